"""The rollout controller against real objects: the chart's HTTPRoute (real CRD schema), KServe's
InferenceServices and the Deployments the real KServe controller makes from them, the state ConfigMap.

- weights land in the real HTTPRoute; our field manager owns `spec.rules` (an atomic list), so a
  `helm upgrade` mid-rollout stops with a conflict naming us instead of undoing the split (audit #12);
- a state write does not roll the stable Deployment (pod-template hash and ReplicaSets before and
  after); the old annotation store did, shown as the control (audit #5);
- deploying the canary (targets.deploy_canary, what the operator does) and promote wait until the new model's
  pods are the ready ones, where the old wait (Ready + observedGeneration) returned while only old pods
  were ready (audit #3, #4);
- promotion keeps the stable pods labelled `stable`, so each PDB still covers its own track (audit #11);
- the controller end to end with its ConfigMap store, as the CLI's `start --router gateway_api` runs it
  (metrics scripted from the live route's weights, as allowed: the providers are tested against a real
  Prometheus elsewhere): a good canary is promoted, a bad one rolled back, the evidence in the state
  ConfigMap;
- the Knative router's canaryTrafficPercent passes KServe's webhook and reaches the Knative Service KServe
  builds, as far as a control plane without Knative's controller shows.
"""

from __future__ import annotations

import json
import time

import pytest

from serving.rollout import controller as ctl
from serving.rollout import kube, targets
from serving.rollout.machine import RolloutSpec
from serving.rollout.record import RolloutRecord
from serving.rollout.routers import GatewayApiRouter, KServeKnativeRouter
from serving.rollout.store import ConfigMapStore
from tests.controlplane.conftest import CHART, NS, Kube
from tests.unit.test_rollout_controller import CANARY, DEAD_ROUTER, GATES, SCRAPE, STABLE, World


def state_configmap(fullname: str) -> str:
    """Where the CLI keeps a release's rollout state (routers.ROUTERS' state location for gateway_api)."""
    return f"{fullname}-rollout"


V1_URI = "s3://mlpipeline/models/breast-cancer/1.0.0"
V2_URI = "s3://mlpipeline/models/breast-cancer/2.0.0"


def install_canary(k: Kube, release: str, *sets: str) -> str:
    args = ["install", release, str(CHART), "-n", NS, "-f", str(CHART / "ci" / "canary-values.yaml")]
    for s in (
        "strategy.canary.weight=0",
        f"model.storageUri={V1_URI}",
        f"strategy.canary.storageUri={V1_URI}",
        *sets,
    ):
        args += ["--set", s]
    k.helm(*args)
    full = f"{release}-mlrollout-model"
    k.wait(f"{full} serving", lambda: all(k.isvc_ready(f"{full}-{t}") for t in ("stable", "canary")), 60)
    api = k.api()
    for t in ("stable", "canary"):
        targets.wait_serving(api, NS, f"{full}-{t}", V1_URI, timeout_s=60, poll_s=0.5)
    return full


@pytest.fixture
def release(k, request):
    name = request.node.name.split("[")[0].removeprefix("test_").replace("_", "-")[:20].rstrip("-")
    full = install_canary(k, name)
    yield full
    k.helm("uninstall", name, "-n", NS, "--wait", "--timeout", "60s", check=False)


def router(api, full: str) -> GatewayApiRouter:
    return GatewayApiRouter(
        full,
        NS,
        f"{full}-stable-predictor",
        f"{full}-canary-predictor",
        stable_isvc=f"{full}-stable",
        canary_isvc=f"{full}-canary",
        api=api,
        ready_timeout_s=90,
        poll_s=0.5,
    )


def deploy_v2(api, release: str, **kw) -> str:
    """What the operator does before a rollout: the canary to v2, waiting until its pods serve it."""
    name, _ = targets.deploy_canary(
        api, namespace=NS, fullname=release, storage_uri=V2_URI, version=CANARY.version,
        **{"ready_timeout_s": 90, "poll_s": 0.5, **kw},
    )  # fmt: skip
    return name


def run_rollout(api, release: str, traffic: World, threshold: int = 2) -> RolloutRecord:
    """The controller on scripted traffic with its ConfigMap store, as the CLI's `start` builds it."""
    rec = ctl.new_record(
        RolloutSpec((20, 50, 100), 1.0, threshold, 10), GATES, STABLE, CANARY,
        router(api, release).config(), SCRAPE,
    )  # fmt: skip
    store = ConfigMapStore(state_configmap(release), NS, owner_isvc=f"{release}-stable", api=api)
    return ctl.drive(store, rec, router=router(api, release), provider=traffic, log=lambda _m: None,
                     poll_s=0.25, max_seconds=120)  # fmt: skip


def workload(k: Kube, isvc: str) -> dict:
    """What a restart would change: the Deployment's generation, its ReplicaSets, the pods' template hash."""
    dep = k.get("deployment", f"{isvc}-predictor")
    rs = sorted(
        r["metadata"]["name"]
        for r in k.items("replicaset", "-l", f"serving.kserve.io/inferenceservice={isvc}")
    )
    pods = k.items("pod", "-l", f"serving.kserve.io/inferenceservice={isvc}")
    return {
        "generation": dep["metadata"]["generation"],
        "replicasets": rs,
        "hashes": sorted({p["metadata"]["labels"]["pod-template-hash"] for p in pods}),
        "pods": sorted(p["metadata"]["name"] for p in pods),
    }


def ready_pods(k: Kube, isvc: str) -> list[dict]:
    pods = k.items("pod", "-l", f"serving.kserve.io/inferenceservice={isvc}")
    return [
        p
        for p in pods
        if not p["metadata"].get("deletionTimestamp")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]


def served_uris(k: Kube, isvc: str) -> set[str]:
    """The model each ready pod was started with (the storage-initializer's source argument)."""
    return {p["spec"]["initContainers"][0]["args"][0] for p in ready_pods(k, isvc)}


def old_wait_says_ready(api, isvc: str, generation: int) -> bool:
    """The wait this project used before audit #4: Ready and observedGeneration >= generation."""
    st = (kube.get(api, kube.ISVC, NS, isvc) or {}).get("status", {})
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions", []))
    return ready and st.get("observedGeneration", 0) >= generation


# --------------------------------------------------------------------------- weights and ownership


def test_weights_land_on_the_real_route_and_helm_upgrade_conflicts_mid_rollout(k, release):
    api = k.api()
    r = router(api, release)
    r.set_weights(75, 25)
    route = k.get("httproute", release)
    assert [b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]] == [75, 25]
    assert r.get_weights() == (75, 25)
    managed = k.json("-n", NS, "get", "httproute", release, "--show-managed-fields")["metadata"][
        "managedFields"
    ]
    ours = [m for m in managed if m["manager"] == kube.FIELD_MANAGER]
    assert ours and "f:rules" in ours[0]["fieldsV1"]["f:spec"], (
        "the merge patch owns the whole atomic rules list"
    )
    # Helm 4 (server-side apply) re-applies spec.rules even for unchanged values: a conflict that names us
    release_name = release.removesuffix("-mlrollout-model")
    proc = k.helm("upgrade", release_name, str(CHART), "-n", NS, "--reuse-values", check=False)
    assert proc.returncode != 0
    assert f'conflict with "{kube.FIELD_MANAGER}"' in proc.stderr and ".spec.rules" in proc.stderr, (
        proc.stderr
    )
    assert r.get_weights() == (75, 25), "the failed upgrade must not have reset the split"
    # after the rollout the chart takes the rules back, on purpose
    k.helm("upgrade", release_name, str(CHART), "-n", NS, "--reuse-values", "--force-conflicts")
    assert r.get_weights() == (100, 0)


def test_rollback_sends_everything_to_stable(k, release):
    r = router(k.api(), release)
    r.set_weights(50, 50)
    r.rollback()
    assert [b["weight"] for b in k.get("httproute", release)["spec"]["rules"][0]["backendRefs"]] == [100, 0]


# --------------------------------------------------------------------------- state


def _record(**fields) -> ctl.RolloutRecord:
    """A valid rollout record that no controller drives (its router's socket does not exist)."""
    rec = ctl.new_record(RolloutSpec(), GATES, STABLE, CANARY, DEAD_ROUTER, SCRAPE)
    for k, v in fields.items():
        setattr(rec, k, v)
    return rec


def _points(n: int) -> list[dict]:
    return [{"t": float(i), "weight": 0, "action": "none"} for i in range(n)]


def test_state_writes_do_not_restart_the_stable_pods(k, release):
    api = k.api()
    stable = f"{release}-stable"
    before = workload(k, stable)
    store = ConfigMapStore(state_configmap(release), NS, owner_isvc=stable, api=api)
    for i in range(5):
        store.update(lambda _rec, i=i: _record(created_at=float(i), timeline=_points(i * 50)))
    time.sleep(3)  # KServe reconciles InferenceService changes at once; give it the chance
    assert workload(k, stable) == before
    cm = k.get("configmap", state_configmap(release))
    assert json.loads(cm["data"]["state"])["created_at"] == 4.0
    owner = cm["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("InferenceService", stable)
    # the control: the old store's annotation on the InferenceService is copied into the pod template
    k.run("-n", NS, "annotate", "inferenceservice", stable, "rollout.mlrollout.io/state={}")
    k.wait(
        "KServe rolling the stable Deployment",
        lambda: workload(k, stable)["replicasets"] != before["replicasets"],
        30,
    )


def test_state_configmap_is_garbage_collected_with_the_release(k):
    full = install_canary(k, "gc-state")
    store = ConfigMapStore(state_configmap(full), NS, owner_isvc=f"{full}-stable", api=k.api())
    store.update(lambda _rec: _record())
    assert k.get("configmap", state_configmap(full))
    k.helm("uninstall", "gc-state", "-n", NS, "--wait", "--timeout", "60s")
    k.wait("state ConfigMap gone", lambda: k.get("configmap", state_configmap(full)) is None, 30)


def test_one_controller_owns_a_rollout_and_a_stale_one_is_taken_over(k, release):
    """Two controllers on one release: the second is refused while the first's heartbeat is fresh, takes
    over once it is stale, and the first then learns it lost the rollout, all through the real ConfigMap
    (its annotation, written with the conflict-retrying merge patch)."""
    from serving.rollout.store import OWNER_ANNOTATION, OwnershipError

    api, now = k.api(), [1000.0]
    name, stable = state_configmap(release), f"{release}-stable"
    a = ConfigMapStore(name, NS, owner_isvc=stable, api=api, clock=lambda: now[0])
    b = ConfigMapStore(name, NS, owner_isvc=stable, api=api, clock=lambda: now[0])
    a.acquire("controller-a", interval_s=2)
    held = json.loads(k.get("configmap", name)["metadata"]["annotations"][OWNER_ANNOTATION])
    assert held["holder"] == "controller-a"
    with pytest.raises(OwnershipError, match="holds the rollout"):
        b.acquire("controller-b", interval_s=2)
    now[0] += 1
    a.heartbeat()
    now[0] += held["ttl_s"] + 1  # a stops beating
    b.acquire("controller-b", interval_s=2)
    with pytest.raises(OwnershipError, match="took over"):
        a.heartbeat()
    a.release()  # not the holder: must leave b's claim alone
    assert json.loads(k.get("configmap", name)["metadata"]["annotations"][OWNER_ANNOTATION])["holder"] == (
        "controller-b"
    )
    b.release()
    assert OWNER_ANNOTATION not in (k.get("configmap", name)["metadata"].get("annotations") or {})


# --------------------------------------------------------------------------- waits


def test_deploy_canary_returns_only_when_the_new_pods_serve(k, release):
    api = k.api()
    canary = f"{release}-canary"
    gen = kube.get(api, kube.ISVC, NS, canary)["metadata"]["generation"]
    start = time.monotonic()
    # the old wait, right after the patch KServe turns into a rolling update
    kube.patch(api, kube.ISVC, NS, canary, {"spec": {"predictor": {"model": {"storageUri": V2_URI}}}})
    assert old_wait_says_ready(api, canary, gen), "Ready + observedGeneration: the old wait passes at once"
    assert served_uris(k, canary) == {V1_URI}, "...while only the old model's pods are ready"
    # put it back, then do it the fixed way
    kube.patch(api, kube.ISVC, NS, canary, {"spec": {"predictor": {"model": {"storageUri": V1_URI}}}})
    targets.wait_serving(api, NS, canary, V1_URI, timeout_s=60, poll_s=0.5)
    assert deploy_v2(api, release) == canary
    assert served_uris(k, canary) == {V2_URI}
    dep = k.get("deployment", f"{canary}-predictor")
    assert dep["status"]["replicas"] == dep["status"]["updatedReplicas"] == dep["status"]["availableReplicas"]
    assert time.monotonic() - start < 120


def test_promote_waits_for_stable_and_keeps_its_labels(k, release):
    api = k.api()
    deploy_v2(api, release)
    r = router(api, release)
    r.set_weights(50, 50)
    r.promote()
    # when promote() returns, stable already serves the canary's model on every ready pod, then takes traffic
    assert served_uris(k, f"{release}-stable") == {V2_URI}
    assert r.get_weights() == (100, 0)
    stable = kube.get(api, kube.ISVC, NS, f"{release}-stable")
    assert stable["spec"]["predictor"]["labels"][targets.TRACK_LABEL] == "stable"
    for p in ready_pods(k, f"{release}-stable"):
        assert p["metadata"]["labels"][targets.TRACK_LABEL] == "stable"
    # each PDB covers its own track: the disruption controller counts one pod each
    for track in ("stable", "canary"):
        k.wait(
            f"PDB {track} covering its pod",
            lambda track=track: (
                (k.get("pdb", f"{release}-{track}") or {}).get("status", {}).get("expectedPods") == 1
            ),
            30,
        )


def test_deploy_canary_creates_a_missing_canary_as_a_canary(k, release):
    api = k.api()
    canary = f"{release}-canary"
    k.run("-n", NS, "delete", "inferenceservice", canary, "--wait=true", "--timeout=60s")
    deploy_v2(api, release)
    isvc = kube.get(api, kube.ISVC, NS, canary)
    assert isvc["metadata"]["labels"][targets.TRACK_LABEL] == "canary"
    assert isvc["spec"]["predictor"]["labels"][targets.TRACK_LABEL] == "canary"
    assert {p["metadata"]["labels"][targets.TRACK_LABEL] for p in ready_pods(k, canary)} == {"canary"}
    assert served_uris(k, canary) == {V2_URI}


# --------------------------------------------------------------------------- the whole rollout


class LiveTraffic(World):
    """Scripted request/latency/score counters that follow the weights of the real HTTPRoute."""

    def __init__(self, route: GatewayApiRouter, **kw):
        super().__init__(rps=400.0, **kw)
        self.route = route
        self.last = time.monotonic()

    def snapshot(self, target):
        now = time.monotonic()
        self.weights = self.route.get_weights()
        self.sleep(now - self.last)  # World.sleep turns elapsed time x weights into counters
        self.last = now
        return super().snapshot(target)


@pytest.mark.parametrize("good", [True, False], ids=["promoted", "rolled-back"])
def test_progressive_rollout_end_to_end(k, release, good):
    api = k.api()
    deploy_v2(api, release)
    traffic = LiveTraffic(router(api, release), error_rate=0.0 if good else 0.3)
    rec = run_rollout(api, release, traffic, threshold=1)
    assert rec.state["phase"] == ("Promoted" if good else "RolledBack")
    stored = json.loads(k.get("configmap", state_configmap(release))["data"]["state"])
    assert stored["state"]["phase"] == rec.state["phase"]
    assert any(h.get("evidence") for h in stored["state"]["history"]), "the decision's evidence is stored"
    assert [b["weight"] for b in k.get("httproute", release)["spec"]["rules"][0]["backendRefs"]] == [100, 0]
    assert served_uris(k, f"{release}-stable") == ({V2_URI} if good else {V1_URI})


# --------------------------------------------------------------------------- Knative mode


def test_knative_router_reaches_the_knative_service(k):
    k.helm("install", "kn", str(CHART), "-n", NS, "-f", str(CHART / "ci" / "knative-canary-values.yaml"))
    try:
        api = k.api()
        isvc = "kn-mlrollout-model"
        r = KServeKnativeRouter(isvc, NS, api=api)
        r.set_weights(70, 30)
        obj = kube.get(api, kube.ISVC, NS, isvc)
        assert obj["spec"]["predictor"]["canaryTrafficPercent"] == 30
        assert r.get_weights() == (70, 30)  # from the spec: no Knative controller reports traffic here
        r.promote()
        assert "canaryTrafficPercent" not in kube.get(api, kube.ISVC, NS, isvc)["spec"]["predictor"]
        ksvc = k.wait(
            "the Knative Service", lambda: k.get("services.serving.knative.dev", f"{isvc}-predictor"), 60
        )
        assert ksvc["spec"]["template"]["spec"]["containers"][0]["ports"] == [
            {"containerPort": 8080, "name": "http1", "protocol": "TCP"}
        ]
    finally:
        k.helm("uninstall", "kn", "-n", NS, "--wait", "--timeout", "60s", check=False)


# --------------------------------------------------------------------------- failure paths


def test_router_rebuilt_from_its_persisted_config_and_a_kubeconfig(k, release, controlplane):
    """What the controller persists is enough to rebuild the router in another process (kubeconfig path)."""
    from serving.rollout.routers import build_router

    cfg = {**router(k.api(), release).config(), "kubeconfig": str(controlplane.kubeconfig)}
    again = build_router(json.loads(json.dumps(cfg)))
    again.set_weights(60, 40)
    assert [b["weight"] for b in k.get("httproute", release)["spec"]["rules"][0]["backendRefs"]] == [60, 40]


def test_a_concurrent_route_edit_is_a_real_409_and_is_retried(k, release):
    api = k.api()
    r = router(api, release)
    real_patch = api.patch_namespaced_custom_object
    raced = []

    def patch_after_someone_else(*a, **kw):
        if not raced:  # between our read and our write, another writer changes the route
            raced.append(1)
            k.run("-n", NS, "annotate", "httproute", release, "someone/else=was-here", "--overwrite")
        return real_patch(*a, **kw)

    api.patch_namespaced_custom_object = patch_after_someone_else
    r.set_weights(80, 20)
    assert raced and r.get_weights() == (80, 20)
    assert k.get("httproute", release)["metadata"]["annotations"]["someone/else"] == "was-here", (
        "their write survived"
    )


def test_a_route_without_our_backends_is_named_in_the_error(k, release):
    from serving.rollout.routers import RouterError

    r = GatewayApiRouter(release, NS, "no-such-stable", "no-such-canary", api=k.api())
    with pytest.raises(RouterError, match="no rule with backendRefs named 'no-such-stable'"):
        r.get_weights()


UNSCHEDULABLE = {"spec": {"predictor": {"nodeSelector": {"mlrollout.io/no-such-node": "true"}}}}


def test_promotion_keeps_traffic_on_the_canary_when_stable_never_serves(k, release):
    from serving.rollout.routers import RouterError

    api = k.api()
    kube.patch(
        api,
        kube.ISVC,
        NS,
        f"{release}-canary",
        {
            **UNSCHEDULABLE,
            "spec": {"predictor": {**UNSCHEDULABLE["spec"]["predictor"], "model": {"storageUri": V2_URI}}},
        },
    )
    r = router(api, release)
    r.ready_timeout_s = 5
    with pytest.raises(RouterError, match="traffic stays on the canary"):
        r.promote()
    assert r.get_weights() == (0, 100)
    assert served_uris(k, f"{release}-stable") == {V1_URI}, "the old stable pods keep serving"


def test_deploy_canary_reports_a_canary_that_never_serves(k, release):
    api = k.api()
    kube.patch(api, kube.ISVC, NS, f"{release}-canary", UNSCHEDULABLE)
    with pytest.raises(kube.KubeError, match="does not serve the new model after 3s"):
        deploy_v2(api, release, ready_timeout_s=3)


def test_deploy_canary_in_knative_mode_starts_a_dark_revision(k):
    k.helm("install", "kndark", str(CHART), "-n", NS, "-f", str(CHART / "ci" / "knative-canary-values.yaml"))
    try:
        api = k.api()
        # no Knative controller: the revision never reports ready, but the dark canary is requested
        with pytest.raises(kube.KubeError, match="latest revision"):
            targets.deploy_canary(
                api,
                namespace=NS,
                fullname="kndark-mlrollout-model",
                storage_uri=V2_URI,
                version="2.0.0",
                router="kserve_knative",
                ready_timeout_s=2,
                poll_s=0.5,
            )
        pred = kube.get(api, kube.ISVC, NS, "kndark-mlrollout-model")["spec"]["predictor"]
        assert pred["canaryTrafficPercent"] == 0 and pred["model"]["storageUri"] == V2_URI
    finally:
        k.helm("uninstall", "kndark", "-n", NS, "--wait", "--timeout", "60s", check=False)
