"""Prometheus metrics of the runtime (names and labels are the README's contract).

With ``--workers > 1`` every uvicorn worker is its own process: ``serving.__main__`` then points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before prometheus_client is imported, and
:func:`exposition` aggregates all processes' files with ``MultiProcessCollector``.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import exposition as prom_exposition

SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05, 0.10, ..., 1.0
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

REQUESTS = Counter(
    "mlrollout_requests",
    "Inference requests answered, by model version, protocol and status (HTTP code or gRPC code name)",
    ["model", "version", "protocol", "status"],
)
LATENCY = Histogram(
    "mlrollout_request_duration_seconds",
    "Inference request latency inside the server, from the first byte read to the answer",
    ["model", "version", "protocol"],
    buckets=LATENCY_BUCKETS,
)
SCORE = Histogram(
    "mlrollout_prediction_score",
    "Predicted score per row: P(positive class) for binary models, P(predicted class) for multiclass",
    ["model", "version"],
    buckets=SCORE_BUCKETS,
)
FAULT_INJECTION = Gauge(
    "mlrollout_fault_injection",
    "Test/demo fault injection setting of this server (0 = off): error_rate in [0, 1], latency_ms",
    ["setting"],
    multiprocess_mode="max",
)
PREDICTED_CLASS = Counter(
    "mlrollout_predicted_class",
    "Predicted rows by class label",
    ["model", "version", "class"],
)


def set_fault_injection(error_rate: float, latency_ms: float) -> None:
    """Always exported, so "no fault injection" is visible as 0 and not as a missing series."""
    FAULT_INJECTION.labels("error_rate").set(error_rate)
    FAULT_INJECTION.labels("latency_ms").set(latency_ms)


class ModelMetrics:
    """Label-bound children for one model version, resolved once (label lookup costs on every call)."""

    def __init__(self, name: str, version: str, classes: tuple = ()):
        self.name, self.version = name, version
        self._score = SCORE.labels(name, version)
        self._classes = {c: PREDICTED_CLASS.labels(name, version, str(c)) for c in classes}
        self._latency = {p: LATENCY.labels(name, version, p) for p in ("v1", "v2", "grpc-v2")}
        self._requests: dict[tuple[str, str], object] = {}

    def request(self, protocol: str, status: str | int, seconds: float) -> None:
        key = (protocol, str(status))
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = REQUESTS.labels(self.name, self.version, protocol, key[1])
        child.inc()
        lat = self._latency.get(protocol)
        if lat is None:
            lat = self._latency[protocol] = LATENCY.labels(self.name, self.version, protocol)
        lat.observe(seconds)

    def predictions(self, scores, labels) -> None:
        observe = self._score.observe
        for s in scores.tolist():
            observe(s)
        values, counts = _unique_counts(labels)
        for v, n in zip(values, counts, strict=True):
            child = self._classes.get(v)
            if child is None:
                child = self._classes[v] = PREDICTED_CLASS.labels(self.name, self.version, str(v))
            child.inc(n)


def _unique_counts(labels):
    if len(labels) == 1:
        return [labels.tolist()[0]], [1]
    import numpy as np

    values, counts = np.unique(labels, return_counts=True)
    return values.tolist(), counts.tolist()


def exposition(accept: str | None) -> tuple[bytes, str]:
    """The /metrics body and its content type; all worker processes' metrics in multiprocess mode."""
    encoder, content_type = prom_exposition.choose_encoder(accept or "")
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return encoder(registry), content_type
    return encoder(REGISTRY), content_type
