"""What `make cluster` installs, installed by the same functions (infra/install.sh) on a real API server.

- the components run at the pinned versions; fake nodes are Ready;
- Gateway API CRDs have one owner: the standard channel stays in charge after Envoy Gateway's CRDs are
  installed, and installing the Envoy Gateway chart the old way (Helm 4 applies its crds/ by server-side
  apply) is refused for real (audit #1);
- KServe's admission webhooks answer from the local controller by URL: an invalid InferenceService is
  refused by KServe's own validator, and Pod Security `restricted` is enforced in the model namespace;
- the storage-initializer's `restricted` securityContext comes from the KServe chart's values, owned by
  Helm alone (audit #13); KServe's own runtimes (kserve-tritonserver) are installed (audit #8);
- every install step is idempotent: running them all again changes nothing and fails nothing.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request

import yaml

from infra.controlplane.build import Builder
from infra.controlplane.versions import read_versions
from tests.controlplane.conftest import NS, ROOT

V = read_versions()


def test_components_run_at_the_pinned_versions(k, controlplane):
    server = k.json("version")["serverVersion"]
    assert server["gitVersion"] == V["KUBERNETES_VERSION"]
    node_image_k8s = V["KIND_NODE_IMAGE"].split(":")[1].split("@")[0]
    assert server["gitVersion"] == node_image_k8s, (
        "the control plane must run the kind node image's Kubernetes"
    )
    port = controlplane.state["ports"]["etcd"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=5) as r:
        etcd = json.load(r)["etcdserver"]
    assert "v" + etcd == Builder().etcd_version()
    releases = {r["name"]: r for r in json.loads(k.helm("list", "-n", "kserve", "-o", "json").stdout)}
    for chart in ("kserve-crd", "kserve-resources", "kserve-runtime-configs"):
        rel = next(r for r in releases.values() if r["chart"].startswith(chart + "-"))
        assert rel["chart"] == f"{chart}-v{V['KSERVE_VERSION']}" and rel["status"] == "deployed"


def test_fake_nodes_are_ready_and_schedulable(k):
    nodes = k.items("nodes", ns="default")
    assert len(nodes) >= 2
    for n in nodes:
        ready = {c["type"]: c["status"] for c in n["status"]["conditions"]}["Ready"]
        assert ready == "True", n["metadata"]["name"]
        assert not any(t["effect"] == "NoSchedule" for t in n["spec"].get("taints", []))


def test_gateway_api_crds_stay_standard_after_envoy_gateway(k):
    for crd in ("httproutes", "gateways", "gatewayclasses", "grpcroutes", "referencegrants"):
        ann = k.json("get", "crd", f"{crd}.gateway.networking.k8s.io")["metadata"]["annotations"]
        assert ann["gateway.networking.k8s.io/channel"] == "standard", crd
        assert ann["gateway.networking.k8s.io/bundle-version"] == V["GATEWAY_API_VERSION"], crd
    eg = k.json("get", "crd", "envoyproxies.gateway.envoyproxy.io")
    assert any(c["type"] == "Established" and c["status"] == "True" for c in eg["status"]["conditions"])
    # the standard channel's own guard is installed with it
    assert k.run("get", "validatingadmissionpolicy", "-o", "name").stdout.count("safe-upgrades") == 1


def test_envoy_gateway_chart_with_its_crds_is_refused_over_the_standard_ones(k, controlplane):
    """The pre-fix `make cluster` step: `helm install` of gateway-helm applies its experimental Gateway API
    CRDs by server-side apply and conflicts with the standard ones (the reason for --skip-crds)."""
    chart = controlplane.bin.envoy_gateway_module / "charts" / "gateway-helm"
    proc = k.helm("install", "eg-old-way", str(chart), "-n", "eg-old-way", "--create-namespace", check=False)
    try:
        assert proc.returncode != 0
        assert "conflict" in proc.stderr and "gateway.networking.k8s.io/channel" in proc.stderr, proc.stderr
    finally:
        k.helm("uninstall", "eg-old-way", "-n", "eg-old-way", check=False)
        k.run("delete", "namespace", "eg-old-way", "--wait=false", check=False)
    ann = k.json("get", "crd", "httproutes.gateway.networking.k8s.io")["metadata"]["annotations"]
    assert ann["gateway.networking.k8s.io/channel"] == "standard"


def test_kserve_webhooks_are_served_by_the_local_controller(k, controlplane):
    hooks = k.json("get", "mutatingwebhookconfiguration", "inferenceservice.serving.kserve.io")["webhooks"]
    port = controlplane.state["ports"]["webhook"]
    assert {h["clientConfig"]["url"] for h in hooks} == {
        f"https://127.0.0.1:{port}/mutate-serving-kserve-io-v1beta1-inferenceservice",
        f"https://127.0.0.1:{port}/mutate-pods",
    }
    bad = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": "bad-autoscaler",
            "namespace": NS,
            "annotations": {"serving.kserve.io/autoscalerClass": "no-such-class"},
        },
        "spec": {"predictor": {"model": {"modelFormat": {"name": "onnx"}, "storageUri": "s3://b/m"}}},
    }
    proc = k.run("apply", "--dry-run=server", "-f", "-", input=json.dumps(bad), check=False)
    assert proc.returncode != 0
    assert "admission webhook" in proc.stderr and "no-such-class" in proc.stderr, proc.stderr


def test_model_namespace_enforces_restricted(k):
    labels = k.json("get", "namespace", NS)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged", "namespace": NS},
        "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]},
    }
    proc = k.run("apply", "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False)
    assert proc.returncode != 0 and 'violates PodSecurity "restricted' in proc.stderr, proc.stderr


def test_storage_initializer_security_comes_from_the_chart_values(k):
    csc = k.json("get", "clusterstoragecontainer", "default", "--show-managed-fields")
    sc = csc["spec"]["container"]["securityContext"]
    want = yaml.safe_load((ROOT / "infra" / "kserve-values.yaml").read_text())["kserve"]["storage"]
    assert sc == want["containerSecurityContext"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"} and sc["runAsUser"] == 1000
    assert {m["manager"] for m in csc["metadata"]["managedFields"]} == {"helm"}, (
        "one owner: the KServe release"
    )
    assert csc["spec"]["container"]["image"] == f"kserve/storage-initializer:v{V['KSERVE_VERSION']}"


def test_kserve_and_project_runtimes_are_installed(k):
    names = {r["metadata"]["name"] for r in k.items("clusterservingruntimes", ns="default")}
    assert {"kserve-tritonserver", "mlrollout-onnx", "mlrollout-onnx-knative"} <= names


def test_install_steps_are_idempotent(controlplane, k):
    before = {
        kind: {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in k.items(kind, ns="default")}
        for kind in ("crd", "clusterservingruntimes", "validatingwebhookconfigurations")
    }
    controlplane.install_steps(
        "gateway_api_crds",
        "envoy_gateway_crds",
        "kserve_charts",
        "kserve_admission",
        "kserve_runtimes",
        "model_namespace",
    )
    after = {
        kind: {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in k.items(kind, ns="default")}
        for kind in before
    }
    assert after.keys() == before.keys()
    for kind in before:
        assert set(after[kind]) == set(before[kind]), kind
    # a second helm upgrade of unchanged charts leaves the webhook wiring as the post-renderer made it
    hooks = k.json("get", "validatingwebhookconfiguration", "inferenceservice.serving.kserve.io")["webhooks"]
    assert all(h["clientConfig"]["url"].startswith("https://127.0.0.1:") for h in hooks)


def test_kubectl_is_within_one_minor_of_the_server(k):
    proc = subprocess.run(
        [k.kubectl_bin, "version", "-o", "json"],
        env=k.env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    v = json.loads(proc.stdout)
    client, server = int(v["clientVersion"]["minor"]), int(v["serverVersion"]["minor"])
    assert abs(client - server) <= 1
    assert "warning" not in proc.stderr.lower(), proc.stderr
