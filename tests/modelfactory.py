"""Build real model packages (ONNX + model card) quickly for tests of the serving side.

The pipeline tests exercise the KFP components themselves; tests of the runtime, batch scoring
and rollouts only need a valid package fast, so this trains a small sklearn pipeline on the
bundled breast_cancer data and writes it through the same ``pipelines.core.modelcard`` code.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import onnx
import skl2onnx
import sklearn
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pipelines.core import modelcard

TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}


def breast_cancer() -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    data = load_breast_cancer()
    return (
        data.data.astype(np.float32),
        data.target.astype(np.int64),
        list(data.feature_names),
        list(data.target_names),
    )


def build_package(
    out_root: str | Path,
    name: str = "breast-cancer",
    version: str = "1.0.0",
    estimator: str = "logistic_regression",
    seed: int = 0,
) -> tuple[Path, Pipeline]:
    """Train, export and package; returns (``<out_root>/<name>``, the fitted sklearn pipeline)."""
    X, y, features, class_names = breast_cancer()
    est = (
        LogisticRegression(max_iter=2000, random_state=seed)
        if estimator == "logistic_regression"
        else RandomForestClassifier(n_estimators=30, random_state=seed)
    )
    pipe = Pipeline([("scale", StandardScaler()), ("model", est)]).fit(X, y)
    onx = to_onnx(
        pipe,
        initial_types=[("input", FloatTensorType([None, X.shape[1]]))],
        options={"zipmap": False},
        target_opset=TARGET_OPSET,
    )
    card = {
        "name": name,
        "version": version,
        "format": "onnx",
        "opset": {d.domain or "ai.onnx": d.version for d in onx.opset_import},
        "task": "binary_classification",
        "classes": [0, 1],
        "class_names": class_names,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, X.shape[1]], "features": features}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
        ],
        "training_data": {"fingerprint": "test", "rows": int(X.shape[0]), "source": "sklearn:breast_cancer"},
        "metrics": {},
        "estimator": estimator,
        "hyperparameters": {},
        "library_versions": {
            "scikit-learn": sklearn.__version__,
            "skl2onnx": skl2onnx.__version__,
            "onnx": onnx.__version__,
        },
        "created_at": dt.datetime.now(dt.UTC).isoformat(),
        "pipeline_run_id": "test",
    }
    return modelcard.write_package(out_root, card, onx.SerializeToString()), pipe
