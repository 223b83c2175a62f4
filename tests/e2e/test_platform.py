"""The platform `make cluster` installs is there and wired: controllers up, Gateway programmed, the project's
ClusterServingRuntime installed, the model namespace enforcing the `restricted` Pod Security Standard, the
rollout operator running and leading."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.e2e.kube import KubeError

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("namespace", "deployment"),
    [
        ("cert-manager", "cert-manager-webhook"),
        ("envoy-gateway-system", "envoy-gateway"),
        ("kserve", "kserve-controller-manager"),
        ("kubeflow", "ml-pipeline"),
        ("kubeflow", "seaweedfs"),
        ("monitoring", "prometheus"),
    ],
)
def test_platform_deployments_available(k, namespace, deployment):
    d = k.json("-n", namespace, "get", "deployment", deployment)
    conditions = {c["type"]: c["status"] for c in d["status"].get("conditions", [])}
    assert conditions.get("Available") == "True", f"{namespace}/{deployment}: {conditions}"


def test_gateway_is_programmed_and_runtime_installed(k, versions):
    gw = k.json("-n", "kserve", "get", "gateway", "kserve-ingress-gateway")
    conditions = {c["type"]: c["status"] for c in gw["status"]["conditions"]}
    assert conditions.get("Programmed") == "True", conditions
    runtime = k.json("get", "clusterservingruntime", "mlrollout-onnx")
    image = runtime["spec"]["containers"][0]["image"]
    assert image == f"{versions['MLROLLOUT_RUNTIME_IMAGE']}:{versions['MLROLLOUT_VERSION']}"
    assert any(f["name"] == "onnx" for f in runtime["spec"]["supportedModelFormats"])


def test_model_namespace_is_wired_for_kfp_storage(k):
    ns = k.json("get", "namespace", k.namespace)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    secret = k.json("-n", k.namespace, "get", "secret", "kfp-s3-credentials")
    assert set(secret["data"]) >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert secret["metadata"]["annotations"]["serving.kserve.io/s3-usevirtualbucket"] == "0"
    k.run("-n", "kubeflow", "get", "networkpolicy", "seaweedfs-allow-mlrollout-models")
    can = k.run(
        "auth",
        "can-i",
        "create",
        "inferenceservices.serving.kserve.io",
        "-n",
        k.namespace,
        "--as=system:serviceaccount:kubeflow:pipeline-runner",
        check=False,
    )
    assert can.strip() == "yes", "KFP's pipeline-runner must be able to deploy models"
    cannot = k.run(
        "auth",
        "can-i",
        "get",
        "secrets",
        "-n",
        k.namespace,
        "--as=system:serviceaccount:kubeflow:pipeline-runner",
        check=False,
    )
    assert cannot.strip() == "no", "pipeline-runner must not read secrets of the model namespace"


def test_restricted_admission_rejects_a_privileged_pod(k):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "e2e-privileged-probe"},
        "spec": {
            "containers": [
                {"name": "c", "image": "registry.k8s.io/pause", "securityContext": {"privileged": True}}
            ]
        },
    }
    with pytest.raises(KubeError, match="violates PodSecurity"):
        k.ns("apply", "--dry-run=server", "-f", "-", stdin=json.dumps(pod))


def test_operator_runs_from_the_serving_image_leads_and_passes_its_helm_test(k, versions):
    """On kind the operator's code really runs (on the control plane kwok only fakes its pods): both replicas
    Ready on /healthz, one of them holding the Lease, and `helm test` reading /healthz and /metrics through
    the metrics Service."""
    ns, name = "mlrollout-system", "mlrollout-operator"
    d = k.json("-n", ns, "get", "deployment", name)
    assert d["status"].get("readyReplicas") == 2, d["status"]
    image = d["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == f"{versions['MLROLLOUT_RUNTIME_IMAGE']}:{versions['MLROLLOUT_VERSION']}"
    pods = {
        p["metadata"]["name"]
        for p in k.json("-n", ns, "get", "pods", "-l", "app.kubernetes.io/component=operator")["items"]
    }
    holder = k.json("-n", ns, "get", "lease", name)["spec"].get("holderIdentity")
    assert holder in pods, (holder, pods)
    cmd = [k.helm, "test", name, "-n", ns, "--logs", "--timeout", "120s"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "/healthz ok" in proc.stdout
