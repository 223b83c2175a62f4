"""The controller loop, stores, operator commands, CLI and report, against a simulated world.

``World`` is a fake of the two interfaces the loop talks to (TrafficRouter, MetricsProvider) plus
a clock: every ``sleep`` turns the current weights into request/latency/score counters, so the
loop, the gates and the state machine run exactly as they do against HAProxy and Prometheus.
"""

from __future__ import annotations

import json
import math
import threading

import pytest

from serving.rollout import controller as ctl
from serving.rollout.cli import main as cli_main
from serving.rollout.cli import parse_duration
from serving.rollout.gates import DriftGate, LatencyGate, SuccessRateGate
from serving.rollout.machine import RolloutSpec
from serving.rollout.metrics import MetricsError, Target
from serving.rollout.report import plot_timeline, text_report
from serving.rollout.stats import Snapshot
from serving.rollout.store import FileStateStore, StoreError

GOOD = (0.35, 0.02, 0.02, 0.02, 0.59)
STABLE, CANARY = Target("m", "1.0.0"), Target("m", "2.0.0")


class World:
    name = "fake"

    def __init__(self, rps=100.0, batch=8, error_rate=0.0, latency_s=0.005, scores=GOOD, metrics_down=False):
        self.t = 1_000.0
        self.weights = (100, 0)
        self.rps, self.batch = rps, batch
        self.error_rate, self.latency_s, self.scores = error_rate, latency_s, scores
        self.metrics_down = metrics_down
        self.calls: list[tuple] = []
        self.snaps = {v: Snapshot() for v in (STABLE.version, CANARY.version)}
        self.on_sleep = None

    # TrafficRouter
    def set_weights(self, stable, canary):
        self.calls.append(("set", stable, canary))
        self.weights = (stable, canary)

    def get_weights(self):
        return self.weights

    def promote(self):
        self.calls.append(("promote",))
        self.weights = (0, 100)

    def rollback(self):
        self.calls.append(("rollback",))
        self.weights = (100, 0)

    def config(self):
        return {"router": "fake"}

    # MetricsProvider
    def online(self):
        return not self.metrics_down

    def snapshot(self, target):
        if self.metrics_down:
            raise MetricsError("prometheus at http://x unreachable")
        return Snapshot.from_dict({**self.snaps[target.version].to_dict(), "at": self.t})

    # clock
    def clock(self):
        return self.t

    def sleep(self, dt):
        for version, share in ((STABLE.version, self.weights[0]), (CANARY.version, self.weights[1])):
            n = self.rps * dt * share / 100
            s = self.snaps[version]
            canary = version == CANARY.version
            err = n * (self.error_rate if canary else 0.0)
            s.requests["200"] = s.requests.get("200", 0) + n - err
            s.requests["500"] = s.requests.get("500", 0) + err
            lat = self.latency_s if canary else 0.005
            for le in (0.01, 0.25, 0.5, 1.0, math.inf):
                s.latency[le] = s.latency.get(le, 0) + (n if lat <= le else 0)
            shares = self.scores if canary else GOOD
            run = 0.0
            for le, p in zip((0.2, 0.4, 0.6, 0.8, 1.0), shares, strict=True):
                run += p * n * self.batch
                s.scores[le] = s.scores.get(le, 0) + run
            s.scores[math.inf] = s.scores[1.0]
        self.t += dt
        if self.on_sleep:
            self.on_sleep(self)


GATES = [SuccessRateGate(0.99, 20), LatencyGate(250, min_requests=20), DriftGate(0.15, "js", 400)]


def make(tmp_path, world, steps=(10, 25, 50, 100), interval=10.0, threshold=2, max_inconclusive=3):
    store = FileStateStore(tmp_path / "state.json")
    rec = ctl.new_record(
        RolloutSpec(steps, interval, threshold, max_inconclusive),
        GATES,
        STABLE,
        CANARY,
        {"router": "local_proxy", "socket_path": "/nonexistent"},
        {"provider": "scrape"},
    )
    ctl.begin(store, rec)
    logs: list[str] = []
    c = ctl.Controller(
        store, router=world, provider=world, clock=world.clock, sleep=world.sleep, log=logs.append
    )
    return store, c, logs


def test_good_canary_walks_the_steps_and_is_promoted(tmp_path):
    w = World()
    store, c, logs = make(tmp_path, w)
    rec = c.run(max_seconds=30)
    assert rec["state"]["phase"] == "Promoted"
    assert w.calls == [("set", 90, 10), ("set", 75, 25), ("set", 50, 50), ("set", 0, 100), ("promote",)]
    assert rec["state"]["analyses"] == 4 and rec["pending"] is None
    shares = [
        p["requests"]["canary"] / (p["requests"]["canary"] + p["requests"]["stable"]) for p in rec["timeline"]
    ]
    assert shares == pytest.approx([0.10, 0.25, 0.50, 1.0])
    assert any("drift_js=" in line and "PASS" in line for line in logs)
    assert store.load()["state"]["phase"] == "Promoted"


@pytest.mark.parametrize(
    "fault, gate",
    [
        ({"error_rate": 0.2}, "success_rate"),
        ({"latency_s": 0.6}, "latency_p99"),
        ({"scores": tuple(reversed(GOOD))}, "drift_js"),
    ],
)
def test_bad_canaries_roll_back_after_threshold_failed_checks(tmp_path, fault, gate):
    w = World(**fault)
    _, c, _ = make(tmp_path, w)
    rec = c.run(max_seconds=30)
    st = rec["state"]
    assert st["phase"] == "RolledBack" and st["analyses"] == 2 and w.weights == (100, 0)
    assert w.calls == [("set", 90, 10), ("rollback",)]
    failed = {e["gate"] for e in st["history"][-1]["evidence"] if e["verdict"] == "fail"}
    assert failed == {gate}


def test_no_traffic_is_inconclusive_then_paused_never_promoted(tmp_path):
    w = World(rps=0.0)
    store, c, _ = make(tmp_path, w, max_inconclusive=3)
    c.run(stop=lambda: store.load()["state"]["phase"] == "Paused", max_seconds=30)
    st = store.load()["state"]
    assert st["phase"] == "Paused" and st["analyses"] == 3 and st["weight"] == 10
    assert all(h["action"] in ("set_weight", "hold", "pause") for h in st["history"])
    assert "inconclusive" in st["reason"]


def test_metrics_backend_down_is_inconclusive_not_a_pass(tmp_path):
    w = World(metrics_down=False)
    store, c, _ = make(tmp_path, w, max_inconclusive=2)
    w.on_sleep = lambda world: setattr(world, "metrics_down", world.t > 1_005)  # down after the first tick
    c.run(stop=lambda: store.load()["state"]["phase"] == "Paused", max_seconds=30)
    st = store.load()["state"]
    assert st["phase"] == "Paused" and st["weight"] == 10
    assert st["history"][-1]["evidence"][0]["gate"] == "metrics"
    assert "unreachable" in st["history"][-1]["evidence"][0]["detail"]


def test_killed_controller_resumes_at_the_same_step(tmp_path):
    w = World()
    store, c, _ = make(tmp_path, w)
    c.run(stop=lambda: store.load()["state"]["step_index"] == 2, max_seconds=30)  # "killed" at 50%
    assert store.load()["state"]["weight"] == 50
    w.weights = (100, 0)  # and the data plane lost its weights meanwhile
    logs: list[str] = []
    c2 = ctl.Controller(store, router=w, provider=w, clock=w.clock, sleep=w.sleep, log=logs.append)
    rec = c2.run(max_seconds=30)
    assert "resume rollout m:2.0.0 at step 3/4 (canary 50%" in logs[0]
    assert w.calls[3:] == [("set", 50, 50), ("set", 0, 100), ("promote",)]
    assert [h["event"] for h in rec["state"]["history"]].count("start") == 1
    assert rec["state"]["phase"] == "Promoted"


def test_a_pending_action_is_finished_on_restart(tmp_path):
    w = World()
    store, c, _ = make(tmp_path, w)
    c.run(stop=lambda: True, max_seconds=5)  # first tick only
    store.update(
        lambda r: {**r, "pending": {"action": "set_weight", "weight": 25}}
    )  # crashed before applying
    ctl.Controller(store, router=w, provider=w, clock=w.clock, sleep=w.sleep, log=lambda s: None).run(
        stop=lambda: True
    )
    assert w.calls[-1] == ("set", 75, 25) and store.load()["pending"] is None


def test_operator_commands_pause_resume_abort(tmp_path):
    w = World()
    store, c, _ = make(tmp_path, w)
    c.run(stop=lambda: True)
    rec = ctl.command(store, "pause", router=w, clock=w.clock)
    assert rec["state"]["phase"] == "Paused"
    c.run(max_seconds=0.3)  # a paused rollout is not analysed
    assert store.load()["state"]["analyses"] == 0
    ctl.command(store, "resume", router=w, clock=w.clock)
    rec = ctl.command(store, "abort", router=w, clock=w.clock, reason="bad dashboard")
    assert rec["state"]["phase"] == "Aborted" and w.calls[-1] == ("rollback",) and rec["pending"] is None
    with pytest.raises(Exception, match="already Aborted"):
        ctl.command(store, "promote", router=w)


def test_resume_starts_a_fresh_window(tmp_path):
    """Errors served while paused (say, during a dependency outage) do not count after a resume."""
    w = World()
    store, c, _ = make(tmp_path, w)
    c.run(stop=lambda: True)
    ctl.command(store, "pause", router=w, clock=w.clock)
    w.error_rate = 1.0
    w.sleep(30)  # traffic (all canary answers failing) while paused
    w.error_rate = 0.0
    ctl.command(store, "resume", router=w, clock=w.clock)
    assert store.load()["baselines"]["step"] is None
    rec = c.run(max_seconds=30)
    assert rec["state"]["phase"] == "Promoted" and rec["state"]["failed_checks"] == 0


def test_begin_refuses_a_second_live_rollout_of_other_versions(tmp_path):
    w = World()
    store, c, _ = make(tmp_path, w)
    c.run(stop=lambda: True)
    other = ctl.new_record(
        RolloutSpec(), GATES, STABLE, Target("m", "3.0.0"), {"router": "fake"}, {"provider": "x"}
    )
    with pytest.raises(StoreError, match="abort it first"):
        ctl.begin(store, other)
    same = ctl.new_record(RolloutSpec(), GATES, STABLE, CANARY, {"router": "fake"}, {"provider": "x"})
    rec, resumed = ctl.begin(store, same)
    assert resumed and rec["state"] is not None


def test_file_store_serialises_concurrent_updates(tmp_path):
    store = FileStateStore(tmp_path / "s.json")
    store.update(lambda r: {"n": 0})

    def bump():
        for _ in range(50):
            store.update(lambda r: {"n": r["n"] + 1})

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.load()["n"] == 200


def test_report_text_and_png(tmp_path):
    w = World(error_rate=0.2)
    _, c, _ = make(tmp_path, w)
    rec = c.run(max_seconds=30)
    text = text_report(rec)
    assert "outcome: RolledBack after 2 analyses (2 failed)" in text
    assert text.count(" fail ") >= 2 and "success_rate=0.8" in text
    # each analysis point keeps every gate's verdict, so the PNG can mark the failing points
    fails = [p["verdicts"]["success_rate"] for p in rec["timeline"] if p["verdict"] == "fail"]
    assert fails and all(v == "fail" for v in fails)
    png = plot_timeline(rec, tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize(
    "text, secs", [("30s", 30), ("1m", 60), ("1m30s", 90), ("500ms", 0.5), ("2.5s", 2.5), ("3", 3)]
)
def test_parse_duration(text, secs):
    assert parse_duration(text) == secs


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            [
                "start",
                "--router",
                "local_proxy",
                "--model",
                "m",
                "--stable-version",
                "1",
                "--canary-version",
                "2",
                "--state-file",
                "x.json",
            ],
            "--haproxy-socket",
        ),
        (
            [
                "start",
                "--router",
                "gateway_api",
                "--model",
                "m",
                "--stable-version",
                "1",
                "--canary-version",
                "2",
                "--state-file",
                "x.json",
            ],
            "--route",
        ),
        (["status"], "--state-file"),
        (["abort", "--state-file", "MISSING"], "no running rollout"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_cli_status_pause_and_abort_on_a_stored_rollout(tmp_path, capsys):
    w = World()
    store, c, _ = make(tmp_path, w)
    c.run(stop=lambda: store.load()["state"]["analyses"] >= 1, max_seconds=30)
    sf = str(tmp_path / "state.json")
    assert cli_main(["status", "--state-file", sf]) == 0
    out = capsys.readouterr().out
    assert "phase Progressing, step 2/4" in out and "canary weight 25%" in out and "drift_js=" in out
    assert cli_main(["pause", "--state-file", sf, "--reason", "lunch"]) == 0
    assert json.loads((tmp_path / "state.json").read_text())["state"]["reason"] == "lunch"
    capsys.readouterr()
    assert cli_main(["status", "--state-file", sf, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"]["phase"] == "Paused"
    assert cli_main(["abort", "--state-file", sf]) == 2  # the stored router (a dead socket) refuses: says so
    assert "HAProxy runtime API" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            [
                "start",
                "--router",
                "local_proxy",
                "--model",
                "m",
                "--stable-version",
                "1",
                "--canary-version",
                "2",
                "--interval",
                "0s",
            ],
            "duration must be positive",
        ),
        (["start", "--router", "nginx"], "invalid choice: 'nginx'"),
        (["start", "--router", "local_proxy", "--steps", "50,20"], "strictly increasing"),
    ],
)
def test_cli_argument_errors_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "--help" in err
