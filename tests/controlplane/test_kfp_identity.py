"""The KFP step `progressive_rollout` as `kubeflow/pipeline-runner`, with that account's own bound token
(what a pipeline pod gets), against the RBAC the chart installs and a real rollout operator process.

pipeline-runner may create the release's ModelRollout and get/patch/list/watch that one object, nothing else
(helm/mlrollout-model/templates/rbac.yaml). Shown here: the step's function (`cluster.progressive_rollout`,
all the component does after loading its in-cluster config) with that token creates the ModelRollout,
watches it while a real operator process (tests/controlplane/test_operator.py's, scripted runtimes that
follow the real HTTPRoute) deploys the canary and walks it to promotion, and writes the Markdown report
and the KFP metrics from the status; a retried step patches the same object and returns at once. The
real authorizer refuses pipeline-runner InferenceServices and routes (by `kubectl auth can-i` and by a real
API call), other ModelRollouts, the status subresource, delete, Secrets, tokens and other namespaces.
"""

from __future__ import annotations

import json

import pytest
from kfp import dsl

from serving.rollout import cluster, crd, kube
from serving.rollout.routers import GatewayApiRouter
from tests.controlplane.conftest import NS
from tests.controlplane.test_operator import INTERVAL_S, OperatorProc, Runtimes, kc, lease_holder  # noqa: F401
from tests.controlplane.test_rollout import V2_URI, install_canary, served_uris
from tests.unit.test_rollout_controller import CANARY, STABLE

RUNNER = "system:serviceaccount:kubeflow:pipeline-runner"
LEASE = "kfp-op"


@pytest.fixture(scope="module")
def release(kc):  # noqa: F811 (the CRD fixture, imported)
    full = install_canary(kc, "kfp")
    yield full
    kc.run("-n", NS, "delete", crd.PLURAL, full, "--ignore-not-found", "--wait=true", check=False)
    kc.run("-n", NS, "delete", "lease", LEASE, "--ignore-not-found", check=False)
    kc.helm("uninstall", "kfp", "-n", NS, "--wait", "--timeout", "60s", check=False)


def test_the_token_is_pipeline_runners_own(runner):
    review = runner.json("auth", "whoami")
    assert review["status"]["userInfo"]["username"] == RUNNER


def package(tmp_path, version: str):
    """package_model's output as the step sees it: a card under ``<dir>/<name>/``, a minio:// URI."""
    card = tmp_path / "package" / STABLE.model / "model-card.json"
    card.parent.mkdir(parents=True, exist_ok=True)
    card.write_text(json.dumps({"name": STABLE.model, "version": version}))
    return str(tmp_path / "package"), V2_URI.replace("s3://", "minio://")


def test_the_step_hands_the_model_to_the_operator_and_reports_the_outcome(kc, runner, release, tmp_path):  # noqa: F811
    route = GatewayApiRouter(
        release, NS, f"{release}-stable-predictor", f"{release}-canary-predictor", api=kc.api()
    )
    runtimes = Runtimes(route)
    op = OperatorProc(kc, "kfp-op-a", LEASE, tmp_path)
    try:
        kc.wait("the operator leading", lambda: lease_holder(kc, LEASE) == "kfp-op-a", 30)
        assert kc.get(crd.PLURAL, release) is None
        pkg_dir, pkg_uri = package(tmp_path, CANARY.version)
        report, metrics, lines = tmp_path / "report.md", dsl.Metrics(), []
        scrape = {
            "provider": "scrape",
            "stableMetricsUrl": f"{runtimes.url}/stable/metrics",
            "canaryMetricsUrl": f"{runtimes.url}/canary/metrics",
        }

        def step():
            return cluster.progressive_rollout(
                runner.api(),
                package_dir=pkg_dir,
                package_uri=pkg_uri,
                namespace=NS,
                fullname=release,
                model_name=STABLE.model,
                steps="50,100",
                interval_s=INTERVAL_S,
                threshold=1,
                timeout_s=150,
                report_path=str(report),
                log_metric=metrics.log_metric,
                log=lines.append,
                metrics=scrape,
            )

        assert step() == "Promoted"
        obj = kc.get(crd.PLURAL, release)
        assert obj["spec"]["model"] == {"name": STABLE.model, "storageUri": V2_URI, "version": CANARY.version}
        assert obj["spec"]["strategy"]["steps"] == [50, 100] and obj["spec"]["strategy"]["interval"] == "2s"
        managed = kc.json("-n", NS, "get", crd.PLURAL, release, "--show-managed-fields")["metadata"]
        assert cluster.FIELD_MANAGER in {m["manager"] for m in managed["managedFields"]}
        st = obj["status"]
        assert (st["phase"], st["stableVersion"], st["canaryVersion"]) == ("Promoted", "1.0.0", "2.0.0")
        assert served_uris(kc, f"{release}-stable") == {V2_URI}, "the operator promoted the step's model"
        # the evidence, from the status the operator wrote
        md = report.read_text()
        assert md.startswith("# Rollout of 2.0.0: Promoted\n")
        for g in st["lastAnalysis"]:
            assert f"| {g['gate']} | " in md and f"| {g['n']} |" in md
        # the CRD's default gates: the p99 limit beside the comparisons with stable
        assert {g["gate"] for g in st["lastAnalysis"]} >= {
            "latency_p99",
            "error_rate_vs_stable",
            "drift_chi2",
        }
        assert md.count("| **pass** |") == len(st["lastAnalysis"])
        assert "| promote |" in md and f"## History ({len(st['history'])} decisions)" in md
        m = metrics.metadata
        assert (m["promoted"], m["canary_weight"], m["step"]) == (1.0, 100.0, 2.0)
        assert m["analyses_pass"] >= 2 and m["analyses_fail"] == 0
        assert 0 < m["latency_p99"] <= 500 and m["latency_p99_n"] >= 20 and m["error_rate_vs_stable_n"] >= 20
        assert any("Progressing 1.0.0 -> 2.0.0, step 1/2, canary 50%" in line for line in lines), lines
        # a retried step patches the same spec (no new generation, no new rollout) and returns at once
        generation, created = obj["metadata"]["generation"], json.loads(st["record"])["created_at"]
        assert step() == "Promoted"
        again = kc.get(crd.PLURAL, release)
        assert again["metadata"]["generation"] == generation
        assert json.loads(again["status"]["record"])["created_at"] == created
    finally:
        op.stop()
        runtimes.close()
        print(f"--- operator log tail ---\n{op.text()[-3000:]}")


def test_a_real_write_to_an_inference_service_is_forbidden(runner, release):
    api = runner.api()
    for call in (
        lambda: kube.patch(api, kube.ISVC, NS, f"{release}-stable", {"metadata": {"labels": {"x": "y"}}}),
        lambda: api.create_namespaced_custom_object(
            *kube.ISVC[:2],
            NS,
            kube.ISVC.plural,
            {
                "apiVersion": "serving.kserve.io/v1beta1",
                "kind": "InferenceService",
                "metadata": {"name": "sneaky"},
                "spec": {"predictor": {"model": {"modelFormat": {"name": "onnx"}}}},
            },
        ),
        lambda: kube.get(api, kube.ISVC, NS, f"{release}-stable"),
    ):
        with pytest.raises(Exception) as err:
            call()
        assert kube.status_of(err.value) == 403, err.value


ALLOWED = [
    ("create", "modelrollouts.mlrollout.io", ""),
    ("get", "modelrollouts.mlrollout.io", "kfp-mlrollout-model"),
    ("patch", "modelrollouts.mlrollout.io", "kfp-mlrollout-model"),
    ("watch", "modelrollouts.mlrollout.io", "kfp-mlrollout-model"),
    ("list", "modelrollouts.mlrollout.io", "kfp-mlrollout-model"),
]

REFUSED = [
    ("patch", "inferenceservices.serving.kserve.io", NS),
    ("create", "inferenceservices.serving.kserve.io", NS),
    ("get", "inferenceservices.serving.kserve.io", NS),
    ("patch", "httproutes.gateway.networking.k8s.io", NS),
    ("get", "configmaps", NS),
    ("create", "serviceaccounts/token", NS),
    ("get", "secrets", NS),
    ("list", "secrets", NS),
    ("create", "pods/exec", NS),
    ("create", "pods", NS),
    ("delete", "deployments", NS),
    ("delete", "modelrollouts.mlrollout.io", NS),
    ("update", "modelrollouts.mlrollout.io", NS),
    ("patch", "modelrollouts.mlrollout.io/someone-elses", NS),
    ("get", "modelrollouts.mlrollout.io/someone-elses", NS),
    ("list", "modelrollouts.mlrollout.io", NS),  # without the name: not every rollout of the namespace
    ("create", "modelrollouts.mlrollout.io", "default"),
    ("get", "inferenceservices.serving.kserve.io", "default"),
    ("patch", "httproutes.gateway.networking.k8s.io", "kserve"),
    ("get", "configmaps", "kserve"),
    ("create", "namespaces", ""),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", ""),
    ("patch", "nodes", ""),
    ("create", "clusterservingruntimes.serving.kserve.io", ""),
]


def test_what_the_chart_grants_is_what_the_step_needs(runner, release):
    for verb, resource, name in ALLOWED:
        target = f"{resource}/{name}" if name else resource
        assert runner.run("auth", "can-i", verb, target, "-n", NS).stdout.strip() == "yes", (verb, target)
    # only the operator writes the status
    status = runner.run(
        "auth",
        "can-i",
        "patch",
        f"modelrollouts.mlrollout.io/{release}",
        "--subresource=status",
        "-n",
        NS,
        check=False,
    )
    assert status.stdout.strip() == "no"


@pytest.mark.parametrize(("verb", "resource", "namespace"), REFUSED, ids=lambda x: str(x) or "cluster")
def test_pipeline_runner_is_refused(runner, release, verb, resource, namespace):
    args = ["auth", "can-i", verb, resource] + (["-n", namespace] if namespace else [])
    proc = runner.run(*args, check=False)
    assert proc.stdout.strip() == "no", (
        f"pipeline-runner may {verb} {resource} in {namespace or 'the cluster'}"
    )


def test_refusal_is_real_not_just_a_review(runner):
    """The authorizer answers the real request too: a Secret read is a 403 from the API server."""
    proc = runner.run("-n", NS, "get", "secret", "kfp-s3-credentials", check=False)
    assert proc.returncode != 0 and "Forbidden" in proc.stderr, proc.stderr


def test_runner_identity_is_bound_in_the_model_namespace_only(k):
    bindings = (
        k.items("rolebindings", ns=NS)
        + json.loads(k.run("get", "clusterrolebindings", "-o", "json").stdout)["items"]
    )
    mine = [
        b
        for b in bindings
        if any(
            s.get("kind") == "ServiceAccount" and s.get("name") == "pipeline-runner"
            for s in b.get("subjects") or []
        )
    ]
    assert mine and all(b["kind"] == "RoleBinding" and b["metadata"]["namespace"] == NS for b in mine)
