"""Rollouts against the real local stack: two KServe runtimes, HAProxy (runtime API), Prometheus.

One stack per module (stable v1 = logistic regression, canary v2 = random forest); each bad
canary replaces only the canary runtime. Traffic is real HTTP through HAProxy; the split is
checked from the ``x-model-version`` header of every answer.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.demo.badmodel import build_swapped_package, with_version
from serving.demo.localstack import LocalStack, TrafficGenerator
from serving.rollout import controller as ctl
from serving.rollout.gates import DriftGate, LatencyGate, SuccessRateGate
from serving.rollout.machine import RolloutSpec
from serving.rollout.store import FileStateStore
from tests.modelfactory import breast_cancer, build_package

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (os.path.exists("/usr/sbin/haproxy") and os.path.exists("/usr/bin/prometheus")),
        reason="needs the Debian haproxy and prometheus packages (make sysdeps)",
    ),
]

REPO = Path(__file__).resolve().parents[2]
INTERVAL = 2.0
BAD_INTERVAL = 3.0
X, Y, _, _ = breast_cancer()


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout-models")
    v1, _ = build_package(root / "v1", "breast-cancer", "1.0.0", "logistic_regression", 0)
    v2, _ = build_package(root / "v2", "breast-cancer", "2.0.0", "random_forest", 0)
    return {
        "v1": v1,
        "v2": v2,
        "errors": with_version(v2, root / "errors", "2.1.0", "injected errors"),
        "latency": with_version(v2, root / "latency", "2.2.0", "injected latency"),
        "drift": build_swapped_package(v2, root / "drift", "2.3.0"),
        "restart": with_version(v2, root / "restart", "2.4.0"),
        "outage": with_version(v2, root / "outage", "2.5.0"),
        "owner": with_version(v2, root / "owner", "2.6.0"),
    }


@contextlib.contextmanager
def started_stack(stable_pkg, canary_pkg, workdir):
    """A running LocalStack; afterwards every process it started must be gone (also used by
    test_rollout_compare_local.py)."""
    s = LocalStack(stable_pkg, canary_pkg, workdir, log=lambda m: None)
    s.start()
    pids = s.pids()
    try:
        yield s
    finally:
        s.stop()
        time.sleep(0.2)
        alive = [p for p in pids if _alive(p)]
        assert not alive, f"processes left running after stop(): {alive}"


@pytest.fixture(scope="module")
def stack(packages, tmp_path_factory):
    with started_stack(packages["v1"], packages["v2"], tmp_path_factory.mktemp("stack")) as s:
        yield s


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def gates(max_p99_ms: float, min_predictions: int):
    return [
        SuccessRateGate(0.99, 20),
        LatencyGate(max_p99_ms, min_requests=20),
        DriftGate(0.15, "js", min_predictions),
    ]


def run_rollout(
    stack,
    tmp_path,
    steps,
    max_p99_ms=2000.0,
    min_predictions=400,
    interval=INTERVAL,
    shadow=False,
    extra_gates=(),
):
    tg = TrafficGenerator(
        stack.proxy_url, stack.model, X, Y, rps=120, concurrency=24, batch=16, max_seconds=120
    )
    logs: list[str] = []
    with tg:
        time.sleep(interval)  # stable-only traffic: the drift gate's stable reference
        store = FileStateStore(tmp_path / "state.json")
        rec = ctl.new_record(
            RolloutSpec(steps, interval, threshold=2, max_inconclusive=6, shadow=shadow),
            [*gates(max_p99_ms, min_predictions), *extra_gates],
            stack.stable_target,
            stack.canary_target,
            stack.router().config(),
            stack.metrics_config(),
        )
        ctl.begin(store, rec)
        c = ctl.Controller(store, router=stack.router(), provider=stack.provider(), log=logs.append)
        rec = c.run(max_seconds=90)
        t_end = time.time()
        time.sleep(1.0)  # traffic after the final decision
    return rec, tg.result(), t_end, logs


def step_windows(rec, guard=0.5):
    """(weight, t_from, t_to) for every weight the router was told, from the decision history."""
    hist = [h for h in rec.state["history"] if h["action"] in ("set_weight", "promote", "rollback")]
    out = []
    for h, nxt in zip(hist, [*hist[1:], None], strict=True):
        t_to = nxt["t"] if nxt else h["t"] + INTERVAL
        out.append((h["weight"], h["t"] + guard, t_to))
    return out


def test_good_canary_promoted_with_the_split_matching_each_weight(stack, tmp_path):
    rec, traffic, _, logs = run_rollout(stack, tmp_path, (10, 25, 50, 100))
    st = rec.state
    assert st["phase"] == "Promoted", "\n".join(logs)
    advanced = [h["weight"] for h in st["history"] if h["action"] == "set_weight"]
    assert advanced == [10, 25, 50, 100]
    # the observed share of answers per version is within a binomial 4.5-sigma bound of each weight
    checked = 0
    windows = step_windows(rec)
    for i, (weight, t0, t1) in enumerate(windows):
        w = traffic.window(t0, t1)
        n = w.total
        if i == len(windows) - 1 and n < 40:
            continue  # the short tail after the promotion (traffic stops 1 s later)
        assert n >= 40, f"too little traffic at {weight}% to check the split ({n} answers)"
        k = w.by_version().get("2.0.0", 0)
        p = weight / 100
        tol = 4.5 * math.sqrt(p * (1 - p) / n) + 1.5 / n
        assert abs(k / n - p) <= tol, (
            f"weight {weight}%: canary answered {k}/{n} = {k / n:.3f} (tol {tol:.3f})"
        )
        checked += 1
    assert checked >= 4
    # weight changes and the promotion cost no client request
    assert traffic.failures() == [], traffic.failures()[:5]
    assert stack.router().get_weights() == (0, 100)


@pytest.mark.parametrize(
    "kind, env, failing_gate, max_p99_ms",
    [
        ("errors", {"MLROLLOUT_FAULT_ERROR_RATE": "0.3"}, "success_rate", 2000.0),
        ("latency", {"MLROLLOUT_FAULT_LATENCY_MS": "600"}, "latency_p99", 250.0),
        ("drift", {}, "drift_js", 2000.0),
    ],
)
def test_bad_canary_rolled_back_within_two_intervals_while_stable_serves(
    stack, packages, tmp_path, kind, env, failing_gate, max_p99_ms
):
    canary = stack.replace_canary(packages[kind], env)
    # first step 25%: enough canary samples in one 2 s window even on a loaded machine; a swapped-class
    # model sits at JS ~0.22 against stable, far above 0.15 already at 200 predictions (README table)
    # 3 s intervals: Prometheus scrapes every 1 s, so up to 1 s of a window can predate the weight change;
    # a slow canary also answers fewer requests per second than it is sent
    rec, traffic, t_end, logs = run_rollout(
        stack, tmp_path, (25, 50, 100), max_p99_ms, min_predictions=200, interval=BAD_INTERVAL
    )
    st = rec.state
    assert st["phase"] == "RolledBack", "\n".join(logs)
    assert st["analyses"] <= 2, "\n".join(logs)
    last = st["history"][-1]
    failed = {e["gate"] for e in last["evidence"] if e["verdict"] == "fail"}
    assert failing_gate in failed, "\n".join(logs)
    if kind == "drift":  # only the drift gate can see a model that answers fast and without errors
        assert failed == {"drift_js"}
    assert stack.router().get_weights() == (100, 0)
    # stable kept serving: no stable failure, no failure without a model answer, and after the
    # rollback every answer comes from stable
    assert traffic.model_failures("1.0.0") == []
    assert traffic.proxy_failures() == []
    after = traffic.window(t_end + 0.3, t_end + 10)
    assert after.total > 0 and set(after.by_version()) == {"1.0.0"}
    only_canary_errors = {a.version for a in traffic.failures()}
    assert only_canary_errors <= {canary.version}
    if kind == "errors":
        assert traffic.model_failures(canary.version), (
            "the faulty canary's own errors were not seen by clients"
        )


def _cli(stack, state_file: Path, version: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "serving.rollout",
        "start",
        "--router",
        "local_proxy",
        "--haproxy-socket",
        str(stack.haproxy_socket),
        "--metrics",
        "scrape",
        "--stable-metrics-url",
        stack.stable_target.metrics_url,
        "--canary-metrics-url",
        stack.canary_target.metrics_url,
        "--model",
        stack.model,
        "--stable-version",
        "1.0.0",
        "--canary-version",
        version,
        "--steps",
        "10,25,50,100",
        "--interval",
        f"{INTERVAL:g}s",
        "--max-p99-ms",
        "500",
        # the absolute gates: these tests are about the controller's processes and state, and the canary
        # (a random forest) is a different model from stable (logistic regression) whose scores and
        # latency really differ, which the default comparisons with stable would rightly roll back
        "--no-compare",
        "--state-file",
        str(state_file),
        "--report-dir",
        str(state_file.parent / "report"),
    ]


def _state(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def test_controller_killed_mid_rollout_resumes_at_the_same_step(stack, packages, tmp_path):
    stack.replace_canary(packages["restart"], {})
    state_file = tmp_path / "state.json"
    cmd = _cli(stack, state_file, "2.4.0")
    tg = TrafficGenerator(
        stack.proxy_url, stack.model, X, Y, rps=120, concurrency=24, batch=16, max_seconds=120
    )
    with tg:
        time.sleep(INTERVAL)
        first = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                s = _state(state_file)
                if s and s.get("state") and s["state"]["step_index"] >= 1 and not s.get("pending"):
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the rollout never reached its second step")
        finally:
            os.killpg(first.pid, signal.SIGKILL)  # the controller dies mid-rollout
            first.wait(10)
        record = _state(state_file)
        killed = record["state"]
        step, weight = killed["step_index"], killed["weight"]
        assert killed["phase"] == "Progressing"
        if not record.get(
            "pending"
        ):  # (killed between persisting a decision and applying it: reconciled below)
            assert stack.router().get_weights() == (100 - weight, weight)  # the data plane keeps the weight
        time.sleep(INTERVAL / 2)
        second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=90)
        time.sleep(0.5)
    out = second.stdout
    assert second.returncode == 0, out + second.stderr
    assert f"resume rollout breast-cancer:2.4.0 at step {step + 1}/4 (canary {weight}%" in out, out
    final = _state(state_file)["state"]
    assert final["phase"] == "Promoted"
    events = [h["event"] for h in final["history"]]
    assert events.count("start") == 1
    weights = [h["weight"] for h in final["history"] if h["action"] == "set_weight"]
    assert weights == [10, 25, 50, 100][: len(weights)] and weights[-1] == 100
    assert tg.result().failures() == []
    report = (tmp_path / "report" / "rollout-report.txt").read_text()
    assert "outcome: Promoted" in report and f"report: {tmp_path / 'report'}" in out
    assert (tmp_path / "report" / "rollout-timeline.png").read_bytes()[:4] == b"\x89PNG"


def test_metrics_backend_outage_pauses_never_promotes_and_resumes(stack, packages, tmp_path):
    """Prometheus goes away mid-rollout: analyses turn inconclusive, the rollout pauses at its weight
    (stable and canary keep serving), and after Prometheus is back an operator resumes it to the end."""
    stack.replace_canary(packages["outage"], {})
    tg = TrafficGenerator(
        stack.proxy_url, stack.model, X, Y, rps=120, concurrency=24, batch=16, max_seconds=240
    )
    logs: list[str] = []
    with tg:
        time.sleep(INTERVAL)
        store = FileStateStore(tmp_path / "state.json")
        spec = RolloutSpec((10, 25, 50, 100), INTERVAL, threshold=2, max_inconclusive=2)
        ctl.begin(
            store,
            ctl.new_record(
                spec,
                gates(2000.0, 400),
                stack.stable_target,
                stack.canary_target,
                stack.router().config(),
                stack.metrics_config(),
            ),
        )
        c = ctl.Controller(store, router=stack.router(), provider=stack.provider(), log=logs.append)
        c.run(stop=lambda: store.load().state["step_index"] >= 1, max_seconds=60)
        stack.stop_prometheus()
        try:
            rec = c.run(stop=lambda: store.load().state["phase"] == "Paused", max_seconds=60)
            st = store.load().state
            assert st["phase"] == "Paused", "\n".join(logs)
            assert st["weight"] in (25, 50) and stack.router().get_weights() == (
                100 - st["weight"],
                st["weight"],
            )
            last = st["history"][-1]
            assert last["action"] == "pause" and last["evidence"][0]["gate"] == "metrics"
            assert "unreachable" in last["evidence"][0]["detail"]
            assert not any(h["action"] == "promote" for h in st["history"])
        finally:
            t_down = time.monotonic()
            stack.start_prometheus()
            logs.append(f"prometheus back after {time.monotonic() - t_down:.1f}s")
        ctl.command(store, "resume", router=stack.router())
        rec = c.run(max_seconds=60)
        time.sleep(0.5)
    assert rec.state["phase"] == "Promoted", "\n".join(logs)
    assert tg.result().failures() == []  # the outage cost no client request


def test_start_with_prometheus_down_is_one_line_and_leaves_nothing(stack, tmp_path):
    """Section 8: a reachable router, an unreachable Prometheus: exit 2 with one line (there was also a
    contradicting warning), no stub state file, and the data plane untouched."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    before = stack.router().get_weights()
    state_file = tmp_path / "state" / "rollout.json"
    cmd = _cli(stack, state_file, "2.0.0")
    i = cmd.index("--metrics")
    assert cmd[i + 2] == "--stable-metrics-url" and cmd[i + 4] == "--canary-metrics-url"
    cmd[i : i + 6] = ["--metrics", "prometheus", "--prometheus-url", down]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "metrics prometheus" in lines[0] and "unreachable" in lines[0], res.stderr
    assert "router" not in lines[0] and "warning" not in res.stderr.lower()
    assert list((tmp_path / "state").iterdir()) == []  # no stub state file (state: null), no lock file
    assert stack.router().get_weights() == before


def test_a_second_controller_is_refused_and_a_new_one_takes_over_after_kill_9(stack, packages, tmp_path):
    """Section 8's two controllers, on the real stack: the second `start` refuses naming the first one's
    PID (it co-drove the rollout before), pause/resume work while the first one runs, and after a SIGKILL
    the same command takes the rollout over and promotes it."""
    stack.replace_canary(packages["owner"], {})
    state_file = tmp_path / "state.json"
    cmd = _cli(stack, state_file, "2.6.0")
    cli = [sys.executable, "-m", "serving.rollout"]
    tg = TrafficGenerator(
        stack.proxy_url, stack.model, X, Y, rps=120, concurrency=24, batch=16, max_seconds=120
    )
    with tg:
        time.sleep(INTERVAL)
        first = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                s = _state(state_file)
                if s and s.get("state") and not s.get("pending"):
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the first controller never started")
            second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
            assert second.returncode == 2, second.stdout + second.stderr
            lines = second.stderr.strip().splitlines()
            assert len(lines) == 1 and f"controller PID {first.pid} " in lines[0], second.stderr
            assert "resume rollout" not in second.stdout  # it did not co-drive
            for verb in ("pause", "resume"):
                res = subprocess.run(
                    [*cli, verb, "--state-file", str(state_file)],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert res.returncode == 0, res.stderr
            assert first.poll() is None, "the first controller stopped"
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
        assert _state(state_file)["state"]["phase"] == "Progressing"
        third = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=90)
        time.sleep(0.5)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "resume rollout breast-cancer:2.6.0 at step" in third.stdout, third.stdout
    final = _state(state_file)["state"]
    assert final["phase"] == "Promoted"
    assert [h["event"] for h in final["history"]].count("start") == 1
    assert tg.result().failures() == []
    assert not (tmp_path / "state.json.owner").exists()
