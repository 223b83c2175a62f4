"""GitOps ownership (serving/rollout/gitops.py) without a cluster: the route's rules written from the
chart's template with the live weights, only when they differ (server defaults ignored); Flagger's
initialization due only when the stable InferenceService serves no model; the stable version without a
record; what initialization and the canary deploy write, over a fake CustomObjectsApi that records every
call. The real thing, with helm and the operator processes, is tests/controlplane/test_gitops.py."""

from __future__ import annotations

import copy
import json

import pytest

from serving.rollout import gitops
from serving.rollout.routers import GatewayApiRouter, KServeKnativeRouter

S, C = "m-stable-predictor", "m-canary-predictor"
RULE = {
    "matches": [{"path": {"type": "Exact", "value": "/v1/models/m:predict"}}],
    "backendRefs": [
        {"group": "", "kind": "Service", "name": S, "port": 80, "weight": 100},
        {"group": "", "kind": "Service", "name": C, "port": 80, "weight": 0},
    ],
    "timeouts": {"request": "30s"},
}


def route(rules=None, template=(RULE,)) -> dict:
    ann = {} if template is None else {gitops.RULES_ANNOTATION: json.dumps(list(template))}
    meta = {"name": "m", "namespace": "ns", "resourceVersion": "7", "annotations": ann}
    obj: dict = {"metadata": meta, "spec": {}}
    if rules is not None:
        obj["spec"]["rules"] = rules
    return obj


def weighted(s: int, c: int, **extra) -> list[dict]:
    r = copy.deepcopy(RULE)
    r["backendRefs"][0]["weight"], r["backendRefs"][1]["weight"] = s, c
    for ref in r["backendRefs"]:
        ref.update(extra)
    return [r]


def test_first_install_gets_the_template_all_on_stable():
    default = [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}]  # the CRD's default rule
    assert gitops.desired_rules(route(default), S, C) == weighted(100, 0)
    assert gitops.desired_rules(route(None), S, C) == weighted(100, 0)


def test_live_weights_are_kept_and_an_equal_route_is_left_alone():
    # mid-rollout 70/30 with a changed timeout in the template: the rule follows git, the weights stay
    tmpl = copy.deepcopy(RULE)
    tmpl["timeouts"] = {"request": "10s"}
    want = gitops.desired_rules(route(weighted(70, 30), template=[tmpl]), S, C)
    assert want[0]["timeouts"] == {"request": "10s"}
    assert [b["weight"] for b in want[0]["backendRefs"]] == [70, 30]
    # the same rule, plus fields the API server defaults: nothing to write (no resourceVersion churn)
    assert gitops.desired_rules(route(weighted(70, 30, namespace="ns")), S, C) is None
    assert gitops.desired_rules(route(weighted(0, 100)), S, C) is None


def test_a_route_the_chart_renders_itself_is_never_touched():
    assert gitops.desired_rules(route(weighted(90, 10), template=None), S, C) is None


def test_a_broken_template_is_one_clear_error():
    bad = route(None)
    bad["metadata"]["annotations"][gitops.RULES_ANNOTATION] = "{not json"
    with pytest.raises(ValueError, match=r"mlrollout\.io/route-rules is not JSON"):
        gitops.desired_rules(bad, S, C)
    bad["metadata"]["annotations"][gitops.RULES_ANNOTATION] = '{"a": 1}'
    with pytest.raises(ValueError, match="must be a JSON list"):
        gitops.desired_rules(bad, S, C)


def test_contains_compares_on_the_templates_keys_and_list_lengths():
    assert gitops.contains({"a": 1, "b": 2}, {"a": 1})
    assert not gitops.contains({"a": 1}, {"a": 1, "b": 2})
    assert not gitops.contains([{"a": 1}, {"a": 2}], [{"a": 1}])
    assert not gitops.contains({"w": 1}, {"w": 0})


def isvc(uri: str | None) -> dict:
    model = {"modelFormat": {"name": "onnx"}} | ({"storageUri": uri} if uri else {})
    return {"metadata": {"name": "x", "annotations": {}}, "spec": {"predictor": {"model": model}}}


def test_initialization_is_due_only_when_stable_serves_no_model():
    assert gitops.needs_initialization(isvc(None))
    assert not gitops.needs_initialization(isvc("s3://b/m/1"))
    assert not gitops.needs_initialization(None), "no release installed: nothing to initialize"


def test_the_stable_version_without_a_record():
    obj = {"spec": {"model": {"storageUri": "s3://b/m/2", "version": "2.0.0"}}, "status": {}}
    assert gitops.stable_version_fallback(obj, isvc("s3://b/m/2")) == "2.0.0"
    assert gitops.stable_version_fallback(obj, isvc("s3://b/m/1")) is None
    obj["status"]["stableVersion"] = "1.0.0"
    assert gitops.stable_version_fallback(obj, isvc("s3://b/m/1")) == "1.0.0"


class FakeApi:
    """CustomObjectsApi over a dict, recording each write (kind, name, body, field manager)."""

    def __init__(self, objects: dict[tuple[str, str], dict]):
        self.objects, self.writes = objects, []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if (plural, name) not in self.objects:
            raise type("NotFound", (Exception,), {"status": 404})()
        return copy.deepcopy(self.objects[(plural, name)])

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body, field_manager):
        self.writes.append((plural, name, body, field_manager))
        return body

    def patch_namespaced_custom_object_status(self, group, version, ns, plural, name, body, field_manager):
        self.writes.append((plural + "/status", name, body, field_manager))
        return body


CR = {
    "metadata": {"name": "m", "namespace": "ns", "generation": 1},
    "spec": {"model": {"storageUri": "s3://b/m/1", "version": "1.0.0"}},
}


def test_initialization_records_the_version_first_then_sets_only_owned_fields():
    api = FakeApi({
        ("inferenceservices", "m-stable"): isvc(None), ("inferenceservices", "m-canary"): isvc(None),
        ("httproutes", "m"): route([{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}]}]),
    })  # fmt: skip
    msg = gitops.initialize(api, CR, GatewayApiRouter.for_release("m", "ns"))
    assert msg and msg.startswith("1.0.0 (s3://b/m/1) is the stable model")
    kinds = [(w[0], w[1]) for w in api.writes]
    assert kinds == [("modelrollouts/status", "m"), ("httproutes", "m"),
                     ("inferenceservices", "m-stable"), ("inferenceservices", "m-canary")]  # fmt: skip
    assert api.writes[0][2]["status"] | {"message": ""} == {
        "phase": "Initialized",
        "stableVersion": "1.0.0",
        "message": "",
        "observedGeneration": 1,
    }
    assert api.writes[1][2]["spec"]["rules"] == weighted(100, 0)
    assert api.writes[1][2]["metadata"] == {"resourceVersion": "7"}, "the route write is optimistic"
    for w in api.writes[2:]:
        assert w[2] == {"spec": {"predictor": {"model": {"storageUri": "s3://b/m/1"}}}}, "storageUri only"
    assert {w[3] for w in api.writes} == {"mlrollout-rollout"}
    # once the stable serves a model, nothing is due (an installed release is never re-initialized)
    api.objects[("inferenceservices", "m-stable")] = isvc("s3://b/m/1")
    api.writes.clear()
    assert gitops.initialize(api, CR, GatewayApiRouter.for_release("m", "ns")) is None and not api.writes


def test_knative_initialization_and_canary_touch_the_one_inference_service(monkeypatch):
    api = FakeApi({("inferenceservices", "kn"): isvc(None)})
    release = KServeKnativeRouter.for_release("kn", "ns")
    assert gitops.initialize(api, CR, release)
    assert [(w[0], w[1]) for w in api.writes] == [("modelrollouts/status", "m"),
                                                   ("inferenceservices", "kn")]  # fmt: skip
    assert api.writes[1][2] == {"spec": {"predictor": {"model": {"storageUri": "s3://b/m/1"}}}}, (
        "no canaryTrafficPercent on the first install: all traffic on the one revision"
    )
    api.writes.clear()
    monkeypatch.setattr(gitops.targets, "wait_serving", lambda *a, **k: {"waited": a[2:4]})
    name, obj = gitops.deploy_canary(api, namespace="ns", fullname="kn", release=release,
                                     storage_uri="s3://b/m/2", version="2.0.0")  # fmt: skip
    assert (name, obj) == ("kn", {"waited": ("kn", "s3://b/m/2")})
    dark = {"model": {"storageUri": "s3://b/m/2"}, "canaryTrafficPercent": 0}
    assert api.writes == [("inferenceservices", "kn", {"spec": {"predictor": dark}}, "mlrollout-rollout")]


def test_the_canary_deploy_changes_no_field_the_chart_owns(monkeypatch):
    api = FakeApi({("inferenceservices", "m-canary"): isvc("s3://b/m/1")})
    monkeypatch.setattr(gitops.targets, "wait_serving", lambda *a, **k: {})
    gitops.deploy_canary(api, namespace="ns", fullname="m", release=GatewayApiRouter.for_release("m", "ns"),
                         storage_uri="s3://b/m/2", version="2.0.0")  # fmt: skip
    (w,) = api.writes
    want = {"spec": {"predictor": {"model": {"storageUri": "s3://b/m/2"}}}}
    assert w[:3] == ("inferenceservices", "m-canary", want), "storageUri only: no label, no annotation"


def test_a_seen_generation_is_recorded_once():
    api = FakeApi({})
    obj = copy.deepcopy(CR) | {"status": {"observedGeneration": 0}}
    assert gitops.observe(api, obj)
    assert api.writes == [
        ("modelrollouts/status", "m", {"status": {"observedGeneration": 1}}, "mlrollout-rollout")
    ]
    obj["status"]["observedGeneration"] = 1
    assert not gitops.observe(api, obj) and len(api.writes) == 1, "current: no write, no new resourceVersion"
