"""The local stack's process registry stops every child by PID on SIGTERM, SIGINT and normal exit."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys, time
from serving.rollout.localstack.procs import REGISTRY
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
from serving.rollout.localstack import LocalStack
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
