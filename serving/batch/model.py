"""A verified model package with its onnxruntime session, as the batch engine scores with it."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from serving.contract import modelcard
from serving.contract.session import session_options

PROB_PREFIX = "prob_"


@dataclass(frozen=True)
class BatchModel:
    """A verified model package with its onnxruntime session."""

    name: str
    version: str
    features: list[str]
    input_name: str
    classes: list[Any]
    class_names: list[str]
    session: ort.InferenceSession = field(repr=False)

    @property
    def prob_columns(self) -> list[str]:
        return prob_column_names(self.class_names)

    def score(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels int64 [n], probabilities float32 [n, n_classes]) for a float32 [n, n_features] matrix."""
        label, proba = self.session.run(["label", "probabilities"], {self.input_name: matrix})
        return label, proba


def prob_column_names(class_names: list[str]) -> list[str]:
    """``prob_<class name>`` with anything but letters, digits, '-' and '.' turned into '_'; unique."""
    names = [
        PROB_PREFIX + (re.sub(r"[^0-9A-Za-z.-]+", "_", str(c)).strip("_") or str(i))
        for i, c in enumerate(class_names)
    ]
    if len(set(names)) != len(names):  # two class names collapse to one: fall back to indices
        names = [f"{PROB_PREFIX}{i}" for i in range(len(class_names))]
    return names


def load_model(model_dir: str | os.PathLike, threads: int = 0, spinning: bool = False) -> BatchModel:
    """Find the package under ``model_dir``, verify its sha256 and open an onnxruntime session."""
    pkg = modelcard.find_package(model_dir)
    card = modelcard.verify_package(pkg)
    inputs = card["inputs"]
    if len(inputs) != 1 or inputs[0].get("datatype") != "FP32" or not inputs[0].get("features"):
        raise modelcard.ModelPackageError(
            f"model card in {str(pkg)!r} must declare one FP32 input with feature names "
            "(inputs[0].features); re-package the model with the training pipeline"
        )
    sess = ort.InferenceSession(
        str(modelcard.onnx_path(pkg)), session_options(threads, spinning), providers=["CPUExecutionProvider"]
    )
    outputs = {o.name for o in sess.get_outputs()}
    if not {"label", "probabilities"} <= outputs:
        raise modelcard.ModelPackageError(
            f"{str(modelcard.onnx_path(pkg))!r} has outputs {sorted(outputs)}, expected 'label' and "
            "'probabilities' (export with skl2onnx options zipmap=False)"
        )
    n_classes = sess.get_outputs()[[o.name for o in sess.get_outputs()].index("probabilities")].shape[-1]
    classes = list(card.get("classes") or [])
    if not classes and isinstance(n_classes, int):
        classes = list(range(n_classes))
    class_names = [str(c) for c in (card.get("class_names") or classes)]
    return BatchModel(
        name=card["name"],
        version=card["version"],
        features=list(inputs[0]["features"]),
        input_name=inputs[0].get("name", sess.get_inputs()[0].name),
        classes=classes,
        class_names=class_names,
        session=sess,
    )
