"""The local stack: two real runtimes, HAProxy in front, Prometheus, a bounded traffic generator."""

from serving.demo.localstack.procs import REGISTRY, ProcessRegistry
from serving.demo.localstack.stack import LocalStack
from serving.demo.localstack.traffic import TrafficGenerator, TrafficResult

__all__ = ["REGISTRY", "LocalStack", "ProcessRegistry", "TrafficGenerator", "TrafficResult"]
