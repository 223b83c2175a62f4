"""The ModelRollout CRD (helm/mlrollout-operator/crds/modelrollouts.mlrollout.io.yaml), offline.

It parses and is a valid, structural apiextensions/v1 CRD; its names are serving/rollout/crd.py's; its
defaults are gates.DEFAULTS and RolloutSpec's; its threshold ranges refuse exactly what the gates refuse;
its enums are the code's (routers, phases, actions, verdicts, webhook types); the printer columns read
status fields that exist; the chart around it passes `helm lint --strict` and `helm template`. The
API server's own verdicts (CEL messages, defaulting, the status subresource) are
tests/controlplane/test_modelrollout_crd.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from serving.contract.modelcard import SEMVER_RE
from serving.rollout import commands, crd, gates, hooks, kube
from serving.rollout.cli import parse_duration
from serving.rollout.gates import Verdict
from serving.rollout.machine import Action, Phase, RolloutSpec
from serving.rollout.routers import ROUTERS, mirrors
from tests.chart.conftest import tools, versions_env  # noqa: F401  (tools: the pinned helm, or a skip naming why)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "mlrollout-operator"
CRD_FILE = CHART / "crds" / "modelrollouts.mlrollout.io.yaml"
MODEL_CHART_SCHEMA = ROOT / "helm" / "mlrollout-model" / "values.schema.json"


@pytest.fixture(scope="module")
def doc() -> dict:
    docs = [d for d in yaml.safe_load_all(CRD_FILE.read_text()) if d]
    assert len(docs) == 1, "one file, one CRD"
    return docs[0]


@pytest.fixture(scope="module")
def version(doc) -> dict:
    (v,) = doc["spec"]["versions"]
    return v


@pytest.fixture(scope="module")
def schema(version) -> dict:
    return version["schema"]["openAPIV3Schema"]


def at(schema: dict, path: str) -> dict:
    """The schema node at a dotted path of property names (``[]`` steps into array items)."""
    node = schema
    for part in path.split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


def camel_to_snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def rule_of(node: dict, contains: str) -> dict:
    (r,) = [r for r in node.get("x-kubernetes-validations", []) if contains in r["rule"]]
    return r


# ------------------------------------------------------------------------------- shape and names


def test_names_are_the_code_contract(doc, version):
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1" and doc["kind"] == "CustomResourceDefinition"
    assert doc["metadata"]["name"] == crd.CRD_NAME == f"{crd.PLURAL}.{crd.GROUP}"
    spec = doc["spec"]
    assert (spec["group"], spec["scope"]) == (crd.GROUP, "Namespaced")
    assert (spec["names"]["kind"], spec["names"]["plural"]) == (crd.KIND, crd.PLURAL)
    assert (version["name"], version["served"], version["storage"]) == (crd.VERSION, True, True)
    assert version["subresources"] == {"status": {}}
    assert isinstance(crd.MODELROLLOUT, kube.GVR)
    assert (spec["group"], version["name"], spec["names"]["plural"]) == crd.MODELROLLOUT
    assert crd.API_VERSION == "mlrollout.io/v1alpha1"


def test_is_a_valid_crd_for_the_cluster_kubernetes(doc):
    kubernetes_validate.validate(doc, "1.34", strict=True)


def walk(node: dict, path: str = ""):
    yield path or ".", node
    for name, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")


def test_schema_is_structural(schema):
    """Every node has a type (no preserve-unknown-fields, no int-or-string escape hatches); properties
    only on objects, items only on arrays: what apiextensions calls a structural schema."""
    for path, node in walk(schema):
        assert node.get("type") in ("object", "array", "string", "integer", "number", "boolean"), path
        assert "x-kubernetes-preserve-unknown-fields" not in node, path
        if "properties" in node:
            assert node["type"] == "object", path
        if "items" in node:
            assert node["type"] == "array", path
        for req in node.get("required", []):
            assert isinstance(req, str) and req in node["properties"], f"{path}: required {req!r}"
    # metadata stays the API server's (only type: object there)
    assert schema["properties"]["metadata"] == {"type": "object"}


def test_every_cel_rule_has_a_message(schema):
    rules = [(p, r) for p, n in walk(schema) for r in n.get("x-kubernetes-validations", [])]
    assert len(rules) >= 8
    for path, r in rules:
        assert r.get("message") or r.get("messageExpression"), f"{path}: {r['rule']} has no message"


# ------------------------------------------------------------------------------- defaults


def test_strategy_defaults_are_rollout_spec_defaults(schema):
    strategy = at(schema, "spec.strategy")
    props = strategy["properties"]
    d = RolloutSpec()
    assert strategy["default"] == {}
    assert props["steps"]["default"] == list(d.steps)
    assert parse_duration(props["interval"]["default"]) == d.interval_s
    assert props["threshold"]["default"] == d.threshold
    assert props["maxInconclusive"]["default"] == d.max_inconclusive
    # the defaults pass the CRD's own rules as RolloutSpec checks them
    assert RolloutSpec(steps=tuple(props["steps"]["default"])) == d


def test_gate_fields_and_defaults_are_gates_defaults(schema):
    node = at(schema, "spec.strategy.gates")
    assert node["default"] == {}
    props = dict(node["properties"])
    assert props.pop("driftGate")["default"] is True  # gates.defaults(drift=True)
    assert props.pop("compareWithStable")["default"] is True  # gates.defaults(compare=True)
    by_snake = {camel_to_snake(k): v for k, v in props.items()}
    assert set(by_snake) == set(gates.DEFAULTS), "one CRD field per gates.DEFAULTS setting"
    for name, value in gates.DEFAULTS.items():
        if value is None:  # min_accuracy: absent means no accuracy gate
            assert "default" not in by_snake[name], name
        else:
            assert by_snake[name]["default"] == value, name
    # the defaulted gates build
    assert gates.defaults(**{k: v["default"] for k, v in by_snake.items() if "default" in v})


def schema_accepts(node: dict, v: float) -> bool:
    """What a numeric schema node's minimum/maximum (and exclusive flags) admit."""
    if "minimum" in node:
        lo = node["minimum"]
        if v < lo or (node.get("exclusiveMinimum") and v == lo):
            return False
    if "maximum" in node:
        hi = node["maximum"]
        if v > hi or (node.get("exclusiveMaximum") and v == hi):
            return False
    return True


def gates_accept(name: str, v: float) -> bool:
    # the accuracy gate (whose constructor checks its settings) exists only with a min_accuracy
    accuracy = {"min_accuracy": 0.5} if name in ("max_accuracy_drop", "min_labelled") else {}
    try:
        gates.defaults(**{**accuracy, name: v})
    except ValueError:
        return False
    return True


PROBES = [-1, 0, 1e-9, 0.5, 1, 1.5, 2, 20, 100, 101, 5000]


@pytest.mark.parametrize("name", [k for k, v in gates.DEFAULTS.items() if k != "drift_method"])
def test_threshold_ranges_refuse_what_the_gates_refuse(schema, name):
    """At every probe value, the schema's range admits a threshold exactly when the gate's own
    constructor does (drift with its default method js: the CEL rule caps maxDrift at 1 there)."""
    props = at(schema, "spec.strategy.gates")["properties"]
    (field,) = [k for k in props if camel_to_snake(k) == name]
    node = props[field]
    for v in PROBES:
        if node["type"] == "integer" and v != int(v):
            continue
        v = int(v) if node["type"] == "integer" else float(v)
        crd_ok = schema_accepts(node, v) and not (name == "max_drift" and v > 1)
        assert crd_ok == gates_accept(name, v), f"{field}={v}: CRD {'admits' if crd_ok else 'refuses'} it"


def test_drift_cap_rule_is_for_js_only(schema):
    r = rule_of(at(schema, "spec.strategy.gates"), "maxDrift")
    assert "'js'" in r["rule"] and "<= 1.0" in r["rule"]
    assert gates.DriftGate(method="psi", max_drift=1.5)  # PSI is not capped at 1: the rule lets it through


def test_nullable_accuracy_drop_means_no_comparison(schema):
    node = at(schema, "spec.strategy.gates.maxAccuracyDrop")
    assert node["nullable"] is True
    assert gates.AccuracyGate(max_drop=None).max_drop is None


# ------------------------------------------------------------------------------- enums and patterns


def test_router_enum_is_the_registry_cluster_routers(schema):
    """The routers that drive a release of the chart in a cluster (they have ``for_release``); the only
    one left out is local_proxy, HAProxy on the machine that runs the CLI, which no operator reaches."""
    cluster = [name for name, cls in ROUTERS.items() if hasattr(cls, "for_release")]
    assert at(schema, "spec.strategy.router")["enum"] == cluster
    assert set(ROUTERS) - set(cluster) == {"local_proxy"}
    r = rule_of(at(schema, "spec"), "|| self.strategy.router in ['kserve_knative', 'kserve_canary']")
    assert "['kserve_knative', 'kserve_canary']" in r["rule"]
    assert {"kserve_knative", "kserve_canary"} <= set(cluster)


def test_the_shadow_step_is_the_spec_flag_and_refused_where_no_router_mirrors(schema):
    shadow = at(schema, "spec.strategy.shadow")
    assert set(shadow["properties"]) == {"enabled"}
    assert at(schema, "spec.strategy.shadow.enabled") == {
        **at(schema, "spec.strategy.shadow.enabled"),
        "type": "boolean",
        "default": RolloutSpec().shadow,
    }
    r = rule_of(at(schema, "spec"), "self.strategy.shadow.enabled")
    # the routers the rule lets through are the cluster routers that mirror, and only those
    cluster = [name for name, cls in ROUTERS.items() if hasattr(cls, "for_release")]
    refused = [name for name in cluster if f"'{name}'" in r["rule"]]
    assert refused == [n for n in cluster if not mirrors(n)] == ["kserve_knative", "kserve_canary"]
    assert "inferenceService" in r["rule"] and r["fieldPath"] == ".strategy.shadow.enabled"


def test_status_enums_are_the_state_machine(schema):
    phases = [p.value for p in Phase]
    assert at(schema, "status.phase")["enum"] == [*phases, crd.INITIALIZED], "plus a first install's"
    assert at(schema, "status.history.[].phase")["enum"] == phases
    assert at(schema, "status.history.[].action")["enum"] == [a.value for a in Action]
    verdicts = [v.value for v in Verdict]
    assert at(schema, "status.history.[].verdict")["enum"] == verdicts
    assert at(schema, "status.lastAnalysis.[].verdict")["enum"] == verdicts
    assert at(schema, "status.history")["maxItems"] == crd.STATUS_HISTORY_LIMIT


def test_status_conditions_are_metav1_conditions(schema):
    cond = at(schema, "status.conditions")
    assert cond["x-kubernetes-list-type"] == "map" and cond["x-kubernetes-list-map-keys"] == ["type"]
    item = cond["items"]
    assert item["required"] == ["type", "status", "reason", "message", "lastTransitionTime"]
    assert set(item["properties"]) == {*item["required"], "observedGeneration"}
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
    type_re = re.compile(item["properties"]["type"]["pattern"])
    assert all(type_re.match(t) for t in crd.CONDITION_TYPES)
    for t in crd.CONDITION_TYPES:
        assert t in cond["description"]


def test_last_analysis_carries_the_gate_evidence(schema):
    item = at(schema, "status.lastAnalysis.[]")
    assert {"gate", "value", "threshold", "n", "verdict"} <= set(item["properties"])
    assert item["properties"]["value"]["nullable"] is True  # an inconclusive gate has no value
    assert item["properties"]["op"]["enum"] == ["<=", ">="]


def test_webhooks(schema):
    webhooks = at(schema, "spec.webhooks")
    assert webhooks["x-kubernetes-list-map-keys"] == ["name"]
    item = webhooks["items"]
    assert item["required"] == ["name", "type", "url"]
    assert item["properties"]["type"]["enum"] == list(crd.WEBHOOK_TYPES)
    assert parse_duration(item["properties"]["timeout"]["default"]) > 0
    assert "startsWith('https://')" in item["properties"]["url"]["x-kubernetes-validations"][0]["rule"]
    # the bound on a call's timeout is the code's own (hooks.py caps whatever the spec says)
    rule = item["properties"]["timeout"]["x-kubernetes-validations"][0]["rule"]
    assert f"duration(self) <= duration('{hooks.MAX_TIMEOUT_S / 60:g}m')" in rule


def test_last_command_is_the_operators_acknowledgement(schema):
    ack = at(schema, "status.lastCommand")
    assert ack["required"] == ["id", "command", "result"]
    assert ack["properties"]["result"]["enum"] == [commands.APPLIED, commands.REJECTED]
    sample = commands.ack(commands.Command("pause", "n"), commands.APPLIED, "ok", 0.0)["lastCommand"]
    assert set(sample) == set(ack["properties"])


def cel_regex(node: dict) -> re.Pattern:
    """The regex inside a node's ``self.matches('...')`` rule, unescaped from the CEL string literal."""
    (r,) = [r["rule"] for r in node["x-kubernetes-validations"] if "matches(" in r["rule"]]
    literal = re.search(r"matches\('(.*?)'\)", r).group(1)
    return re.compile(literal.replace("\\\\", "\\"))


VERSIONS = ["1.0.0", "0.1.0", "10.20.30", "2.0.0-rc.1", "1.0.0+build.5", "1.0.0-a+b"]
NOT_VERSIONS = ["v1", "1.0", "01.0.0", "1.0.0.0", "", "1.0.0 ", "latest", "1.0.0-"]


def test_version_rule_is_the_model_card_semver(schema):
    rx = cel_regex(at(schema, "spec.model.version"))
    for v in VERSIONS + NOT_VERSIONS:
        assert bool(rx.match(v)) == bool(SEMVER_RE.match(v)), v
    assert all(rx.match(v) for v in VERSIONS) and not any(rx.match(v) for v in NOT_VERSIONS)


def test_storage_uri_is_the_model_chart_pattern_but_required(schema):
    import json

    chart = json.loads(MODEL_CHART_SCHEMA.read_text())
    chart_rx = re.compile(chart["properties"]["model"]["properties"]["storageUri"]["pattern"])
    ours = re.compile(at(schema, "spec.model.storageUri")["pattern"])
    for uri in [
        "s3://b/m",
        "pvc://claim/m",
        "gs://b/m",
        "https://h/m",
        "oci://r/m:1",
        "hf://o/m",
        "file:///m",
    ]:
        assert bool(ours.match(uri)) == bool(chart_rx.match(uri)), uri
    assert chart_rx.match("") and not ours.match("")
    assert at(schema, "spec.model")["required"] == ["storageUri", "version"]


@pytest.mark.parametrize("path", ["spec.strategy.interval", "spec.webhooks.[].timeout"])
def test_duration_rule_agrees_with_the_cli(schema, path):
    rx = cel_regex(at(schema, path))
    for text in ["30s", "1m", "1m30s", "500ms", "2.5s", "1h"]:
        assert rx.fullmatch(text) and parse_duration(text) > 0, text
    for text in ["", "30", "1 m", "-1s", "1d", "s"]:
        assert not rx.fullmatch(text), text


def test_steps_rules(schema):
    steps = at(schema, "spec.strategy.steps")
    assert (steps["items"]["minimum"], steps["items"]["maximum"]) == (1, 100)
    assert steps["minItems"] == 1 and steps["maxItems"] == 100  # maxItems bounds the CEL cost
    messages = " | ".join(r.get("message", "") for r in steps["x-kubernetes-validations"])
    assert "strictly increasing" in messages and "last step must be 100" in messages
    assert "from 1 to 100" in messages


def test_exactly_one_target(schema):
    target = at(schema, "spec.target")
    assert rule_of(target, "has(self.release)")["rule"] == "has(self.release) != has(self.inferenceService)"
    assert at(schema, "spec")["required"] == ["target", "model"]


# ------------------------------------------------------------------------------- printer columns


def test_printer_columns(version, schema):
    cols = version["additionalPrinterColumns"]
    assert [c["name"] for c in cols] == ["Phase", "Weight", "Step", "Stable", "Canary", "Age"]
    for c in cols:
        path = c["jsonPath"]
        if path == ".metadata.creationTimestamp":
            assert c["type"] == "date"
            continue
        node = at(schema, path.lstrip("."))
        assert c["type"] == node["type"], c["name"]


# ------------------------------------------------------------------------------- the chart


def test_chart_lints_and_templates(tools):  # noqa: F811
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert (chart["apiVersion"], chart["name"], chart["version"]) == ("v2", "mlrollout-operator", "0.2.0")
    assert chart["appVersion"] == versions_env()["MLROLLOUT_VERSION"] and chart["description"]
    tools.run(tools.helm, "lint", "--strict", CHART, check=True)
    plain = tools.run(tools.helm, "template", "op", CHART, "--namespace", "mlrollout", check=True)
    # the CRD comes only from crds/ (the operator's objects: tests/chart/test_operator_chart.py)
    assert not [d for d in yaml.safe_load_all(plain.stdout) if d and d["kind"] == "CustomResourceDefinition"]
    full = tools.run(tools.helm, "template", "op", CHART, "--include-crds", check=True)
    crds = [d for d in yaml.safe_load_all(full.stdout) if d and d["kind"] == "CustomResourceDefinition"]
    assert crds == [yaml.safe_load(CRD_FILE.read_text())], "helm renders the one CRD file as it is"


def test_cohort_patterns_are_the_cohort_module_names(schema):
    """spec.strategy.cohort's patterns refuse on the API server what serving.rollout.cohorts refuses."""
    from serving.rollout import cohorts

    node = at(schema, "spec.strategy.cohort")["properties"]
    cases = {
        "header": (cohorts.HEADER_NAME, ["x-user-id", "X1", "a" * 128, "", "-x", "x y", "x_y", "x;y"]),
        "cookie": (cohorts.COOKIE_NAME, ["uid", "a.b_c-d", "", "a=b", "a b", "a;b"]),
        "exact": (cohorts.MATCH_VALUE, ["always", "v1.2~x", "", "a b", "a}", "a=b"]),
    }
    for field, (ours, values) in cases.items():
        rx = re.compile(node[field]["pattern"])
        for v in values:
            crd_ok = bool(rx.match(v)) and len(v) <= node[field]["maxLength"]
            assert crd_ok == bool(ours.fullmatch(v)), (field, v)


def test_a_cohort_rule_asks_for_a_release_and_gateway_api(schema):
    r = rule_of(at(schema, "spec"), "self.strategy.cohort")
    assert "!has(self.target.inferenceService)" in r["rule"] and "'gateway_api'" in r["rule"]
    assert r["fieldPath"] == ".strategy.cohort"
    assert (
        rule_of(at(schema, "spec.strategy.cohort"), "header")["rule"]
        == "has(self.header) != has(self.cookie)"
    )
