"""The local stack: two real runtimes, HAProxy in front, Prometheus, a bounded traffic generator."""

from serving.rollout.localstack.procs import REGISTRY, ProcessRegistry
from serving.rollout.localstack.stack import LocalStack
from serving.rollout.localstack.traffic import TrafficGenerator, TrafficResult

__all__ = ["REGISTRY", "LocalStack", "ProcessRegistry", "TrafficGenerator", "TrafficResult"]
