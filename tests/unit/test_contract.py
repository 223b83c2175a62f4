"""serving.contract: the signals (score, metric names, buckets), the session options, the error base."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from serving.contract import errors, signals
from serving.contract.session import session_options

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT / "serving" / "contract"


def test_scores_are_clipped_into_the_histogram_range():
    # float32 tree ensembles can give 1.0000004 (seen with random forests); it must not count as +Inf
    proba = np.array([[-4e-7, 1.0000004], [0.5, 0.5]], dtype=np.float32)
    out = signals.score(proba)
    assert out.max() <= 1.0 and out.min() >= 0.0
    np.testing.assert_allclose(out, [1.0, 0.5])


def test_scores_are_positive_class_for_binary_and_predicted_class_otherwise():
    binary = np.array([[0.9, 0.1], [0.3, 0.7]], np.float32)
    np.testing.assert_allclose(signals.score(binary), [0.1, 0.7])
    multi = np.array([[0.2, 0.5, 0.3]], np.float32)
    np.testing.assert_allclose(signals.score(multi), [0.5])


def test_score_buckets_are_sorted_and_end_at_one():
    for buckets in (signals.SCORE_BUCKETS, signals.LATENCY_BUCKETS):
        assert list(buckets) == sorted(set(buckets)) and buckets[0] > 0
    assert signals.SCORE_BUCKETS[-1] == 1.0


def test_the_readme_documents_every_exported_metric():
    """The names are a public contract: serving/README.md's metrics table names what the runtime exports."""
    readme = (ROOT / "serving" / "README.md").read_text()
    for name in (
        signals.REQUESTS_TOTAL,
        signals.REQUEST_DURATION,
        signals.PREDICTION_SCORE,
        signals.PREDICTED_CLASS_TOTAL,
        signals.FAULT_INJECTION,
    ):
        assert f"`{name}" in readme, name


def test_the_runtime_registers_the_contract_names_labels_and_buckets():
    from serving.runtime import metrics

    assert metrics.SCORE._name == signals.PREDICTION_SCORE
    assert tuple(metrics.SCORE._labelnames) == signals.PREDICTION_SCORE_LABELS
    assert tuple(metrics.SCORE._upper_bounds[:-1]) == signals.SCORE_BUCKETS
    assert tuple(metrics.LATENCY._upper_bounds[:-1]) == signals.LATENCY_BUCKETS
    assert tuple(metrics.REQUESTS._labelnames) == signals.REQUESTS_LABELS


@pytest.mark.parametrize(("threads", "spinning"), [(1, False), (0, True)])
def test_session_options(threads, spinning):
    so = session_options(threads, spinning)
    assert so.intra_op_num_threads == threads and so.inter_op_num_threads == 1
    flag = "1" if spinning else "0"
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == flag


def test_the_contract_imports_nothing_else_of_the_project():
    for path in CONTRACT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                top = name.split(".")[0]
                if top in ("serving", "pipelines", "infra", "tests"):
                    assert name.startswith("serving.contract"), f"{path.name} imports {name}"


def test_project_errors_derive_from_the_base():
    """Every error class the product defines (found by reading the source, so a new one cannot be
    missed) is an MlrolloutError: the CLIs catch exactly those."""
    import importlib

    root = CONTRACT.parents[1]
    found = []
    for pkg in (
        "pipelines",
        "serving/contract",
        "serving/runtime",
        "serving/batch",
        "serving/rollout",
        "serving/demo",
    ):
        for path in sorted((root / pkg).rglob("*.py")):
            if pkg == "pipelines" and "compiled" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and node.bases:
                    module = ".".join(path.relative_to(root).with_suffix("").parts)
                    found.append((module.removesuffix(".__init__"), node.name))
    assert len(found) >= 15, found
    for module, name in found:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, errors.MlrolloutError), f"{module}.{name} is not an MlrolloutError"
