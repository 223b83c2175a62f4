"""Kubeflow Pipelines (v2) components and pipelines that train, verify and package ONNX models."""

__version__ = "0.1.0"
