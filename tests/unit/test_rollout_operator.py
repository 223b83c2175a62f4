"""The operator's pure parts (serving/rollout/operator.py, crstore.py), without a cluster: the ModelRollout
spec mapped onto the controller's record, the status view of a record, the Events and metrics derived from
a record before and after a write, and the Lease logic over a fake CoordinationV1Api. The operator on a
real API server is tests/controlplane/test_operator.py."""

from __future__ import annotations

import copy
import datetime as dt
import threading
from types import SimpleNamespace

import pytest

from serving.rollout import operator as op
from serving.rollout.crstore import status_view
from serving.rollout.gates import (
    AccuracyGate,
    DriftGate,
    ErrorRateVsStable,
    LatencyGate,
    LatencyVsStable,
    SuccessRateGate,
)
from tests.unit.test_rollout_controller import World, make

CR = {
    "apiVersion": "mlrollout.io/v1alpha1",
    "kind": "ModelRollout",
    "metadata": {"name": "churn", "namespace": "models", "generation": 3},
    "spec": {
        "target": {"release": {"fullname": "churn"}},
        "model": {"storageUri": "s3://b/churn/2.0.0", "version": "2.0.0"},
        "strategy": {
            "steps": [5, 50, 100],
            "interval": "1m30s",
            "threshold": 3,
            "maxInconclusive": 4,
            "gates": {
                "compareWithStable": False,  # the absolute limits alone (the default compares with stable)
                "minSuccessRate": 0.95,
                "maxP99Ms": 250,
                "driftMethod": "psi",
                "maxDrift": 0.3,
                "minAccuracy": 0.8,
                "minLabelled": 10,
            },
        },
    },
}


def cr(**spec) -> dict:
    obj = copy.deepcopy(CR)
    obj["spec"].update(spec)
    return obj


def test_the_spec_becomes_the_record_the_cli_would_build():
    rec = op.build_record(CR, "1.0.0", "http://prom:9090")
    assert rec.spec == {"steps": [5, 50, 100], "interval_s": 90.0, "threshold": 3, "max_inconclusive": 4}
    gates = {type(g): g for g in rec.gate_objects()}
    assert gates[SuccessRateGate].min_rate == 0.95 and gates[LatencyGate].max_ms == 250
    assert gates[DriftGate].method == "psi" and gates[DriftGate].max_drift == 0.3
    assert gates[AccuracyGate].min_accuracy == 0.8 and gates[AccuracyGate].min_labelled == 10
    assert rec.router["router"] == "gateway_api" and rec.router["route"] == "churn"
    assert (
        rec.router["stable_isvc"] == "churn-stable"
        and rec.router["canary_backend"] == "churn-canary-predictor"
    )
    assert rec.metrics == {"provider": "prometheus", "url": "http://prom:9090"}
    assert (rec.stable["model"], rec.stable["version"], rec.canary["version"]) == ("churn", "1.0.0", "2.0.0")
    assert rec.canary["extra"] == {"namespace": "models"}


def test_no_drift_gate_scrape_urls_model_name_and_interval_floor():
    obj = cr(
        metrics={
            "provider": "scrape",
            "stableMetricsUrl": "http://s/metrics",
            "canaryMetricsUrl": "http://c/metrics",
        }
    )
    obj["spec"]["strategy"]["gates"] = {"driftGate": False}
    obj["spec"]["model"]["name"] = "breast-cancer"
    rec = op.build_record(obj, "1.0.0", "", interval_floor_s=120)
    # the default gates without the drift test: the p99 limit beside the error and latency comparisons
    assert [type(g) for g in rec.gate_objects()] == [LatencyGate, ErrorRateVsStable, LatencyVsStable]
    assert rec.metrics == {"provider": "scrape"}
    assert (rec.stable["metrics_url"], rec.canary["metrics_url"]) == ("http://s/metrics", "http://c/metrics")
    assert rec.canary["model"] == "breast-cancer" and rec.spec["interval_s"] == 120


def test_specs_the_operator_cannot_drive_are_refused_with_a_reason():
    with pytest.raises(op.SpecError, match="neither a release nor an inferenceService"):
        op.build_record(cr(target={}), "1.0.0", "http://p")
    with pytest.raises(op.SpecError, match="--prometheus-url"):
        op.build_record(CR, "1.0.0", "")


def test_a_knative_inference_service_target_is_driven_by_kserve_knative():
    """spec.target.inferenceService (the chart's knativeCanary in operator mode): canaryTrafficPercent on
    that one InferenceService, which is also the stable one (its version, its state)."""
    obj = cr(target={"inferenceService": {"name": "churn-kn"}})
    rec = op.build_record(obj, "1.0.0", "http://prom:9090")
    assert rec.router == {"router": "kserve_knative", "isvc": "churn-kn", "namespace": "models",
                          "kubeconfig": None}  # fmt: skip
    cls, name = op.release_router(obj)
    assert (cls.name, name, cls.for_release(name, "models").owner_isvc) == ("kserve_knative", "churn-kn",
                                                                             "churn-kn")  # fmt: skip
    # a release of the chart's knativeCanary names the router itself; the CRD refuses gateway_api there
    obj = cr(target={"release": {"fullname": "kn"}})
    obj["spec"]["strategy"]["router"] = "kserve_knative"
    assert op.build_record(obj, "1.0.0", "http://p").router["isvc"] == "kn"


def test_a_standard_inference_service_target_can_name_kserve_canary():
    """spec.canary on that one InferenceService (the entry the operator adds is the only one); promotion
    by copy, so the chart's HTTPRoute keeps its <name>-predictor."""
    obj = cr(target={"inferenceService": {"name": "churn"}})
    obj["spec"]["strategy"]["router"] = "kserve_canary"
    rec = op.build_record(obj, "1.0.0", "http://prom:9090")
    assert rec.router == {"router": "kserve_canary", "isvc": "churn", "namespace": "models", "canary": "",
                          "promotion": "copy", "route": "", "kubeconfig": None}  # fmt: skip
    assert rec.canary["version"] == obj["spec"]["model"]["version"]


def _driven(tmp_path, **world_kw):
    world = World(**world_kw)
    store, c, _ = make(tmp_path, world, threshold=1)
    before = store.load()
    c.run()
    return before, store.load()


def test_what_to_roll_out(tmp_path):
    _, promoted = _driven(tmp_path)
    assert op.stable_version_of(None, CR, promoted) == "2.0.0", "a promotion leaves its canary as stable"
    assert not op.wanted(cr(model={"storageUri": "s3://x/y", "version": "2.0.0"}), promoted, "2.0.0")
    assert op.wanted(cr(model={"storageUri": "s3://x/y", "version": "3.0.0"}), promoted, "2.0.0")
    _, rolled_back = _driven(tmp_path / "bad", error_rate=0.5)
    assert rolled_back.phase == "RolledBack"
    assert op.stable_version_of(None, CR, rolled_back) == "1.0.0"
    assert not op.wanted(cr(model={"storageUri": "s3://x/y", "version": "2.0.0"}), rolled_back, "1.0.0"), (
        "a rolled-back version is not retried"
    )
    assert op.wanted(CR, None, "1.0.0") and not op.wanted(CR, None, "2.0.0")


def test_status_view_is_the_record(tmp_path):
    _, rec = _driven(tmp_path)
    v = status_view(rec, {}, 3, 1_000.0)
    assert (v["phase"], v["step"], v["canaryWeight"]) == ("Promoted", 4, 100)
    assert (v["stableVersion"], v["canaryVersion"], v["observedGeneration"]) == ("1.0.0", "2.0.0", 3)
    conds = {c["type"]: c for c in v["conditions"]}
    assert conds["Promoted"]["status"] == "True" and conds["Ready"]["status"] == "True"
    assert conds["Progressing"]["status"] == "False" and conds["Progressing"]["reason"] == "NotProgressing"
    assert {g["gate"] for g in v["lastAnalysis"]} == {"success_rate", "latency_p99", "drift_js"}
    assert all({"n", "threshold", "verdict", "op"} <= set(g) for g in v["lastAnalysis"])
    assert v["history"][0]["event"] == "start" and v["history"][-1]["action"] == "promote"
    assert all(h.get("verdict") in (None, "pass", "fail", "inconclusive") for h in v["history"])
    # a condition keeps its transition time while its status holds
    again = status_view(rec, v, 3, 2_000.0)
    assert again["conditions"] == v["conditions"]


def test_events_and_metrics_come_from_the_record_before_and_after(tmp_path):
    before, rec = _driven(tmp_path)
    evs = [op.event_for(h, rec) for h in op.new_decisions(before, rec)]
    reasons = [e[1] for e in evs if e]
    assert reasons[0] == "Started" and reasons[-1] == "Promoted" and reasons.count("StepAdvanced") == 3
    assert "success_rate=" in evs[-1][2] and "drift_js=" in evs[-1][2] and evs[-1][0] == "Normal"
    assert op.new_decisions(rec, rec) == [], "no new decision, no Event"
    m = op.OperatorMetrics()
    m.observe("models", "churn", before, rec)
    val = m.registry.get_sample_value
    assert (
        val("mlrollout_operator_rollout_phase", {"namespace": "models", "name": "churn", "phase": "Promoted"})
        == 1
    )
    assert val("mlrollout_operator_canary_weight", {"namespace": "models", "name": "churn"}) == 100
    assert (
        val("mlrollout_operator_analyses_total", {"namespace": "models", "name": "churn", "verdict": "pass"})
        == 4
    )
    assert (
        val("mlrollout_operator_gate_value", {"namespace": "models", "name": "churn", "gate": "success_rate"})
        == 1
    )
    assert (
        val("mlrollout_operator_rollout_duration_seconds_count", {"namespace": "models", "phase": "Promoted"})
        == 1
    )
    m.observe("models", "churn", rec, rec)  # a rewrite of the same ended rollout counts nothing again
    assert (
        val("mlrollout_operator_rollout_duration_seconds_count", {"namespace": "models", "phase": "Promoted"})
        == 1
    )
    _, bad = _driven(tmp_path / "bad", error_rate=0.5)
    last = op.event_for(bad.state["history"][-1], bad)
    assert last[:2] == ("Warning", "RolledBack") and "success_rate=" in last[2]


# --------------------------------------------------------------------------- the Lease


class Conflict(Exception):
    status = 409


class FakeCoord:
    """read/create/replace_namespaced_lease on one Lease, with resourceVersion checks."""

    def __init__(self):
        self.lease = None
        self.rv = 0

    def read_namespaced_lease(self, name, ns):
        if self.lease is None:
            raise type("NotFound", (Exception,), {"status": 404})()
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, ns, body):
        if self.lease is not None:
            raise Conflict()
        self.rv += 1
        body.metadata.resource_version = str(self.rv)
        self.lease = copy.deepcopy(body)

    def replace_namespaced_lease(self, name, ns, body):
        if body.metadata.resource_version != self.lease.metadata.resource_version:
            raise Conflict()
        self.rv += 1
        body.metadata.resource_version = str(self.rv)
        self.lease = copy.deepcopy(body)


def electors(n=2, lease_s=10):
    coord = FakeCoord()
    out = []
    for i in range(n):
        e = op.LeaseElector(SimpleNamespace(api_client=None), "l", "ns", f"r{i}", lease_s)
        e.coord = coord
        out.append(e)
    return coord, out


def test_one_lease_holder_and_a_takeover_after_expiry():
    coord, (a, b) = electors()
    assert a.try_acquire_or_renew() and coord.lease.spec.holder_identity == "r0"
    assert not b.try_acquire_or_renew(), "a fresh lease is not taken"
    assert a.try_acquire_or_renew(), "the holder renews"
    coord.lease.spec.renew_time = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=11)  # a stopped renewing
    assert b.try_acquire_or_renew()
    assert coord.lease.spec.holder_identity == "r1" and coord.lease.spec.lease_transitions == 1
    assert not a.try_acquire_or_renew(), "the old holder does not take it back while b renews"


def test_a_write_race_on_the_lease_is_lost_not_an_error():
    coord, (a, b) = electors()
    a.try_acquire_or_renew()
    coord.lease.spec.renew_time = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=11)
    real = coord.read_namespaced_lease
    stale = real("l", "ns")  # what b read: expired
    assert a.try_acquire_or_renew()  # meanwhile a renews (the resourceVersion moves on)
    coord.read_namespaced_lease = lambda *_: copy.deepcopy(stale)
    assert not b.try_acquire_or_renew(), "b's replace carries the old resourceVersion: 409, not leading"
    coord.read_namespaced_lease = real
    assert coord.lease.spec.holder_identity == "r0"


# --------------------------------------------------------------------------- list/watch


def _obj(name: str, rv: str, generation: int = 1) -> dict:
    return {
        "metadata": {"name": name, "namespace": "models", "resourceVersion": rv, "generation": generation}
    }


def test_the_watch_relists_on_410_gone_and_follows_events(monkeypatch):
    """410 Gone (the resourceVersion is too old) relists; a watch that times out is re-opened from the
    last resourceVersion seen; ADDED/MODIFIED/DELETED keep the cache."""
    from kubernetes import watch
    from kubernetes.client.rest import ApiException

    lists = [
        {"metadata": {"resourceVersion": "10"}, "items": [_obj("a", "9")]},
        {"metadata": {"resourceVersion": "20"}, "items": [_obj("a", "9"), _obj("b", "19")]},
    ]
    streams: list[dict] = []

    class FakeApi:
        api_client = None

        def list_namespaced_custom_object(self, *a, **kw):
            return lists.pop(0) if len(lists) > 1 else lists[0]

    o = op.Operator.__new__(op.Operator)
    o.api, o.s = FakeApi(), op.Settings(namespace="models", watch_timeout_s=1)
    o.stop = threading.Event()
    o.objects, o.workers, o.cancel = {}, {}, {}
    o._lock, o._kick = threading.Lock(), threading.Event()

    def stream(self, fn, *args, **kw):
        streams.append(kw)
        if len(streams) == 1:
            raise ApiException(status=410, reason="Gone")  # what Watch raises after its own one retry
        if len(streams) == 2:
            yield {"type": "MODIFIED", "object": _obj("b", "21", generation=2)}
            return  # the server's timeout: re-watch from rv 21
        yield {"type": "DELETED", "object": _obj("a", "22")}
        o.stop.set()

    monkeypatch.setattr(watch.Watch, "stream", stream)
    o._watch_loop()
    assert [s["resource_version"] for s in streams] == ["10", "20", "21"], streams
    assert set(o.objects) == {("models", "b")} and o.objects[("models", "b")]["metadata"]["generation"] == 2


def test_the_operator_command_without_a_cluster_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    from serving.rollout.cli import main

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert main(["operator", "--kubeconfig", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the API server") and err.count("\n") == 1
