"""The shadow step: the state machine's weight-0 step, the record's checks, the controller's order of
router calls (weights, then mirror; mirror off before any live weight), and the local stack's HAProxy
config with its Lua mirror, on a real HAProxy (the rollouts: tests/integration/test_shadow_local.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from serving.rollout import controller as ctl
from serving.rollout import machine as m
from serving.rollout.cli import main as cli_main
from serving.rollout.gates import (
    AccuracyGate,
    AccuracyVsStable,
    AgreementGate,
    DriftGate,
    GateResult,
    Verdict,
    shadow_gates,
)
from serving.rollout.machine import Action, Phase, RolloutSpec
from serving.rollout.record import RecordError
from serving.rollout.routers import HAProxyRuntimeAPI, LocalProxyRouter, RouterError, mirrors
from serving.rollout.store import FileStateStore
from tests.unit.test_rollout_controller import CANARY, GATES, SCRAPE, STABLE, World

HAPROXY = "/usr/sbin/haproxy"
needs_haproxy = pytest.mark.skipif(not os.path.exists(HAPROXY), reason="needs the Debian haproxy package")


def g(verdict: Verdict) -> list[GateResult]:
    value = None if verdict is Verdict.INCONCLUSIVE else (1.0 if verdict is Verdict.PASS else 0.5)
    return [GateResult("success_rate", verdict, value, 0.99, ">=", 100)]


PASS, FAIL, INC = g(Verdict.PASS), g(Verdict.FAIL), g(Verdict.INCONCLUSIVE)
SPEC = RolloutSpec(steps=(10, 50, 100), interval_s=30, threshold=2, max_inconclusive=3, shadow=True)


# --------------------------------------------------------------------------- the state machine


def test_a_shadow_step_comes_first_at_weight_0_and_only_its_pass_leaves_it():
    st, d = m.start(SPEC, now=0)
    assert (st.shadow, st.weight, st.step_index, d.action, d.weight) == (True, 0, 0, Action.SET_WEIGHT, 0)
    assert "shadow step" in d.reason and d.reset_window
    st, d = m.analyse(st, SPEC, INC, now=30)  # inconclusive holds the shadow step
    assert (st.shadow, d.action, st.weight) == (True, Action.HOLD, 0) and "in the shadow step" in d.reason
    st, d = m.analyse(st, SPEC, PASS, now=60)
    assert (st.shadow, st.step_index, st.weight, d.action, d.weight) == (False, 0, 10, Action.SET_WEIGHT, 10)
    assert d.reset_window and "shadow step" in d.reason
    for now in (90, 120):
        st, d = m.analyse(st, SPEC, PASS, now=now)
    assert (st.step_index, st.weight) == (2, 100)
    st, d = m.analyse(st, SPEC, PASS, now=150)
    assert (st.phase, d.action) == (Phase.PROMOTED, Action.PROMOTE)
    # every weight the rollout set, in order: the shadow step's 0, then the steps
    assert [h["weight"] for h in st.history if h["action"] == "set_weight"] == [0, 10, 50, 100]


def test_failed_checks_in_the_shadow_step_roll_back_with_nothing_user_facing_set():
    st, _ = m.start(SPEC, now=0)
    st, d = m.analyse(st, SPEC, FAIL, now=30)
    assert (d.action, st.shadow, st.failed_checks) == (Action.HOLD, True, 1)
    st, d = m.analyse(st, SPEC, FAIL, now=60)
    assert (st.phase, d.action, st.weight, st.shadow) == (Phase.ROLLED_BACK, Action.ROLLBACK, 0, False)
    assert d.reason.startswith("rollback: in the shadow step: failed check 2/2")
    assert all(h["weight"] == 0 for h in st.history)


def test_a_pass_in_the_shadow_step_of_a_one_step_rollout_advances_and_never_awaits_or_promotes():
    spec = RolloutSpec(steps=(100,), shadow=True)
    st, _ = m.start(spec, now=0)
    assert not m.awaiting_promotion(st, spec)
    st, d = m.analyse(st, spec, PASS, now=30, awaiting="no approval yet")
    assert (d.action, st.weight, st.phase) == (Action.SET_WEIGHT, 100, Phase.PROGRESSING)
    st, d = m.analyse(st, spec, PASS, now=60, awaiting="no approval yet")
    assert d.action is Action.HOLD and m.awaiting_promotion(st, spec)


def test_commands_in_the_shadow_step():
    st, _ = m.start(SPEC, now=0)
    paused, _ = m.pause(st, now=1)
    resumed, d = m.resume(paused, SPEC, now=2)
    assert (resumed.shadow, d.action, d.weight) == (True, Action.SET_WEIGHT, 0)  # back to the mirror
    promoted, _ = m.promote(st, now=3)
    aborted, _ = m.abort(st, now=3)
    assert (promoted.shadow, promoted.weight, aborted.shadow, aborted.weight) == (False, 100, False, 0)


def test_a_spec_without_shadow_is_unchanged_and_shadow_must_be_a_bool():
    st, d = m.start(RolloutSpec(steps=(10, 100)), now=0)
    assert (st.shadow, d.weight) == (False, 10)
    assert RolloutSpec.from_dict({"steps": [10], "interval_s": 1, "threshold": 1, "max_inconclusive": 1})
    assert RolloutSpec.from_dict(SPEC.to_dict()) == SPEC
    with pytest.raises(ValueError, match="shadow must be true or false, got 'yes'"):
        RolloutSpec(shadow="yes")


# --------------------------------------------------------------------------- the record


ROUTER = {"router": "local_proxy", "socket_path": "/nonexistent"}


def record(spec=SPEC, gates=GATES, router=ROUTER, metrics=SCRAPE):
    return ctl.new_record(spec, gates, STABLE, CANARY, router, metrics)


def test_the_record_refuses_a_shadow_step_no_router_or_gate_can_carry():
    knative = {"router": "kserve_knative", "isvc": "m", "namespace": "models"}
    with pytest.raises(
        RecordError, match="router kserve_knative cannot mirror traffic; the shadow step needs"
    ):
        record(router=knative)
    assert mirrors("local_proxy") and mirrors("gateway_api") and not mirrors("kserve_knative")
    cohort = {**ROUTER, "cohort": "hash:header:x-user-id", "cohort_map": "/w/c.map"}
    with pytest.raises(RecordError, match="a shadow step and a cohort do not combine yet"):
        record(router=cohort)
    with pytest.raises(RecordError, match="needs a gate that judges mirrored traffic"):
        record(gates=[AccuracyGate(0.9), AccuracyVsStable()])
    assert "shadow" not in record(spec=RolloutSpec(), router=knative).spec  # no shadow: any router, as before


@pytest.mark.parametrize(
    "spec, state, message",
    [
        (RolloutSpec(), {"shadow": True, "weight": 0}, "in a shadow step but its spec has none"),
        (SPEC, {"shadow": True, "weight": 0, "step_index": 1}, "only a live rollout before its first step"),
        (SPEC, {"shadow": True, "weight": 0, "phase": "RolledBack"}, "not a RolledBack one"),
        (SPEC, {"shadow": True, "weight": 10}, "state.weight: 10% is impossible"),
        (SPEC, {"shadow": "yes", "weight": 0}, "state.shadow: must be true or false"),
    ],
)
def test_the_record_refuses_an_impossible_shadow_state(spec, state, message):
    rec = record(spec=spec).to_dict()
    st, _ = m.start(spec, now=0)
    rec["state"] = {**st.to_dict(), **state}
    with pytest.raises(RecordError, match=message):
        ctl.RolloutRecord.from_dict(rec)


def test_label_gates_sit_out_the_shadow_step():
    drift = DriftGate(0.15, "js", 400)
    assert shadow_gates([AccuracyGate(0.9), drift, AccuracyVsStable()]) == [drift]


# --------------------------------------------------------------------------- the controller


class MirrorWorld(World):
    """The simulated world with a mirror: while it is on, the canary answers a copy of every request
    stable answers (the weights stay 100/0), as HAProxy's Lua mirror and a RequestMirror filter do."""

    def __init__(self, agreement: float = 0.98, **kw):
        super().__init__(**kw)
        self.mirror = False
        self.agreement = agreement  # the share of mirrored rows whose label matches stable's

    def set_mirror(self, on):
        self.calls.append(("mirror", on))
        self.mirror = on

    def get_mirror(self):
        return self.mirror

    def check_mirror(self):
        pass

    def sleep(self, dt):
        if not self.mirror:
            return super().sleep(dt)
        weights, self.weights = self.weights, (100, 100)  # each side sees the whole rate
        rows = self.rps * dt * self.batch
        c = self.snaps[CANARY.version]
        c.compared_rows += rows
        c.agreed_rows += rows * self.agreement
        try:
            return super().sleep(dt)
        finally:
            self.weights = weights


def drive(tmp_path, world, spec=SPEC, gates=GATES, metrics=SCRAPE):
    store = FileStateStore(tmp_path / "state.json")
    ctl.begin(store, record(spec, gates, metrics=metrics))
    logs: list[str] = []
    c = ctl.Controller(
        store, router=world, provider=world, clock=world.clock, sleep=world.sleep, log=logs.append
    )
    return c.run(max_seconds=30), logs


def test_a_good_canary_is_mirrored_then_walks_the_steps_with_the_mirror_off(tmp_path):
    w = MirrorWorld()
    spec = RolloutSpec((10, 50, 100), 10.0, 2, 3, shadow=True)
    rec, logs = drive(tmp_path, w, spec)
    assert rec.phase == "Promoted", "\n".join(logs)
    assert w.calls[:4] == [("set", 100, 0), ("mirror", True), ("mirror", False), ("set", 90, 10)]
    assert [c for c in w.calls if c[0] == "mirror"] == [("mirror", True), ("mirror", False)] + [
        ("mirror", False)
    ] * 3  # every later action stops the mirror first (idempotent)
    assert "shadow step PASS -> advance" in "\n".join(logs)
    shadow = rec.timeline[0]
    assert shadow["weight"] == 0 and shadow["requests"]["canary"] >= shadow["requests"]["stable"] * 0.99


def test_a_drifting_canary_is_rolled_back_in_the_shadow_step_without_live_traffic(tmp_path):
    from serving.rollout.report import text_report

    w = MirrorWorld(scores=(0.59, 0.02, 0.02, 0.02, 0.35))  # the classes swapped
    rec, logs = drive(tmp_path, w)
    # the report says so: a shadow step first, and its windows' canary requests are mirrored copies
    text = text_report(rec)
    assert "steps shadow step, then [10, 50, 100]" in text
    assert all(p["mirrored"] and p["weight"] == 0 for p in rec.timeline)
    rows = [line for line in text.splitlines() if line.strip().startswith(("30.0", "60.0"))]
    assert len(rows) == 2 and all(" mirrored " in r and "50.0%" not in r for r in rows), rows
    assert rec.phase == "RolledBack" and rec.state["failed_checks"] == 2, "\n".join(logs)
    assert "in the shadow step" in rec.state["reason"] and "drift_js" in rec.state["reason"]
    # the canary never had a weight above 0, and the mirror is off at the end
    assert all(c[2] == 0 for c in w.calls if c[0] == "set")
    assert w.calls[-2:] == [("mirror", False), ("rollback",)] and w.mirror is False


def in_shadow_step(tmp_path, w: MirrorWorld) -> FileStateStore:
    """A rollout that has just entered its shadow step (the controller's first tick), then stopped."""
    store = FileStateStore(tmp_path / "state.json")
    ctl.begin(store, record())
    c = ctl.Controller(store, router=w, provider=w, clock=w.clock, sleep=w.sleep, log=lambda s: None)
    c.run(stop=lambda: store.load().state is not None, max_seconds=10)
    return store


def test_a_restarted_controller_turns_the_mirror_back_on_in_the_shadow_step(tmp_path):
    w = MirrorWorld()
    store = in_shadow_step(tmp_path, w)
    w.mirror = False  # a restarted HAProxy reads the map file again: mirror off
    c = ctl.Controller(store, router=w, provider=w, clock=w.clock, sleep=w.sleep, log=lambda s: None)
    c.run(stop=lambda: True, max_seconds=10)
    assert w.mirror is True and store.load().state["shadow"] is True


def test_an_operator_abort_in_the_shadow_step_stops_the_mirror(tmp_path):
    w = MirrorWorld()
    store = in_shadow_step(tmp_path, w)
    assert w.mirror
    ctl.command(store, "abort", router=w)
    assert w.mirror is False and w.calls[-2:] == [("mirror", False), ("rollback",)]


PROM = {"provider": "prometheus", "url": "http://127.0.0.1:9"}


@pytest.mark.parametrize("agreement, phase", [(0.98, "Promoted"), (0.05, "RolledBack")])
def test_label_agreement_judges_the_shadow_step_only(tmp_path, agreement, phase):
    w = MirrorWorld(agreement=agreement)
    spec = RolloutSpec((50, 100), 10.0, 1, 3, shadow=True)
    rec, logs = drive(tmp_path, w, spec, [*GATES, AgreementGate(0.9, 200)], metrics=PROM)
    assert rec.phase == phase, "\n".join(logs)
    judged = [h for h in rec.state["history"] if h["event"] == "analysis"]
    first = {e["gate"]: e for e in judged[0]["evidence"]}
    assert first["label_agreement"]["value"] == pytest.approx(agreement)
    assert first["label_agreement"]["verdict"] == ("pass" if agreement >= 0.9 else "fail")
    for h in judged[1:]:  # live steps: no mirrored request, no agreement gate
        assert "label_agreement" not in {e["gate"] for e in h["evidence"]}
    if phase == "RolledBack":
        assert len(judged) == 1 and "label_agreement=0.05" in rec.state["reason"]


def test_the_label_agreement_gate_and_its_counters():
    from serving.rollout.stats import Snapshot

    gate = AgreementGate(0.9, 200)
    assert gate.evaluate(Snapshot(agreed_rows=150, compared_rows=199), Snapshot(), Snapshot()).verdict is (
        Verdict.INCONCLUSIVE
    )
    r = gate.evaluate(Snapshot(agreed_rows=900, compared_rows=1000), Snapshot(), Snapshot())
    assert (r.verdict, r.value, r.samples) == (Verdict.PASS, 0.9, 1000)
    assert gate.evaluate(Snapshot(agreed_rows=899, compared_rows=1000), Snapshot(), Snapshot()).verdict is (
        Verdict.FAIL
    )
    with pytest.raises(ValueError, match="--min-agreement"):
        AgreementGate(1.5)
    # a window of the counters; a restart (counters lower than the baseline) counts from zero
    later, base = Snapshot(agreed_rows=50, compared_rows=60), Snapshot(agreed_rows=20, compared_rows=30)
    assert ((later - base).agreed_rows, (later - base).compared_rows) == (30, 30)
    assert ((base - later).agreed_rows, (base - later).compared_rows) == (20, 30)
    assert Snapshot.from_dict(later.to_dict()) == later
    assert "compared_rows" not in Snapshot(labelled_total=3).to_dict()  # written as before without them


def test_the_record_refuses_the_agreement_gate_without_a_shadow_step_or_prometheus():
    gates = [*GATES, AgreementGate()]
    with pytest.raises(RecordError, match=r"label agreement gate judges only mirrored requests.*--shadow"):
        record(spec=RolloutSpec(), gates=gates, metrics=PROM)
    with pytest.raises(RecordError, match="reads the mirror's counters from Prometheus"):
        record(gates=gates, metrics=SCRAPE)
    assert record(gates=gates, metrics=PROM).gates[-1]["kind"] == "AgreementGate"


# --------------------------------------------------------------------------- HAProxy


def _haproxy_cfg(tmp: Path, mirror: bool = True) -> tuple[Path, Path]:
    from serving.demo.localstack.stack import haproxy_config
    from serving.runtime.client import free_port

    mirror_map = tmp / "mlrollout-mirror.map"
    mirror_map.write_text("mirror off\n")
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(
        haproxy_config(
            tmp / "s.sock",
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            mirror_map=mirror_map if mirror else None,
        )
    )
    return cfg, tmp / "s.sock"


@needs_haproxy
def test_the_stack_config_with_the_lua_mirror_passes_haproxy_check(tmp_path):
    cfg, _ = _haproxy_cfg(tmp_path)
    text = cfg.read_text()
    assert "lua-load" in text and "http-request lua.mlrollout_mirror be_model canary" in text
    assert "http-response lua.mlrollout_pair if { var(txn.mlr_pair) -m found }" in text
    p = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    cfg_plain, _ = _haproxy_cfg(tmp_path, mirror=False)
    assert "lua" not in cfg_plain.read_text()


@contextlib.contextmanager
def running_haproxy(mirror: bool = True):
    """A real HAProxy with the stack's config (its backends are never up: only its runtime API is used)."""
    d = Path(tempfile.mkdtemp(prefix="hap"))  # short: Unix socket paths are limited to 107 bytes
    cfg, sock = _haproxy_cfg(d, mirror)
    proc = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not sock.exists():
            time.sleep(0.05)
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def real_haproxy():
    with running_haproxy() as sock:
        yield sock


@needs_haproxy
def test_the_router_turns_the_mirror_map_on_and_off_on_a_real_haproxy(real_haproxy):
    r = LocalProxyRouter(str(real_haproxy))
    r.check_mirror()
    assert r.get_mirror() is False
    r.set_mirror(True)
    assert r.get_mirror() is True
    out = HAProxyRuntimeAPI(str(real_haproxy)).command("show map")
    assert "mlrollout-mirror.map" in out
    r.set_mirror(False)
    assert r.get_mirror() is False and r.get_weights() == (100, 0)


@needs_haproxy
def test_shadow_against_an_haproxy_that_cannot_mirror_is_one_line_exit_2(tmp_path, capsys):
    with running_haproxy(mirror=False) as sock:
        with pytest.raises(RouterError, match=r"has no map mlrollout-mirror\.map"):
            LocalProxyRouter(str(sock)).check_mirror()
        argv = [
            "start", "--router", "local_proxy", "--haproxy-socket", str(sock), "--shadow",
            "--metrics", "scrape", "--stable-metrics-url", "http://127.0.0.1:9/s",
            "--canary-metrics-url", "http://127.0.0.1:9/c", "--model", "m", "--stable-version", "1.0.0",
            "--canary-version", "2.0.0", "--no-report", "--state-file", str(tmp_path / "s.json"),
        ]  # fmt: skip
        assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "router local_proxy: HAProxy at" in err[0], err
    assert "has no map mlrollout-mirror.map" in err[0]
    assert not (tmp_path / "s.json").exists()


def test_shadow_with_a_router_that_cannot_mirror_is_one_line_exit_2(tmp_path, capsys):
    argv = [
        "start", "--router", "kserve_knative", "--isvc", "m", "--namespace", "models", "--shadow",
        "--model", "m", "--stable-version", "1.0.0", "--canary-version", "2.0.0",
        "--state-file", str(tmp_path / "s.json"),
    ]  # fmt: skip
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "router kserve_knative cannot mirror traffic" in err[0], err
    assert not (tmp_path / "s.json").exists()


# --------------------------------------------------------------------------- the operator


def test_the_operator_builds_the_shadow_step_from_the_modelrollout_and_the_floor_keeps_it():
    from serving.rollout import operator as op
    from tests.unit.test_rollout_operator import CR, cr

    strategy = {**CR["spec"]["strategy"], "shadow": {"enabled": True}}
    rec = op.build_record(cr(strategy=strategy), "1.0.0", "http://prom:9090", interval_floor_s=120)
    assert rec.spec["shadow"] is True and rec.spec["interval_s"] == 120
    assert rec.router["router"] == "gateway_api"
    assert "shadow" not in op.build_record(CR, "1.0.0", "http://prom:9090").spec
    knative = cr(strategy={**strategy, "router": "kserve_knative"})
    with pytest.raises(RecordError, match="router kserve_knative cannot mirror traffic"):
        op.build_record(knative, "1.0.0", "http://prom:9090")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--min-agreement", "1.5"], "--min-agreement"),
        (["--min-agreement", "0.9"], "the label agreement gate judges only mirrored requests"),
        (["--min-agreement", "0.9", "--shadow", "--metrics", "scrape"], "reads the mirror's counters from"),
    ],
)
def test_bad_agreement_flags_are_one_line_exit_2(tmp_path, capsys, extra, message):
    argv = [
        "start", "--router", "local_proxy", "--haproxy-socket", str(tmp_path / "none.sock"),
        "--stable-metrics-url", "http://127.0.0.1:9/s", "--canary-metrics-url", "http://127.0.0.1:9/c",
        "--model", "m", "--stable-version", "1.0.0", "--canary-version", "2.0.0",
        "--state-file", str(tmp_path / "s.json"), *extra,
    ]  # fmt: skip
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "s.json").exists()
