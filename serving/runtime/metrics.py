"""Prometheus metrics of the runtime (names, labels, buckets: ``serving.contract.signals``; README contract).

With ``--workers > 1`` every uvicorn worker is its own process: ``serving.__main__`` then points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder before prometheus_client is imported, and
:func:`exposition` aggregates all processes' files with ``MultiProcessCollector``.
"""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import exposition as prom_exposition

from serving.contract import signals

REQUESTS = Counter(
    signals.REQUESTS,
    "Inference requests answered, by model version, protocol and status (HTTP code or gRPC code name)",
    signals.REQUESTS_LABELS,
)
LATENCY = Histogram(
    signals.REQUEST_DURATION,
    "Inference request latency inside the server, from the first byte read to the answer",
    signals.REQUEST_DURATION_LABELS,
    buckets=signals.LATENCY_BUCKETS,
)
SCORE = Histogram(
    signals.PREDICTION_SCORE,
    "Predicted score per row: P(positive class) for binary models, P(predicted class) for multiclass",
    signals.PREDICTION_SCORE_LABELS,
    buckets=signals.SCORE_BUCKETS,
)
FAULT_INJECTION = Gauge(
    signals.FAULT_INJECTION,
    "Test/demo fault injection setting of this server (0 = off): error_rate in [0, 1], latency_ms",
    signals.FAULT_INJECTION_LABELS,
    multiprocess_mode="max",
)
PREDICTED_CLASS = Counter(
    signals.PREDICTED_CLASS,
    "Predicted rows by class label",
    signals.PREDICTED_CLASS_LABELS,
)
FEEDBACK = Counter(
    signals.FEEDBACK,
    "Rows of labelled feedback counted by this replica, by the version that answered and outcome "
    "(correct/incorrect): the accuracy gate's input",
    signals.FEEDBACK_LABELS,
)
FEEDBACK_NOT_COUNTED = Counter(
    signals.FEEDBACK_NOT_COUNTED,
    "Feedback ids this replica did not count, by reason: duplicate, unknown_id (the token does not "
    "verify), expired (older than the feedback TTL or than what the replica remembers)",
    signals.FEEDBACK_NOT_COUNTED_LABELS,
)


def feedback(name: str, own_version: str, tally) -> None:
    """Export one feedback request's :class:`serving.runtime.feedback.Tally`: counted rows under the
    version that answered (the token's); ids not counted under theirs, or this replica's when the
    token did not verify."""
    for outcome, by_version in ((signals.CORRECT, tally.correct), (signals.INCORRECT, tally.incorrect)):
        for version, n in by_version.items():
            FEEDBACK.labels(name, version, outcome).inc(n)
    for reason, ids in tally.not_counted.items():
        for _, version in ids:
            FEEDBACK_NOT_COUNTED.labels(name, version or own_version, reason).inc()


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
