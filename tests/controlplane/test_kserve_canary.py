"""The ``kserve_canary`` router against the real KServe 0.20.0 controller and its webhooks.

One Standard-mode InferenceService from the model chart (strategy rolling, 4 fixed replicas, autoscaler
class none as KServe's own canary e2e test uses) gets a ``spec.canary`` entry; what KServe builds from it
is read back from the API server:

- the dark entry (``deploy_dark``, what the operator does) makes the canary's own Deployment
  ``<isvc>-<name>-predictor`` with the new model in its pod template and no pod;
- our weights size the two Deployments (KServe 0.20.0 splits replicas: ceil(4 x pct / 100)) and come back
  in ``status.canaryStatuses``; our field manager owns ``spec.canary``;
- promotion the KServe way (rename: the canary's Deployment becomes stable, pod template untouched, the old
  one deleted) and by copy (``<isvc>-predictor`` rolls to the new model and keeps its Service);
- rollback deletes the canary's Deployment and Service and gives stable its replicas back;
- the webhook refuses what the router must never write (a duplicated name, percentages above 100);
- the controller end to end on scripted metrics that follow the live weights, as the CLI's
  ``start --router kserve_canary`` runs it: promoted, and rolled back; ``status`` reads the router;
- the operator (a real process) on a ModelRollout naming the InferenceService with router
  kserve_canary: the dark entry, the steps on its trafficPercent, promotion by copy, and a rollback.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from serving.rollout import controller as ctl
from serving.rollout import crd, kube, targets
from serving.rollout.machine import RolloutSpec
from serving.rollout.routers.kserve_canary import KServeCanaryRouter, deploy_dark
from serving.rollout.store import ConfigMapStore
from tests.controlplane.conftest import CHART, NS, ROOT, Kube
from tests.controlplane.test_gitops import managers_of
from tests.controlplane.test_operator import (
    OperatorProc,
    Runtimes,
    finished,
    kc,  # noqa: F401 (a fixture: the CRD applied)
    status,
)
from tests.controlplane.test_rollout import V1_URI, V2_URI, LiveTraffic, served_uris
from tests.unit.test_rollout_controller import CANARY, GATES, SCRAPE, STABLE

REPLICAS = 4
CANARY_NAME = "v2-0-0"  # canary_name_for(CANARY.version)


def install_standard(k: Kube, release: str) -> str:
    k.helm(
        "install", release, str(CHART), "-n", NS, "-f", str(CHART / "ci" / "rolling-values.yaml"),
        "--set", f"model.storageUri={V1_URI}", "--set", f"replicas.min={REPLICAS}",
        "--set", f"replicas.max={REPLICAS}", "--set", "autoscaling.class=none",
    )  # fmt: skip
    full = f"{release}-mlrollout-model"
    targets.wait_serving(k.api(), NS, full, V1_URI, timeout_s=60, poll_s=0.5)
    return full


@pytest.fixture
def isvc(k, request):
    name = "kc" + request.node.name.split("[")[0].removeprefix("test_").replace("_", "")[:14]
    # a release left by an interrupted run (its spec.canary entry is ours, not Helm's): gone first
    k.helm("uninstall", name, "-n", NS, "--wait", "--timeout", "60s", "--ignore-not-found", check=False)
    full = install_standard(k, name)
    yield full
    k.helm("uninstall", name, "-n", NS, "--wait", "--timeout", "60s", check=False)


def router(api, isvc: str, **kw) -> KServeCanaryRouter:
    return KServeCanaryRouter(isvc, NS, api=api, ready_timeout_s=90, poll_s=0.5, **kw)


def dark(api, isvc: str) -> None:
    name, obj = deploy_dark(
        api, namespace=NS, isvc=isvc, storage_uri=V2_URI, version=CANARY.version,
        ready_timeout_s=60, poll_s=0.5,
    )  # fmt: skip
    assert name == isvc and obj["spec"]["canary"][0]["predictor"]["name"] == CANARY_NAME


def replicas(k: Kube, isvc: str) -> dict[str, int]:
    """Each predictor Deployment of ``isvc``: its wanted replicas (KServe's split)."""
    deps = k.items("deployment", "-l", f"serving.kserve.io/inferenceservice={isvc}")
    return {
        d["metadata"]["name"]: d["spec"]["replicas"]
        for d in deps
        if not d["metadata"].get("deletionTimestamp")
    }


def reported(k: Kube, isvc: str) -> tuple[int, int] | None:
    """The split KServe reports in ``status.canaryStatuses`` (None before it has)."""
    st = (k.get("inferenceservice", isvc) or {}).get("status", {}).get("canaryStatuses") or []
    return (100 - st[0]["trafficPercent"], st[0]["trafficPercent"]) if st else None


def template_uri(k: Kube, deployment: str) -> str | None:
    dep = k.get("deployment", deployment) or {}
    annotations = dep.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations") or {}
    return annotations.get(targets.SOURCE_URI_ANNOTATION)


def test_weights_size_the_canary_deployment_kserve_builds(k, isvc):
    api = k.api()
    stable_dep, canary_dep = f"{isvc}-predictor", f"{isvc}-{CANARY_NAME}-predictor"
    dark(api, isvc)
    assert template_uri(k, canary_dep) == V2_URI and template_uri(k, stable_dep) == V1_URI
    assert replicas(k, isvc) == {stable_dep: REPLICAS, canary_dep: 0}  # a dark canary runs no pod
    r = router(api, isvc)
    for canary, want in ((25, 1), (50, 2)):
        r.set_weights(100 - canary, canary)
        k.wait(
            f"{canary_dep} at {want}",
            lambda w=want: replicas(k, isvc) == {stable_dep: REPLICAS - w, canary_dep: w},
            30,
        )
        k.wait(
            f"status at {canary}", lambda c=canary: r.get_weights() == (100 - c, c) == reported(k, isvc), 30
        )
    assert managers_of(k, "inferenceservice", isvc, ["f:spec", "f:canary"]) == {kube.FIELD_MANAGER}
    k.wait("the canary pods ready", lambda: served_uris(k, isvc) == {V1_URI, V2_URI}, 60)


def test_renaming_promotion_hands_the_canary_deployment_to_stable_without_a_restart(k, isvc):
    api = k.api()
    canary_dep = f"{isvc}-{CANARY_NAME}-predictor"
    dark(api, isvc)
    r = router(api, isvc)
    r.set_weights(75, 25)
    k.wait("canary pod", lambda: replicas(k, isvc).get(canary_dep) == 1, 30)
    before = k.get("deployment", canary_dep)["spec"]["template"]
    r.promote()
    # promote returns only once the old stable is gone and every stable pod serves v2
    assert replicas(k, isvc) == {canary_dep: REPLICAS}
    dep = k.get("deployment", canary_dep)
    assert dep["spec"]["template"] == before, "no pod template change: no restart"
    assert dep["status"].get("availableReplicas") == REPLICAS
    assert k.get("service", f"{isvc}-predictor") is None and k.get("service", canary_dep) is not None
    spec = k.get("inferenceservice", isvc)["spec"]
    assert spec["predictor"]["name"] == CANARY_NAME and spec["predictor"]["model"]["storageUri"] == V2_URI
    assert "canary" not in spec
    assert r.get_weights() == (100, 0)
    r.promote()  # a pending promotion re-run after a restart: nothing left to do, returns


def test_copy_promotion_keeps_the_stable_deployment_and_service(k, isvc):
    api = k.api()
    stable_dep, canary_dep = f"{isvc}-predictor", f"{isvc}-{CANARY_NAME}-predictor"
    dark(api, isvc)
    r = router(api, isvc, promotion="copy")
    r.set_weights(50, 50)
    r.promote()
    assert template_uri(k, stable_dep) == V2_URI
    dep = k.get("deployment", stable_dep)
    assert dep["spec"]["replicas"] == REPLICAS and dep["status"].get("updatedReplicas") == REPLICAS
    k.wait("the canary Deployment deleted", lambda: canary_dep not in replicas(k, isvc), 30)
    assert k.get("service", stable_dep) is not None  # what the chart's HTTPRoute points at
    spec = k.get("inferenceservice", isvc)["spec"]
    assert not spec["predictor"].get("name") and "canary" not in spec


def test_rollback_deletes_the_canary_and_restores_stable(k, isvc):
    api = k.api()
    stable_dep, canary_dep = f"{isvc}-predictor", f"{isvc}-{CANARY_NAME}-predictor"
    dark(api, isvc)
    r = router(api, isvc)
    r.set_weights(50, 50)
    k.wait("split", lambda: replicas(k, isvc) == {stable_dep: 2, canary_dep: 2}, 30)
    r.rollback()
    k.wait("canary gone", lambda: replicas(k, isvc) == {stable_dep: REPLICAS}, 30)
    k.wait("canary Service gone", lambda: k.get("service", canary_dep) is None, 30)
    assert r.get_weights() == (100, 0)
    r.set_weights(100, 0)  # re-applied after a restart: no entry is already 0 %, nothing written
    assert "canary" not in k.get("inferenceservice", isvc)["spec"]
    assert template_uri(k, stable_dep) == V1_URI


def backend_refs(k: Kube, route: str) -> list[tuple[str, int]]:
    """(name, weight) of the chart's route rule (the rolling strategy renders one)."""
    refs = k.get("httproute", route)["spec"]["rules"][0]["backendRefs"]
    return [(r["name"], r.get("weight", 1)) for r in refs]


@pytest.mark.parametrize("promotion", ["rename", "copy"])
def test_with_the_charts_route_requests_follow_the_pods(k, isvc, promotion):
    """--route: the chart's HTTPRoute splits requests like the replicas, and only onto pods that serve."""
    api = k.api()
    stable_svc, canary_svc = f"{isvc}-predictor", f"{isvc}-{CANARY_NAME}-predictor"
    dark(api, isvc)
    r = router(api, isvc, route=isvc, promotion=promotion)
    assert r.get_weights() == (100, 0)
    r.set_weights(75, 25)
    # set_weights moved requests only after the canary's pod was up
    assert k.get("deployment", canary_svc)["status"].get("availableReplicas", 0) >= 1
    assert backend_refs(k, isvc) == [(stable_svc, 75), (canary_svc, 25)]
    assert k.get("httproute", isvc)["spec"]["rules"][0]["backendRefs"][1]["port"] == 80
    assert r.get_weights() == (75, 25)
    r.promote()
    new_stable = canary_svc if promotion == "rename" else stable_svc
    assert backend_refs(k, isvc) == [(new_stable, 100)]
    k.wait("one predictor left", lambda: set(replicas(k, isvc)) == {new_stable}, 30)
    assert k.get("service", new_stable) is not None, "the route's only backend exists"
    assert template_uri(k, new_stable) == V2_URI and served_uris(k, isvc) == {V2_URI}
    assert r.get_weights() == (100, 0)


def test_with_the_charts_route_rollback_takes_requests_back_first(k, isvc):
    api = k.api()
    stable_svc, canary_svc = f"{isvc}-predictor", f"{isvc}-{CANARY_NAME}-predictor"
    dark(api, isvc)
    r = router(api, isvc, route=isvc)
    r.set_weights(50, 50)
    assert backend_refs(k, isvc) == [(stable_svc, 50), (canary_svc, 50)]
    r.set_weights(75, 25)  # shrinking: requests first, then the replicas
    assert backend_refs(k, isvc) == [(stable_svc, 75), (canary_svc, 25)]
    r.rollback()
    assert backend_refs(k, isvc) == [(stable_svc, 100)]
    k.wait("canary gone", lambda: replicas(k, isvc) == {stable_svc: REPLICAS}, 30)
    assert r.get_weights() == (100, 0)


def test_the_kserve_webhook_refuses_what_the_router_must_not_write(k, isvc):
    api = k.api()
    dark(api, isvc)
    obj = kube.get(api, kube.ISVC, NS, isvc)
    entry = obj["spec"]["canary"][0]

    def refused(canary: list) -> str:
        proc = k.run("-n", NS, "patch", "inferenceservice", isvc, "--type=merge", "-p",
                     json.dumps({"spec": {"canary": canary}}), check=False)  # fmt: skip
        assert proc.returncode != 0, f"accepted {canary}"
        return proc.stderr

    assert "duplicated" in refused([entry, entry])
    second = {**entry, "predictor": {**entry["predictor"], "name": "v3"}, "trafficPercent": 60}
    assert "must be <= 100" in refused([{**entry, "trafficPercent": 60}, second])
    # the CRD schema alone: 0..100 (kubebuilder Minimum/Maximum)
    assert "trafficPercent" in refused([{**entry, "trafficPercent": 101}])
    assert kube.get(api, kube.ISVC, NS, isvc)["spec"]["canary"] == [entry]


@pytest.mark.parametrize(
    "good, routed", [(True, False), (False, False), (True, True)], ids=["promoted", "rolled-back", "routed"]
)
def test_progressive_rollout_end_to_end(k, isvc, good, routed):
    api = k.api()
    dark(api, isvc)
    r = router(api, isvc, route=isvc if routed else "")
    rec = ctl.new_record(RolloutSpec((25, 50, 100), 1.0, 1, 10), GATES, STABLE, CANARY, r.config(), SCRAPE)
    cm, owner = KServeCanaryRouter.state_location(r.config())
    store = ConfigMapStore(cm, NS, owner_isvc=owner, api=api)
    # scripted counters that follow the weights the real InferenceService reports
    # (routed: the weights of the chart's HTTPRoute, which the router sets)
    traffic = LiveTraffic(router(api, isvc, route=r.route), error_rate=0.0 if good else 0.3)  # type: ignore[arg-type]
    rec = ctl.drive(store, rec, router=r, provider=traffic, log=lambda _m: None, poll_s=0.25, max_seconds=120)
    assert rec.state["phase"] == ("Promoted" if good else "RolledBack")
    seen = {h.get("weight") for h in rec.state["history"]}
    assert (25 in seen) if good else seen <= {25, 0}
    spec = k.get("inferenceservice", isvc)["spec"]
    assert "canary" not in spec
    assert served_uris(k, isvc) == ({V2_URI} if good else {V1_URI})
    if routed:  # renamed: the canary's Service is the stable one, the route's only backend
        assert backend_refs(k, isvc) == [(f"{isvc}-{CANARY_NAME}-predictor", 100)]
    stored = json.loads(k.get("configmap", cm)["data"]["state"])
    assert stored["state"]["phase"] == rec.state["phase"] and stored["router"]["router"] == "kserve_canary"
    # the CLI reads the same record and asks the router for the live weights
    out = subprocess.run(
        [sys.executable, "-m", "serving.rollout", "status", "--state-configmap", cm, "--namespace", NS],
        env={**k.env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert rec.state["phase"] in out.stdout and "router reports stable 100% / canary 0%" in out.stdout


# --------------------------------------------------------------------------- the operator


@pytest.mark.parametrize("good", [True, False], ids=["promoted", "rolled-back"])
@pytest.mark.usefixtures("kc")  # the ModelRollout CRD applied (test_operator)
def test_the_operator_drives_kserve_canary_on_an_inference_service_target(k, isvc, good, tmp_path):
    """A ModelRollout naming the InferenceService and router kserve_canary: the operator adds the dark
    entry, walks its trafficPercent, and promotes by copy (the chart's Service stays) or rolls back.
    Metrics as in test_operator: scripted runtimes whose counters follow the live weights."""
    api = k.api()
    name, lease = isvc.removesuffix("-mlrollout-model"), f"{isvc}-lease"
    runtimes = Runtimes(router(api, isvc), error_rate=0.0 if good else 0.3)  # type: ignore[arg-type]
    op = OperatorProc(k, f"{name}-op", lease, tmp_path)
    obj = {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "target": {"inferenceService": {"name": isvc}},
            "model": {"name": STABLE.model, "storageUri": V2_URI, "version": CANARY.version},
            "strategy": {"steps": [25, 50, 100], "interval": "2s", "threshold": 1, "router": "kserve_canary"},
            "metrics": {
                "provider": "scrape",
                "stableMetricsUrl": f"{runtimes.url}/stable/metrics",
                "canaryMetricsUrl": f"{runtimes.url}/canary/metrics",
            },
        },
    }
    try:
        k.run("apply", "-f", "-", input=json.dumps(obj))
        # the step's weight is the entry's trafficPercent, and KServe sized the canary by it
        canary_dep = f"{isvc}-{CANARY_NAME}-predictor"
        k.wait(
            "the first step on the entry",
            lambda: (
                (s := status(k, name)).get("canaryWeight") == 25
                and reported(k, isvc) == (75, 25)
                and replicas(k, isvc).get(canary_dep) == 1
                and s
            ),
            120,
        )
        st = finished(k, name)
        assert st["phase"] == ("Promoted" if good else "RolledBack"), st.get("message")
        assert json.loads(st["record"])["router"]["router"] == "kserve_canary"
        spec = k.get("inferenceservice", isvc)["spec"]
        assert "canary" not in spec and not spec["predictor"].get("name")
        k.wait("the canary Deployment gone", lambda: replicas(k, isvc) == {f"{isvc}-predictor": REPLICAS}, 30)
        assert served_uris(k, isvc) == ({V2_URI} if good else {V1_URI})
        assert k.get("service", f"{isvc}-predictor") is not None
    finally:
        op.stop()
        print(f"--- operator (PID {op.pid}) log tail ---\n{op.text()[-3000:]}")
        runtimes.close()
        k.run("-n", NS, "delete", crd.PLURAL, name, "--ignore-not-found", "--wait=true", check=False)
        k.run("-n", NS, "delete", "lease", lease, "--ignore-not-found", check=False)
