"""The watch after promotion (issue 15 part 5): the pure transitions (machine.verify, the commands in
Verifying), the record's ``watch``, the controller on the unit tests' simulated world, the operator's
spec and Events, and the CRD's field. The real data planes: tests/integration/test_rollout_watch_local.py
(LocalStack) and tests/controlplane/test_operator_watch.py (the operator on the control plane)."""

from __future__ import annotations

import copy
import json

import pytest

from serving.rollout import controller as ctl
from serving.rollout import crstore, handoff, machine, operator
from serving.rollout.cli import main as cli_main
from serving.rollout.gates import GateResult, Verdict
from serving.rollout.machine import Action, InvalidTransition, Phase, RolloutSpec
from serving.rollout.record import RecordError, RolloutRecord
from serving.rollout.store import FileStateStore
from tests.unit.test_modelrollout_crd import at, doc, rule_of, schema, version  # noqa: F401 (fixtures)
from tests.unit.test_rollout_controller import CANARY, GATES, SCRAPE, STABLE, World

PASS = [GateResult("success_rate", Verdict.PASS, 1.0, 0.99, ">=", 100)]
FAIL = [GateResult("success_rate", Verdict.FAIL, 0.7, 0.99, ">=", 100)]
THIN = [GateResult("success_rate", Verdict.INCONCLUSIVE, None, 0.99, ">=", 3)]
SPEC = RolloutSpec(steps=(50, 100), interval_s=10.0, max_inconclusive=2, post_promotion_intervals=3)


def promoted(spec: RolloutSpec = SPEC):
    st, _ = machine.start(spec, 0.0)
    st, _ = machine.analyse(st, spec, PASS, 10.0)
    return machine.analyse(st, spec, PASS, 20.0)


# ------------------------------------------------------------------------------- the machine


def test_a_pass_at_the_last_step_promotes_into_verifying_not_promoted():
    st, d = promoted()
    assert (st.phase, st.weight, d.action) == (Phase.VERIFYING, 100, Action.PROMOTE)
    assert not st.phase.terminal and "watching the new stable for 3 intervals" in d.reason
    assert st.next_analysis_at == 30.0
    off = RolloutSpec(steps=(50, 100), interval_s=10.0)
    st0, d0 = promoted(off)
    assert (st0.phase, d0.action) == (Phase.PROMOTED, Action.PROMOTE), "0 intervals: today's behaviour"


def test_n_passed_intervals_end_promoted_without_touching_the_data_plane():
    st, _ = promoted()
    actions = []
    for i in range(3):
        st, d = machine.verify(st, SPEC, PASS, 30.0 + 10 * i)
        actions.append(d.action)
    assert actions == [Action.HOLD, Action.HOLD, Action.NONE]
    assert st.phase is Phase.PROMOTED and st.weight == 100 and st.watch_passes == 3
    assert "passed 3/3" in st.reason and st.history[-1]["event"] == "watch"
    with pytest.raises(InvalidTransition, match="not Verifying"):
        machine.verify(st, SPEC, PASS, 70.0)


def test_a_failed_interval_restores_the_previous_model_at_once_and_says_so():
    st, _ = promoted()
    st, _ = machine.verify(st, SPEC, PASS, 30.0)
    st, d = machine.verify(st, SPEC, FAIL, 40.0)
    assert (st.phase, st.weight, d.action) == (Phase.ROLLED_BACK, 0, Action.RESTORE)
    assert d.reason.startswith("rollback: after promotion, watch interval 2/3 failed")
    assert "success_rate=0.7 < 0.99" in d.reason and "previous model is restored" in d.reason
    assert d.evidence == tuple(FAIL)


def test_inconclusive_intervals_never_pass_and_too_many_restore():
    st, _ = promoted()
    st, d = machine.verify(st, SPEC, THIN, 30.0)
    assert (st.phase, d.action, st.watch_passes) == (Phase.VERIFYING, Action.HOLD, 0)
    st, d = machine.verify(st, SPEC, PASS, 40.0)  # a pass resets the inconclusive run
    st, d = machine.verify(st, SPEC, THIN, 50.0)
    assert st.phase is Phase.VERIFYING and st.watch_passes == 1
    st, d = machine.verify(st, SPEC, THIN, 60.0)
    assert (st.phase, d.action) == (Phase.ROLLED_BACK, Action.RESTORE)
    assert "could not be verified" in d.reason


def test_commands_during_the_watch():
    st, _ = promoted()
    with pytest.raises(InvalidTransition, match="cannot pause during the watch"):
        machine.pause(st, 31.0)
    with pytest.raises(InvalidTransition, match="not Paused"):
        machine.resume(st, SPEC, 31.0)
    p, d = machine.promote(st, 31.0)
    assert (p.phase, p.weight, d.action) == (Phase.PROMOTED, 100, Action.NONE)
    assert "watch after promotion ended early" in d.reason
    a, d = machine.abort(st, 31.0)
    assert (a.phase, a.weight, d.action) == (Phase.ABORTED, 0, Action.RESTORE)
    # a manual promote before the last step skips the watch too (an operator's promote is final)
    s0, _ = machine.start(SPEC, 0.0)
    assert machine.promote(s0, 1.0)[0].phase is Phase.PROMOTED


@pytest.mark.parametrize("bad", [-1, 1001, True, 1.5, "3"])
def test_the_spec_refuses_a_bad_interval_count(bad):
    with pytest.raises(ValueError, match=r"post_promotion_intervals .* from 0 to 1000"):
        RolloutSpec(post_promotion_intervals=bad)


def test_spec_and_state_keep_their_old_shape_when_the_watch_is_off():
    assert "post_promotion_intervals" not in RolloutSpec().to_dict()
    assert RolloutSpec.from_dict(SPEC.to_dict()) == SPEC
    st, _ = machine.start(RolloutSpec(), 0.0)
    assert "watch_passes" not in st.to_dict()
    st, _ = promoted()
    st, _ = machine.verify(st, SPEC, PASS, 30.0)
    assert machine.RolloutState.from_dict(st.to_dict()) == st and st.to_dict()["watch_passes"] == 1


# ------------------------------------------------------------------------------- the record

ROUTER = {"router": "local_proxy", "socket_path": "/nonexistent"}


def verifying_record() -> dict:
    rec = ctl.new_record(SPEC, GATES, STABLE, CANARY, ROUTER, SCRAPE).to_dict()
    st, _ = promoted()
    rec["state"] = st.to_dict()
    snap = {"requests": {"200": 900.0}, "latency": {}, "scores": {}}
    rec["baselines"] = {"rollout": {"stable": snap, "canary": snap}, "step": None}
    rec["watch"] = {"previous_model": {"model": {"storageUri": "s3://m/1"}}, "baseline": snap, "start": None}
    rec["pending"] = {"action": "restore", "weight": 0}
    return rec


def test_a_verifying_record_round_trips_key_for_key():
    d = verifying_record()
    assert RolloutRecord.from_dict(d).to_dict() == d


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("watch"), "watch: a Verifying rollout needs the watch's baseline"),
        (lambda d: d["watch"].update(baseline=None), "watch.baseline: a Verifying rollout needs"),
        (lambda d: d["watch"].update(start=[1]), "watch.start: must be an object"),
        (lambda d: d["watch"].update(previous_model="s3://x"), "watch.previous_model: must be an object"),
        (lambda d: d["watch"].update(other=1), "watch: must be an object with previous_model"),
        (lambda d: d["state"].update(weight=50), "state.weight: 50% is impossible for a Verifying"),
        (lambda d: d["state"].update(watch_passes=-1), "state.watch_passes: must be a whole number"),
        (
            lambda d: d.update(router={"router": "kserve_knative", "isvc": "m", "namespace": "models"}),
            "spec.post_promotion_intervals: router kserve_knative cannot restore",
        ),
    ],
)
def test_the_record_refuses_a_watch_it_could_not_drive(edit, message):
    d = verifying_record()
    edit(d)
    with pytest.raises(RecordError, match=message.replace("(", r"\(").replace(".", r"\.")):
        RolloutRecord.from_dict(d)


# ------------------------------------------------------------------------------- the controller


class WatchWorld(World):
    """The simulated world as a router that promotes by weights and records the watch's calls; the new
    version's error rate jumps to ``degrade`` once it is promoted (it broke under full load)."""

    promoted_side = "canary"

    def __init__(self, degrade: float = 0.0, **kw):
        super().__init__(**kw)
        self.degrade = degrade

    def previous_model(self):
        self.calls.append(("previous_model",))
        return {"model": {"storageUri": "file:///models/1.0.0"}}

    def promote(self):
        super().promote()
        self.error_rate = self.degrade

    def restore(self, previous):
        self.calls.append(("restore", previous))
        self.weights = (100, 0)


def drive(tmp_path, w, n=3):
    store = FileStateStore(tmp_path / "state.json")
    rec = ctl.new_record(RolloutSpec((50, 100), 10.0, 2, 3, n), GATES, STABLE, CANARY, ROUTER, SCRAPE)
    ctl.begin(store, rec)
    logs: list[str] = []
    c = ctl.Controller(store, router=w, provider=w, clock=w.clock, sleep=w.sleep, log=logs.append)
    return store, c.run(max_seconds=30), logs


def test_a_version_that_degrades_after_promotion_is_restored(tmp_path):
    w = WatchWorld(degrade=0.2)
    _, rec, logs = drive(tmp_path, w)
    st = rec.rollout_state
    assert st.phase is Phase.ROLLED_BACK and rec.pending is None
    prev = {"model": {"storageUri": "file:///models/1.0.0"}}
    assert w.calls == [("previous_model",), ("set", 50, 50), ("set", 0, 100), ("promote",), ("restore", prev)]
    assert w.weights == (100, 0)
    last = st.history[-1]
    assert (last["event"], last["action"]) == ("watch", "restore")
    assert "rollback: after promotion, watch interval 1/3 failed" in st.reason
    assert "success_rate=" in st.reason
    # the comparison's "stable" was the previous version's counters over the rollout, recorded once
    base = rec.watch["baseline"]
    # (100 req/s for 10 s at 50 %, then none at 100 %)
    assert base["requests"]["200"] == pytest.approx(100 * 10.0 * 0.5, rel=0.05)
    assert any("] watch 1/3 FAIL -> rollback: after promotion, watch interval 1/3" in line for line in logs)
    assert rec.timeline[-1]["watch"] is True and rec.timeline[-1]["action"] == "restore"
    # the timeline: the new stable answered everything; what it was compared with is beside it
    point = rec.timeline[-1]
    assert point["requests"]["stable"] == 0 and point["requests"]["canary"] > 0
    assert point["baseline_requests"] == pytest.approx(sum(base["requests"].values()))


def test_a_good_version_passes_the_watch_and_stays_promoted(tmp_path):
    w = WatchWorld()
    _, rec, _ = drive(tmp_path, w, n=2)
    st = rec.rollout_state
    assert st.phase is Phase.PROMOTED and st.watch_passes == 2 and w.weights == (0, 100)
    assert [c[0] for c in w.calls] == ["previous_model", "set", "set", "promote"], "no restore"
    assert [h["event"] for h in st.history][-3:] == ["analysis", "watch", "watch"]
    # the window of each interval grows from the promotion: the second saw about twice the first
    n1, n2 = (p["requests"]["canary"] for p in rec.timeline if p.get("watch"))
    assert n2 == pytest.approx(2 * n1, rel=0.05)


def test_an_abort_during_the_watch_restores_through_the_router(tmp_path):
    w = WatchWorld()
    store = FileStateStore(tmp_path / "s.json")
    d = verifying_record()
    d["pending"] = None
    store.update(lambda _old: RolloutRecord.from_dict(d))
    rec = ctl.command(store, "abort", router=w, clock=lambda: 31.0)
    assert rec.phase == "Aborted" and rec.pending is None
    assert w.calls == [("restore", {"model": {"storageUri": "s3://m/1"}})]


def test_a_controller_restarted_mid_watch_resumes_it(tmp_path):
    """Killed between the promotion and the watch's first snapshot: the restarted one opens the window
    (from the counters then) and goes on watching; the previous model recorded at the start is kept."""
    w = WatchWorld(degrade=0.2)
    store = FileStateStore(tmp_path / "state.json")
    d = verifying_record()
    d["pending"] = None
    store.update(lambda _old: RolloutRecord.from_dict(d))
    w.weights = (0, 100)
    w.error_rate = 0.2
    c = ctl.Controller(store, router=w, provider=w, clock=w.clock, sleep=w.sleep, log=lambda _m: None)
    rec = c.run(max_seconds=30)
    assert rec.phase == "RolledBack" and w.calls == [("restore", {"model": {"storageUri": "s3://m/1"}})]


# ------------------------------------------------------------------------------- operator and CRD


def test_the_operator_reads_the_crd_field_and_names_the_events():
    assert operator.rollout_spec({"postPromotionIntervals": 4}).post_promotion_intervals == 4
    assert operator.rollout_spec({}).post_promotion_intervals == 0
    rec = RolloutRecord.from_dict(verifying_record())
    st, _ = promoted()
    watch_pass = {**st.history[-1], "event": "watch", "action": "none", "phase": "Promoted"}
    restore = {**st.history[-1], "event": "watch", "action": "restore", "phase": "RolledBack"}
    hold = {**st.history[-1], "event": "watch", "action": "hold", "phase": "Verifying"}
    assert operator.event_for(st.history[-1], rec)[:2] == ("Normal", "Verifying")
    assert operator.event_for(watch_pass, rec)[:2] == ("Normal", "Promoted")
    assert operator.event_for(restore, rec)[:2] == ("Warning", "RolledBack")
    assert operator.event_for(hold, rec) is None
    conds = {c["type"]: c for c in crstore.conditions(rec, [], 1, 0.0)}
    assert conds["Progressing"]["status"] == "True" and conds["Progressing"]["reason"] == "Verifying"
    assert conds["Ready"]["status"] == "False", "not ready while the watch runs"


def test_the_crd_field_is_the_spec_field(schema):  # noqa: F811
    f = at(schema, "spec.strategy.postPromotionIntervals")
    assert (f["type"], f["default"], f["minimum"], f["maximum"]) == (
        "integer",
        RolloutSpec().post_promotion_intervals,
        0,
        machine.MAX_WATCH_INTERVALS,
    )
    r = rule_of(at(schema, "spec"), "postPromotionIntervals")
    assert "gateway_api" in r["rule"] and r["fieldPath"] == ".strategy.postPromotionIntervals"
    spec = copy.deepcopy(SPEC)
    assert spec.post_promotion_intervals == 3


# ------------------------------------------------------------------------------- the CLI

START = ["start", "--model", "m", "--stable-version", "1.0.0", "--canary-version", "2.0.0"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            [
                *START,
                "--router",
                "local_proxy",
                "--haproxy-socket",
                "h.sock",
                "--watch-after-promotion",
                "-1",
            ],
            "error: post_promotion_intervals (the watch after promotion) must be a whole number from 0",
        ),
        (
            [*START, "--router", "kserve_knative", "--isvc", "m", "--watch-after-promotion", "3"],
            "error: --watch-after-promotion: router kserve_knative cannot restore the previous model",
        ),
    ],
)
def test_cli_refuses_a_watch_it_cannot_run_in_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli_main([*argv, "--state-file", "s.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err, err
    assert not (tmp_path / "s.json").exists(), "refused before anything is written"


def test_cli_status_shows_the_watch(tmp_path, capsys):
    store = FileStateStore(tmp_path / "s.json")
    d = verifying_record()
    d["pending"] = None
    st, _ = promoted()
    st, _ = machine.verify(st, SPEC, PASS, 30.0)
    d["state"] = st.to_dict()
    store.update(lambda _old: RolloutRecord.from_dict(d))
    assert cli_main(["status", "--state-file", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "phase Verifying" in out and "watch after promotion: 1/3 intervals passed" in out


def test_the_kfp_hand_off_waits_through_the_watch_and_reports_its_rollback():
    """handoff.outcome: Verifying is not an end (the step keeps waiting); the watch's rollback is
    RolledBack, and the step's failure line carries the reason naming the gate and "after promotion"."""
    rec = RolloutRecord.from_dict({**verifying_record(), "pending": None})
    meta = {"name": "churn", "namespace": "models"}

    def obj(r: RolloutRecord) -> dict:
        view = crstore.status_view(r, {}, 1, 0.0)
        return {"metadata": meta, "status": {**view, "record": json.dumps(r.to_dict())}}

    assert handoff.outcome(obj(rec), CANARY.version) is None, "still watching: not this version's end"
    st, _ = machine.verify(rec.rollout_state, SPEC, FAIL, 30.0)
    rec.state = st.to_dict()
    assert handoff.outcome(obj(rec), CANARY.version) == "RolledBack"
    line = handoff.failure_line(obj(rec), CANARY.version)
    assert "RolledBack" in line and "rollback: after promotion" in line and "success_rate=0.7" in line


def test_the_kfp_step_asks_for_the_watch_and_the_operator_reads_it_back():
    base = {"fullname": "bc", "model_name": "m", "storage_uri": "s3://b/m/2", "version": "2.0.0"}
    spec = handoff.spec(**base, steps="50,100", post_promotion_intervals=3)
    assert spec["strategy"]["postPromotionIntervals"] == 3
    rec = operator.build_record(handoff.manifest("bc", "models", spec), "1.0.0", "http://prom:9090")
    assert rec.rollout_spec.post_promotion_intervals == 3
    assert handoff.spec(**base)["strategy"]["postPromotionIntervals"] == 0, "written: a patch turns it off"
    with pytest.raises(ValueError, match="needs router gateway_api, got 'kserve_knative'"):
        handoff.spec(**base, router="kserve_knative", post_promotion_intervals=3)
    with pytest.raises(ValueError, match="post_promotion_intervals"):
        handoff.spec(**base, post_promotion_intervals=-1)
