"""Build and fit the inference pipeline: one sklearn ``Pipeline`` (preprocessing + estimator).

The estimator is picked by name from :data:`REGISTRY`, a fixed table of classifiers that skl2onnx
converts and whose ONNX graph passes the parity check (``tests/unit/test_pipeline_core.py`` trains,
exports and checks every entry). Nothing is imported or called from a user-given path: an unknown
name is refused before anything is constructed.

Preprocessing depends on the estimator family (each entry's ``scale``). Linear models get median
imputation and standardisation. Tree models get imputation only: they do not need scaling, and a
float32 ONNX graph of a scaled tree model can cross split thresholds differently from sklearn's
float64 scaling (|dp| ~ 2e-3 for HistGradientBoosting + StandardScaler), while without scaling trees
compare float32 values in both runtimes and parity is exact to ~1e-6.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.ensemble import (
    ExtraTreesClassifier,
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.tree import DecisionTreeClassifier


@dataclass(frozen=True)
class Estimator:
    """A registered classifier: its class, whether it gets a ``StandardScaler``, and the defaults
    it is built with (``random_state`` is set to the run's seed)."""

    cls: type[ClassifierMixin]
    scale: bool
    params: Mapping[str, Any] = field(default_factory=dict)


REGISTRY: Mapping[str, Estimator] = MappingProxyType(
    {
        "logistic_regression": Estimator(LogisticRegression, True, {"max_iter": 5000}),
        "random_forest": Estimator(RandomForestClassifier, False, {"n_estimators": 100, "n_jobs": 1}),
        "hist_gradient_boosting": Estimator(HistGradientBoostingClassifier, False),
        "extra_trees": Estimator(ExtraTreesClassifier, False, {"n_estimators": 100, "n_jobs": 1}),
        "gradient_boosting": Estimator(GradientBoostingClassifier, False),
        "decision_tree": Estimator(DecisionTreeClassifier, False),
    }
)
ESTIMATORS = tuple(REGISTRY)


class TrainError(ValueError):
    """The estimator or its hyperparameters are not usable."""


def _defaults(estimator: str, seed: int) -> tuple[Any, bool]:
    """Returns (estimator instance, needs_scaling) for a registered name."""
    entry = REGISTRY.get(estimator) if isinstance(estimator, str) else None
    if entry is None:
        raise TrainError(f"unknown estimator {estimator!r}: use one of {', '.join(ESTIMATORS)}")
    est = entry.cls(**entry.params)
    if "random_state" in est.get_params(deep=False):
        est.set_params(random_state=seed)
    return est, entry.scale


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
