"""The KFP steps' cluster functions run as `kubeflow/pipeline-runner`, with that account's own bound token
(what a pipeline pod gets), against the RBAC `make cluster` and the chart install.

pipeline-runner may do one thing in the model namespace: request a short-lived token for the release's
deployer (`<fullname>-deployer`, hardening.md S6). Every call deploy_canary and progressive_rollout make
with it is allowed (they complete) and made as the deployer; a negative list is refused by the real
authorizer, for pipeline-runner (InferenceServices and routes directly, Secrets, pods/exec, tokens for other
accounts, other namespaces, cluster-scoped writes) and for the deployer (Secrets, delete, pods, Deployments
it does not name).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.rollout import cluster, kube
from tests.controlplane.conftest import NS, Kube
from tests.controlplane.test_rollout import (
    V2_URI,
    LiveTraffic,
    deploy_v2,
    install_canary,
    router,
    run_rollout,
    served_uris,
)

RUNNER = "system:serviceaccount:kubeflow:pipeline-runner"


@pytest.fixture(scope="module")
def release(k):
    full = install_canary(k, "kfp")
    yield full
    k.helm("uninstall", "kfp", "-n", NS, "--wait", "--timeout", "60s", check=False)


def test_the_token_is_pipeline_runners_own(runner):
    review = runner.json("auth", "whoami")
    assert review["status"]["userInfo"]["username"] == RUNNER


def whoami(api) -> str:
    """The user the API server sees behind ``api`` (SelfSubjectReview)."""
    from kubernetes import client

    review = client.AuthenticationV1Api(api.api_client).create_self_subject_review(
        client.V1SelfSubjectReview(api_version="authentication.k8s.io/v1", kind="SelfSubjectReview")
    )
    return review.status.user_info.username


def test_the_steps_act_as_the_release_deployer(runner, release):
    as_deployer = cluster.as_deployer(runner.api(), NS, release, 600)
    assert whoami(runner.api()) == RUNNER
    assert whoami(as_deployer) == f"system:serviceaccount:{NS}:{release}-deployer"


def test_kfp_steps_run_as_pipeline_runner(k, runner, release):
    api = runner.api()
    out = deploy_v2(api, release)
    assert out["isvc"] == f"{release}-canary"
    rec = run_rollout(api, release, LiveTraffic(router(k.api(), release)), steps="50,100")
    assert rec.state["phase"] == "Promoted"
    assert served_uris(k, f"{release}-stable") == {V2_URI}
    # the writes are the runner's, under the controller's field manager
    managed = k.json("-n", NS, "get", "inferenceservice", f"{release}-stable", "--show-managed-fields")
    assert kube.FIELD_MANAGER in {m["manager"] for m in managed["metadata"]["managedFields"]}


REFUSED = [
    ("patch", "inferenceservices.serving.kserve.io", NS),  # only through the deployer
    ("create", "inferenceservices.serving.kserve.io", NS),
    ("patch", "httproutes.gateway.networking.k8s.io", NS),
    ("get", "configmaps", NS),
    ("create", "serviceaccounts/token", NS),  # for any other account (tested by name below)
    ("get", "secrets", NS),
    ("list", "secrets", NS),
    ("create", "pods/exec", NS),
    ("create", "pods", NS),
    ("delete", "deployments", NS),
    ("get", "inferenceservices.serving.kserve.io", "default"),
    ("patch", "httproutes.gateway.networking.k8s.io", "kserve"),
    ("get", "configmaps", "kserve"),
    ("create", "namespaces", ""),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", ""),
    ("patch", "nodes", ""),
    ("create", "clusterservingruntimes.serving.kserve.io", ""),
]


@pytest.mark.parametrize(("verb", "resource", "namespace"), REFUSED, ids=lambda x: str(x) or "cluster")
def test_pipeline_runner_is_refused(runner, verb, resource, namespace):
    args = ["auth", "can-i", verb, resource] + (["-n", namespace] if namespace else [])
    proc = runner.run(*args, check=False)
    assert proc.stdout.strip() == "no", (
        f"pipeline-runner may {verb} {resource} in {namespace or 'the cluster'}"
    )


def test_refusal_is_real_not_just_a_review(runner):
    """The authorizer answers the real request too: a Secret read is a 403 from the API server."""
    proc = runner.run("-n", NS, "get", "secret", "kfp-s3-credentials", check=False)
    assert proc.returncode != 0 and "Forbidden" in proc.stderr, proc.stderr


def test_what_the_chart_grants_is_what_the_steps_need(k, runner, release, controlplane):
    can = runner.run(
        "auth", "can-i", "create", f"serviceaccounts/{release}-deployer", "--subresource=token", "-n", NS
    )
    assert can.stdout.strip() == "yes"
    other = runner.run(
        "auth", "can-i", "create", "serviceaccounts/kfp-s3", "--subresource=token", "-n", NS, check=False
    )
    assert other.stdout.strip() == "no", "a token for another account would be an escalation"
    deployer = Kube(
        controlplane, _token_kubeconfig(controlplane, cluster.as_deployer(runner.api(), NS, release, 600))
    )
    allowed = [
        ("patch", "inferenceservices.serving.kserve.io", ""),
        ("create", "inferenceservices.serving.kserve.io", ""),
        ("patch", "httproutes.gateway.networking.k8s.io", ""),
        ("get", "deployments.apps", f"{release}-stable-predictor"),
        ("create", "configmaps", ""),
        ("patch", "configmaps", f"{release}-rollout"),
    ]
    for verb, resource, name in allowed:
        target = f"{resource}/{name}" if name else resource
        assert deployer.run("auth", "can-i", verb, target, "-n", NS).stdout.strip() == "yes", (verb, target)
    refused = [
        ("delete", "inferenceservices.serving.kserve.io", ""),  # rbac.allowDelete is off by default
        ("get", "secrets", ""),
        ("create", "pods", ""),
        ("get", "deployments.apps", "someone-elses-predictor"),
        ("patch", "configmaps", "someone-elses-config"),
        ("get", "inferenceservices.serving.kserve.io", ""),
    ]
    for verb, resource, name in refused[:-1]:
        target = f"{resource}/{name}" if name else resource
        assert deployer.run("auth", "can-i", verb, target, "-n", NS, check=False).stdout.strip() == "no", (
            verb,
            target,
        )
    assert (
        deployer.run(
            "auth", "can-i", "get", "inferenceservices.serving.kserve.io", "-n", "default", check=False
        ).stdout.strip()
        == "no"
    )


def _token_kubeconfig(controlplane, api) -> Path:
    from infra.controlplane.pki import kubeconfig

    token = api.api_client.configuration.api_key["authorization"]
    path = controlplane.dir / "deployer.kubeconfig"
    path.write_text(
        kubeconfig(controlplane.server, controlplane.dir / "pki" / "ca.crt", user="deployer", token=token)
    )
    return path


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
