"""Export the sklearn inference pipeline to ONNX and prove the two agree.

The graph has one float32 input ``input`` ``[-1, n_features]`` and two plain-tensor outputs,
``label`` (int64 ``[-1]``) and ``probabilities`` (float32 ``[-1, n_classes]``): ZipMap is off.
The target opset is pinned so that a skl2onnx upgrade cannot silently change the graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.core.train import estimator_names
from serving.contract.errors import MlrolloutError

TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
INPUT_NAME = "input"
OUTPUT_NAMES = ("label", "probabilities")
# skl2onnx names the graph with a fresh uuid4 unless told: the one field that made two identical
# trainings give different bytes, so a different sha256 in the card (reproducible packages need it fixed)
GRAPH_NAME = "mlrollout"


class ExportError(MlrolloutError, ValueError):
    """skl2onnx cannot convert the model, or the graph does not have the contract's shape."""


class ParityError(MlrolloutError, ValueError):
    """onnxruntime and sklearn disagree beyond the thresholds."""


def to_onnx(model: Any, n_features: int, target_opset: dict[str, int] | None = None) -> bytes:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from skl2onnx.common.exceptions import MissingConverter, MissingShapeCalculator

    est = model.steps[-1][1] if hasattr(model, "steps") else model
    try:
        onx = convert_sklearn(
            model,
            initial_types=[(INPUT_NAME, FloatTensorType([None, int(n_features)]))],
            options={"zipmap": False},
            target_opset=target_opset or TARGET_OPSET,
            name=GRAPH_NAME,
        )
    except (MissingShapeCalculator, MissingConverter, RuntimeError, NotImplementedError) as e:
        raise ExportError(
            f"skl2onnx cannot convert estimator {type(est).__module__}.{type(est).__name__} to ONNX "
            f"({type(e).__name__}): use one of {estimator_names()} (pipelines/core/train.py ESTIMATORS: "
            "each converts and passes parity) or register a skl2onnx converter for it"
        ) from e
    names = [o.name for o in onx.graph.output]
    if tuple(names) != OUTPUT_NAMES:
        raise ExportError(f"ONNX outputs are {names}, expected {list(OUTPUT_NAMES)} (ZipMap must be off)")
    return onx.SerializeToString()


def check_convertible(model: Any, n_features: int) -> None:
    """Fail fast (right after training) when skl2onnx cannot convert the model; the same
    :class:`ExportError` the export step would raise later, before evaluation time is spent."""
    to_onnx(model, n_features)


def session(onnx_bytes: bytes, threads: int = 1) -> Any:
    import onnxruntime as ort

    from serving.contract.session import session_options

    return ort.InferenceSession(onnx_bytes, session_options(threads), providers=["CPUExecutionProvider"])


def io_schema(onnx_bytes: bytes) -> dict[str, Any]:
    """Input/output names, ONNX types and shapes as onnxruntime reports them."""
    sess = session(onnx_bytes)
    return {
        "inputs": [{"name": i.name, "type": i.type, "shape": list(i.shape)} for i in sess.get_inputs()],
        "outputs": [{"name": o.name, "type": o.type, "shape": list(o.shape)} for o in sess.get_outputs()],
    }


def opset(onnx_bytes: bytes) -> dict[str, int]:
    import onnx

    m = onnx.load_from_string(onnx_bytes)
    return {d.domain or "ai.onnx": int(d.version) for d in m.opset_import}


def parity(model: Any, onnx_bytes: bytes, X: np.ndarray) -> dict[str, Any]:
    """sklearn ``predict_proba`` on float64 rows (as served by sklearn) vs onnxruntime on float32."""
    X = np.asarray(X, dtype=np.float64)
    sk_proba = model.predict_proba(X)
    sk_label = np.asarray(model.classes_)[np.argmax(sk_proba, axis=1)]
    label, proba = session(onnx_bytes).run(list(OUTPUT_NAMES), {INPUT_NAME: X.astype(np.float32)})
    diff = np.abs(sk_proba - proba)
    return {
        "rows": len(X),
        "max_abs_prob_diff": float(diff.max()) if diff.size else 0.0,
        "mean_abs_prob_diff": float(diff.mean()) if diff.size else 0.0,
        "label_agreement": float(np.mean(label == sk_label)) if len(X) else 1.0,
        "label_mismatches": int(np.sum(label != sk_label)),
        "onnx_output_dtypes": {"label": str(label.dtype), "probabilities": str(proba.dtype)},
    }


def raise_for_parity(
    result: dict[str, Any], max_abs_prob_diff: float = 1e-4, min_label_agreement: float = 1.0
) -> None:
    problems = []
    if result["max_abs_prob_diff"] >= max_abs_prob_diff:
        problems.append(
            f"max abs probability difference {result['max_abs_prob_diff']:.3g} >= {max_abs_prob_diff:g}"
        )
    if result["label_agreement"] < min_label_agreement:
        problems.append(
            f"label agreement {result['label_agreement']:.4f} < {min_label_agreement} "
            f"({result['label_mismatches']} of {result['rows']} rows differ)"
        )
    if problems:
        raise ParityError(
            "ONNX parity check failed (onnxruntime vs sklearn on held-out rows): " + "; ".join(problems)
        )
