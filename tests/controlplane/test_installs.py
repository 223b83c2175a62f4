"""Every chart values file (`helm/mlrollout-model/ci/*-values.yaml`, Helm 4: real server-side apply) and
every kustomize overlay, installed into `models` on the control plane, then upgraded and removed.

For each: the API server validates every object against the real CRDs; KServe reconciles each
InferenceService into the Deployment, Service and HPA whose names and ports the HTTPRoute, the
NetworkPolicy and the PDB assume (checked object by object, not by name patterns); every pod those
Deployments create, the injected storage-initializer included, is admitted under Pod Security
`restricted` and carries the restricted fields container by container (audit #17); InferenceServices
become Ready within 60 s. Knative mode has no Knative controller here: its InferenceService is
reconciled into a Knative Service, which must be one Knative's webhook admits (audit #2); kind's e2e
test_knative.py covers the rest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from infra.controlplane.versions import read_versions
from tests.chart.validators import KNATIVE_CAPABILITIES_FIELDS, KNATIVE_CONTAINER_SECURITY_CONTEXT_FIELDS
from tests.controlplane.conftest import CHART, NS, ROOT, Kube
from tests.podsecurity import assert_restricted_pod

VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
OVERLAYS = sorted(p for p in (ROOT / "manifests" / "overlays").iterdir() if p.is_dir())
READY_WITHIN_S = 60


def isvcs_of(k: Kube, selector: str) -> list[dict]:
    return k.items("inferenceservice", "-l", selector)


def is_knative(isvc: dict) -> bool:
    return (isvc["metadata"].get("annotations") or {}).get("serving.kserve.io/deploymentMode") == "Knative"


def wait_ready(k: Kube, names: list[str]) -> float:
    start = time.monotonic()
    k.wait(f"InferenceServices {names} Ready", lambda: all(k.isvc_ready(n) for n in names), READY_WITHIN_S)
    return time.monotonic() - start


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == v for key, v in (selector.get("matchLabels") or {}).items()) and all(
        (e["operator"] == "In" and labels.get(e["key"]) in e["values"])
        or (e["operator"] == "Exists" and e["key"] in labels)
        for e in selector.get("matchExpressions") or []
    )


def release_objects(k: Kube, selector: str) -> dict[str, list[dict]]:
    """A chart release's objects: the chart labels every one with app.kubernetes.io/instance."""
    return {
        kind: k.items(kind, "-l", selector)
        for kind in ("inferenceservice", "httproute", "poddisruptionbudget", "networkpolicy")
    }


def overlay_objects(k: Kube, overlay: Path) -> dict[str, list[dict]]:
    """An overlay's live namespaced objects, found by the names `kubectl kustomize` renders."""
    out: dict[str, list[dict]] = {
        "inferenceservice": [],
        "httproute": [],
        "poddisruptionbudget": [],
        "networkpolicy": [],
    }
    for doc in yaml.safe_load_all(k.run("kustomize", str(overlay)).stdout):
        kind = doc["kind"].lower()
        if kind in out:
            live = k.get(kind, doc["metadata"]["name"])
            assert live is not None, f"{doc['kind']}/{doc['metadata']['name']} was not created"
            out[kind].append(live)
    return out


def check_release_objects(k: Kube, objs: dict[str, list[dict]]) -> dict:
    """KServe's objects and the chart's route, PDB and NetworkPolicy fit each other. Returns counts."""
    isvcs = objs["inferenceservice"]
    assert isvcs, "no InferenceService"
    services = {s["metadata"]["name"]: s for s in k.items("service")}
    names = {i["metadata"]["name"] for i in isvcs}
    pods = [
        p
        for p in k.items("pod")
        if not p["metadata"].get("deletionTimestamp")
        and p["metadata"]["labels"].get("serving.kserve.io/inferenceservice") in names
    ]
    counts = {"isvcs": len(isvcs), "pods": len(pods), "containers": 0}
    for isvc in isvcs:
        name = isvc["metadata"]["name"]
        dep = k.get("deployment", f"{name}-predictor")
        assert dep is not None, f"KServe made no Deployment {name}-predictor"
        svc = services.get(f"{name}-predictor")
        assert svc is not None, f"KServe made no Service {name}-predictor"
        ports = {p["port"]: p for p in svc["spec"]["ports"]}
        assert ports[80]["targetPort"] == 8080, svc["spec"]["ports"]
        if isvc["spec"]["predictor"]["model"].get("runtime") == "mlrollout-onnx":  # declares h2c for gRPC
            assert ports[8081]["appProtocol"] == "kubernetes.io/h2c", svc["spec"]["ports"]
        assert k.get("horizontalpodautoscaler", f"{name}-predictor") is not None
        own = [p for p in pods if p["metadata"]["labels"].get("serving.kserve.io/inferenceservice") == name]
        assert own, f"no pod for {name}"
        for pod in own:
            init = [c["name"] for c in pod["spec"].get("initContainers", [])]
            uri = isvc["spec"]["predictor"]["model"]["storageUri"]
            if uri.startswith("s3://"):
                assert init == ["storage-initializer"], f"KServe's pod mutator did not inject it: {init}"
                si = pod["spec"]["initContainers"][0]
                assert si["args"][0] == uri and si["securityContext"]["runAsUser"] == 1000
            assert_restricted_pod(pod)
            counts["containers"] += len(pod["spec"]["containers"]) + len(init)
    for route in objs["httproute"]:
        for rule in route["spec"]["rules"]:
            refs = rule["backendRefs"] + [
                f["requestMirror"]["backendRef"]
                for f in rule.get("filters", [])
                if f["type"] == "RequestMirror"
            ]
            for ref in refs:
                svc = services.get(ref["name"])
                assert svc is not None, f"HTTPRoute backend {ref['name']} is not a Service KServe made"
                assert ref["port"] in {p["port"] for p in svc["spec"]["ports"]}
                assert any(
                    selects({"matchLabels": svc["spec"]["selector"]}, p["metadata"]["labels"]) for p in pods
                ), ref
    for pdb in objs["poddisruptionbudget"]:
        matched = [p for p in pods if selects(pdb["spec"]["selector"], p["metadata"]["labels"])]
        assert matched, f"PDB {pdb['metadata']['name']} selects no pod"
        n = len(matched)
        # the disruption controller agrees
        k.wait(
            f"PDB {pdb['metadata']['name']} status",
            lambda pdb=pdb, n=n: (
                (k.get("pdb", pdb["metadata"]["name"]) or {}).get("status", {}).get("expectedPods", 0) >= n
            ),
            30,
        )
    for np in objs["networkpolicy"]:
        if np["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component") == "test":
            continue  # the `helm test` client's own policy (test_helm_test_hook_pod_is_admitted)
        assert [p for p in pods if selects(np["spec"]["podSelector"], p["metadata"]["labels"])], np[
            "metadata"
        ]["name"]
    return counts


def knative_rejections(ksvc: dict) -> list[str]:
    """What Knative v1.21's webhook (default feature flags) rejects in a Knative Service's pod spec."""
    spec = ksvc["spec"]["template"]["spec"]
    out = []
    if spec.get("securityContext"):
        out.append(f"pod-level securityContext {sorted(spec['securityContext'])}")
    ports = [p for c in spec["containers"] for p in c.get("ports") or []]
    if len(ports) > 1:
        out.append(f"{len(ports)} container ports")
    for c in spec["containers"]:
        ctx = c.get("securityContext") or {}
        extra = set(ctx) - KNATIVE_CONTAINER_SECURITY_CONTEXT_FIELDS
        extra |= {
            f"capabilities.{x}" for x in set(ctx.get("capabilities") or {}) - KNATIVE_CAPABILITIES_FIELDS
        }
        if extra:
            out.append(f"container {c['name']} securityContext {sorted(extra)}")
    return out


@pytest.fixture
def pvc_for_triton(k):
    """ci/triton-pvc-values.yaml reads pvc://models/repository: a bound claim `models` (static PV)."""
    docs = [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": "models-repository"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "manual",
                "hostPath": {"path": "/tmp/mlrollout-models"},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": "models", "namespace": NS},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "manual",
                "resources": {"requests": {"storage": "1Gi"}},
                "volumeName": "models-repository",
            },
        },
    ]
    k.run("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    yield
    k.run("-n", NS, "delete", "pvc", "models", "--wait=false", check=False)
    k.run("delete", "pv", "models-repository", "--wait=false", check=False)


@pytest.mark.parametrize("values", VALUES, ids=lambda p: p.name.removesuffix("-values.yaml"))
def test_chart_values_install_upgrade_uninstall(k, values: Path, request):
    release = "ci-" + values.name.removesuffix("-values.yaml")
    if "triton" in values.name:
        request.getfixturevalue("pvc_for_triton")
    selector = f"app.kubernetes.io/instance={release}"
    k.helm("install", release, str(CHART), "-n", NS, "-f", str(values))
    try:
        isvcs = isvcs_of(k, selector)
        if any(is_knative(i) for i in isvcs):
            (isvc,) = isvcs
            name = isvc["metadata"]["name"]
            ksvc = k.wait(
                f"Knative Service {name}-predictor",
                lambda: k.get("services.serving.knative.dev", f"{name}-predictor"),
                60,
            )
            assert knative_rejections(ksvc) == []
            container = ksvc["spec"]["template"]["spec"]["containers"][0]
            assert container["ports"] == [{"containerPort": 8080, "name": "http1", "protocol": "TCP"}]
            traffic = {t.get("tag"): t for t in ksvc["spec"].get("traffic", [])}
            assert traffic or ksvc["spec"]["template"], ksvc["spec"]
        else:
            took = wait_ready(k, [i["metadata"]["name"] for i in isvcs])
            assert took < READY_WITHIN_S
            counts = check_release_objects(k, release_objects(k, selector))
            assert counts["pods"] >= counts["isvcs"]
        # Helm 4 upgrade (server-side apply) of a changed value: no conflict, the change lands
        k.helm("upgrade", release, str(CHART), "-n", NS, "-f", str(values), "--set", "replicas.max=4")
        for isvc in isvcs_of(k, selector):
            assert isvc["spec"]["predictor"]["maxReplicas"] == 4
    finally:
        k.helm("uninstall", release, "-n", NS, "--wait", "--timeout", "60s")
    assert isvcs_of(k, selector) == []
    k.wait(
        f"{release}'s Deployments garbage-collected", lambda: not k.items("deployment", "-l", selector), 60
    )


def test_helm_test_hook_pod_is_admitted_under_restricted(k):
    """`helm test` creates its client pod in the restricted namespace: admitted, restricted field by field.
    (Its prediction needs a data plane: kind's e2e runs `helm test` to completion.)"""
    release = "hooktest"
    k.helm("install", release, str(CHART), "-n", NS, "-f", str(CHART / "ci" / "canary-values.yaml"))
    try:
        k.helm("test", release, "-n", NS, "--timeout", "5s", check=False)
        pod = k.get("pod", f"{release}-mlrollout-model-test-predict")
        assert pod is not None, "the test hook pod was not admitted"
        assert_restricted_pod(pod)
        assert pod["spec"]["containers"][0]["image"] == read_versions()["CURL_IMAGE"]
    finally:
        k.helm("uninstall", release, "-n", NS, "--wait", "--timeout", "60s")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_kustomize_overlay_applies_and_reconciles(k, overlay: Path):
    rendered = list(yaml.safe_load_all(k.run("kustomize", str(overlay)).stdout))
    for doc in rendered:
        if doc["kind"] == "InferenceService":
            assert k.get("inferenceservice", doc["metadata"]["name"]) is None, (
                "a previous test left it behind"
            )
    k.run("apply", "-k", str(overlay))
    try:
        objs = overlay_objects(k, overlay)
        isvcs = objs["inferenceservice"]
        if any(is_knative(i) for i in isvcs):
            (isvc,) = isvcs
            name = isvc["metadata"]["name"]
            ksvc = k.wait(
                f"Knative Service {name}-predictor",
                lambda: k.get("services.serving.knative.dev", f"{name}-predictor"),
                60,
            )
            assert knative_rejections(ksvc) == []
        else:
            wait_ready(k, [i["metadata"]["name"] for i in isvcs])
            check_release_objects(k, overlay_objects(k, overlay))
    finally:
        # the namespaced objects only: the overlay's ClusterServingRuntimes are shared by every release
        for doc in rendered:
            if doc["metadata"].get("namespace"):
                k.run(
                    "-n",
                    doc["metadata"]["namespace"],
                    "delete",
                    doc["kind"],
                    doc["metadata"]["name"],
                    "--ignore-not-found",
                    "--wait=false",
                    check=False,
                )
    for doc in rendered:
        if doc["kind"] == "InferenceService":
            name = doc["metadata"]["name"]
            k.wait(
                f"{name} and its Deployment gone",
                lambda name=name: (
                    not k.get("inferenceservice", name) and not k.get("deployment", f"{name}-predictor")
                ),
                60,
            )


def test_admission_policy_pins_what_an_inferenceservice_may_run(k):
    """hardening.md S6: whoever can write InferenceServices can start any pod spec. With admissionPolicy on,
    the API server's own CEL admission (ValidatingAdmissionPolicy) refuses anything but the pinned runtime,
    image prefix and ServiceAccount; the release's own InferenceServices pass."""
    release = "pinned"
    k.helm(
        "install",
        release,
        str(CHART),
        "-n",
        NS,
        "-f",
        str(CHART / "ci" / "canary-values.yaml"),
        "--set",
        "admissionPolicy.enabled=true",
    )
    try:
        full = f"{release}-mlrollout-model"
        wait_ready(k, [f"{full}-stable", f"{full}-canary"])
        good = k.get("inferenceservice", f"{full}-canary")
        base = {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": {
                "name": "intruder",
                "namespace": NS,
                "annotations": {"serving.kserve.io/deploymentMode": "Standard"},
            },
            "spec": {"predictor": json.loads(json.dumps(good["spec"]["predictor"]))},
        }
        cases = {
            "another runtime": (
                lambda p: p["model"].update(runtime="kserve-sklearnserver"),
                "runtime kserve-sklearnserver is not one of",
            ),
            "another image": (
                lambda p: p["model"].update(image="docker.io/evil/miner:1"),
                "image docker.io/evil/miner:1 does not start with",
            ),
            "another ServiceAccount": (
                lambda p: p.update(serviceAccountName="default"),
                "serviceAccountName default is not one of",
            ),
            "its own containers": (
                lambda p: p.update(
                    containers=[{"name": "x", "image": "ghcr.io/mlrollout/onnx-runtime:0.1.0"}]
                ),
                "may not bring their own predictor containers",
            ),
        }
        for what, (change, message) in cases.items():
            obj = json.loads(json.dumps(base))
            change(obj["spec"]["predictor"])
            proc = k.run("apply", "--dry-run=server", "-f", "-", input=json.dumps(obj), check=False)
            assert proc.returncode != 0 and message in proc.stderr, (what, proc.stderr)
            assert "ValidatingAdmissionPolicy" in proc.stderr, proc.stderr
        # the release's own shape passes (a server-side dry run of a copy)
        ok = k.run("apply", "--dry-run=server", "-f", "-", input=json.dumps(base), check=False)
        assert ok.returncode == 0, ok.stderr
        # a copy with a foreign ServiceAccount: refused now, admitted once the release is gone (below)
        foreign = json.loads(json.dumps(base))
        foreign["spec"]["predictor"]["serviceAccountName"] = "default"
    finally:
        k.helm("uninstall", release, "-n", NS, "--wait", "--timeout", "60s")
    assert not k.run("get", "validatingadmissionpolicy", "-o", "name").stdout.count("pinned-mlrollout-model")
    # the API server's policy cache refreshes about once a second after a delete: the next test's installs
    # must not meet a policy that is already gone from the API
    k.wait(
        "the admission policy to stop applying",
        lambda: (
            k.run("apply", "--dry-run=server", "-f", "-", input=json.dumps(foreign), check=False).returncode
            == 0
        ),
        30,
    )
