"""The deliberately bad canary (classes swapped) and the demo's offline drift estimate."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from serving.contract import modelcard
from serving.demo.badmodel import build_swapped_package, with_version
from serving.demo.rollout import offline_drift, traffic_data
from tests.modelfactory import breast_cancer, build_package


@pytest.fixture(scope="module")
def pkgs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    v2, _ = build_package(root / "v2", "m", "2.0.0", "random_forest", 0)
    return v2, build_swapped_package(v2, root / "bad", "2.0.1"), with_version(v2, root / "same", "2.0.2")


def _run(pkg, x):
    sess = ort.InferenceSession(str(modelcard.onnx_path(pkg)), providers=["CPUExecutionProvider"])
    return sess.run(["label", "probabilities"], {"input": x})


def test_swapped_package_mirrors_the_source_and_verifies(pkgs):
    src, bad, same = pkgs
    x, y, _, _ = breast_cancer()
    lab, proba = _run(src, x)
    blab, bproba = _run(bad, x)
    np.testing.assert_allclose(bproba, proba[:, ::-1])
    assert (blab == 1 - lab).all()
    assert (lab == y).mean() > 0.95 and (blab == y).mean() < 0.05
    card = modelcard.verify_package(bad)  # sha256 of the edited graph matches its card
    assert card["version"] == "2.0.1" and "classes swapped" in card["estimator"]
    assert modelcard.verify_package(same)["version"] == "2.0.2"
    np.testing.assert_array_equal(_run(same, x)[1], proba)


def test_offline_drift_tells_the_bad_canary_from_the_good(pkgs):
    src, bad, same = pkgs
    x, y = traffic_data(modelcard.load_card(src))
    assert y is not None and x.shape[1] == 30  # the card's sklearn:breast_cancer source was loaded
    assert offline_drift(src, same, x) == pytest.approx(0.0)
    assert offline_drift(src, bad, x) > 0.15
