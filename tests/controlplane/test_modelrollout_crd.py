"""The ModelRollout CRD (helm/mlrollout-operator/crds/) on the real API server.

Applied server-side as an upgrade would apply it; a valid ModelRollout is accepted and the API server
fills in the defaults (gates.DEFAULTS, RolloutSpec's); each bad spec is refused with its CEL or schema
message, as kubectl prints it; the status subresource takes the operator's writes while spec edits
leave the status alone; `kubectl get modelrollouts` prints the columns. Everything lives in its own
namespace, removed at the end with the CRD (cluster-scoped, so nothing else here uses it).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from serving.rollout import crd, gates
from serving.rollout.machine import RolloutSpec
from tests.controlplane.conftest import ROOT, Kube

CRD_FILE = ROOT / "helm" / "mlrollout-operator" / "crds" / "modelrollouts.mlrollout.io.yaml"
NS = "mlrollout-crd-test"

VALID = {
    "apiVersion": crd.API_VERSION,
    "kind": crd.KIND,
    "metadata": {"name": "churn"},
    "spec": {
        "target": {"release": {"fullname": "churn"}},
        "model": {"storageUri": "s3://mlpipeline/models/churn/1.1.0", "version": "1.1.0"},
    },
}


@pytest.fixture(scope="module")
def kc(k: Kube):
    """k, with the CRD applied and Established and the test namespace created; both removed after."""
    k.run("apply", "--server-side", "--field-manager=mlrollout-crd-test", "-f", str(CRD_FILE))
    k.run("wait", "--for=condition=Established", f"crd/{crd.CRD_NAME}", "--timeout=60s")
    # apply, not create: a namespace left by an interrupted run is taken over, not an error
    k.run(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    try:
        yield k
    finally:
        k.run("delete", "namespace", NS, "--ignore-not-found", "--wait=true", "--timeout=120s", check=False)
        k.run(
            "delete", "-f", str(CRD_FILE), "--ignore-not-found", "--wait=true", "--timeout=120s", check=False
        )


def create(k: Kube, obj: dict, check: bool = True):
    return k.run("-n", NS, "create", "-f", "-", "-o", "json", input=json.dumps(obj), check=check)


def get(k: Kube, name: str) -> dict:
    obj = k.get(crd.PLURAL, name, ns=NS)
    assert obj is not None, f"{crd.KIND} {name} is missing"
    return obj


def rollout(name: str, **spec) -> dict:
    obj = copy.deepcopy(VALID)
    obj["metadata"]["name"] = name
    obj["spec"].update(copy.deepcopy(spec))
    return obj


def strategy(**kw) -> dict:
    return {"strategy": kw}


def test_a_valid_rollout_is_accepted_and_defaulted(kc):
    obj = json.loads(create(kc, rollout("valid")).stdout)
    s = obj["spec"]["strategy"]
    d = RolloutSpec()
    assert s["steps"] == list(d.steps) and s["interval"] == "30s"
    assert (s["threshold"], s["maxInconclusive"]) == (d.threshold, d.max_inconclusive)
    assert s["postPromotionIntervals"] == d.post_promotion_intervals == 0, "no watch after promotion"
    assert "router" not in s  # chosen by the target (gateway_api for a release)
    g = s["gates"]
    assert g == {
        "minSuccessRate": gates.DEFAULTS["min_success_rate"],
        "maxP99Ms": gates.DEFAULTS["max_p99_ms"],
        "minRequests": gates.DEFAULTS["min_requests"],
        "driftGate": True,
        "maxDrift": gates.DEFAULTS["max_drift"],
        "driftMethod": gates.DEFAULTS["drift_method"],
        "driftBins": gates.DEFAULTS["drift_bins"],
        "minPredictions": gates.DEFAULTS["min_predictions"],
        "maxAccuracyDrop": gates.DEFAULTS["max_accuracy_drop"],
        "minLabelled": gates.DEFAULTS["min_labelled"],
        "compareWithStable": True,  # gates.defaults(compare=True)
        "alpha": gates.DEFAULTS["alpha"],
        "maxErrorIncrease": gates.DEFAULTS["max_error_increase"],
        "latencyMinEffect": gates.DEFAULTS["latency_min_effect"],
        "driftMinEffect": gates.DEFAULTS["drift_min_effect"],
    }
    assert "status" not in obj  # only the operator writes it


def test_the_kfp_steps_comparison_settings_are_accepted_as_written(kc):
    """What the KFP step writes (handoff.spec) with the comparisons on, and with the step's defaults
    (accuracy_min_effect 0, which the CRD would refuse, is left out): accepted, no field pruned."""
    from serving.rollout import handoff
    from tests.unit.test_rollout_handoff import COMPARE

    base = {"model_name": "churn", "storage_uri": "s3://mlpipeline/models/churn/1.1.0", "version": "1.1.0"}
    on = handoff.spec(fullname="churn", **base, **COMPARE)
    got = json.loads(create(kc, handoff.manifest("kfp-compare", NS, on)).stdout)["spec"]["strategy"]["gates"]
    assert {k: got[k] for k in on["strategy"]["gates"]} == on["strategy"]["gates"]
    assert got["accuracyMinEffect"] == 0.03 and got["compareWithStable"] is True
    defaults = handoff.spec(
        fullname="churn",
        **base,
        compare_with_stable=True,
        alpha=gates.DEFAULTS["alpha"],
        max_error_increase=gates.DEFAULTS["max_error_increase"],
        latency_min_effect=gates.DEFAULTS["latency_min_effect"],
        drift_min_effect=gates.DEFAULTS["drift_min_effect"],
        accuracy_min_effect=0.0,
    )
    got = json.loads(create(kc, handoff.manifest("kfp-defaults", NS, defaults)).stdout)["spec"]["strategy"]
    assert "accuracyMinEffect" not in got["gates"] and got["gates"]["compareWithStable"] is True
    # the step's defaults are the ones the API server fills in for an object that names none
    plain = json.loads(create(kc, rollout("kfp-plain")).stdout)["spec"]["strategy"]["gates"]
    assert {k: plain[k] for k in defaults["strategy"]["gates"]} == defaults["strategy"]["gates"]


def test_a_full_spec_is_accepted_as_written(kc):
    spec = {
        "target": {"inferenceService": {"name": "churn-kn"}},
        "strategy": {
            "steps": [5, 20, 100],
            "interval": "1m30s",
            "threshold": 3,
            "maxInconclusive": 2,
            "router": "kserve_knative",
            "gates": {"driftMethod": "psi", "maxDrift": 1.5, "minAccuracy": 0.8, "maxAccuracyDrop": None},
        },
        "webhooks": [
            {"name": "approve", "type": "confirm-promotion", "url": "https://approvals.example/ok"},
            {"name": "notify", "type": "rollback", "url": "http://hooks.tools.svc/x", "timeout": "2s"},
        ],
    }
    obj = json.loads(create(kc, rollout("full", **spec)).stdout)["spec"]
    assert obj["strategy"]["steps"] == [5, 20, 100] and obj["strategy"]["router"] == "kserve_knative"
    g = obj["strategy"]["gates"]
    assert (g["driftMethod"], g["maxDrift"], g["minAccuracy"]) == ("psi", 1.5, 0.8)
    assert g["maxAccuracyDrop"] is None  # nullable: kept, not defaulted (no comparison with stable)
    assert [h.get("timeout") for h in obj["webhooks"]] == ["10s", "2s"]


def test_a_cohort_is_accepted_as_written(kc):
    for name, cohort in (("coh-hash", {"header": "x-user-bucket"}),
                         ("coh-match", {"cookie": "canary", "exact": "always"})):  # fmt: skip
        obj = json.loads(create(kc, rollout(name, **strategy(cohort=cohort))).stdout)
        assert obj["spec"]["strategy"]["cohort"] == cohort


def test_a_shadow_step_is_accepted_for_a_release_and_off_unless_enabled(kc):
    on = json.loads(create(kc, rollout("shadow-on", **strategy(shadow={"enabled": True}))).stdout)
    assert on["spec"]["strategy"]["shadow"] == {"enabled": True}
    empty = json.loads(create(kc, rollout("shadow-empty", **strategy(shadow={}))).stdout)
    assert empty["spec"]["strategy"]["shadow"] == {"enabled": False}  # defaulted: RolloutSpec().shadow
    off = json.loads(create(kc, rollout("shadow-off")).stdout)
    assert "shadow" not in off["spec"]["strategy"]


def test_a_standard_inference_service_target_takes_the_kserve_canary_router(kc):
    spec = {"target": {"inferenceService": {"name": "churn"}}, **strategy(router="kserve_canary")}
    obj = json.loads(create(kc, rollout("kcanary", **spec)).stdout)["spec"]
    assert obj["strategy"]["router"] == "kserve_canary" and obj["target"] == spec["target"]


BAD = [
    ("steps-not-increasing", strategy(steps=[10, 50, 25, 100]), ["steps must be strictly increasing"]),
    ("steps-repeated", strategy(steps=[10, 10, 100]), ["steps must be strictly increasing"]),
    (
        "weight-150",
        strategy(steps=[10, 150]),
        ["each step is a canary weight in percent, from 1 to 100", "should be less than or equal to 100"],
    ),
    ("weight-0", strategy(steps=[0, 100]), ["each step is a canary weight in percent, from 1 to 100"]),
    ("last-step-not-100", strategy(steps=[10, 25, 50]), ["the last step must be 100"]),
    (
        "two-targets",
        {"target": {"release": {"fullname": "a"}, "inferenceService": {"name": "b"}}},
        ["target must name exactly one of release or inferenceService"],
    ),
    ("empty-target", {"target": {}}, ["target must name exactly one of release or inferenceService"]),
    (
        "success-rate-1.5",
        strategy(gates={"minSuccessRate": 1.5}),
        ["spec.strategy.gates.minSuccessRate", "should be less than or equal to 1"],
    ),
    (
        "success-rate-0",
        strategy(gates={"minSuccessRate": 0}),
        ["spec.strategy.gates.minSuccessRate", "should be greater than 0"],
    ),
    ("p99-0", strategy(gates={"maxP99Ms": 0}), ["spec.strategy.gates.maxP99Ms", "should be greater than 0"]),
    (
        "js-drift-above-1",
        strategy(gates={"maxDrift": 1.5}),
        ["maxDrift is a Jensen-Shannon distance with driftMethod js, so it must be at most 1"],
    ),
    (
        "accuracy-above-1",
        strategy(gates={"minAccuracy": 1.2}),
        ["spec.strategy.gates.minAccuracy", "should be less than or equal to 1"],
    ),
    (
        "min-requests-0",
        strategy(gates={"minRequests": 0}),
        ["spec.strategy.gates.minRequests", "should be greater than or equal to 1"],
    ),
    (
        "bad-version",
        {"model": {"storageUri": "s3://b/m", "version": "v1"}},
        ["version must be a semantic version such as 1.4.0 or 2.0.0-rc.1, got v1"],
    ),
    ("bad-interval", strategy(interval="0s"), ["interval must be a positive duration"]),
    (
        "unknown-router",
        strategy(router="local_proxy"),
        ['spec.strategy.router: Unsupported value: "local_proxy"'],
    ),
    (
        "isvc-with-gateway-router",
        {"target": {"inferenceService": {"name": "kn"}}, **strategy(router="gateway_api")},
        [
            "an inferenceService target is one InferenceService: its router is kserve_knative (Knative "
            "mode) or kserve_canary (Standard mode, spec.canary); gateway_api needs a release target"
        ],
    ),
    (
        "cohort-header-and-cookie",
        strategy(cohort={"header": "x-user-bucket", "cookie": "uid"}),
        ["a cohort names exactly one of header or cookie"],
    ),
    (
        "cohort-bad-header",
        strategy(cohort={"header": "x user"}),
        ["spec.strategy.cohort.header", "should match"],
    ),
    (
        "cohort-on-knative",
        {"target": {"inferenceService": {"name": "kn"}}, **strategy(cohort={"header": "x-user-bucket"})},
        ["a cohort routes by HTTPRoute matches: it needs a release target and the gateway_api router"],
    ),
    (
        "watch-negative",
        strategy(postPromotionIntervals=-1),
        ["spec.strategy.postPromotionIntervals", "should be greater than or equal to 0"],
    ),
    (
        "watch-1001",
        strategy(postPromotionIntervals=1001),
        ["spec.strategy.postPromotionIntervals", "should be less than or equal to 1000"],
    ),
    (
        "watch-with-knative",
        {"target": {"inferenceService": {"name": "kn"}}, **strategy(postPromotionIntervals=3)},
        ["the watch after promotion restores the previous model by copying it back onto the stable"],
    ),
    (
        "watch-with-knative-router",
        strategy(router="kserve_knative", postPromotionIntervals=3),
        ["it needs a release target with router gateway_api (kserve_knative and kserve_canary cannot"],
    ),
    (
        "watch-with-kserve-canary",
        {
            "target": {"inferenceService": {"name": "m"}},
            **strategy(router="kserve_canary", postPromotionIntervals=3),
        },
        ["it needs a release target with router gateway_api (kserve_knative and kserve_canary cannot"],
    ),
    (
        "shadow-with-an-isvc-target",
        {"target": {"inferenceService": {"name": "kn"}}, **strategy(shadow={"enabled": True})},
        ["the shadow step mirrors traffic with an HTTPRoute RequestMirror filter: it needs the gateway_api"],
    ),
    (
        "shadow-with-the-knative-router",
        strategy(router="kserve_knative", shadow={"enabled": True}),
        ["spec.strategy.shadow.enabled", "kserve_knative and kserve_canary cannot mirror"],
    ),
    (
        "shadow-not-a-bool",
        strategy(shadow={"enabled": "yes"}),
        ["spec.strategy.shadow.enabled", "must be of type boolean"],
    ),
    (
        "webhook-url-without-scheme",
        {"webhooks": [{"name": "n", "type": "post-rollout", "url": "hooks.example/x"}]},
        ["webhook url must start with http:// or https://, got hooks.example/x"],
    ),
    (
        "webhook-timeout-above-1m",
        {"webhooks": [{"name": "n", "type": "pre-rollout", "url": "https://h/x", "timeout": "2m"}]},
        ["timeout must be a positive duration of at most 1m"],
    ),
    (
        "webhook-bad-type",
        {"webhooks": [{"name": "n", "type": "pre-promotion", "url": "https://h/x"}]},
        ['spec.webhooks[0].type: Unsupported value: "pre-promotion"'],
    ),
]


@pytest.mark.parametrize("case,spec,messages", BAD, ids=[b[0] for b in BAD])
def test_a_bad_spec_is_refused_with_its_message(kc, case, spec, messages):
    proc = create(kc, rollout(f"bad-{case}", **spec), check=False)
    assert proc.returncode != 0, f"{case}: the API server accepted it"
    for m in messages:
        assert m in proc.stderr, f"{case}: {m!r} not in kubectl's error:\n{proc.stderr}"
    assert kc.get(crd.PLURAL, f"bad-{case}", ns=NS) is None


def test_no_target_is_refused(kc):
    obj = rollout("bad-no-target")
    del obj["spec"]["target"]
    proc = create(kc, obj, check=False)
    assert proc.returncode != 0 and "spec.target: Required value" in proc.stderr, proc.stderr


STATUS = {
    "observedGeneration": 1,
    "phase": "Progressing",
    "message": "analysis passed: weight 25%",
    "step": 2,
    "canaryWeight": 25,
    "stableVersion": "1.0.0",
    "canaryVersion": "1.1.0",
    "conditions": [
        {
            "type": "Progressing",
            "status": "True",
            "reason": "AnalysisPassed",
            "message": "step 2 of 4",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
            "observedGeneration": 1,
        },
        {
            "type": "Ready",
            "status": "False",
            "reason": "Progressing",
            "message": "not promoted yet",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        },
    ],
    "lastAnalysisTime": "2026-01-01T00:01:00Z",
    "lastAnalysis": [
        {"gate": "success_rate", "value": 1.0, "threshold": 0.99, "op": ">=", "n": 120, "verdict": "pass"},
        {
            "gate": "drift_js",
            "value": None,
            "threshold": 0.15,
            "n": 10,
            "baselineN": 300,
            "verdict": "inconclusive",
        },
    ],
    "history": [
        {"time": "2026-01-01T00:00:00Z", "event": "start", "step": 1, "weight": 10, "action": "set_weight"},
        {
            "time": "2026-01-01T00:01:00Z",
            "event": "analysis",
            "phase": "Progressing",
            "step": 2,
            "weight": 25,
            "action": "set_weight",
            "verdict": "pass",
            "reason": "all gates passed",
        },
    ],
}


def patch_status(k: Kube, name: str, status: dict, check: bool = True):
    return k.run(
        "-n", NS, "patch", crd.PLURAL, name, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}), check=check,
    )  # fmt: skip


def test_status_subresource(kc):
    create(kc, rollout("status"))
    patch_status(kc, "status", STATUS)
    obj = get(kc, "status")
    # a merge patch's null deletes: an inconclusive gate's value is absent, as the operator will write it
    stored = copy.deepcopy(STATUS)
    del stored["lastAnalysis"][1]["value"]
    assert obj["status"] == stored
    gen = obj["metadata"]["generation"]

    # a spec edit bumps the generation and leaves the status alone
    kc.run(
        "-n",
        NS,
        "patch",
        crd.PLURAL,
        "status",
        "--type=merge",
        "-p",
        '{"spec":{"strategy":{"interval":"1m"}}}',
    )
    after = get(kc, "status")
    assert after["metadata"]["generation"] == gen + 1 and after["status"] == stored
    # status in a main-resource write is ignored (only the subresource writes it)
    kc.run("-n", NS, "patch", crd.PLURAL, "status", "--type=merge", "-p", '{"status":{"phase":"Promoted"}}')
    assert get(kc, "status")["status"]["phase"] == "Progressing"
    # a status write does not bump the generation
    patch_status(kc, "status", {"canaryWeight": 50, "step": 3})
    again = get(kc, "status")
    assert again["metadata"]["generation"] == gen + 1 and again["status"]["canaryWeight"] == 50

    # the status schema is enforced too
    for bad, message in (
        ({"canaryWeight": 150}, "status.canaryWeight"),
        ({"phase": "Done"}, 'status.phase: Unsupported value: "Done"'),
        ({"history": [STATUS["history"][0]] * 51}, "status.history: Too many"),
    ):
        proc = patch_status(kc, "status", bad, check=False)
        assert proc.returncode != 0 and message in proc.stderr, f"{bad}: {proc.stderr}"


def test_kubectl_get_prints_the_columns(kc):
    create(kc, rollout("columns"))
    patch_status(kc, "columns", {**STATUS, "history": [], "lastAnalysis": []})
    out = kc.run("-n", NS, "get", crd.PLURAL, "columns").stdout.splitlines()
    assert out[0].split() == ["NAME", "PHASE", "WEIGHT", "STEP", "STABLE", "CANARY", "AGE"], out
    assert out[1].split()[:6] == ["columns", "Progressing", "25", "2", "1.0.0", "1.1.0"], out
    # the short name and the category reach it too
    assert "columns" in kc.run("-n", NS, "get", "mlr").stdout
    assert "columns" in kc.run("-n", NS, "get", "mlrollout").stdout


def test_the_applied_crd_is_the_file(kc):
    live = kc.json("get", "crd", crd.CRD_NAME)
    want = yaml.safe_load(Path(CRD_FILE).read_text())
    assert live["spec"]["versions"][0]["schema"] == want["spec"]["versions"][0]["schema"]
    assert (
        live["spec"]["versions"][0]["additionalPrinterColumns"]
        == want["spec"]["versions"][0]["additionalPrinterColumns"]
    )
