"""The ONNX KServe runtime, offline batch scoring and the rollout controller."""

__version__ = "0.1.0"
