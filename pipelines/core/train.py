"""Build and fit the inference pipeline: one sklearn ``Pipeline`` (preprocessing + estimator).

The estimator is picked by name from :data:`ESTIMATORS`, a fixed table of classifiers that skl2onnx
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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sklearn.base import ClassifierMixin
    from sklearn.pipeline import Pipeline

from serving.contract.errors import MlrolloutError


@dataclass(frozen=True)
class Estimator:
    """A registered classifier: ``factory()`` builds it with its defaults (``random_state`` is then
    set to the run's seed), ``scale`` says whether it gets a ``StandardScaler``."""

    factory: Callable[[], ClassifierMixin]
    scale: bool


# sklearn is imported only when an estimator is built: the CLI's --help reads the names cheaply
def _logistic_regression() -> ClassifierMixin:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=5000)


def _random_forest() -> ClassifierMixin:
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=100, n_jobs=1)


def _hist_gradient_boosting() -> ClassifierMixin:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier()


def _extra_trees() -> ClassifierMixin:
    from sklearn.ensemble import ExtraTreesClassifier

    return ExtraTreesClassifier(n_estimators=100, n_jobs=1)


def _gradient_boosting() -> ClassifierMixin:
    from sklearn.ensemble import GradientBoostingClassifier

    return GradientBoostingClassifier()


def _decision_tree() -> ClassifierMixin:
    from sklearn.tree import DecisionTreeClassifier

    return DecisionTreeClassifier()


ESTIMATORS: Mapping[str, Estimator] = MappingProxyType(
    {
        "logistic_regression": Estimator(_logistic_regression, scale=True),
        "random_forest": Estimator(_random_forest, scale=False),
        "hist_gradient_boosting": Estimator(_hist_gradient_boosting, scale=False),
        "extra_trees": Estimator(_extra_trees, scale=False),
        "gradient_boosting": Estimator(_gradient_boosting, scale=False),
        "decision_tree": Estimator(_decision_tree, scale=False),
    }
)


class TrainError(MlrolloutError, ValueError):
    """The estimator or its hyperparameters are not usable."""


def estimator_names() -> str:
    """The registered names, comma-separated (for help texts and error messages)."""
    return ", ".join(ESTIMATORS)


def lookup(estimator: str) -> Estimator:
    """The registry entry of ``estimator``; anything but a registered name is refused (one line)."""
    entry = ESTIMATORS.get(estimator) if isinstance(estimator, str) else None
    if entry is None:
        raise TrainError(f"unknown estimator {estimator!r}: use one of {estimator_names()}")
    return entry


def build_pipeline(
    estimator: str = "logistic_regression", hyperparameters: dict | None = None, seed: int = 42
) -> Pipeline:
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    entry = lookup(estimator)
    est = entry.factory()
    if "random_state" in est.get_params(deep=False):
        est.set_params(random_state=seed)
    params = dict(hyperparameters or {})
    unknown = sorted(set(params) - set(est.get_params(deep=False)))
    if unknown:
        raise TrainError(
            f"unknown hyperparameter(s) for {estimator}: {', '.join(unknown)} "
            f"(valid: {', '.join(sorted(est.get_params(deep=False)))})"
        )
    est.set_params(**params)
    steps: list[tuple[str, Any]] = [("impute", SimpleImputer(strategy="median"))]
    if entry.scale:
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
