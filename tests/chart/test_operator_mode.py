"""The model chart in operator mode (`operator.enabled`): a ModelRollout with the desired model, and none
of the fields the operator owns rendered (no storageUri, no version annotation, no canaryTrafficPercent,
no HTTPRoute spec.rules), so helm's server-side apply never owns them. The rule the operator writes is the
chart's own rule, in an annotation. On the real API server with a real operator: tests/controlplane/
test_gitops.py."""

from __future__ import annotations

import pytest

from serving.rollout import gitops
from tests.chart.conftest import CHART, NAMESPACE
from tests.chart.validators import check_httproute, check_kserve

pytestmark = pytest.mark.chart
# the values operator mode refuses are in test_chart.py BAD_VALUES ("operator ...")

FULL = "bc-mlrollout-model"
BASE = ("model.name=breast-cancer", "model.storageUri=s3://mlpipeline/m/1.0.0", "model.version=1.0.0")
CANARY = (*BASE, "strategy.type=canary")
KNATIVE = (*BASE, "strategy.type=knativeCanary")
ON = ("operator.enabled=true",)


def kinds(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def test_canary_renders_the_desired_model_and_none_of_the_operators_fields(render):
    objs = render(sets=(*CANARY, *ON, "operator.strategy.interval=2s", "operator.strategy.threshold=1"))
    (mr,) = kinds(objs, "ModelRollout")
    assert mr["apiVersion"] == "mlrollout.io/v1alpha1" and mr["metadata"]["name"] == FULL
    assert mr["metadata"]["namespace"] == NAMESPACE
    assert mr["spec"]["target"] == {"release": {"fullname": FULL}}
    assert mr["spec"]["model"] == {
        "name": "breast-cancer",
        "storageUri": "s3://mlpipeline/m/1.0.0",
        "version": "1.0.0",
    }
    assert mr["spec"]["strategy"] == {"interval": "2s", "threshold": 1}, "the router is the CRD's default"
    isvcs = kinds(objs, "InferenceService")
    assert sorted(i["metadata"]["name"] for i in isvcs) == [f"{FULL}-canary", f"{FULL}-stable"]
    for i in isvcs:
        check_kserve(i)
        assert "storageUri" not in i["spec"]["predictor"]["model"]
        assert "mlrollout.io/model-version" not in i["metadata"]["annotations"]
    (route,) = kinds(objs, "HTTPRoute")
    check_httproute(route)
    assert "rules" not in route["spec"], "spec.rules is atomic: rendering it would make helm own the weights"
    # the template is exactly the rule the chart renders without the operator, all traffic on stable
    plain = kinds(render(sets=(*CANARY, "strategy.canary.storageUri=s3://mlpipeline/m/1.0.0")), "HTTPRoute")
    assert gitops.rules_template(route) == plain[0]["spec"]["rules"]
    assert (
        gitops.desired_rules(route, f"{FULL}-stable-predictor", f"{FULL}-canary-predictor")
        == (plain[0]["spec"]["rules"])
    )


def test_the_shadow_step_reaches_the_modelrollout(render):
    objs = render(sets=(*CANARY, *ON, "operator.strategy.shadow.enabled=true"))
    (mr,) = kinds(objs, "ModelRollout")
    assert mr["spec"]["strategy"] == {"shadow": {"enabled": True}}


def test_the_cohort_and_the_watch_reach_the_modelrollout(render):
    sets = ("operator.strategy.cohort.header=x-user-id", "operator.strategy.postPromotionIntervals=3")
    (mr,) = kinds(render(sets=(*CANARY, *ON, *sets)), "ModelRollout")
    assert mr["spec"]["strategy"] == {"cohort": {"header": "x-user-id"}, "postPromotionIntervals": 3}


def test_without_the_operator_nothing_changes(render):
    objs = render(sets=(*CANARY, "strategy.canary.storageUri=s3://mlpipeline/m/1.1.0"))
    assert not kinds(objs, "ModelRollout")
    (route,) = kinds(objs, "HTTPRoute")
    assert gitops.RULES_ANNOTATION not in (route["metadata"].get("annotations") or {})
    uris = {i["spec"]["predictor"]["model"]["storageUri"] for i in kinds(objs, "InferenceService")}
    assert uris == {"s3://mlpipeline/m/1.0.0", "s3://mlpipeline/m/1.1.0"}


def test_knative_canary_targets_the_one_inference_service(render):
    metrics = "operator.metrics.url=http://prometheus.monitoring:9090"
    objs = render(sets=(*KNATIVE, *ON, metrics))
    (mr,) = kinds(objs, "ModelRollout")
    assert mr["spec"]["target"] == {"inferenceService": {"name": FULL}}
    assert mr["spec"]["strategy"] == {"router": "kserve_knative"}
    assert mr["spec"]["metrics"] == {"url": "http://prometheus.monitoring:9090"}
    (isvc,) = kinds(objs, "InferenceService")
    check_kserve(isvc)
    pred = isvc["spec"]["predictor"]
    assert "storageUri" not in pred["model"] and "canaryTrafficPercent" not in pred
    assert not kinds(objs, "HTTPRoute")


def test_operator_mode_lints_strict(tools):
    args = [tools.helm, "lint", "--strict", CHART, "--namespace", NAMESPACE]
    for s in (*CANARY, *ON):
        args += ["--set", s]
    proc = tools.run(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
