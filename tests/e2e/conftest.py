"""Cluster e2e suite (`make e2e` = `pytest -m e2e tests/e2e`) against the current kube context.

Every test here is marked `e2e` and is skipped, with the reason, when no platform is reachable:
kubectl missing, no current context, the API server not answering, or KServe/KFP not installed
(`make cluster` installs all of it). With MLROLLOUT_E2E_REQUIRED=1 (the GitHub kind workflow) the same
reason FAILS every test instead, so a broken cluster cannot pass as "skipped".

Settings (environment): MLROLLOUT_E2E_NAMESPACE (default `models`, prepared by `make cluster`),
MLROLLOUT_GATEWAY_URL (default: http://127.0.0.1:8080, the kind port mapping, else a port-forward to
the Envoy Service of Gateway kserve/kserve-ingress-gateway).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e import kube

ROOT = Path(__file__).resolve().parents[2]


def find_kubectl() -> str | None:
    bootstrapped = ROOT / ".tools" / "bin" / "kubectl"
    if bootstrapped.exists():
        return str(bootstrapped)
    return shutil.which("kubectl")


def cluster_unreachable_reason(kubectl: str | None = None, timeout: float = 15.0) -> str | None:
    """None when a cluster with the mlrollout platform answers, else one line: what is missing, how to fix."""
    kubectl = kubectl or find_kubectl()
    hint = "run `make cluster` (needs docker + kind), then `make e2e`"
    if not kubectl:
        return f"no kubectl: run `make tools` to bootstrap the pinned one; {hint}"

    def kc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([kubectl, *args], capture_output=True, text=True, timeout=timeout)

    try:
        ctx = kc("config", "current-context")
        if ctx.returncode != 0:
            where = os.environ.get("KUBECONFIG", "~/.kube/config")
            return f"no Kubernetes cluster: no current kube context in {where}; {hint}"
        context = ctx.stdout.strip()
        info = kc("cluster-info", "--request-timeout=5s")
        if info.returncode != 0:
            last = (info.stderr.strip().splitlines() or ["no answer"])[-1][:160]
            return f"no Kubernetes cluster reachable (context {context!r}: {last}); {hint}"
        for crd, what in (
            ("inferenceservices.serving.kserve.io", "KServe"),
            ("httproutes.gateway.networking.k8s.io", "Gateway API"),
            ("workflows.argoproj.io", "Kubeflow Pipelines"),
        ):
            if kc("get", "crd", crd, "--request-timeout=5s").returncode != 0:
                return f"cluster {context!r} is reachable but {what} is not installed ({crd}); {hint}"
    except subprocess.TimeoutExpired:
        return f"kubectl timed out after {timeout:.0f}s talking to the cluster; {hint}"
    return None


@functools.cache
def _reason() -> str | None:
    return cluster_unreachable_reason()


def pytest_collection_modifyitems(config, items):
    e2e_items = [i for i in items if Path(str(i.fspath)).is_relative_to(Path(__file__).parent)]
    if not e2e_items:
        return
    for item in e2e_items:
        item.add_marker(pytest.mark.e2e)
    reason = _reason()
    if reason is None:
        return
    if os.environ.get("MLROLLOUT_E2E_REQUIRED") == "1":
        return  # pytest_runtest_setup fails each test with the reason
    for item in e2e_items:
        item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_setup(item):
    # MLROLLOUT_E2E_REQUIRED=1: a missing platform is a failure, not a skip
    if os.environ.get("MLROLLOUT_E2E_REQUIRED") == "1" and Path(str(item.fspath)).is_relative_to(
        Path(__file__).parent
    ):
        reason = _reason()
        if reason is not None:
            pytest.fail(f"MLROLLOUT_E2E_REQUIRED=1 but {reason}", pytrace=False)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def versions() -> dict[str, str]:
    out = {}
    for line in (ROOT / "infra" / "versions.env").read_text().splitlines():
        m = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


@pytest.fixture(scope="session")
def k() -> kube.Kube:
    kubectl = find_kubectl()
    assert kubectl, "kubectl vanished after collection"
    helm = str(ROOT / ".tools" / "bin" / "helm") if (ROOT / ".tools" / "bin" / "helm").exists() else "helm"
    return kube.Kube(
        kubectl=kubectl, helm=helm, namespace=os.environ.get("MLROLLOUT_E2E_NAMESPACE", "models")
    )


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def gateway_url(k):
    if os.environ.get("MLROLLOUT_GATEWAY_URL"):
        yield os.environ["MLROLLOUT_GATEWAY_URL"].rstrip("/")
        return
    if _port_open("127.0.0.1", 8080):  # infra/kind-config.yaml maps NodePort 30080 here
        yield "http://127.0.0.1:8080"
        return
    svc = k.json(
        "get",
        "svc",
        "-n",
        "envoy-gateway-system",
        "-l",
        "gateway.envoyproxy.io/owning-gateway-name=kserve-ingress-gateway",
    )["items"]
    assert svc, "no Envoy Service for Gateway kserve/kserve-ingress-gateway (is `make cluster` complete?)"
    with k.port_forward("envoy-gateway-system", f"svc/{svc[0]['metadata']['name']}", 80) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def prometheus_url(k):
    with k.port_forward("monitoring", "svc/prometheus", 9090) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def kfp_url(k):
    with k.port_forward("kubeflow", "svc/ml-pipeline-ui", 80) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def filer_url(k):
    """SeaweedFS filer HTTP API (KFP's object store): list and upload under /buckets/mlpipeline/."""
    with k.port_forward("kubeflow", "svc/seaweedfs", 8888) as port:
        yield f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------- the pipeline and its model


@pytest.fixture(scope="session")
def pipeline_run(kfp_url):
    import kfp

    from tests.e2e.helpers import COMPILED, model_versions

    client = kfp.Client(host=kfp_url)
    name = f"mlrollout-e2e-{int(time.time())}"
    pipeline = client.upload_pipeline(str(COMPILED), pipeline_name=name)
    version_id = client.list_pipeline_versions(pipeline.pipeline_id).pipeline_versions[0].pipeline_version_id
    experiment = client.create_experiment("mlrollout-e2e")
    run = client.run_pipeline(
        experiment_id=experiment.experiment_id,
        job_name=name,
        pipeline_id=pipeline.pipeline_id,
        version_id=version_id,
        params={"model_version": model_versions()["v1"]},
        enable_caching=False,
    )
    done = client.wait_for_run_completion(run.run_id, timeout=2400, sleep_duration=10)
    return done


@pytest.fixture(scope="session")
def packages(pipeline_run, filer_url, tmp_path_factory) -> dict[str, str]:
    """storageUris of v1 (what the pipeline produced), v2 and the bad canary."""
    import httpx

    from serving.contract import modelcard
    from serving.demo import badmodel
    from tests.e2e import helpers

    versions = helpers.model_versions()
    assert pipeline_run.state == "SUCCEEDED"
    cards = []
    for entry in helpers.filer_list(filer_url, f"{helpers.BUCKET_ROOT}/v2/artifacts"):
        if helpers.is_dir(entry):
            try:
                cards += helpers.filer_find(
                    filer_url, f"{entry['FullPath']}/{pipeline_run.run_id}", "model-card.json"
                )
            except httpx.HTTPStatusError:  # this pipeline has no folder for the run
                continue
    assert len(cards) == 1, f"expected one packaged model for run {pipeline_run.run_id}, found {cards}"
    pkg_path = cards[0].rsplit("/", 1)[0]
    work = tmp_path_factory.mktemp("packages")
    local_v1 = work / "v1" / pkg_path.rsplit("/", 1)[-1]
    helpers.filer_download_tree(filer_url, pkg_path, local_v1)
    card = modelcard.verify_package(local_v1)
    assert card["version"] == versions["v1"]
    assert card["pipeline_run_id"] == pipeline_run.run_id, "the served model must be this run's output"
    stamp = f"e2e/{pipeline_run.run_id}"
    v2 = badmodel.with_version(local_v1, work / "v2", versions["v2"], note="e2e canary")
    bad = badmodel.build_swapped_package(local_v1, work / "bad", versions["bad"])
    uris = {"v1": helpers.s3_uri(pkg_path)}
    for key, pkg in (("v2", v2), ("bad", bad)):
        dest = f"{helpers.BUCKET_ROOT}/{stamp}/{key}/{pkg.name}"
        helpers.filer_upload_tree(filer_url, pkg, dest)
        uris[key] = helpers.s3_uri(dest)
    return uris
