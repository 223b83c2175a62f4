"""The local stack's process registry stops every child by PID on SIGTERM, SIGINT and normal exit."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.unit.test_rollout_controller import FakeHAProxy, _EmptyMetrics

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys, time
from serving.demo.localstack.procs import REGISTRY
for i in range(3):
    p = REGISTRY.spawn(f"sleeper-{i}", ["sleep", "120"], sys.argv[1])
    print(p.pid, flush=True)
print("ready", flush=True)
if sys.argv[2] == "exit":
    sys.exit(0)
time.sleep(120)
"""


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().split()[2] == "Z":
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "exit"])
def test_children_are_stopped(tmp_path, how):
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "log"), how],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    pids = []
    try:
        for line in proc.stdout:
            if line.strip() == "ready":
                break
            pids.append(int(line))
        assert len(pids) == 3
        if how != "exit":
            proc.send_signal(getattr(signal, how))
        proc.wait(20)
        assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p, 0)]
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


STACK_SCRIPT = """
import sys, time
from tests.modelfactory import build_package
from serving.demo.localstack import LocalStack
v1, _ = build_package(sys.argv[1] + "/v1", "m", "1.0.0")
v2, _ = build_package(sys.argv[1] + "/v2", "m", "2.0.0")
stack = LocalStack(v1, v2, sys.argv[1] + "/stack", log=lambda m: None).start()
print(" ".join(str(p) for p in stack.pids()), flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(
    not (os.path.exists("/usr/sbin/haproxy") and os.path.exists("/usr/bin/prometheus")),
    reason="needs the Debian haproxy and prometheus packages (make sysdeps)",
)
def test_sigterm_stops_the_whole_local_stack(tmp_path):
    """Runtimes, HAProxy and Prometheus all go away when the process that started them is terminated
    (SIGTERM skips atexit: only the handler, installed from the main thread, can stop them)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", STACK_SCRIPT, str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    pids: list[int] = []
    try:
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert len(pids) == 4, line
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p, 0)]
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p, signal.SIGKILL)


def _start_cmd(sock: str, metrics: str, state: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "serving.rollout", "start", "--router", "local_proxy", "--haproxy-socket", sock,
        "--metrics", "scrape", "--stable-metrics-url", f"{metrics}/s", "--canary-metrics-url", f"{metrics}/c",
        "--model", "m", "--stable-version", "1.0.0", "--canary-version", "2.0.0", "--interval", "200ms",
        "--max-inconclusive", "100000", "--no-report", "--state-file", str(state), *extra,
    ]  # fmt: skip


def test_a_second_start_is_refused_until_the_first_controller_is_killed(tmp_path):
    """Section 8's two controllers on one state file, as real processes: the second `start` refuses with
    one line naming the first one's PID; operator commands work meanwhile; after SIGKILL a new `start`
    takes over (the kernel dropped the first one's flock) and resumes the same rollout."""
    sock_dir = tempfile.mkdtemp(prefix="hap")
    haproxy = FakeHAProxy(os.path.join(sock_dir, "admin.sock"))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EmptyMetrics)  # a quiet canary: it keeps holding
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    metrics = f"http://127.0.0.1:{srv.server_address[1]}"
    state = tmp_path / "rollout.json"
    owner_file = tmp_path / "rollout.json.owner"
    cli = [sys.executable, "-m", "serving.rollout"]
    first = subprocess.Popen(
        _start_cmd(haproxy.path, metrics, state, "--max-seconds", "120"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                if (
                    json.loads(owner_file.read_text())["pid"] == first.pid
                    and json.loads(state.read_text())["state"]
                ):
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the first controller never started")
        second = subprocess.run(
            _start_cmd(haproxy.path, metrics, state, "--max-seconds", "5"),
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert second.returncode == 2, second.stdout + second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"error: controller PID {first.pid} (host " in lines[0], second.stderr
        status = subprocess.run(
            [*cli, "status", "--state-file", str(state)], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert status.returncode == 0 and f"controller: PID {first.pid} on " in status.stdout, status
        for verb in ("pause", "resume"):  # operator commands only update the record: no ownership needed
            res = subprocess.run(
                [*cli, verb, "--state-file", str(state)], cwd=REPO, capture_output=True, text=True, timeout=60
            )
            assert res.returncode == 0, res.stderr
        assert first.poll() is None, "the first controller stopped"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
        third = subprocess.run(
            _start_cmd(haproxy.path, metrics, state, "--max-seconds", "1"),
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert third.returncode == 0, third.stdout + third.stderr
        assert "resume rollout m:2.0.0 at step 1/4 (canary 10%" in third.stdout, third.stdout
        events = [h["event"] for h in json.loads(state.read_text())["state"]["history"]]
        assert events.count("start") == 1 and "pause" in events and "resume" in events
        assert not owner_file.exists(), "the third controller released the rollout when it stopped"
        assert haproxy.weights == {"stable": 90, "canary": 10}
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(10)
        srv.shutdown()
        srv.server_close()
        haproxy.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
