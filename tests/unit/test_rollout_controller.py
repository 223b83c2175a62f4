"""The controller loop, stores, operator commands, CLI and report, against a simulated world.

``World`` is a fake of the two interfaces the loop talks to (TrafficRouter, MetricsProvider) plus
a clock: every ``sleep`` turns the current weights into request/latency/score counters, so the
loop, the gates and the state machine run exactly as they do against HAProxy and Prometheus.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.server
import json
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from serving.rollout import controller as ctl
from serving.rollout.cli import main as cli_main
from serving.rollout.cli import parse_duration
from serving.rollout.gates import DriftGate, LatencyGate, SuccessRateGate
from serving.rollout.machine import RolloutSpec
from serving.rollout.metrics import MetricsError, Target
from serving.rollout.report import plot_timeline, text_report
from serving.rollout.routers import HAProxyRuntimeAPI, LocalProxyRouter, RouterError
from serving.rollout.stats import Snapshot
from serving.rollout.store import OWNER_ANNOTATION, ConfigMapStore, FileStateStore, OwnershipError, StoreError

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
DEAD_ROUTER = {"router": "local_proxy", "socket_path": "/nonexistent"}
SCRAPE = {"provider": "scrape"}


def make(
    tmp_path,
    world,
    steps=(10, 25, 50, 100),
    interval=10.0,
    threshold=2,
    max_inconclusive=3,
    router_cfg=DEAD_ROUTER,
    store=None,
):
    store = store or FileStateStore(tmp_path / "state.json")
    rec = ctl.new_record(
        RolloutSpec(steps, interval, threshold, max_inconclusive),
        GATES,
        STABLE,
        CANARY,
        router_cfg,
        SCRAPE,
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
    assert rec.state["phase"] == "Promoted"
    assert w.calls == [("set", 90, 10), ("set", 75, 25), ("set", 50, 50), ("set", 0, 100), ("promote",)]
    assert rec.state["analyses"] == 4 and rec.pending is None
    shares = [
        p["requests"]["canary"] / (p["requests"]["canary"] + p["requests"]["stable"]) for p in rec.timeline
    ]
    assert shares == pytest.approx([0.10, 0.25, 0.50, 1.0])
    assert any("drift_js=" in line and "PASS" in line for line in logs)
    assert store.load().state["phase"] == "Promoted"


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
    st = rec.state
    assert st["phase"] == "RolledBack" and st["analyses"] == 2 and w.weights == (100, 0)
    assert w.calls == [("set", 90, 10), ("rollback",)]
    failed = {e["gate"] for e in st["history"][-1]["evidence"] if e["verdict"] == "fail"}
    assert failed == {gate}


def test_no_traffic_is_inconclusive_then_paused_never_promoted(tmp_path):
    w = World(rps=0.0)
    store, c, _ = make(tmp_path, w, max_inconclusive=3)
    c.run(stop=lambda: store.load().state["phase"] == "Paused", max_seconds=30)
    st = store.load().state
    assert st["phase"] == "Paused" and st["analyses"] == 3 and st["weight"] == 10
    assert all(h["action"] in ("set_weight", "hold", "pause") for h in st["history"])
    assert "inconclusive" in st["reason"]


def test_metrics_backend_down_is_inconclusive_not_a_pass(tmp_path):
    w = World(metrics_down=False)
    store, c, _ = make(tmp_path, w, max_inconclusive=2)
    w.on_sleep = lambda world: setattr(world, "metrics_down", world.t > 1_005)  # down after the first tick
    c.run(stop=lambda: store.load().state["phase"] == "Paused", max_seconds=30)
    st = store.load().state
    assert st["phase"] == "Paused" and st["weight"] == 10
    assert st["history"][-1]["evidence"][0]["gate"] == "metrics"
    assert "unreachable" in st["history"][-1]["evidence"][0]["detail"]


def test_killed_controller_resumes_at_the_same_step(tmp_path):
    w = World()
    store, c, _ = make(tmp_path, w)
    c.run(stop=lambda: store.load().state["step_index"] == 2, max_seconds=30)  # "killed" at 50%
    assert store.load().state["weight"] == 50
    w.weights = (100, 0)  # and the data plane lost its weights meanwhile
    logs: list[str] = []
    c2 = ctl.Controller(store, router=w, provider=w, clock=w.clock, sleep=w.sleep, log=logs.append)
    rec = c2.run(max_seconds=30)
    assert "resume rollout m:2.0.0 at step 3/4 (canary 50%" in logs[0]
    assert w.calls[3:] == [("set", 50, 50), ("set", 0, 100), ("promote",)]
    assert [h["event"] for h in rec.state["history"]].count("start") == 1
    assert rec.state["phase"] == "Promoted"


def test_a_pending_action_is_finished_on_restart(tmp_path):
    w = World()
    store, c, _ = make(tmp_path, w)
    c.run(stop=lambda: True, max_seconds=5)  # first tick only
    store.update(
        lambda r: dataclasses.replace(r, pending={"action": "set_weight", "weight": 25})
    )  # crashed before applying
    ctl.Controller(store, router=w, provider=w, clock=w.clock, sleep=w.sleep, log=lambda s: None).run(
        stop=lambda: True
    )
    assert w.calls[-1] == ("set", 75, 25) and store.load().pending is None


def test_operator_commands_pause_resume_abort(tmp_path):
    w = World()
    store, c, _ = make(tmp_path, w)
    c.run(stop=lambda: True)
    rec = ctl.command(store, "pause", router=w, clock=w.clock)
    assert rec.state["phase"] == "Paused"
    c.run(max_seconds=0.3)  # a paused rollout is not analysed
    assert store.load().state["analyses"] == 0
    ctl.command(store, "resume", router=w, clock=w.clock)
    rec = ctl.command(store, "abort", router=w, clock=w.clock, reason="bad dashboard")
    assert rec.state["phase"] == "Aborted" and w.calls[-1] == ("rollback",) and rec.pending is None
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
    assert store.load().baselines["step"] is None
    rec = c.run(max_seconds=30)
    assert rec.state["phase"] == "Promoted" and rec.state["failed_checks"] == 0


def test_begin_refuses_a_second_live_rollout_of_other_versions(tmp_path):
    w = World()
    store, c, _ = make(tmp_path, w)
    c.run(stop=lambda: True)
    other = ctl.new_record(RolloutSpec(), GATES, STABLE, Target("m", "3.0.0"), DEAD_ROUTER, SCRAPE)
    with pytest.raises(StoreError, match="abort it first"):
        ctl.begin(store, other)
    same = ctl.new_record(RolloutSpec(), GATES, STABLE, CANARY, DEAD_ROUTER, SCRAPE)
    rec, resumed = ctl.begin(store, same)
    assert resumed and rec.state is not None


def _counted(rec, n: int):
    """``rec`` with ``n`` analysis points: a counter that lives in a valid record."""
    rec.timeline = [{"t": float(i), "weight": 0, "action": "none"} for i in range(n)]
    return rec


def test_file_store_serialises_concurrent_updates(tmp_path):
    store = FileStateStore(tmp_path / "s.json")
    store.update(
        lambda r: _counted(ctl.new_record(RolloutSpec(), GATES, STABLE, CANARY, DEAD_ROUTER, SCRAPE), 0)
    )

    def bump():
        for _ in range(50):
            store.update(lambda r: _counted(r, len(r.timeline) + 1))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.load().timeline) == 200


def test_report_text_and_png(tmp_path):
    w = World(error_rate=0.2)
    _, c, _ = make(tmp_path, w)
    rec = c.run(max_seconds=30)
    text = text_report(rec)
    assert "outcome: RolledBack after 2 analyses (2 failed)" in text
    assert text.count(" fail ") >= 2 and "success_rate=0.8" in text
    # each analysis point keeps every gate's verdict, so the PNG can mark the failing points
    fails = [p["verdicts"]["success_rate"] for p in rec.timeline if p["verdict"] == "fail"]
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
    c.run(stop=lambda: store.load().state["analyses"] >= 1, max_seconds=30)
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


# --------------------------------------------------------------------------- fakes of the data plane


class FakeHAProxy:
    """HAProxy's runtime API on a Unix socket: answers ``get weight``/``set weight``, and keeps every
    byte it receives (``received``), so a test can show that nothing reached the socket."""

    def __init__(self, path: str):
        self.path = path
        self.received: list[bytes] = []
        self.weights = {"stable": 100, "canary": 0}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(16)
        self._sock.settimeout(0.02)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                with contextlib.suppress(OSError):
                    while not data.endswith(b"\n") and (chunk := conn.recv(4096)):
                        data += chunk
                self.received.append(data)
                cmd = data.decode(errors="replace").strip()
                answer = "Unknown command.\n"
                if m := re.fullmatch(r"get weight be_model/(stable|canary)", cmd):
                    answer = f"{self.weights[m[1]]} (initial 1)\n"
                elif m := re.fullmatch(r"set weight be_model/(stable|canary) (\d+)", cmd):
                    self.weights[m[1]], answer = int(m[2]), ""
                with contextlib.suppress(OSError):
                    conn.sendall(answer.encode())

    @property
    def commands(self) -> list[str]:
        return [d.decode(errors="replace") for d in self.received]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def haproxy():
    d = tempfile.mkdtemp(prefix="hap")  # a short path: Unix socket paths are limited to 107 bytes
    fake = FakeHAProxy(os.path.join(d, "admin.sock"))
    try:
        yield fake
    finally:
        fake.close()
        shutil.rmtree(d, ignore_errors=True)


class _EmptyMetrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def metrics_url():
    """A runtime /metrics that answers with no samples yet (a quiet canary: analyses are inconclusive)."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EmptyMetrics)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def start_argv(sock: str, metrics: str | None, state, *extra: str) -> list[str]:
    """A quick real `start`: scrape metrics (or Prometheus when ``metrics`` is None), 100 ms interval."""
    m = (
        [
            "--metrics",
            "scrape",
            "--stable-metrics-url",
            f"{metrics}/s",
            "--canary-metrics-url",
            f"{metrics}/c",
        ]
        if metrics
        else []
    )
    return [
        "start", "--router", "local_proxy", "--haproxy-socket", sock, *m,
        "--model", "m", "--stable-version", "1.0.0", "--canary-version", "2.0.0",
        "--interval", "100ms", "--max-seconds", "0.5", "--no-report", "--state-file", str(state), *extra,
    ]  # fmt: skip


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# --------------------------------------------------------------------------- 1. values


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--min-success-rate", "2"], "min_rate (--min-success-rate) must be in (0, 1]"),
        (["--min-success-rate", "-1"], "--min-success-rate"),
        (["--min-success-rate", "0"], "--min-success-rate"),
        (["--min-success-rate", "nan"], "--min-success-rate"),
        (["--max-p99-ms", "-5"], "max_ms (--max-p99-ms) must be > 0"),
        (["--max-p99-ms", "0"], "--max-p99-ms"),
        (["--max-p99-ms", "inf"], "--max-p99-ms"),
        (["--drift-bins", "0"], "bins (--drift-bins) must be a whole number between 2 and 100"),
        (["--drift-bins", "-3"], "--drift-bins"),
        (["--drift-bins", "1"], "--drift-bins"),
        (["--min-predictions", "-1"], "min_samples (--min-predictions) must be a whole number >= 1"),
        (["--min-predictions", "0"], "--min-predictions"),
        (["--min-requests", "0"], "min_requests (--min-requests) must be a whole number >= 1"),
        (["--min-requests", "-5"], "--min-requests"),
        (["--max-drift", "-0.1"], "--max-drift"),
        (["--max-drift", "1.5"], "--max-drift"),
        (["--min-accuracy", "1.5"], "--min-accuracy"),
        (["--min-accuracy", "-0.2"], "--min-accuracy"),
        (["--min-accuracy", "0.9", "--max-accuracy-drop", "2"], "--max-accuracy-drop"),
        (["--min-accuracy", "0.9", "--min-labelled", "0"], "--min-labelled"),
        (["--canary-version", "1.0.0"], "--canary-version: '1.0.0' is also the stable version"),
        (["--backend", "be_model\nshow info"], "HAProxy backend name"),
        (["--stable-server", "stable;show info"], "HAProxy stable server name"),
        (["--canary-server", "can ary"], "HAProxy canary server name"),
    ],
)
def test_cli_refuses_nonsense_gate_and_spec_values(tmp_path, capsys, haproxy, flags, message):
    """Section 8: each was accepted (and rolled back for sure, passed for sure, or crashed)."""
    state = tmp_path / "dir" / "s.json"
    assert cli_main(start_argv(haproxy.path, "http://127.0.0.1:9", state, *flags)) == 2
    assert message in one_error_line(capsys)
    assert tree(tmp_path) == [] and haproxy.received == []  # refused before anything is written or sent


def test_a_quiet_canary_is_inconclusive_at_the_smallest_min_requests(tmp_path):
    """--min-requests 0 and a quiet canary was a ZeroDivisionError; at 1 (the least allowed) it holds."""
    w = World(rps=0.0)
    store = FileStateStore(tmp_path / "state.json")
    rec = ctl.new_record(
        RolloutSpec((10, 100), 10.0, 2, 2),
        [SuccessRateGate(0.99, 1), LatencyGate(250, min_requests=1), DriftGate(0.15, "js", 1)],
        STABLE,
        CANARY,
        DEAD_ROUTER,
        SCRAPE,
    )
    ctl.begin(store, rec)
    c = ctl.Controller(store, router=w, provider=w, clock=w.clock, sleep=w.sleep, log=lambda _m: None)
    c.run(stop=lambda: store.load().state["phase"] == "Paused", max_seconds=30)
    st = store.load().state
    assert st["phase"] == "Paused" and st["failed_checks"] == 0
    assert {e["verdict"] for e in st["history"][-1]["evidence"]} == {"inconclusive"}


def test_new_record_refuses_equal_versions_as_a_value_error():
    with pytest.raises(ValueError, match=r"canary\.version: '1\.0\.0' is also the stable version"):
        ctl.new_record(RolloutSpec(), GATES, STABLE, Target("m", "1.0.0"), DEAD_ROUTER, SCRAPE)


# --------------------------------------------------------------------------- 2. 3. 4. files and reachability


@pytest.mark.parametrize("verb", ["status", "pause", "report", "start"])
def test_a_state_file_that_is_a_directory_is_one_line(tmp_path, capsys, haproxy, verb):
    argv = {
        "status": ["status", "--state-file", str(tmp_path)],
        "pause": ["pause", "--state-file", str(tmp_path)],
        "report": ["report", "--state-file", str(tmp_path), "--out", str(tmp_path / "r")],
        "start": start_argv(haproxy.path, "http://127.0.0.1:9", tmp_path),
    }[verb]
    assert cli_main(argv) == 2
    assert "is a directory" in one_error_line(capsys)
    assert tree(tmp_path) == []


@pytest.mark.parametrize(
    "router, metrics, named, not_named",
    [
        ("missing", "prometheus-down", ["router local_proxy", "HAProxy", "metrics prometheus"], []),
        ("fake", "prometheus-down", ["metrics prometheus", "unreachable"], ["router", "warning"]),
        ("missing", "scrape-up", ["router local_proxy", "HAProxy"], ["metrics"]),
    ],
)
def test_start_with_an_unreachable_router_or_metrics_is_one_line_and_leaves_nothing(
    tmp_path, capsys, haproxy, metrics_url, router, metrics, named, not_named
):
    sock = haproxy.path if router == "fake" else str(tmp_path / "no.sock")
    extra = ["--prometheus-url", closed_port_url()] if metrics == "prometheus-down" else []
    state = tmp_path / "state" / "s.json"
    argv = start_argv(sock, metrics_url if metrics == "scrape-up" else None, state, *extra)
    assert cli_main(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: cannot start the rollout: ")
    for word in named:
        assert word in line
    for word in not_named:
        assert word not in line
    assert not state.exists() and tree(tmp_path / "state") == []  # no stub (state: null), no lock file
    assert all(c.startswith("get weight") for c in haproxy.commands)  # it only looked


def test_a_metrics_outage_at_the_first_tick_leaves_no_stub_record(tmp_path):
    w = World(metrics_down=True)
    store, c, _ = make(tmp_path, w)
    with pytest.raises(MetricsError):
        c.run(max_seconds=5)
    assert store.load() is None and not (tmp_path / "state.json").exists() and w.calls == []


def test_read_only_commands_create_nothing(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dir" / "s.json"
    for argv in (
        ["status", "--state-file", str(missing)],
        ["status", "--state-file", str(missing), "--json"],
        ["report", "--state-file", str(missing), "--out", str(tmp_path / "out")],
    ):
        assert cli_main(argv) == 2
        assert "no rollout in" in one_error_line(capsys)
    assert tree(tmp_path) == []
    # and on a stored rollout: no .lock file either (readers need none: writers replace the file atomically)
    _, c, _ = make(tmp_path, World())
    c.run(stop=lambda: True)
    before = tree(tmp_path)
    assert cli_main(["status", "--state-file", str(tmp_path / "state.json")]) == 0
    assert "controller: none running" in capsys.readouterr().out
    assert tree(tmp_path) == before and "state.json.owner" not in before


# --------------------------------------------------------------------------- 5. corrupt records


def _stored_rollout(tmp_path, sock: str) -> Path:
    """A live rollout (after one analysis) whose record names the fake HAProxy socket."""
    w = World()
    store, c, _ = make(
        tmp_path, w, router_cfg={"router": "local_proxy", "socket_path": sock}, max_inconclusive=100
    )
    c.run(stop=lambda: store.load().state["analyses"] >= 1, max_seconds=30)
    return tmp_path / "state.json"


def _set(path: str, value):
    def fn(rec):
        *parents, last = path.split(".")
        node = rec
        for k in parents:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[int(last) if isinstance(node, list) else last] = value
        return rec

    return fn


CORRUPTIONS = {
    "list": ("[]", "the record must be a JSON object, got a list"),
    "empty": ("{}", "kind: missing, not 'mlrollout.io/v1alpha1 RolloutRecord'"),
    "state-5-only": ('{"state": 5}', "kind: missing"),
    "other-kind": ('{"kind": "x", "state": {}}', "kind: 'x', not"),
    "state-5": (_set("state", 5), "state: must be an object or null, got a int"),
    "history-string": (_set("state.history", "oops"), "state.history: must be a list, got a string"),
    "history-evidence": (_set("state.history.1.evidence", [{"gate": 1}]), "state.history[1].evidence[0]"),
    "gate-kind": (_set("gates.0.kind", "Bogus"), "gates[0]: unknown gate kind 'Bogus'"),
    "gate-no-kind": (lambda r: {**r, "gates": [{"min_rate": 0.9}]}, "gates[0]: unknown gate kind None"),
    "gate-value": (_set("gates.0.min_rate", 2), "gates[0]: success_rate gate: min_rate"),
    "step-99": (_set("state.step_index", 99), "state.step_index: 99 is out of range for 4 steps"),
    "weight-500": (_set("state.weight", 500), "state.weight: 500% is impossible"),
    "phase": (_set("state.phase", "Bogus"), "state.phase: 'Bogus' is not one of"),
    "pending-explode": (_set("pending", {"action": "explode", "weight": 10}), "pending.action: 'explode'"),
    "steps": (_set("spec.steps", [10, 5]), "spec: steps must be strictly increasing"),
    "baselines": (_set("baselines", []), "baselines: must be an object"),
    "versions": (_set("canary.version", "1.0.0"), "canary.version: '1.0.0' is also the stable version"),
    "backend-newline": (_set("router.backend", "be_model\nshow info"), "router: HAProxy backend name"),
    "server-semicolon": (_set("router.stable_server", "stable;show info"), "router: HAProxy stable server"),
    "router-kind": (_set("router.router", "nginx"), "router: unknown router 'nginx'"),
}


@pytest.mark.parametrize("verb", ["status", "pause", "resume", "start"])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_records_are_refused_with_one_line_naming_the_field(
    tmp_path, capsys, haproxy, metrics_url, corruption, verb
):
    """Section 8's corrupted state files: every verb refuses in one line, changes nothing, sends nothing."""
    sf = _stored_rollout(tmp_path, haproxy.path)
    change, message = CORRUPTIONS[corruption]
    if isinstance(change, str):
        sf.write_text(change)
    else:
        sf.write_text(json.dumps(change(json.loads(sf.read_text()))))
    before = sf.read_bytes()
    argv = [verb, "--state-file", str(sf)] if verb != "start" else start_argv(haproxy.path, metrics_url, sf)
    assert cli_main(argv) == 2
    line = one_error_line(capsys)
    assert f"error: corrupt rollout record in {sf}: " in line and message in line, line
    assert ("pass --force" in line) == (verb == "start")
    assert sf.read_bytes() == before and haproxy.received == []
    assert not FileStateStore(sf).owner_path.exists()


def test_start_force_replaces_a_corrupt_record(tmp_path, capsys, haproxy, metrics_url):
    sf = tmp_path / "s.json"
    sf.write_text('{"state": 5}')
    assert cli_main(start_argv(haproxy.path, metrics_url, sf, "--force")) == 0
    rec = ctl.validate_record(json.loads(sf.read_text()))
    assert rec["state"]["phase"] in ("Progressing", "Paused") and rec["state"]["weight"] == 10
    assert haproxy.weights == {"stable": 90, "canary": 10}


# --------------------------------------------------------------------------- 6. S10: HAProxy names


def test_haproxy_names_are_checked_before_anything_reaches_the_socket(tmp_path, capsys, haproxy):
    for bad in ("be_model\nshow info", "be;show info", "be model", "", "be_model\n"):
        with pytest.raises(ValueError, match="HAProxy backend name"):
            LocalProxyRouter(haproxy.path, backend=bad)
    with pytest.raises(RouterError, match="refusing to send"):
        HAProxyRuntimeAPI(haproxy.path).command("set weight be_model/stable 100\nshow info")
    assert haproxy.received == []
    # a tampered record: the controller and every operator command refuse it before sending a byte
    sf = _stored_rollout(tmp_path, haproxy.path)
    sf.write_text(json.dumps(_set("router.backend", "be_model\nshow info")(json.loads(sf.read_text()))))
    with pytest.raises(StoreError, match="router: HAProxy backend name"):
        ctl.Controller(FileStateStore(sf))
    for verb in ("status", "pause", "resume", "promote", "abort"):
        assert cli_main([verb, "--state-file", str(sf)]) == 2
        assert "HAProxy backend name" in one_error_line(capsys)
    assert haproxy.received == []
    # the names that are allowed go through, one command per connection
    LocalProxyRouter(haproxy.path, backend="be_model").set_weights(90, 10)
    assert haproxy.commands == [
        "get weight be_model/canary\n",
        "set weight be_model/canary 10\n",
        "set weight be_model/stable 90\n",
    ]


# --------------------------------------------------------------------------- 7. ownership: state file


def test_a_second_controller_is_refused_while_the_first_runs(tmp_path, capsys, haproxy, metrics_url):
    w = World(rps=0.0)  # a quiet canary: the first controller keeps holding (inconclusive)
    w.on_sleep = lambda _w: time.sleep(0.002)
    store, c, _ = make(tmp_path, w, max_inconclusive=10_000)
    sf = tmp_path / "state.json"
    done: dict = {}
    first = threading.Thread(target=lambda: done.update(rec=c.run(max_seconds=30)))
    first.start()
    try:
        # bounded by the first controller's own 30 s: on a loaded 2-core `make test` its start took > 10 s
        deadline = time.monotonic() + 30
        while not (store.owner() and getattr(store.load(), "state", None)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.owner() and getattr(store.load(), "state", None), "the first controller never started"
        owner = json.loads(store.owner_path.read_text())
        assert owner["pid"] == os.getpid() and store.owner()["pid"] == os.getpid()
        # a second `start` (the same command) refuses, naming the holder's PID
        assert cli_main(start_argv(haproxy.path, metrics_url, sf)) == 2
        assert f"controller PID {os.getpid()} (host " in one_error_line(capsys)
        other = ctl.Controller(FileStateStore(sf), router=w, provider=w, clock=w.clock, sleep=w.sleep)
        with pytest.raises(OwnershipError, match=f"PID {os.getpid()}"):
            other.run(max_seconds=1)
        assert cli_main(["status", "--state-file", str(sf)]) == 0
        assert f"controller: PID {os.getpid()} on " in capsys.readouterr().out
        # operator commands only update the record: they work while the controller holds the rollout
        assert cli_main(["pause", "--state-file", str(sf)]) == 0
        assert cli_main(["resume", "--state-file", str(sf)]) == 0
        ctl.command(FileStateStore(sf), "abort", router=w, clock=w.clock)
        first.join(30)
    finally:
        if first.is_alive():
            ctl.command(FileStateStore(sf), "abort", router=w, clock=w.clock)
            first.join(30)
    assert done["rec"].state["phase"] == "Aborted"
    assert haproxy.received == []  # the refused start sent nothing
    # the first one is gone: its lock file went with it, and a new controller may take over
    assert store.owner() is None and not store.owner_path.exists()
    store.acquire("next")
    store.release()


def test_file_ownership_is_a_flock_that_a_fresh_store_cannot_take(tmp_path):
    a, b = FileStateStore(tmp_path / "s.json"), FileStateStore(tmp_path / "s.json")
    a.acquire("a")
    a.acquire("a")  # idempotent for its holder
    with pytest.raises(OwnershipError, match=rf"controller PID {os.getpid()} \(host .*, since "):
        b.acquire("b")
    assert b.owner()["holder"] == "a" and not b.held
    a.release()
    b.acquire("b")
    assert b.owner()["holder"] == "b"
    b.release()
    assert tree(tmp_path) == []


# --------------------------------------------------------------------------- 7. ownership: ConfigMap


class FakeCoreV1:
    """The three CoreV1Api calls ConfigMapStore makes, over one in-memory ConfigMap, with the API server's
    rules that matter here: 404 when absent, 409 on a stale resourceVersion, merge patches (null deletes)."""

    def __init__(self):
        self.obj: dict | None = None
        self.calls: list[tuple] = []

    @staticmethod
    def _error(status: int):
        from kubernetes.client.exceptions import ApiException

        return ApiException(status=status, reason={404: "Not Found", 409: "Conflict"}[status])

    def read_namespaced_config_map(self, name, namespace):
        self.calls.append(("read", name))
        if self.obj is None:
            raise self._error(404)
        m = self.obj["metadata"]
        return SimpleNamespace(
            data=dict(self.obj.get("data") or {}) or None,
            metadata=SimpleNamespace(
                name=m["name"],
                namespace=m["namespace"],
                resource_version=m["resourceVersion"],
                annotations=dict(m.get("annotations") or {}) or None,
            ),
        )

    def create_namespaced_config_map(self, namespace, body, field_manager=None):
        self.calls.append(("create", body["metadata"]["name"]))
        if self.obj is not None:
            raise self._error(409)
        self.obj = json.loads(json.dumps(body))
        self.obj["metadata"]["resourceVersion"] = "1"

    def patch_namespaced_config_map(self, name, namespace, body, field_manager=None):
        self.calls.append(("patch", name, json.loads(json.dumps(body))))
        if self.obj is None:
            raise self._error(404)
        meta = body.get("metadata", {})
        if meta.get("resourceVersion") != self.obj["metadata"]["resourceVersion"]:
            raise self._error(409)
        for key, target in ((body.get("data"), "data"), (meta.get("annotations"), "annotations")):
            node = self.obj.setdefault("data", {}) if target == "data" else self.obj["metadata"]
            if target == "annotations":
                node = node.setdefault("annotations", {})
            for k, v in (key or {}).items():
                if v is None:
                    node.pop(k, None)
                else:
                    node[k] = v
        self.obj["metadata"]["resourceVersion"] = str(int(self.obj["metadata"]["resourceVersion"]) + 1)

    def owner(self) -> dict | None:
        raw = ((self.obj or {}).get("metadata", {}).get("annotations") or {}).get(OWNER_ANNOTATION)
        return json.loads(raw) if raw else None


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def cm_store(core, clock) -> ConfigMapStore:
    return ConfigMapStore("m-rollout", "models", core=core, clock=clock)


def test_configmap_ownership_refuses_a_fresh_heartbeat_and_takes_over_a_stale_one():
    core, clock = FakeCoreV1(), Clock()
    a, b = cm_store(core, clock), cm_store(core, clock)
    a.acquire("host-a:1:aa", interval_s=5)  # the ConfigMap does not exist yet: created with the owner
    assert core.calls[1][0] == "create" and core.obj["metadata"]["labels"]
    owner = core.owner()
    assert owner["holder"] == "host-a:1:aa" and owner["pid"] == os.getpid() and owner["host"]
    assert owner["heartbeat"] == clock.t and owner["ttl_s"] == 30  # max(3 x 5 s, 30 s)
    clock.t += 29
    with pytest.raises(OwnershipError, match=rf"controller PID {os.getpid()} .*heartbeat 29s ago"):
        b.acquire("host-b:2:bb", interval_s=5)
    a.heartbeat()  # renewed: fresh again for 30 s
    assert core.owner()["heartbeat"] == clock.t
    clock.t += 29
    with pytest.raises(OwnershipError):
        b.acquire("host-b:2:bb", interval_s=5)
    assert b.owner()["holder"] == "host-a:1:aa"
    clock.t += 2  # 31 s without a heartbeat: the owner is gone (killed -9, node lost)
    assert b.owner() is None
    b.acquire("host-b:2:bb", interval_s=5)
    assert core.owner()["holder"] == "host-b:2:bb"
    with pytest.raises(OwnershipError, match="took over"):
        a.heartbeat()
    a.release()  # not ours any more: leaves b's annotation alone
    assert core.owner()["holder"] == "host-b:2:bb"
    b.release()
    assert core.owner() is None
    a.acquire("host-a:3:cc", interval_s=5)  # released: taken at once
    assert core.owner()["holder"] == "host-a:3:cc"


def test_configmap_owner_ttl_is_three_intervals():
    core, clock = FakeCoreV1(), Clock()
    cm_store(core, clock).acquire("a", interval_s=60)
    assert core.owner()["ttl_s"] == 180
    clock.t += 150
    with pytest.raises(OwnershipError, match="taken over after 180s"):
        cm_store(core, clock).acquire("b", interval_s=1)
    clock.t += 31
    cm_store(core, clock).acquire("b", interval_s=1)


def test_configmap_controller_heartbeats_and_operators_command_while_it_holds():
    """The controller's loop on the real ConfigMapStore code (over a fake CoreV1Api): it owns the rollout,
    renews its heartbeat from a thread, a second controller is refused, operator commands still work."""
    core, clock = FakeCoreV1(), Clock()
    store = cm_store(core, clock)
    w = World(rps=0.0)
    w.on_sleep = lambda _w: time.sleep(0.005)
    make(None, w, store=store, max_inconclusive=10_000)
    c = ctl.Controller(
        store, router=w, provider=w, clock=w.clock, sleep=w.sleep, log=lambda _m: None, heartbeat_s=0.02
    )
    done: dict = {}
    first = threading.Thread(target=lambda: done.update(rec=c.run(max_seconds=30)))
    first.start()
    try:
        deadline = time.monotonic() + 10
        while not (core.owner() and getattr(store.load(), "state", None)) and time.monotonic() < deadline:
            time.sleep(0.01)
        first_beat = core.owner()["heartbeat"]
        clock.t += 5
        while core.owner()["heartbeat"] == first_beat and time.monotonic() < deadline:
            time.sleep(0.01)
        assert core.owner()["heartbeat"] == first_beat + 5  # renewed by the heartbeat thread
        other = ctl.Controller(cm_store(core, clock), router=w, provider=w, clock=w.clock, sleep=w.sleep)
        with pytest.raises(OwnershipError, match=f"PID {os.getpid()}"):
            other.run(max_seconds=1)
        ctl.command(cm_store(core, clock), "pause", router=w, clock=w.clock)
        assert json.loads(core.obj["data"]["state"])["state"]["phase"] == "Paused"
        assert core.owner()["holder"] == c.holder  # a state write keeps the owner annotation
        ctl.command(cm_store(core, clock), "abort", router=w, clock=w.clock)
        first.join(30)
    finally:
        if first.is_alive():
            ctl.command(cm_store(core, clock), "abort", router=w, clock=w.clock)
            first.join(30)
    assert done["rec"].state["phase"] == "Aborted" and w.weights == (100, 0)
    assert core.owner() is None  # released when the controller ended


def test_configmap_update_to_none_removes_the_state_key():
    core, clock = FakeCoreV1(), Clock()
    store = cm_store(core, clock)
    rec = ctl.new_record(RolloutSpec(), GATES, STABLE, CANARY, DEAD_ROUTER, SCRAPE)
    store.update(lambda _r: rec)
    assert store.load() == rec and json.loads(core.obj["data"]["state"]) == rec.to_dict()
    assert store.update(lambda _r: None) is None
    assert store.load() is None and "state" not in core.obj.get("data", {})


def test_a_controller_whose_configmap_rollout_was_taken_over_stops():
    core, clock = FakeCoreV1(), Clock()
    store = cm_store(core, clock)
    w = World(rps=0.0)
    w.on_sleep = lambda _w: time.sleep(0.005)
    make(None, w, store=store, max_inconclusive=10_000)
    c = ctl.Controller(
        store, router=w, provider=w, clock=w.clock, sleep=w.sleep, log=lambda _m: None, heartbeat_s=0.02
    )
    errors: list[Exception] = []

    def run():
        try:
            c.run(max_seconds=30)
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while not (core.owner() and getattr(store.load(), "state", None)) and time.monotonic() < deadline:
        time.sleep(0.01)
    # another controller took the rollout over (say, ours was stuck past its time to live)
    intruder = {"holder": "other:1:x", "pid": 1, "host": "other", "since": clock.t, "heartbeat": clock.t}
    core.obj["metadata"]["annotations"][OWNER_ANNOTATION] = json.dumps({**intruder, "ttl_s": 30})
    t.join(30)
    assert not t.is_alive() and len(errors) == 1 and isinstance(errors[0], OwnershipError)
    assert "lost the rollout: controller PID 1 (host other" in str(errors[0])
    assert core.owner()["holder"] == "other:1:x"  # our release left the new owner alone


def test_metrics_backends_come_from_one_registry():
    """A backend is one file plus one PROVIDERS line: the CLI's --metrics choices, the record's
    validation and build_provider all read the registry."""
    from serving.rollout.cli import build_parser
    from serving.rollout.metrics import PROVIDERS, PrometheusProvider, ScrapeProvider, build_provider

    assert {"prometheus": PrometheusProvider, "scrape": ScrapeProvider} == PROVIDERS
    start = next(
        a
        for a in build_parser()._subparsers._group_actions[0].choices["start"]._actions
        if a.dest == "metrics"
    )
    assert start.choices == list(PROVIDERS)
    assert isinstance(
        build_provider({"provider": "prometheus", "url": "http://127.0.0.1:1"}), PrometheusProvider
    )
    assert isinstance(build_provider({"provider": "scrape"}), ScrapeProvider)
    with pytest.raises(ValueError, match=r"provider: 'graphite' is not one of prometheus, scrape"):
        build_provider({"provider": "graphite"})
    with pytest.raises(ValueError, match=r"url: the prometheus provider needs a URL"):
        build_provider({"provider": "prometheus"})
