"""From the compiled pipeline to rolled-out endpoints, on the live platform (kind via `make cluster`).

1. upload + run pipelines/compiled/training_pipeline.yaml through kfp.Client; its packaged model (in KFP's
   SeaweedFS) is served as v1; v2 (same weights, new version) and a class-swapped bad canary are derived
   from it with serving/demo/badmodel.py and uploaded next to it;
2. the Helm chart (strategy canary) serves v1 Ready through the Envoy Gateway; the HTTPRoute split at 10%
   and 50% is checked per version from the `x-model-version` header within a binomial tolerance; promote;
   roll back a bad canary; `helm test`;
3. `python -m serving.rollout start --router gateway_api` with Prometheus gates drives 10 -> 50 -> 100 and
   promotes a good canary, and rolls a class-swapped canary back on the drift gate;
4. blue-green switch; a rolling update under steady load with no failed request;
5. every model pod of every release carries Pod Security `restricted`'s fields, container by container;
6. the compiled pipeline with `deploy=true` runs progressive-rollout as `kubeflow/pipeline-runner` inside
   KFP, which hands its model to the rollout operator, and the operator promotes it (audit #7).

Chart upgrades never use `helm --wait` for readiness: Helm 4's kstatus reads KServe's observedGeneration,
which is the Deployment's, so it returns early or hangs (audit #3, #9; shown on the control plane in
tests/controlplane/test_waits.py). After a model change the suite waits as the README says: the
predictor Deployment carries the new model URI, then `kubectl rollout status`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import helpers
from tests.podsecurity import assert_restricted_pod

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "mlrollout-model"


MODEL_VERSIONS = helpers.model_versions()
V1, V2, BAD = MODEL_VERSIONS["v1"], MODEL_VERSIONS["v2"], MODEL_VERSIONS["bad"]


# --------------------------------------------------------------------------- pipeline -> packages


def test_pipeline_run_succeeds(pipeline_run):
    assert pipeline_run.state == "SUCCEEDED", (
        f"run {pipeline_run.run_id}: {pipeline_run.state} {pipeline_run.error}"
    )


def test_pipeline_output_is_a_verified_package(packages):
    assert packages["v1"].startswith("s3://mlpipeline/v2/artifacts/")


# --------------------------------------------------------------------------- chart releases


TRACKS = {"canary": ("stable", "canary"), "blueGreen": ("blue", "green"), "rolling": ("",)}


def install(k, release: str, strategy: str, packages: dict[str, str], canary: str = "v2") -> None:
    args = ["upgrade", "--install", release, str(CHART)]
    for s in helpers.chart_sets(release, strategy, packages, MODEL_VERSIONS, canary=canary):
        args += ["--set", s]
    k.helm_run(*args, "--timeout", "10m")
    k.wait_isvcs_ready(f"app.kubernetes.io/instance={release}")
    uris = {
        "stable": packages["v1"],
        "canary": packages[canary],
        "blue": packages["v1"],
        "green": packages[canary],
        "": packages["v1"],
    }
    for track in TRACKS[strategy]:
        k.wait_serving(f"{release}-{track}" if track else release, uris[track])


def route_host(k, release: str) -> str:
    return k.wait_route_programmed(release)["spec"]["hostnames"][0]


def measure(k, gateway_url, release: str, n: int = 400):
    host = route_host(k, release)
    time.sleep(3)  # Envoy picks up the new route configuration asynchronously
    return helpers.predict_many(gateway_url, host, release, n)


@pytest.fixture(scope="module")
def canary(k, packages):
    release = "bc-canary"
    install(k, release, "canary", packages)
    yield release
    k.helm_run("uninstall", release, "--wait", check=False)


def test_v1_from_the_pipeline_is_served_through_the_gateway(k, gateway_url, canary):
    results = measure(k, gateway_url, canary, n=100)
    assert helpers.versions_seen(results) == {V1: 100}


@pytest.mark.parametrize("weight", [10, 50])
def test_canary_split_matches_the_route_weight(k, gateway_url, canary, weight):
    # a weight-only change: no Deployment changes, measure() waits until the gateway has the new route
    k.helm_run("upgrade", canary, str(CHART), "--reuse-values", "--set", f"strategy.canary.weight={weight}")
    helpers.assert_share(measure(k, gateway_url, canary, n=600), V2, weight / 100)


def test_helm_test_sends_a_real_prediction(k, canary):
    proc = k.helm_run("test", canary, "--timeout", "5m")
    assert "Succeeded" in proc.stdout, proc.stdout


def test_promote_sends_everything_to_v2(k, gateway_url, canary, packages):
    # the chart's documented promotion: the stable takes the canary's model, weight back to 0
    k.helm_run(
        "upgrade",
        canary,
        str(CHART),
        "--reuse-values",
        "--set",
        f"model.storageUri={packages['v2']}",
        "--set",
        f"model.version={V2}",
        "--set",
        "strategy.canary.weight=0",
        "--timeout",
        "10m",
    )
    k.wait_serving(f"{canary}-stable", packages["v2"])
    assert helpers.versions_seen(measure(k, gateway_url, canary, n=200)) == {V2: 200}


def test_rollback_of_a_bad_canary(k, gateway_url, canary, packages):
    k.helm_run(
        "upgrade",
        canary,
        str(CHART),
        "--reuse-values",
        "--set",
        f"strategy.canary.storageUri={packages['bad']}",
        "--set",
        f"strategy.canary.version={BAD}",
        "--set",
        "strategy.canary.weight=50",
        "--timeout",
        "10m",
    )
    k.wait_serving(f"{canary}-canary", packages["bad"])
    helpers.assert_share(measure(k, gateway_url, canary, n=400), BAD, 0.5)
    k.helm_run("upgrade", canary, str(CHART), "--reuse-values", "--set", "strategy.canary.weight=0")
    assert helpers.versions_seen(measure(k, gateway_url, canary, n=200)) == {V2: 200}


# --------------------------------------------------------------------------- the rollout controller


def rollout(
    k, prometheus_url, release: str, canary_version: str, report_dir: Path
) -> subprocess.CompletedProcess:
    names = helpers.release_names(release, k.namespace)
    cmd = [
        sys.executable, "-m", "serving.rollout", "start",
        "--router", "gateway_api", "--model", release,
        "--stable-version", V1, "--canary-version", canary_version,
        "--steps", "10,50,100", "--interval", "30s", "--threshold", "2",
        "--route", names["route"],
        "--stable-backend", names["stable_backend"], "--canary-backend", names["canary_backend"],
        "--stable-isvc", names["stable_isvc"], "--canary-isvc", names["canary_isvc"],
        "--metrics", "prometheus", "--prometheus-url", prometheus_url,
        "--min-requests", "20", "--min-predictions", "40",
        "--namespace", k.namespace,  # state: ConfigMap <route>-rollout, owned by the stable InferenceService
        "--report-dir", str(report_dir), "--max-seconds", "900",
    ]  # fmt: skip
    if os.environ.get("KUBECONFIG"):
        cmd += ["--kubeconfig", os.environ["KUBECONFIG"].split(os.pathsep)[0]]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1000)


def shares_over_time(log, version: str, window: float = 20.0) -> list[float]:
    t0 = log[0][0]
    buckets: dict[int, list[str]] = {}
    for t, status, v in log:
        assert status == 200, f"request failed during the rollout: {status} {v}"
        buckets.setdefault(int((t - t0) // window), []).append(v)
    return [sum(v == version for v in vs) / len(vs) for _, vs in sorted(buckets.items()) if len(vs) >= 20]


@pytest.mark.parametrize(
    ("release", "canary_key", "canary_version", "want_rc", "final"),
    [("bc-progressive", "v2", V2, 0, V2), ("bc-drift", "bad", BAD, 3, V1)],
    ids=["good-canary-promoted", "bad-canary-rolled-back"],
)
def test_controller_drives_the_gateway_route(
    k, gateway_url, prometheus_url, packages, tmp_path, release, canary_key, canary_version, want_rc, final
):
    install(k, release, "canary", packages, canary=canary_key)
    try:
        host = route_host(k, release)
        with helpers.Load(gateway_url, host, release, rps=20) as load:
            proc = rollout(k, prometheus_url, release, canary_version, tmp_path)
            time.sleep(5)
        assert proc.returncode == want_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
        shares = shares_over_time(load.log, canary_version)
        assert shares, "no traffic was recorded"
        if want_rc == 0:
            # the canary's share grows step by step (10 -> 50 -> 100) and ends at 100%
            assert shares[0] < 0.35, shares
            assert max(shares) == 1.0 and shares[-1] == 1.0, shares
        else:
            # the drift gate caught the class swap while the canary took at most a partial share
            assert max(shares) < 0.8, shares
            assert "drift" in (proc.stdout + proc.stderr).lower()
        after = helpers.predict_many(gateway_url, host, release, 200)
        assert helpers.versions_seen(after) == {final: 200}
        assert list(tmp_path.glob("*.png")), "the rollout report must include its timeline plot"
    finally:
        k.helm_run("uninstall", release, "--wait", check=False)


# --------------------------------------------------------------------------- blue-green, rolling


def test_blue_green_switch(k, gateway_url, packages):
    release = "bc-bluegreen"
    install(k, release, "blueGreen", packages)
    try:
        assert helpers.versions_seen(measure(k, gateway_url, release, n=100)) == {V1: 100}
        k.helm_run(
            "upgrade",
            release,
            str(CHART),
            "--reuse-values",
            "--set",
            "strategy.blueGreen.blue.active=false",
            "--set",
            "strategy.blueGreen.green.active=true",
        )  # only the route changes; measure() waits until the gateway has it
        assert helpers.versions_seen(measure(k, gateway_url, release, n=100)) == {V2: 100}
    finally:
        k.helm_run("uninstall", release, "--wait", check=False)


def test_rolling_update_fails_no_request(k, gateway_url, packages):
    release = "bc-rolling"
    install(k, release, "rolling", packages)
    try:
        host = route_host(k, release)
        with helpers.Load(gateway_url, host, release, rps=25) as load:
            time.sleep(5)
            k.helm_run(
                "upgrade",
                release,
                str(CHART),
                "--reuse-values",
                "--set",
                f"model.storageUri={packages['v2']}",
                "--set",
                f"model.version={V2}",
                "--timeout",
                "10m",
            )
            k.wait_serving(release, packages["v2"])
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                recent = [v for t, _, v in load.log if t > time.monotonic() - 10]
                if len(recent) > 50 and set(recent) == {V2}:
                    break
                time.sleep(2)
        failed = [(s, v) for _, s, v in load.log if s != 200]
        assert failed == [], (
            f"{len(failed)} of {len(load.log)} requests failed during the rolling update: {failed[:5]}"
        )
        seen = {v for _, _, v in load.log}
        assert seen == {V1, V2}, seen
        assert {v for _, _, v in load.log[-50:]} == {V2}
    finally:
        k.helm_run("uninstall", release, "--wait", check=False)


@pytest.mark.parametrize("strategy", ["canary", "blueGreen", "rolling"])
def test_model_pods_carry_the_restricted_fields(k, packages, strategy):
    """Every container of every model pod, the storage-initializer included, field by field (admission
    alone says only that the pod got in)."""
    release = f"bc-psa-{strategy.lower()}"
    install(k, release, strategy, packages)
    try:
        pods = k.json("-n", k.namespace, "get", "pods", "-l", f"app.kubernetes.io/instance={release}")[
            "items"
        ]
        assert pods, f"the {strategy} release has no pods"
        for pod in pods:
            assert [c["name"] for c in pod["spec"].get("initContainers", [])] == ["storage-initializer"]
            assert_restricted_pod(pod)
    finally:
        k.helm_run("uninstall", release, "--wait", check=False)


# --------------------------------------------------------------------------- the KFP rollout path


def test_pipeline_with_deploy_true_rolls_its_own_model_out(k, kfp_url, gateway_url, packages):
    """The compiled pipeline, deploy=true: progressive-rollout runs in a KFP pod as kubeflow/pipeline-runner
    (in-cluster config, the embedded hand-off, pip-installed kubernetes), declares the model on the canary
    release's ModelRollout, and the rollout operator (`make cluster`) rolls it out on Prometheus gates
    with live traffic, ending with the pipeline's model served."""
    import kfp

    from tests.e2e.helpers import COMPILED

    release = "bc-kfp"
    install(k, release, "canary", packages)
    new_version = f"{int(V2.split('.')[0])}.1.0"
    client = kfp.Client(host=kfp_url)
    host = route_host(k, release)
    with helpers.Load(gateway_url, host, release, rps=20) as load:
        run = client.create_run_from_pipeline_package(
            str(COMPILED),
            arguments={
                "model_name": release,
                "model_version": new_version,
                "deploy": True,
                "deploy_namespace": k.namespace,
                "release_fullname": release,
                "rollout_steps": "50,100",
                "rollout_interval_s": 60.0,  # ~600 predictions per side per window at 20 rps
            },
            run_name=f"mlrollout-e2e-deploy-{int(time.time())}",
            enable_caching=False,
        )
        done = client.wait_for_run_completion(run.run_id, timeout=2700, sleep_duration=10)
    try:
        assert done.state == "SUCCEEDED", f"run {run.run_id}: {done.state} {done.error}"
        status = k.json("-n", k.namespace, "get", "modelrollouts", release)["status"]
        assert (status["phase"], status["canaryVersion"]) == ("Promoted", new_version)
        assert all(s == 200 for _, s, _ in load.log), "a request failed during the pipeline's rollout"
        after = helpers.predict_many(gateway_url, host, release, 100)
        assert helpers.versions_seen(after) == {new_version: 100}
    finally:
        k.helm_run("uninstall", release, "--wait", check=False)
