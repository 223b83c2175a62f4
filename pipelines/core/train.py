"""Build and fit the inference pipeline: one sklearn ``Pipeline`` (preprocessing + estimator).

Preprocessing depends on the estimator family. Linear models get median imputation and
standardisation. Tree ensembles get imputation only: they do not need scaling, and a float32
ONNX graph of a scaled tree model can cross split thresholds differently from sklearn's float64
scaling (|dp| ~ 2e-3 for HistGradientBoosting + StandardScaler), while without scaling trees compare
float32 values in both runtimes and parity is exact to ~1e-7.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

ESTIMATORS = ("logistic_regression", "random_forest", "hist_gradient_boosting")


class TrainError(ValueError):
    """The estimator or its hyperparameters are not usable."""


def _defaults(estimator: str, seed: int) -> tuple[Any, bool]:
    """Returns (estimator instance, needs_scaling)."""
    if estimator == "logistic_regression":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(max_iter=5000, random_state=seed), True
    if estimator == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        return RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1), False
    if estimator == "hist_gradient_boosting":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(random_state=seed), False
    if estimator.startswith("sklearn.") and estimator.count(".") >= 2:
        module, _, cls_name = estimator.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except (ImportError, AttributeError) as e:
            raise TrainError(f"estimator {estimator!r} cannot be imported: {e}") from e
        from sklearn.base import is_classifier

        est = cls()
        if not is_classifier(est) or not hasattr(est, "predict_proba"):
            raise TrainError(f"estimator {estimator!r} is not a classifier with predict_proba")
        if "random_state" in est.get_params():
            est.set_params(random_state=seed)
        return est, True
    raise TrainError(
        f"unknown estimator {estimator!r}: use one of {', '.join(ESTIMATORS)} "
        "or a scikit-learn classifier class path such as 'sklearn.ensemble.ExtraTreesClassifier'"
    )


def build_pipeline(
    estimator: str = "logistic_regression", hyperparameters: dict | None = None, seed: int = 42
) -> Pipeline:
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import StandardScaler

    est, scale = _defaults(estimator, seed)
    params = dict(hyperparameters or {})
    unknown = sorted(set(params) - set(est.get_params(deep=False)))
    if unknown:
        raise TrainError(
            f"unknown hyperparameter(s) for {estimator}: {', '.join(unknown)} "
            f"(valid: {', '.join(sorted(est.get_params(deep=False)))})"
        )
    est.set_params(**params)
    steps: list[tuple[str, Any]] = [("impute", SimpleImputer(strategy="median"))]
    if scale:
        steps.append(("scale", StandardScaler()))
    steps.append(("model", est))
    return Pipeline(steps)


def train(
    X: np.ndarray,
    y: np.ndarray,
    estimator: str = "logistic_regression",
    hyperparameters: dict | None = None,
    seed: int = 42,
) -> Pipeline:
    pipe = build_pipeline(estimator, hyperparameters, seed)
    try:
        return pipe.fit(np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.int64))
    except (ValueError, TypeError) as e:
        raise TrainError(f"training {estimator} failed: {e}") from e


def effective_hyperparameters(pipe: Pipeline) -> dict[str, Any]:
    """The estimator's parameters as JSON-friendly values (for the model card)."""
    out: dict[str, Any] = {}
    for k, v in pipe.named_steps["model"].get_params(deep=False).items():
        out[k] = v if isinstance(v, str | int | float | bool | type(None)) else repr(v)
    return out
