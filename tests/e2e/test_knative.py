"""The `knativeCanary` strategy on the `knative` profile (PROFILE=knative make cluster): KServe's classic
`canaryTrafficPercent` in Knative mode, routed by Kourier. Skipped, with how to get it, when the cluster
was brought up without Knative."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e import helpers

pytestmark = pytest.mark.e2e

CHART = Path(__file__).resolve().parents[2] / "helm" / "mlrollout-model"
VERSIONS = helpers.model_versions()
V1, V2 = VERSIONS["v1"], VERSIONS["v2"]


@pytest.fixture(scope="module")
def knative(k):
    if k.run("get", "crd", "services.serving.knative.dev", check=False, timeout=30) == "":
        pytest.skip(
            "Knative Serving is not installed: run `PROFILE=knative make cluster` for the knativeCanary e2e"
        )


@pytest.fixture(scope="module")
def kourier_url(k, knative):
    with k.port_forward("kourier-system", "svc/kourier", 80) as port:
        yield f"http://127.0.0.1:{port}"


def wait_latest_revision_ready(k, release: str, timeout_s: float = 600) -> None:
    """Knative mode: the latest created revision is the latest ready one (Ready alone can be stale)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pred = k.json("-n", k.namespace, "get", "inferenceservice", release).get("status", {})
        pred = pred.get("components", {}).get("predictor", {})
        if pred.get("latestCreatedRevision") and pred.get("latestCreatedRevision") == pred.get(
            "latestReadyRevision"
        ):
            return
        assert time.monotonic() < deadline, f"{release}: latest revision not ready: {pred}"
        time.sleep(3)


def upgrade(k, release: str, *sets: str) -> None:
    args = ["upgrade", "--install", release, str(CHART), "--reuse-values"]
    for s in sets:
        args += ["--set", s]
    k.helm_run(*args, "--timeout", "10m")  # no --wait: Helm 4's kstatus misreads InferenceServices
    wait_latest_revision_ready(k, release)
    k.wait_isvcs_ready(f"app.kubernetes.io/instance={release}")


def test_knative_canary_split_promote_and_rollback(k, kourier_url, packages):
    release = "bc-knative"
    base = [
        "--set", f"fullnameOverride={release}", "--set", f"model.name={release}",
        "--set", "storage.existingSecret=kfp-s3-credentials", "--set", "strategy.type=knativeCanary",
        "--set", f"model.storageUri={packages['v1']}", "--set", f"model.version={V1}",
    ]  # fmt: skip
    k.helm_run("upgrade", "--install", release, str(CHART), *base, "--timeout", "10m")
    try:
        wait_latest_revision_ready(k, release)
        k.wait_isvcs_ready(f"app.kubernetes.io/instance={release}")
        isvc = k.json("-n", k.namespace, "get", "inferenceservice", release)
        host = isvc["status"]["url"].split("://", 1)[1]

        def measure(n: int):
            time.sleep(3)
            return helpers.predict_many(kourier_url, host, release, n)

        assert helpers.versions_seen(measure(100)) == {V1: 100}
        # canary: a new revision with the v2 model gets 10% (then 50%)
        upgrade(k, release, f"model.storageUri={packages['v2']}", f"model.version={V2}",
                "strategy.knativeCanary.trafficPercent=10")  # fmt: skip
        helpers.assert_share(measure(600), V2, 0.10)
        upgrade(k, release, "strategy.knativeCanary.trafficPercent=50")
        helpers.assert_share(measure(400), V2, 0.50)
        # rollback: 0 pins all traffic to the previous rolled-out revision
        upgrade(k, release, "strategy.knativeCanary.trafficPercent=0")
        assert helpers.versions_seen(measure(200)) == {V1: 200}
        # promote: remove the field, the latest revision takes 100%
        upgrade(k, release, "strategy.knativeCanary.trafficPercent=null")
        assert helpers.versions_seen(measure(200)) == {V2: 200}
    finally:
        k.helm_run("uninstall", release, "--wait", check=False)
