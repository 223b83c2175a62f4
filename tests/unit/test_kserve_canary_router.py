"""The ``kserve_canary`` router's patch bodies against KServe 0.20.0's field names, and its config.

The field names are KServe's (pkg/apis/serving/v1beta1/inference_service.go): ``spec.canary[]`` of
``{predictor: {name, ...PredictorSpec}, trafficPercent}``, ``status.canaryStatuses[] {name, ready,
trafficPercent}``. What KServe does with these bodies is shown on the real controller in
tests/controlplane/test_kserve_canary.py.
"""

from __future__ import annotations

import copy

import pytest

from serving.rollout import routers
from serving.rollout.cli import main as cli_main
from serving.rollout.routers import RouterError
from serving.rollout.routers.kserve_canary import (
    CANARY_NAME,
    KServeCanaryRouter,
    canary_name_for,
    dark_entry_body,
    find_entry,
    promote_body,
    remove_body,
    route_body,
    route_weights,
    services_of,
    weight_body,
)

V1, V2 = "s3://models/m/1.0.0", "s3://models/m/2.0.0"


def isvc(*entries: dict, predictor_name: str = "") -> dict:
    predictor = {
        "minReplicas": 4,
        "model": {"modelFormat": {"name": "onnx"}, "runtime": "mlrollout-onnx", "storageUri": V1},
    }
    if predictor_name:
        predictor["name"] = predictor_name
    spec = {"predictor": predictor}
    if entries:
        spec["canary"] = list(entries)
    return {"metadata": {"name": "m", "resourceVersion": "42"}, "spec": spec}


def entry(name: str, pct: int = 0, uri: str = V2, **predictor) -> dict:
    return {"predictor": {"name": name, "model": {"storageUri": uri}, **predictor}, "trafficPercent": pct}


@pytest.mark.parametrize(
    "version, name",
    [
        ("1.1.0", "v1-1-0"),
        ("2.0.0-RC.1", "v2-0-0-rc-1"),
        ("2024_01_31", "v2024-01-31"),
        ("9" * 60, "v" + "9" * 39),
    ],
)
def test_canary_name_for_a_version_is_a_short_dns_label(version, name):
    assert canary_name_for(version) == name
    assert CANARY_NAME.fullmatch(name)


def test_find_entry_by_name_the_only_one_or_none():
    obj = isvc(entry("v2"), entry("v3"))
    assert find_entry(obj, "v3") == 1 and find_entry(obj, "v9") is None
    assert find_entry(isvc(entry("v2")), "") == 0 and find_entry(isvc(), "") is None
    with pytest.raises(RouterError, match=r"2 entries \['v2', 'v3'\]; name one with --canary-name"):
        find_entry(obj, "")


def test_weight_body_writes_the_whole_atomic_list_with_only_the_percent_changed():
    obj = isvc(entry("v2", 10), entry("v3", 5))
    before = copy.deepcopy(obj)
    body = weight_body(obj, 0, 25)
    assert body == {
        "metadata": {"resourceVersion": "42"},
        "spec": {"canary": [entry("v2", 25), entry("v3", 5)]},
    }
    assert obj == before, "the read object is not modified"


def test_renaming_promotion_lays_the_entry_over_stable_and_drops_it():
    body = promote_body(isvc(entry("v2", 50, minReplicas=1)), 0)
    # the canary's fixed size is not stable's: minReplicas stays stable's own (a merge patch keeps it)
    assert body == {
        "metadata": {"resourceVersion": "42"},
        "spec": {"predictor": {"name": "v2", "model": {"storageUri": V2}}, "canary": None},
    }


def test_copy_promotion_keeps_the_stable_predictors_name_and_the_other_entries():
    body = promote_body(isvc(entry("v2", 50), entry("v3", 10), predictor_name="v1"), 0, promotion="copy")
    assert body["spec"] == {"predictor": {"model": {"storageUri": V2}}, "canary": [entry("v3", 10)]}
    with pytest.raises(ValueError, match="promotion must be one of"):
        promote_body(isvc(entry("v2")), 0, promotion="swap")


def test_rollback_body_removes_only_the_entry():
    assert remove_body(isvc(entry("v2", 50)), 0)["spec"] == {"canary": None}
    assert remove_body(isvc(entry("v2", 50), entry("v3", 10)), 0)["spec"] == {"canary": [entry("v3", 10)]}


def test_dark_entry_is_added_at_zero_or_an_existing_one_reset_to_zero():
    added = dark_entry_body(isvc(), "v2-0-0", V2)["spec"]["canary"]
    # only the model's storageUri (and its format, which KServe's webhook needs) is the entry's own
    assert added == [
        {
            "predictor": {"name": "v2-0-0", "model": {"modelFormat": {"name": "onnx"}, "storageUri": V2}},
            "trafficPercent": 0,
        }
    ]
    again = dark_entry_body(isvc(entry("v2-0-0", 40, uri="s3://old")), "v2-0-0", V2)["spec"]["canary"]
    assert again == [entry("v2-0-0", 0)]


def test_config_round_trip_and_refusals():
    cfg = KServeCanaryRouter.for_release("m", "models").config
    assert routers.validate_config(cfg) == cfg and cfg["promotion"] == "copy"
    assert KServeCanaryRouter.state_location(cfg) == ("m-rollout", "m")
    for bad, message in (
        ({"promotion": "swap"}, "promotion 'swap' is not one of rename, copy"),
        ({"canary": "V2_0"}, "is not a spec.canary name"),
        ({"isvc": "Bad_Name"}, "is not a Kubernetes object name"),
        ({"route": "Not_A_Route"}, "route 'Not_A_Route' is not a Kubernetes object name"),
        ({"ingress": "r"}, "unknown kserve_canary fields ['ingress']"),
    ):
        with pytest.raises(ValueError) as e:
            routers.validate_config({**cfg, **bad})
        assert message in str(e.value)


def test_cli_needs_the_inferenceservice(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [
        "start",
        "--router",
        "kserve_canary",
        "--model",
        "m",
        "--stable-version",
        "1",
        "--canary-version",
        "2",
    ]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == "error: --router kserve_canary needs --isvc (the Standard-mode InferenceService with spec.canary)"
    )
    assert cli_main([*argv, "--isvc", "m", "--canary-name", "Not_A_Name"]) == 2
    assert "is not a spec.canary name" in capsys.readouterr().err


def route(*refs: dict, other_rule: bool = True) -> dict:
    rules = [
        {"matches": [{"path": {"type": "PathPrefix", "value": "/docs"}}], "backendRefs": [{"name": "docs"}]}
    ]
    rules = rules if other_rule else []
    rules.append({"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": list(refs)})
    return {
        "metadata": {"name": "r", "namespace": "models", "resourceVersion": "7"},
        "spec": {"rules": rules},
    }


def ref(name: str, weight: int | None = None) -> dict:
    out = {"group": "", "kind": "Service", "name": name, "port": 80}
    return out if weight is None else {**out, "weight": weight}


def test_services_are_kserves_predictor_service_names():
    assert services_of(isvc(entry("v2")), 0) == ("m-predictor", "m-v2-predictor")
    assert services_of(isvc(predictor_name="v1"), None) == ("m-v1-predictor", None)


def test_route_body_sets_our_rule_to_exactly_the_two_services_and_leaves_the_others():
    r = route(ref("m-predictor"))  # the chart's rule: one ref, no weight
    body = route_body(r, "m-predictor", "m-v2-predictor", 75, 25)
    assert body["metadata"] == {"resourceVersion": "7"}
    assert body["spec"]["rules"][0] == r["spec"]["rules"][0], "a rule for another Service is untouched"
    assert body["spec"]["rules"][1]["backendRefs"] == [ref("m-predictor", 75), ref("m-v2-predictor", 25)]
    assert body["spec"]["rules"][1]["matches"] == r["spec"]["rules"][1]["matches"]
    # no entry any more (promoted by rename: the canary's Service is stable's): only that one is left
    after = route(ref("m-predictor", 0), ref("m-v2-predictor", 100))
    assert route_body(after, "m-v2-predictor", None, 100, 0)["spec"]["rules"][1]["backendRefs"] == [
        ref("m-v2-predictor", 100)
    ]


def test_route_weights_read_our_rule():
    assert route_weights(route(ref("m-predictor")), "m-predictor", "m-v2-predictor") == (100, 0)
    assert route_weights(
        route(ref("m-predictor", 3), ref("m-v2-predictor", 1)), "m-predictor", "m-v2-predictor"
    ) == (75, 25)
    assert route_weights(
        route(ref("m-predictor", 0), ref("m-v2-predictor", 0)), "m-predictor", "m-v2-predictor"
    ) == (100, 0)
    with pytest.raises(RouterError, match="has no rule with a backendRef to m-predictor or m-v2-predictor"):
        route_weights(route(ref("elsewhere"), other_rule=False), "m-predictor", "m-v2-predictor")
