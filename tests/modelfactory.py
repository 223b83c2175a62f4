"""Build real model packages (ONNX + model card) quickly for tests of the serving side.

The pipeline tests exercise the KFP components themselves; tests of the runtime, batch scoring
and rollouts only need a valid package fast, so this trains a small sklearn pipeline on the
bundled breast_cancer data and exports/packages it with the pipeline's own core functions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pipelines.core import export, package
from serving.contract import modelcard


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
    onnx_bytes = export.to_onnx(pipe, X.shape[1])
    card = package.build_card(
        name=name,
        version=version,
        onnx_bytes=onnx_bytes,
        feature_names=features,
        class_names=class_names,
        training_data={"fingerprint": "test", "rows": int(X.shape[0]), "source": "sklearn:breast_cancer"},
        estimator=estimator,
        pipeline_run_id="test",
    )
    return modelcard.write_package(out_root, card, onnx_bytes), pipe
