"""The kustomize base and overlays under manifests/, built by the real (bootstrapped) kubectl."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from tests.chart.conftest import MANIFESTS, NAMESPACE, load_docs
from tests.chart.test_chart import by_name, kinds, one, predictor_sa
from tests.chart.validators import (
    KNATIVE_CONTAINER_SECURITY_CONTEXT_FIELDS,
    assert_pipeline_rbac,
    assert_restricted,
    check_knative_admissible,
    check_object,
)

pytestmark = pytest.mark.chart

OVERLAYS = sorted(p.name for p in (MANIFESTS / "overlays").iterdir() if (p / "kustomization.yaml").exists())
TARGETS = ["base", *(f"overlays/{o}" for o in OVERLAYS)]
STANDARD_TARGETS = [t for t in TARGETS if t != "overlays/knative-canary"]
RUNTIMES = ["mlrollout-onnx", "mlrollout-onnx-knative"]  # manifests/base/runtime: Standard and Knative mode
# deprecated kustomization fields (kustomize v5) and what replaces them
DEPRECATED = {
    "bases": "resources",
    "patchesStrategicMerge": "patches",
    "patchesJson6902": "patches",
    "commonLabels": "labels",
    "vars": "replacements",
    "imageTags": "images",
}


@pytest.fixture(scope="module")
def build(tools):
    cache: dict[str, tuple[list[dict], str]] = {}

    def _build(target: str | Path) -> list[dict]:
        key = str(target)
        if key not in cache:
            path = target if Path(target).is_absolute() else MANIFESTS / target
            proc = tools.run(tools.kubectl, "kustomize", path, check=True)
            cache[key] = (load_docs(proc.stdout), proc.stderr)
        return cache[key][0]

    _build.stderr = lambda target: cache[str(target)][1]
    return _build


def test_the_issue_overlays_exist():
    assert set(OVERLAYS) >= {"rolling", "canary", "blue-green", "knative-canary"}


@pytest.mark.parametrize("target", TARGETS)
def test_builds_and_every_object_is_valid(build, target):
    objs = build(target)
    assert "deprecated" not in build.stderr(target).lower(), build.stderr(target)
    for obj in objs:
        check_object(obj)
    csrs = kinds(objs, "ClusterServingRuntime")
    for csr in csrs:
        assert "namespace" not in csr["metadata"], "a cluster-scoped object got a namespace"
    assert sorted(c["metadata"]["name"] for c in csrs) == RUNTIMES
    namespaced = [o for o in objs if o["kind"] != "ClusterServingRuntime"]
    expected_ns = None if target == "base" else NAMESPACE
    assert {o["metadata"].get("namespace") for o in namespaced} == {expected_ns}
    assert kinds(objs, "InferenceService") and kinds(objs, "ServiceAccount") and kinds(objs, "NetworkPolicy")
    assert kinds(objs, "Role") and kinds(objs, "RoleBinding")


def test_no_deprecated_kustomize_fields():
    files = sorted(MANIFESTS.rglob("kustomization.yaml"))
    assert len(files) >= 10
    for f in files:
        doc = yaml.safe_load(f.read_text())
        assert (
            doc.get("apiVersion") == "kustomize.config.k8s.io/v1beta1" and doc.get("kind") == "Kustomization"
        ), f
        used = sorted(set(doc) & set(DEPRECATED))
        assert not used, f"{f}: deprecated {used}; use {[DEPRECATED[u] for u in used]}"


@pytest.mark.parametrize("target", TARGETS)
def test_security_and_rbac(build, target):
    objs = build(target)
    assert assert_restricted(objs) >= 2
    runner = {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}
    assert_pipeline_rbac(objs, "mlrollout-model-pipeline", runner)
    assert not kinds(objs, "Secret")
    (sa,) = kinds(objs, "ServiceAccount")
    for isvc in kinds(objs, "InferenceService"):
        assert isvc["spec"]["predictor"]["serviceAccountName"] == sa["metadata"]["name"]


@pytest.mark.parametrize(
    ("overlay", "weights"),
    [
        ("rolling", {"mlrollout-model": 100}),
        ("canary", {"mlrollout-model-stable": 90, "mlrollout-model-canary": 10}),
        ("blue-green", {"mlrollout-model-blue": 0, "mlrollout-model-green": 100}),
    ],
)
def test_routes_point_at_the_predictor_services(build, overlay, weights):
    objs = build(f"overlays/{overlay}")
    route = one(objs, "HTTPRoute")
    refs = route["spec"]["rules"][0]["backendRefs"]
    assert {r["name"]: r["weight"] for r in refs} == {f"{k}-predictor": v for k, v in weights.items()}
    assert all(r["port"] == 80 for r in refs)
    assert sum(r["weight"] for r in refs) == 100
    assert sorted(o["metadata"]["name"] for o in kinds(objs, "InferenceService")) == sorted(weights)
    # every InferenceService has a PDB whose selector matches its pods (spec.predictor.labels)
    pdbs = {p["metadata"]["name"]: p for p in kinds(objs, "PodDisruptionBudget")}
    for isvc in kinds(objs, "InferenceService"):
        selector = pdbs[isvc["metadata"]["name"]]["spec"]["selector"]["matchLabels"]
        assert selector.items() <= isvc["spec"]["predictor"]["labels"].items()


def test_canary_and_stable_differ_only_in_what_they_serve(build):
    isvcs = {o["metadata"]["name"]: o for o in kinds(build("overlays/canary"), "InferenceService")}
    stable, canary = isvcs["mlrollout-model-stable"], isvcs["mlrollout-model-canary"]
    assert stable["spec"]["predictor"]["model"]["storageUri"].endswith("/1.0.0")
    assert canary["spec"]["predictor"]["model"]["storageUri"].endswith("/1.1.0")
    assert canary["metadata"]["labels"]["mlrollout.io/track"] == "canary"
    assert canary["spec"]["predictor"]["labels"]["mlrollout.io/track"] == "canary"
    for isvc in (stable, canary):
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
        assert isvc["spec"]["predictor"]["model"]["args"] == ["--model_name=breast-cancer"]


def test_knative_canary_overlay(build):
    objs = build("overlays/knative-canary")
    isvc = one(objs, "InferenceService")
    pred = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    assert "serving.kserve.io/autoscalerClass" not in isvc["metadata"]["annotations"]
    assert pred["canaryTrafficPercent"] == 20 and "deploymentStrategy" not in pred
    assert not kinds(objs, "HTTPRoute")
    sources = [
        p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for rule in one(objs, "NetworkPolicy")["spec"]["ingress"]
        for p in rule["from"]
    ]
    assert "knative-serving" in sources and "kourier-system" in sources


def test_knative_canary_overlay_is_admissible_to_knative(build):
    """Finding #2: the one-port runtime, no pod-level securityContext, only container fields Knative's
    default SecurityContextMask keeps (runAsUser/runAsGroup moved into the container)."""
    objs = build("overlays/knative-canary")
    isvc = one(objs, "InferenceService")
    pred = isvc["spec"]["predictor"]
    assert pred["model"]["runtime"] == "mlrollout-onnx-knative"
    runtime = by_name(objs, "ClusterServingRuntime", "mlrollout-onnx-knative")
    ports = [p for c in [*runtime["spec"]["containers"], pred["model"]] for p in c.get("ports", [])]
    assert ports == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert "--enable_grpc=false" in runtime["spec"]["containers"][0]["args"]
    assert runtime["spec"]["supportedModelFormats"][0]["autoSelect"] is False
    assert "securityContext" not in pred
    ctx = pred["model"]["securityContext"]
    assert set(ctx) <= KNATIVE_CONTAINER_SECURITY_CONTEXT_FIELDS
    assert ctx["runAsUser"] == ctx["runAsGroup"] == 10001 and ctx["runAsNonRoot"] is True
    for c in runtime["spec"]["containers"]:
        assert set(c["securityContext"]) <= KNATIVE_CONTAINER_SECURITY_CONTEXT_FIELDS
    check_knative_admissible(isvc, runtime)


def test_knative_canary_overlay_admits_the_autoscaler(build):
    """Finding #14: knative-serving may reach the queue-proxy metrics port 9090 (the autoscaler's scrape)."""
    np = one(build("overlays/knative-canary"), "NetworkPolicy")["spec"]
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "knative-serving"}}}
    (rule,) = [r for r in np["ingress"] if peer in r["from"]]
    assert sorted(p["port"] for p in rule["ports"]) == [8012, 8080, 9090]


@pytest.mark.parametrize("target", STANDARD_TARGETS)
def test_standard_mode_keeps_the_two_port_runtime_and_the_pod_security_context(build, target):
    objs = build(target)
    runtime = by_name(objs, "ClusterServingRuntime", "mlrollout-onnx")
    assert [p["name"] for c in runtime["spec"]["containers"] for p in c["ports"]] == ["http1", "h2c"]
    assert runtime["spec"]["supportedModelFormats"][0]["autoSelect"] is True
    for isvc in kinds(objs, "InferenceService"):
        pred = isvc["spec"]["predictor"]
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
        assert pred["model"]["runtime"] == "mlrollout-onnx"
        assert pred["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
    assert assert_restricted(objs) >= 3


def test_rolling_overlay_sets_the_strategy(build):
    pred = one(build("overlays/rolling"), "InferenceService")["spec"]["predictor"]
    assert pred["deploymentStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0},
    }


def test_configurations_carry_names_images_and_labels_into_inferenceservice(build, tmp_path):
    """A user's own kustomization on top of an overlay's model part: namePrefix renames the ServiceAccount
    and the InferenceService's serviceAccountName follows; `images` rewrites an InferenceService image;
    `labels` with includeTemplates reaches the predictor pods (spec.predictor.labels)."""
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(MANIFESTS / "overlays" / "rolling" / "model", tmp_path)],
                "namePrefix": "team-",
                "labels": [{"pairs": {"team": "fraud"}, "includeTemplates": True}],
                "patches": [
                    {
                        "target": {"kind": "InferenceService"},
                        "patch": yaml.safe_dump(
                            [
                                {
                                    "op": "add",
                                    "path": "/spec/predictor/model/image",
                                    "value": "registry.local/custom-runtime:1.0",
                                }
                            ]
                        ),
                    }
                ],
                "images": [
                    {
                        "name": "registry.local/custom-runtime",
                        "newName": "registry.local/custom-runtime",
                        "newTag": "2.0",
                    }
                ],
            }
        )
    )
    objs = build(tmp_path)
    isvc = one(objs, "InferenceService")
    sa = predictor_sa(objs)
    assert isvc["metadata"]["name"] == "team-mlrollout-model"
    assert sa["metadata"]["name"] == "team-mlrollout-model"
    assert isvc["spec"]["predictor"]["serviceAccountName"] == "team-mlrollout-model"
    assert isvc["spec"]["predictor"]["model"]["image"] == "registry.local/custom-runtime:2.0"
    assert isvc["spec"]["predictor"]["labels"]["team"] == "fraud"
    # the prefix reaches the pipeline's Role and the binding's reference to it
    assert by_name(objs, "RoleBinding", "team-mlrollout-model-pipeline")["roleRef"]["name"] == (
        "team-mlrollout-model-pipeline"
    )


def test_overlay_images_reach_the_runtime(build, tmp_path):
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(MANIFESTS / "overlays" / "canary", tmp_path)],
                "images": [{"name": "ghcr.io/mlrollout/onnx-runtime", "newTag": "0.2.0"}],
            }
        )
    )
    csrs = kinds(build(tmp_path), "ClusterServingRuntime")
    assert sorted(c["metadata"]["name"] for c in csrs) == RUNTIMES
    for csr in csrs:
        assert csr["spec"]["containers"][0]["image"] == "ghcr.io/mlrollout/onnx-runtime:0.2.0"


def test_chart_and_kustomize_render_the_same_kinds(build, render):
    rendered = render("ci/canary-values.yaml", sets=("clusterServingRuntime.create=true",))
    # the chart's helm-test Pod and its NetworkPolicy have no kustomize equivalent
    chart = sorted(
        o["kind"]
        for o in rendered
        if o["metadata"]["labels"].get("app.kubernetes.io/component") != "test"
        and not o["metadata"]["name"].endswith("-test")
    )
    kustomize = sorted(o["kind"] for o in build("overlays/canary"))
    assert chart == kustomize


def test_chart_and_kustomize_ship_the_same_runtimes(build, render):
    """The chart's clusterServingRuntime.create and manifests/base/runtime (what infra applies) render the
    same two ClusterServingRuntime specs."""
    chart = {
        o["metadata"]["name"]: o["spec"]
        for o in kinds(
            render("ci/canary-values.yaml", sets=("clusterServingRuntime.create=true",)),
            "ClusterServingRuntime",
        )
    }
    kustomize = {
        o["metadata"]["name"]: o["spec"] for o in kinds(build("base/runtime"), "ClusterServingRuntime")
    }
    assert sorted(chart) == sorted(kustomize) == RUNTIMES
    for name in RUNTIMES:
        assert chart[name] == kustomize[name], name


@pytest.mark.parametrize("overlay", ["canary", "blue-green", "rolling"])
def test_overlay_routes_forward_what_the_chart_forwards(build, overlay):
    from tests.chart.test_chart import ROUTED, _matches

    assert _matches(one(build(f"overlays/{overlay}"), "HTTPRoute")) == ROUTED
