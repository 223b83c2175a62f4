"""The serving signals: what the runtime exports and the rollout controller reads, written once.

The runtime's exporter (``serving.runtime.metrics``) registers these names, labels and buckets; the
rollout's metrics providers (``serving.rollout.metrics``) query and parse them; batch scoring and the
demo's offline drift use the same :func:`score`. The names are also the README's public contract
(``serving/README.md``, "Metrics").

prometheus_client appends ``_total`` to a counter's samples and ``_bucket`` / ``_count`` / ``_sum``
to a histogram's; the ``*_TOTAL`` / ``*_BUCKET`` constants are those sample names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the score works on any numpy array; nothing here imports numpy
    import numpy as np

# --- metric names (as registered)
REQUESTS = "mlrollout_requests"  # counter
REQUEST_DURATION = "mlrollout_request_duration_seconds"  # histogram
PREDICTION_SCORE = "mlrollout_prediction_score"  # histogram of score() per row
PREDICTED_CLASS = "mlrollout_predicted_class"  # counter
FAULT_INJECTION = "mlrollout_fault_injection"  # gauge (test/demo fault knob; 0 = off)
FEEDBACK = "mlrollout_feedback"  # counter: rows of labelled feedback, by the version that answered
FEEDBACK_NOT_COUNTED = "mlrollout_feedback_not_counted"  # counter: feedback ids not counted, by reason

# --- sample names (what /metrics shows and PromQL selects)
REQUESTS_TOTAL = f"{REQUESTS}_total"
REQUEST_DURATION_BUCKET = f"{REQUEST_DURATION}_bucket"
REQUEST_DURATION_COUNT = f"{REQUEST_DURATION}_count"
PREDICTION_SCORE_BUCKET = f"{PREDICTION_SCORE}_bucket"
PREDICTION_SCORE_COUNT = f"{PREDICTION_SCORE}_count"
PREDICTED_CLASS_TOTAL = f"{PREDICTED_CLASS}_total"
FEEDBACK_TOTAL = f"{FEEDBACK}_total"
FEEDBACK_NOT_COUNTED_TOTAL = f"{FEEDBACK_NOT_COUNTED}_total"
# not the runtime's: the local stack's HAProxy mirror (serving/demo/localstack/mirror.lua) counts rows of
# mirrored requests whose predicted label the canary's answer and stable's answer to the same request
# agree on, by model, the canary's version, stable's and RESULT (AGREE or DISAGREE)
MIRROR_LABEL_ROWS_TOTAL = "mlrollout_mirror_label_rows_total"

# --- label keys
MODEL = "model"
VERSION = "version"
PROTOCOL = "protocol"  # "v1", "v2", "grpc-v2"
STATUS = "status"  # HTTP code or gRPC code name
CLASS = "class"  # predicted class label
SETTING = "setting"  # fault injection: "error_rate", "latency_ms"
OUTCOME = "outcome"  # feedback: CORRECT or INCORRECT
REASON = "reason"  # feedback not counted: "duplicate", "unknown_id", "expired"
LE = "le"  # a histogram bucket's upper bound (Prometheus)
CORRECT, INCORRECT = "correct", "incorrect"
RESULT = "result"  # label agreement of a mirrored row: AGREE or DISAGREE
AGREE, DISAGREE = "agree", "disagree"

REQUESTS_LABELS = (MODEL, VERSION, PROTOCOL, STATUS)
REQUEST_DURATION_LABELS = (MODEL, VERSION, PROTOCOL)
PREDICTION_SCORE_LABELS = (MODEL, VERSION)
PREDICTED_CLASS_LABELS = (MODEL, VERSION, CLASS)
FAULT_INJECTION_LABELS = (SETTING,)
FEEDBACK_LABELS = (MODEL, VERSION, OUTCOME)
FEEDBACK_NOT_COUNTED_LABELS = (MODEL, VERSION, REASON)

# --- buckets (upper bounds; Prometheus adds +Inf)
SCORE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05, 0.10, ..., 1.0
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def score(proba: np.ndarray) -> np.ndarray:
    """The score the drift gate histograms, one per row of ``proba`` (rows x classes):
    P(positive class) for binary models, P(predicted class) otherwise.

    Clipped to [0, 1]: float32 tree ensembles can sum to 1.0000004, which would land in the +Inf bucket.
    """
    s = proba[:, 1] if proba.shape[1] == 2 else proba.max(axis=1)
    return s.clip(0.0, 1.0)
