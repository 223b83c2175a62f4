"""The Helm chart helm/mlrollout-model, rendered by the real helm binary and checked object by object."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from tests.chart.conftest import CHART, NAMESPACE, ROOT, versions_env
from tests.chart.validators import (
    KNATIVE_CONTAINER_SECURITY_CONTEXT_FIELDS,
    InvalidObject,
    assert_pipeline_rbac,
    assert_restricted,
    check_httproute,
    check_knative_admissible,
    check_kserve,
    check_object,
)

pytestmark = pytest.mark.chart

CI_FILES = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
CANARY = "ci/canary-values.yaml"
KNATIVE = "ci/knative-canary-values.yaml"
STANDARD_CI_FILES = [f for f in CI_FILES if f != "knative-canary-values.yaml"]
FULL = "bc-mlrollout-model"  # fullname of release "bc"
LONG_RELEASE = "averyveryverylongreleasename-for-models-prod"  # 44 characters: fullname gets truncated
# KServe labels the predictor Deployment selector and pods `app: isvc.<isvc>-predictor` (KServe v0.20.0
# pkg/constants/constants.go:755-756, reconcilers/deployment/deployment_reconciler.go:146,153); a label
# value is at most 63 characters, so an InferenceService name is at most 48
MAX_ISVC_NAME = 48
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


def kinds(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str) -> dict:
    found = kinds(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def predictor_sa(objs: list[dict]) -> dict:
    """The predictors' ServiceAccount (the release's only one)."""
    return one(objs, "ServiceAccount")


def by_name(objs: list[dict], kind: str, name: str) -> dict:
    for o in kinds(objs, kind):
        if o["metadata"]["name"] == name:
            return o
    raise AssertionError(f"no {kind} named {name}; have {[o['metadata']['name'] for o in kinds(objs, kind)]}")


# ------------------------------------------------------------------------------------------- tooling


def test_tools_are_the_pinned_official_binaries(tools):
    pins = versions_env()
    assert (
        tools.run(tools.helm, "version", "--template", "{{.Version}}", check=True).stdout
        == pins["HELM_VERSION"]
    )
    out = tools.run(tools.kubectl, "version", "--client", check=True).stdout
    assert f"Client Version: {pins['KUBECTL_VERSION']}" in out


def test_bootstrap_script_is_shellcheck_clean_and_idempotent(tools):
    if shutil.which("shellcheck"):
        proc = subprocess.run(
            ["shellcheck", "-x", "infra/bootstrap-tools.sh"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stdout
    # binaries present: a second run is a no-op that only reports the versions
    proc = subprocess.run(
        ["bash", "infra/bootstrap-tools.sh", ".tools"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "downloading" not in proc.stdout + proc.stderr
    assert versions_env()["HELM_VERSION"] in proc.stdout


def test_chart_version_pins_match_versions_env():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    pins = versions_env()
    assert chart["appVersion"] == pins["MLROLLOUT_VERSION"]
    assert values["clusterServingRuntime"]["image"]["repository"] == pins["MLROLLOUT_RUNTIME_IMAGE"]
    test_image = f"{values['test']['image']['repository']}:{values['test']['image']['tag']}"
    assert test_image == pins["CURL_IMAGE"]


# ------------------------------------------------------------------------------- lint and validate


@pytest.mark.parametrize("values_file", CI_FILES)
def test_helm_lint_strict(tools, values_file):
    proc = tools.run(
        tools.helm, "lint", "--strict", CHART, "-f", CHART / "ci" / values_file, "--namespace", NAMESPACE
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("values_file", CI_FILES)
def test_every_rendered_object_is_valid(render, values_file):
    objs = render(f"ci/{values_file}")
    assert objs, "nothing rendered"
    used = {}
    for obj in objs:
        used[obj["kind"]] = check_object(obj)
        if obj["kind"] != "ClusterServingRuntime":
            assert obj["metadata"]["namespace"] == NAMESPACE, f"{obj['kind']} not in the release namespace"
        if obj["kind"] == "ConfigMap":
            assert not obj["metadata"]["name"].endswith("-rollout"), (
                "the rollout state belongs to the controller"
            )
    assert used["InferenceService"] == "kserve-sdk"
    assert used["ServiceAccount"] == "kubernetes-1.37"
    assert used["NetworkPolicy"] == "kubernetes-1.37"
    assert used["Pod"] == "kubernetes-1.37"  # the helm test hook


def test_validators_catch_what_they_must(render):
    """The validators reject a misspelt field, a wrong type and an HTTPRoute weight out of range."""
    objs = render(CANARY)
    isvc = json.loads(json.dumps(kinds(objs, "InferenceService")[0]))
    isvc["spec"]["predictor"]["model"]["storageURI"] = "s3://typo"
    with pytest.raises(InvalidObject, match="storageURI"):
        check_kserve(isvc)
    isvc = json.loads(json.dumps(kinds(objs, "InferenceService")[0]))
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(InvalidObject, match="minReplicas"):
        check_kserve(isvc)
    route = json.loads(json.dumps(one(objs, "HTTPRoute")))
    route["spec"]["rules"][0]["backendRefs"][0]["weight"] = -1
    with pytest.raises(InvalidObject, match="weight"):
        check_httproute(route)
    sa = json.loads(json.dumps(predictor_sa(objs)))
    sa["automountToken"] = False
    with pytest.raises(InvalidObject, match="automountToken"):
        check_object(sa)


# ------------------------------------------------------------------------------------- bad values

BAD_VALUES = {
    "unknown strategy": (
        ["model.storageUri=s3://m/a", "strategy.type=linear"],
        "at '/strategy/type': value must be one of 'rolling', 'canary', 'blueGreen', 'knativeCanary'",
    ),
    "weight above 100": (
        [
            "model.storageUri=s3://m/a",
            "strategy.type=canary",
            "strategy.canary.storageUri=s3://m/b",
            "strategy.canary.weight=101",
        ],
        "at '/strategy/canary/weight': maximum: got 101, want 100",
    ),
    "negative weight": (
        [
            "model.storageUri=s3://m/a",
            "strategy.type=canary",
            "strategy.canary.storageUri=s3://m/b",
            "strategy.canary.weight=-5",
        ],
        "at '/strategy/canary/weight': minimum: got -5, want 0",
    ),
    "missing storageUri": ([], "at '/model/storageUri': minLength: got 0, want 1"),
    "canary without its storageUri": (
        ["model.storageUri=s3://m/a", "strategy.type=canary"],
        "at '/strategy/canary/storageUri': minLength: got 0, want 1",
    ),
    "storageUri without a scheme": (
        ["model.storageUri=/models/a"],
        "at '/model/storageUri': '/models/a' does not match",
    ),
    "both colours active": (
        [
            "strategy.type=blueGreen",
            "strategy.blueGreen.blue.storageUri=s3://m/a",
            "strategy.blueGreen.green.storageUri=s3://m/b",
            "strategy.blueGreen.blue.active=true",
            "strategy.blueGreen.green.active=true",
        ],
        "at '/strategy/blueGreen/green/active': value must be false",
    ),
    "no colour active": (
        [
            "strategy.type=blueGreen",
            "strategy.blueGreen.blue.storageUri=s3://m/a",
            "strategy.blueGreen.green.storageUri=s3://m/b",
            "strategy.blueGreen.blue.active=false",
        ],
        "at '/strategy/blueGreen/green/active': value must be true",
    ),
    "shadow with a live weight": (
        [
            "model.storageUri=s3://m/a",
            "strategy.type=canary",
            "strategy.canary.storageUri=s3://m/b",
            "strategy.canary.shadow.enabled=true",
            "strategy.canary.weight=10",
        ],
        "at '/strategy/canary/weight': value must be 0",
    ),
    "triton with protocol v1": (
        ["model.storageUri=s3://m/a", "model.runtime=triton", "model.protocolVersion=v1"],
        "at '/model/protocolVersion': value must be one of '', 'v2'",
    ),
    "misspelt key": (
        ["model.storageUri=s3://m/a", "strategy.canary.wieght=5"],
        "additional properties 'wieght'",
    ),
    "max below min replicas": (
        ["model.storageUri=s3://m/a", "replicas.min=4", "replicas.max=2"],
        "replicas.max (2) must be >= replicas.min (4)",
    ),
    "fullnameOverride too long for canary's -stable/-canary": (
        [
            "model.storageUri=s3://m/a",
            "strategy.type=canary",
            "strategy.canary.storageUri=s3://m/b",
            # 44 characters: fine on its own, too long with -stable
            "fullnameOverride=fraud-detector-gradient-boosted-eu-west-prod",
        ],
        'InferenceService name "fraud-detector-gradient-boosted-eu-west-prod-stable" is 51 characters, '
        "over the limit of 48 (KServe labels its pods app: isvc.<name>-predictor, a label value of at most "
        "63): shorten fullnameOverride or the release name",
    ),
    "fullnameOverride too long for rolling": (
        [
            "model.storageUri=s3://m/a",
            "fullnameOverride=fraud-detector-gradient-boosted-classifier-eu-west-prod",
        ],
        'InferenceService name "fraud-detector-gradient-boosted-classifier-eu-west-prod" is 55 characters, '
        "over the limit of 48",
    ),
    # operator mode (tests/chart/test_operator_mode.py): the operator owns the canary's model and the split
    "operator with rolling": (
        ["model.storageUri=s3://m/a", "model.version=1.0.0", "operator.enabled=true"],
        "at '/strategy/type': value must be one of 'canary', 'knativeCanary'",
    ),
    "operator with a canary storageUri": (
        [
            "model.storageUri=s3://m/a",
            "model.version=1.0.0",
            "strategy.type=canary",
            "operator.enabled=true",
            "strategy.canary.storageUri=s3://m/b",
        ],
        "at '/strategy/canary/storageUri': value must be ''",
    ),
    "operator with a canary weight": (
        [
            "model.storageUri=s3://m/a",
            "model.version=1.0.0",
            "strategy.type=canary",
            "operator.enabled=true",
            "strategy.canary.weight=10",
        ],
        "at '/strategy/canary/weight': value must be 0",
    ),
    "operator with a Knative trafficPercent": (
        [
            "model.storageUri=s3://m/a",
            "model.version=1.0.0",
            "strategy.type=knativeCanary",
            "operator.enabled=true",
            "strategy.knativeCanary.trafficPercent=20",
        ],
        "at '/strategy/knativeCanary/trafficPercent': got number, want null",
    ),
    "operator without a semver model.version": (
        ["model.storageUri=s3://m/a", "strategy.type=canary", "operator.enabled=true"],
        "at '/model/version': '' does not match pattern",
    ),
    "operator strategy typo": (
        [
            "model.storageUri=s3://m/a",
            "model.version=1.0.0",
            "strategy.type=canary",
            "operator.enabled=true",
            "operator.strategy.intervall=2s",
        ],
        "additional properties 'intervall' not allowed",
    ),
    "operator shadow not a bool": (
        [
            "model.storageUri=s3://m/a",
            "model.version=1.0.0",
            "strategy.type=canary",
            "operator.enabled=true",
            "operator.strategy.shadow.enabled=maybe",
        ],
        "at '/operator/strategy/shadow/enabled': got string, want boolean",
    ),
    "operator cohort typo": (
        [
            "model.storageUri=s3://m/a",
            "model.version=1.0.0",
            "strategy.type=canary",
            "operator.enabled=true",
            "operator.strategy.cohort.headr=x-user-id",
        ],
        "additional properties 'headr' not allowed",
    ),
    "operator watch above the CRD's maximum": (
        [
            "model.storageUri=s3://m/a",
            "model.version=1.0.0",
            "strategy.type=canary",
            "operator.enabled=true",
            "operator.strategy.postPromotionIntervals=1001",
        ],
        "at '/operator/strategy/postPromotionIntervals': maximum: got 1,001, want 1,000",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_fail_with_a_readable_message(tools, case):
    sets, message = BAD_VALUES[case]
    assert "InferenceService" not in tools.assert_refused(CHART, "bc", NAMESPACE, sets, message)


# ------------------------------------------------------------------------------------- strategies


@pytest.mark.parametrize("weight", [0, 1, 10, 37, 50, 99, 100])
def test_canary_route_weights_equal_the_values(render, weight):
    objs = render(CANARY, sets=(f"strategy.canary.weight={weight}",))
    route = one(objs, "HTTPRoute")
    assert route["metadata"]["name"] == FULL
    rules = route["spec"]["rules"]
    assert len(rules) == 1
    refs = [(r["name"], r["port"], r["weight"]) for r in rules[0]["backendRefs"]]
    assert refs == [(f"{FULL}-stable-predictor", 80, 100 - weight), (f"{FULL}-canary-predictor", 80, weight)]
    assert "filters" not in rules[0]
    names = sorted(o["metadata"]["name"] for o in kinds(objs, "InferenceService"))
    assert names == [f"{FULL}-canary", f"{FULL}-stable"]
    storage = {
        o["metadata"]["name"]: o["spec"]["predictor"]["model"]["storageUri"]
        for o in kinds(objs, "InferenceService")
    }
    assert storage == {
        f"{FULL}-stable": "s3://mlpipeline/models/breast-cancer/1.0.0",
        f"{FULL}-canary": "s3://mlpipeline/models/breast-cancer/1.1.0",
    }


def test_shadow_mirrors_to_the_canary_and_serves_only_stable(render):
    route = one(render("ci/shadow-values.yaml"), "HTTPRoute")
    rule = route["spec"]["rules"][0]
    assert [(r["name"], r["weight"]) for r in rule["backendRefs"]] == [
        (f"{FULL}-stable-predictor", 100),
        (f"{FULL}-canary-predictor", 0),
    ]
    assert rule["filters"] == [
        {
            "type": "RequestMirror",
            "requestMirror": {
                "backendRef": {"group": "", "kind": "Service", "name": f"{FULL}-canary-predictor", "port": 80}
            },
        }
    ]


@pytest.mark.parametrize("active", ["blue", "green"])
def test_blue_green_sends_everything_to_the_active_colour(render, active):
    sets = (
        f"strategy.blueGreen.blue.active={str(active == 'blue').lower()}",
        f"strategy.blueGreen.green.active={str(active == 'green').lower()}",
    )
    objs = render("ci/blue-green-values.yaml", sets=sets)
    weights = {r["name"]: r["weight"] for r in one(objs, "HTTPRoute")["spec"]["rules"][0]["backendRefs"]}
    other = "green" if active == "blue" else "blue"
    assert weights == {f"{FULL}-{active}-predictor": 100, f"{FULL}-{other}-predictor": 0}
    assert sorted(o["metadata"]["name"] for o in kinds(objs, "InferenceService")) == [
        f"{FULL}-blue",
        f"{FULL}-green",
    ]
    test_pod = one(objs, "Pod")
    url = next(e["value"] for e in test_pod["spec"]["containers"][0]["env"] if e["name"] == "URL")
    assert url.startswith(f"http://{FULL}-{active}-predictor.{NAMESPACE}.svc.cluster.local/")


def test_rolling_sets_the_deployment_strategy(render):
    objs = render("ci/rolling-values.yaml", sets=("strategy.rolling.maxUnavailable=1",))
    isvc = one(objs, "InferenceService")
    assert isvc["metadata"]["name"] == FULL
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    assert isvc["spec"]["predictor"]["deploymentStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1},
    }
    route = one(objs, "HTTPRoute")
    assert [(r["name"], r["weight"]) for r in route["spec"]["rules"][0]["backendRefs"]] == [
        (f"{FULL}-predictor", 100)
    ]
    assert not kinds(render("ci/rolling-values.yaml", sets=("route.enabled=false",)), "HTTPRoute")


def test_knative_canary_uses_canary_traffic_percent(render):
    objs = render("ci/knative-canary-values.yaml")
    isvc = one(objs, "InferenceService")
    pred = isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/enable-tag-routing"] == "true"
    assert pred["canaryTrafficPercent"] == 20
    assert "deploymentStrategy" not in pred
    assert not kinds(objs, "HTTPRoute"), "Knative routes by itself"
    promoted = one(
        render("ci/knative-canary-values.yaml", sets=("strategy.knativeCanary.trafficPercent=null",)),
        "InferenceService",
    )
    assert "canaryTrafficPercent" not in promoted["spec"]["predictor"]
    rollback = one(
        render("ci/knative-canary-values.yaml", sets=("strategy.knativeCanary.trafficPercent=0",)),
        "InferenceService",
    )
    assert rollback["spec"]["predictor"]["canaryTrafficPercent"] == 0


def test_knative_canary_is_admissible_to_knative(render):
    """Finding #2: the Knative Service KServe builds from the InferenceService and its runtime passes
    Knative's webhook under default feature flags: the one-port runtime, no pod-level securityContext, and
    only container-level fields Knative's SecurityContextMask keeps."""
    objs = render(KNATIVE, sets=("clusterServingRuntime.create=true",))
    isvc = one(objs, "InferenceService")
    pred = isvc["spec"]["predictor"]
    assert pred["model"]["runtime"] == "mlrollout-onnx-knative"
    runtime = by_name(objs, "ClusterServingRuntime", pred["model"]["runtime"])
    ports = [p for c in [*runtime["spec"]["containers"], pred["model"]] for p in c.get("ports", [])]
    assert ports == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert "securityContext" not in pred  # Knative's PodSecurityContextMask keeps nothing by default
    ctx = pred["model"]["securityContext"]
    assert set(ctx) <= KNATIVE_CONTAINER_SECURITY_CONTEXT_FIELDS
    assert set(ctx["capabilities"]) == {"drop"}
    # the pod-level identity moved into the container (fsGroup dropped: the model volume is an emptyDir)
    pod = VALUES["podSecurityContext"]
    assert ctx == {
        **VALUES["containerSecurityContext"],
        "runAsUser": pod["runAsUser"],
        "runAsGroup": pod["runAsGroup"],
    }
    check_knative_admissible(isvc, runtime)
    assert assert_restricted([isvc, runtime]) == 2  # still Pod Security 'restricted', per container


def test_knative_security_context_keeps_only_what_knative_admits(render):
    """Container fields Knative rejects by default (privileged: true, capabilities.add, procMount) are not
    rendered for the Knative predictor; the container's own runAsUser wins over the pod-level one."""
    sets = (
        "containerSecurityContext.privileged=true",
        "containerSecurityContext.capabilities.add[0]=NET_ADMIN",
        "containerSecurityContext.procMount=Default",
        "containerSecurityContext.runAsUser=20002",
        "podSecurityContext.supplementalGroups[0]=5",
    )
    isvc = one(render(KNATIVE, sets=sets), "InferenceService")
    ctx = isvc["spec"]["predictor"]["model"]["securityContext"]
    assert "privileged" not in ctx and "procMount" not in ctx
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["runAsUser"] == 20002  # the container's own value wins over the pod-level one
    assert ctx["runAsGroup"] == VALUES["podSecurityContext"]["runAsGroup"]
    assert "securityContext" not in isvc["spec"]["predictor"]
    privileged_false = one(
        render(KNATIVE, sets=("containerSecurityContext.privileged=false",)), "InferenceService"
    )
    assert privileged_false["spec"]["predictor"]["model"]["securityContext"]["privileged"] is False


@pytest.mark.parametrize("values_file", STANDARD_CI_FILES)
def test_standard_mode_keeps_the_two_port_runtime_and_the_pod_security_context(render, values_file):
    objs = render(f"ci/{values_file}", sets=("clusterServingRuntime.create=true",))
    for isvc in kinds(objs, "InferenceService"):
        pred = isvc["spec"]["predictor"]
        assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
        expected = "kserve-tritonserver" if "triton" in values_file else "mlrollout-onnx"
        assert pred["model"]["runtime"] == expected
        assert pred["securityContext"] == VALUES["podSecurityContext"]
        assert pred["model"]["securityContext"] == VALUES["containerSecurityContext"]
    runtime = by_name(objs, "ClusterServingRuntime", "mlrollout-onnx")
    assert [p["name"] for c in runtime["spec"]["containers"] for p in c["ports"]] == ["http1", "h2c"]
    assert assert_restricted(objs) >= 3


def test_knative_validator_catches_what_knative_rejects(render):
    """check_knative_admissible rejects exactly what finding #2 describes: the Standard predictor's
    pod-level securityContext and the two-port runtime."""
    std = render(CANARY, sets=("clusterServingRuntime.create=true",))
    two_ports = by_name(std, "ClusterServingRuntime", "mlrollout-onnx")
    one_port = by_name(std, "ClusterServingRuntime", "mlrollout-onnx-knative")
    with pytest.raises(
        InvalidObject, match=r"pod-level securityContext field\(s\) Knative rejects: \['fsGroup'"
    ):
        check_knative_admissible(kinds(std, "InferenceService")[0], one_port)
    kn = one(render(KNATIVE), "InferenceService")
    with pytest.raises(InvalidObject, match="2 container ports across the containers"):
        check_knative_admissible(kn, two_ports)
    bad = json.loads(json.dumps(kn))
    bad["spec"]["predictor"]["model"]["securityContext"]["seLinuxOptions"] = {"level": "s0"}
    with pytest.raises(InvalidObject, match="seLinuxOptions"):
        check_knative_admissible(bad, one_port)
    bad = json.loads(json.dumps(kn))
    bad["spec"]["predictor"]["model"]["securityContext"]["capabilities"]["add"] = ["NET_ADMIN"]
    with pytest.raises(InvalidObject, match="add"):
        check_knative_admissible(bad, one_port)


# Idle RSS of the runtime serving the breast-cancer package, with headroom: 230 MiB measured in
# `make bench-soak` (python + onnxruntime + kserve imported, one session open).
IDLE_RSS_MIB = 300


def _mib(quantity: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    return float(quantity[:-2]) * units[quantity[-2:]]


def test_documented_request_maxima_fit_the_memory_limit(render):
    """Memory bounded for concurrent uploads (hardening.md area 2): at every limit the runtime enforces,
    with the flags the ClusterServingRuntime passes and the defaults of the rest, the worst case stays
    under the predictor's memory limit: every connection holding a full header buffer and a body's free
    allowance, plus the in-flight body budget, on top of the idle process."""
    from serving.runtime import asgi, protocol
    from serving.runtime.server import build_parser

    objs = render(CANARY, sets=("clusterServingRuntime.create=true",))
    runtime = by_name(objs, "ClusterServingRuntime", "mlrollout-onnx")["spec"]["containers"][0]

    def worst_mib(args: list[str]) -> float:
        flags = build_parser().parse_known_args(args)[0]
        per_conn = flags.max_header_bytes + protocol._SLICE + asgi.BodyBudget(1).free_bytes
        connections = flags.max_connections or protocol.LimitedHttpToolsProtocol.max_connections
        held = max(flags.max_inflight_body_bytes, flags.max_body_bytes) + connections * per_conn
        return IDLE_RSS_MIB + held / 2**20

    assert worst_mib(runtime["args"]) < _mib(runtime["resources"]["limits"]["memory"])
    for isvc in kinds(objs, "InferenceService"):
        model = isvc["spec"]["predictor"]["model"]
        worst = worst_mib(runtime["args"] + model.get("args", []))
        limit = model["resources"]["limits"]["memory"]
        assert worst < _mib(limit), f"{isvc['metadata']['name']}: worst case {worst:.0f} MiB vs {limit}"


# ------------------------------------------------------------------------------------------- names


@pytest.mark.parametrize("values_file", CI_FILES)
def test_long_release_names_fit_kserve_predictor_label(render, values_file):
    """Finding #10: every InferenceService name <= 48, so `app: isvc.<name>-predictor` <= 63, for every
    strategy; the names keep the controller contract `<fullname>[-<track>]`."""
    objs = render(f"ci/{values_file}", release=LONG_RELEASE)
    isvcs = kinds(objs, "InferenceService")
    assert isvcs
    full = predictor_sa(objs)["metadata"]["name"]
    assert full.startswith("averyveryverylongreleasename-for-models-p")
    for isvc in isvcs:
        name = isvc["metadata"]["name"]
        assert len(name) <= MAX_ISVC_NAME, name
        label = f"isvc.{name}-predictor"
        assert len(label) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", label), label
        expected = full if len(isvcs) == 1 else f"{full}-{isvc['metadata']['labels']['mlrollout.io/track']}"
        assert name == expected
    for route in kinds(objs, "HTTPRoute"):
        assert route["metadata"]["name"] == full
        for ref in route["spec"]["rules"][0]["backendRefs"]:
            assert ref["name"] in {f"{i['metadata']['name']}-predictor" for i in isvcs}
    for obj in objs:
        check_object(obj)


R41 = "fraud-eu-west-1-prod-abcd-mlrollout-model"
R45 = "fraud-eu-west-1-prod-abcdefgh-mlrollout-model"


@pytest.mark.parametrize(
    ("values_file", "release", "names"),
    [
        # <release>-mlrollout-model at exactly the budget (41 for two InferenceServices, 45 for one): kept
        (CANARY, "fraud-eu-west-1-prod-abcd", [f"{R41}-canary", f"{R41}-stable"]),
        ("ci/blue-green-values.yaml", "bc", [f"{FULL}-blue", f"{FULL}-green"]),
        ("ci/rolling-values.yaml", "fraud-eu-west-1-prod-abcdefgh", [R45]),
        (KNATIVE, "bc", [FULL]),
    ],
)
def test_names_within_the_budget_are_unchanged(render, values_file, release, names):
    assert len(R41) == 41 and len(R45) == 45
    assert (
        sorted(i["metadata"]["name"] for i in kinds(render(values_file, release=release), "InferenceService"))
        == names
    )


def test_every_track_serves_under_one_model_name(render):
    for isvc in kinds(render(CANARY), "InferenceService"):
        model = isvc["spec"]["predictor"]["model"]
        assert model["args"][0] == "--model_name=breast-cancer"
        assert model["runtime"] == "mlrollout-onnx"
        assert model["modelFormat"] == {"name": "onnx"}
        assert model["protocolVersion"] == "v1"


def test_triton_runtime_uses_v2_and_the_triton_layout(render):
    objs = render("ci/triton-pvc-values.yaml")
    model = one(objs, "InferenceService")["spec"]["predictor"]["model"]
    assert model["runtime"] == "kserve-tritonserver"
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"] == "pvc://models/repository"
    assert "args" not in model  # Triton names the model after its directory
    assert {"name": "tmp", "mountPath": "/tmp"} in model["volumeMounts"]
    env = {e["name"]: e["value"] for e in one(objs, "Pod")["spec"]["containers"][0]["env"]}
    assert env["URL"].endswith("/v2/models/breast-cancer/infer")
    body = json.loads(env["BODY"])
    assert body["inputs"][0]["shape"] == [1, 30] and body["inputs"][0]["datatype"] == "FP32"
    assert not kinds(objs, "HTTPRoute") and not kinds(objs, "Role") and not kinds(objs, "PodDisruptionBudget")
    assert not kinds(objs, "ClusterServingRuntime")  # cluster-scoped and shared: make cluster applies ours
    csrs = kinds(
        render("ci/triton-pvc-values.yaml", sets=("clusterServingRuntime.create=true",)),
        "ClusterServingRuntime",
    )
    assert sorted(c["metadata"]["name"] for c in csrs) == ["mlrollout-onnx", "mlrollout-onnx-knative"]
    assert all("namespace" not in c["metadata"] for c in csrs)


def test_cluster_serving_runtime_matches_the_contract(render):
    pins = versions_env()
    csr = by_name(
        render(CANARY, sets=("clusterServingRuntime.create=true",)), "ClusterServingRuntime", "mlrollout-onnx"
    )
    spec = csr["spec"]
    assert spec["supportedModelFormats"] == [
        {"name": "onnx", "version": "1", "autoSelect": True, "priority": 2}
    ]
    assert spec["protocolVersions"] == ["v1", "v2", "grpc-v2"]
    assert spec["annotations"] == {
        "prometheus.kserve.io/port": "8080",
        "prometheus.kserve.io/path": "/metrics",
    }
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"] == f"{pins['MLROLLOUT_RUNTIME_IMAGE']}:{pins['MLROLLOUT_VERSION']}"
    assert container["args"] == [
        "--model_name={{.Name}}",
        "--model_dir=/mnt/models",
        "--http_port=8080",
        "--grpc_port=8081",
    ]
    assert container["ports"] == [
        {"name": "http1", "containerPort": 8080, "protocol": "TCP"},
        {"name": "h2c", "containerPort": 8081, "protocol": "TCP"},
    ]
    assert container["securityContext"] == VALUES["containerSecurityContext"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_knative_cluster_serving_runtime_is_the_one_port_twin(render):
    """mlrollout-onnx-knative = mlrollout-onnx with one container port (Knative allows one across all
    containers), no gRPC server, no auto-select (KServe's webhook denies two auto-select runtimes with the
    same format, protocol and priority) and a securityContext Knative admits."""
    objs = render(CANARY, sets=("clusterServingRuntime.create=true",))
    std = by_name(objs, "ClusterServingRuntime", "mlrollout-onnx")["spec"]
    kn = by_name(objs, "ClusterServingRuntime", "mlrollout-onnx-knative")["spec"]
    assert kn["supportedModelFormats"] == [{"name": "onnx", "version": "1", "autoSelect": False}]
    assert kn["protocolVersions"] == ["v1", "v2"]  # no grpc-v2: Knative exposes only the HTTP port
    (kn_c,) = kn["containers"]
    (std_c,) = std["containers"]
    assert kn_c["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"}]
    assert kn_c["args"] == [*std_c["args"], "--enable_grpc=false"]  # --grpc_port stays; nothing listens
    assert set(kn_c["securityContext"]) <= KNATIVE_CONTAINER_SECURITY_CONTEXT_FIELDS
    pod = VALUES["podSecurityContext"]
    assert kn_c["securityContext"] == {
        **VALUES["containerSecurityContext"],
        "runAsUser": pod["runAsUser"],
        "runAsGroup": pod["runAsGroup"],
    }
    same = ("name", "image", "imagePullPolicy", "resources", "volumeMounts")
    assert {k: kn_c[k] for k in same} == {k: std_c[k] for k in same}
    assert kn["volumes"] == std["volumes"] and kn["annotations"] == std["annotations"]


# ---------------------------------------------------------------------------------------- security


@pytest.mark.parametrize("values_file", CI_FILES)
def test_every_controlled_container_is_restricted(render, values_file):
    assert assert_restricted(render(f"ci/{values_file}")) >= 2


@pytest.mark.parametrize("values_file", CI_FILES)
def test_rbac_is_least_privilege(render, values_file):
    objs = render(f"ci/{values_file}")
    if not kinds(objs, "Role"):
        return  # rbac.create=false (triton-pvc)
    runner = {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"}
    assert_pipeline_rbac(objs, f"{FULL}-pipeline", runner, name=FULL)


def test_rbac_subjects_can_be_emptied(render):
    assert_pipeline_rbac(render(CANARY, sets=("rbac.subjects=null",)), f"{FULL}-pipeline", None)
    assert_pipeline_rbac(render(CANARY, sets=("rbac.create=false",)), f"{FULL}-pipeline", None)


def test_network_policy_allows_only_gateway_prometheus_dns_and_storage(render):
    objs = render(CANARY)
    np = by_name(objs, "NetworkPolicy", FULL)["spec"]
    assert np["policyTypes"] == ["Ingress", "Egress"]
    assert np["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "mlrollout-model",
        "app.kubernetes.io/instance": "bc",
        "app.kubernetes.io/component": "predictor",
    }
    sources = [peer for rule in np["ingress"] for peer in rule["from"]]
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "envoy-gateway-system"}}
    } in sources
    assert {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
    } in sources
    for peer in sources:  # no open "from everywhere" peer
        assert peer.get("namespaceSelector", {"x": 1}) != {} and (
            peer.get("podSelector") != {} or "namespaceSelector" in peer
        )
    egress_ports = sorted(p["port"] for rule in np["egress"] for p in rule["ports"])
    assert egress_ports == [53, 53, 8333, 9000]
    # the selected pods are exactly the predictors: their labels come from spec.predictor.labels
    for isvc in kinds(objs, "InferenceService"):
        labels = isvc["spec"]["predictor"]["labels"]
        assert np["podSelector"]["matchLabels"].items() <= labels.items()
    test_pod_labels = one(objs, "Pod")["metadata"]["labels"]
    test_peer = next(p for p in sources if "podSelector" in p and "namespaceSelector" not in p)
    assert test_peer["podSelector"]["matchLabels"].items() <= test_pod_labels.items()


def test_knative_network_policy_admits_the_autoscaler(render):
    """Finding #14: the Knative autoscaler scrapes every pod's queue-proxy on 9090 from knative-serving."""
    np = by_name(render(KNATIVE), "NetworkPolicy", FULL)["spec"]
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "knative-serving"}}}
    (rule,) = [r for r in np["ingress"] if peer in r["from"]]
    assert rule["ports"] == [
        {"port": 8012, "protocol": "TCP"},
        {"port": 8080, "protocol": "TCP"},
        {"port": 9090, "protocol": "TCP"},
    ]
    std = by_name(render(CANARY), "NetworkPolicy", FULL)["spec"]
    assert 9090 not in {p["port"] for r in std["ingress"] for p in r["ports"]}


def test_test_pod_network_policy_allows_only_dns_and_the_predictors(render):
    objs = render(CANARY)
    np = by_name(objs, "NetworkPolicy", f"{FULL}-test")["spec"]
    assert np["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in np
    assert np["podSelector"]["matchLabels"].items() <= one(objs, "Pod")["metadata"]["labels"].items()
    (dns, predictors) = np["egress"]
    assert sorted(p["port"] for p in dns["ports"]) == [53, 53]
    assert predictors["ports"] == [{"port": 8080, "protocol": "TCP"}]
    for isvc in kinds(objs, "InferenceService"):
        assert (
            predictors["to"][0]["podSelector"]["matchLabels"].items()
            <= isvc["spec"]["predictor"]["labels"].items()
        )


def test_pdb_per_inference_service(render):
    objs = render(CANARY)
    pdbs = {p["metadata"]["name"]: p["spec"] for p in kinds(objs, "PodDisruptionBudget")}
    assert set(pdbs) == {o["metadata"]["name"] for o in kinds(objs, "InferenceService")}
    for isvc in kinds(objs, "InferenceService"):
        selector = pdbs[isvc["metadata"]["name"]]["selector"]["matchLabels"]
        assert selector.items() <= isvc["spec"]["predictor"]["labels"].items()
        assert selector["mlrollout.io/track"] == isvc["metadata"]["labels"]["mlrollout.io/track"]


@pytest.mark.parametrize("values_file", CI_FILES)
def test_storage_wiring_uses_an_existing_secret_only(render, values_file):
    objs = render(f"ci/{values_file}")
    assert not kinds(objs, "Secret"), "the chart must never render credentials"
    sa = predictor_sa(objs)
    for isvc in kinds(objs, "InferenceService"):
        assert isvc["spec"]["predictor"]["serviceAccountName"] == sa["metadata"]["name"]
    ann = sa["metadata"]["annotations"]
    assert ann["serving.kserve.io/s3-endpoint"] == "seaweedfs.kubeflow:9000"
    assert ann["serving.kserve.io/s3-usehttps"] == "0"
    assert ann["serving.kserve.io/s3-usevirtualbucket"] == "false"
    assert "serving.kserve.io/s3-region" in ann
    if "triton" in values_file:  # pvc:// needs no credentials
        assert "secrets" not in sa
    else:
        assert sa["secrets"] == [{"name": "kfp-s3-credentials"}]


def test_no_credentials_in_values():
    text = (CHART / "values.yaml").read_text() + "".join(p.read_text() for p in (CHART / "ci").glob("*.yaml"))
    assert not re.search(r"(?i)(AWS_SECRET_ACCESS_KEY|secretkey|password)\s*:", text)


# ------------------------------------------------------------------------------ helm test and NOTES


def run_hook_script(
    pod: dict, base_url: str, tmp_path: Path, attempts: int = 2
) -> subprocess.CompletedProcess:
    """Run the helm-test Pod's own shell script (real sh + curl) here, with its URL's scheme and host
    replaced by `base_url` (the path stays as rendered) and the Pod's /tmp replaced by `tmp_path`."""
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    path = "/" + env["URL"].split("://", 1)[1].split("/", 1)[1]
    script = container["args"][0].replace("/tmp/body", str(tmp_path / "body"))
    local_env = {**env, "URL": base_url + path, "ATTEMPTS": str(attempts), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        ["/bin/sh", "-c", script], env=local_env, capture_output=True, text=True, timeout=120
    )


class _FakeModel(BaseHTTPRequestHandler):
    """Answers like the runtime's V1 endpoint; `mode` picks a healthy or a broken answer."""

    mode = "ok"
    seen: ClassVar[list[dict]] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "body": body})
        if self.mode == "ok":
            status, answer = 200, {"predictions": [0] * len(body["instances"])}
        elif self.mode == "no-predictions":
            status, answer = 200, {"error": "nothing"}
        else:
            status, answer = 503, {"error": "model not ready"}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed: the hook script cannot run here")
@pytest.mark.parametrize(("mode", "rc"), [("ok", 0), ("no-predictions", 1), ("unavailable", 1)])
def test_helm_test_hook_script_sends_the_configured_row(render, mode, rc, tmp_path):
    """Run the hook Pod's own shell script (real sh + curl) against a local HTTP server on a free port."""
    pod = one(render(CANARY), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert (
        env["URL"]
        == f"http://{FULL}-stable-predictor.{NAMESPACE}.svc.cluster.local/v1/models/breast-cancer:predict"
    )
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert json.loads(env["BODY"]) == {"instances": values["test"]["instances"]}
    assert len(values["test"]["instances"][0]) == 30

    _FakeModel.mode, _FakeModel.seen = mode, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeModel)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        proc = run_hook_script(pod, base, tmp_path, attempts=2)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert proc.returncode == rc, proc.stdout + proc.stderr
    assert _FakeModel.seen and _FakeModel.seen[0]["body"] == json.loads(env["BODY"])
    assert _FakeModel.seen[0]["path"] == "/v1/models/breast-cancer:predict"
    if mode == "unavailable":
        assert len(_FakeModel.seen) == 2 and "after 2 attempts" in proc.stdout
    if mode == "ok":
        assert "PASS" in proc.stdout


def test_notes_tell_how_to_call_and_watch(tools):
    proc = tools.run(
        tools.helm,
        "install",
        "bc",
        CHART,
        "--dry-run=client",
        "--namespace",
        NAMESPACE,
        "-f",
        CHART / CANARY,
        check=True,
    )
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "Traffic: 90% -> bc-mlrollout-model-stable, 10% -> bc-mlrollout-model-canary" in notes
    assert f"kubectl -n {NAMESPACE} get httproute {FULL}" in notes
    assert f"port-forward svc/{FULL}-stable-predictor 8080:80" in notes
    assert "/v1/models/breast-cancer:predict" in notes
    assert f"helm test bc -n {NAMESPACE} --logs" in notes


# ------------------------------------------------------------------------------------------- docs


def test_readme_documents_every_value():
    python = ROOT / ".venv" / "bin" / "python"
    cmd = [
        str(python) if python.exists() else "python3",
        "helm/values_doc.py",
        "helm/mlrollout-model",
        "--check",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    readme = (CHART / "README.md").read_text()

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v:
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    missing = [
        k for k in leaves(yaml.safe_load((CHART / "values.yaml").read_text())) if f"`{k}`" not in readme
    ]
    assert not missing, f"undocumented values: {missing}"
    for name in (
        "<fullname>-stable-predictor",
        "<fullname>-canary-predictor",
        "<fullname>-rollout",
        'conflict with "mlrollout-rollout"',
        "storage-initializer-sourceuri",
        "mlrollout-onnx-knative",
        "isvc.<name>-predictor",
    ):
        assert name in readme


def test_knative_notes_use_the_knative_ingress(tools):
    proc = tools.run(tools.helm, "install", "bc", CHART, "--dry-run=client", "--namespace", NAMESPACE,
                     "-f", CHART / "ci" / "knative-canary-values.yaml", check=True)  # fmt: skip
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "Traffic: 20% -> latest revision" in notes
    assert "The ClusterServingRuntime mlrollout-onnx-knative must exist" in notes
    assert f"get inferenceservice {FULL} -o jsonpath='{{.status.url}}'" in notes
    assert "port-forward" not in notes  # Knative's <isvc>-predictor Service is an ExternalName


ROUTED = [
    ("Exact", "/v1/models/breast-cancer:predict"),
    ("Exact", "/v1/models/breast-cancer"),
    ("PathPrefix", "/v2/models/breast-cancer"),
    ("Exact", "/v2/health/ready"),
    ("Exact", "/v2/health/live"),
    ("Exact", "/v2"),
]


def _matches(route: dict) -> list[tuple[str, str]]:
    (rule,) = route["spec"]["rules"]
    return [(m["path"]["type"], m["path"]["value"]) for m in rule["matches"]]


def _routed(matches: list[tuple[str, str]], path: str) -> bool:
    """Gateway API path matching: Exact, or PathPrefix element by element."""
    for kind, value in matches:
        if kind == "Exact" and path == value:
            return True
        if kind == "PathPrefix" and (path == value or path.startswith(value.rstrip("/") + "/")):
            return True
    return False


@pytest.mark.parametrize(
    "values_file", ["canary-values.yaml", "blue-green-values.yaml", "rolling-values.yaml"]
)
def test_route_forwards_only_inference_metadata_and_health(render, values_file):
    """hardening.md S1/S8: the route forwarded every path, /metrics and the model-repository API included."""
    matches = _matches(one(render(f"ci/{values_file}"), "HTTPRoute"))
    assert matches == ROUTED
    for path in (
        "/v1/models/breast-cancer:predict",
        "/v2/models/breast-cancer/infer",
        "/v2/models/breast-cancer/ready",
        "/v2/health/ready",
    ):
        assert _routed(matches, path), path
    for path in (
        "/metrics",
        "/v2/repository/models/breast-cancer/unload",
        "/v2/repository/index",
        "/docs",
        "/",
        "/v2/models/breast-cancerX/infer",
        "/v1/models/breast-cancer:explain",
    ):
        assert not _routed(matches, path), path


def test_route_paths_follow_the_model_name(render):
    matches = _matches(one(render(CANARY, sets=("model.name=fraud",)), "HTTPRoute"))
    assert ("Exact", "/v1/models/fraud:predict") in matches and ("PathPrefix", "/v2/models/fraud") in matches


def test_fault_injection_env_is_refused_in_a_release(tools):
    proc = tools.run(
        tools.helm, "template", "bc", CHART, "-n", NAMESPACE, "-f", CHART / CANARY,
        "--set", "model.env[0].name=MLROLLOUT_FAULT_ERROR_RATE", "--set-string", "model.env[0].value=1",
    )  # fmt: skip
    assert proc.returncode != 0
    assert "MLROLLOUT_FAULT_ERROR_RATE is the runtime's test-only fault injection" in proc.stderr
