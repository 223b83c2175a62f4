"""Start, probe, account and stop the servers under test.

Every server is a child process in its own session (so its workers can be stopped with it),
pinned with ``taskset`` to the server core, bound to 127.0.0.1 on a port the OS picked, with its
output going to a log file. ``stop_all`` is safe to call from a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Endpoint:
    """One measured thing: a URL on a server plus the JSON body wrk POSTs to it."""

    name: str
    server: str  # key into the Server table
    path: str
    body: dict
    # how to check the first answer: a callable(json) -> list[float] of probabilities, or None
    # for the floor (constant answer)
    check: str | None = "probabilities"


@dataclass
class Server:
    name: str
    cmd: list[str]
    ready_path: str
    port: int
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, log_dir: Path, cpu: int | None) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.name}.log"
        cmd = ["taskset", "-c", str(cpu), *self.cmd] if cpu is not None else list(self.cmd)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                cwd=self.cwd,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = self.base_url + self.ready_path
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode} before it was ready; "
                    f"its log ends with:\n{self.log_tail(3)}\n(whole log: {self.log_path})"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}"
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except OSError as exc:
                last = str(exc)
            time.sleep(0.25)
        raise RuntimeError(
            f"{self.name} not ready at {url} within {timeout_s:.0f} s ({last}); see {self.log_path}"
        )

    def log_tail(self, n: int = 15) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process and all its descendants, so far."""
        if self.proc is None:
            return float("nan")
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return float("nan")
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the server's process group, then SIGKILL it after ``grace_s``."""
        if self.proc is None or self.proc.poll() is not None:
            self._kill_group_leftovers()
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self._kill_group_leftovers()

    def _kill_group_leftovers(self) -> None:
        # workers that outlived their parent are still in the group we created
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def post_json(url: str, body: dict, timeout_s: float = 10.0) -> tuple[int, dict, dict[str, str]]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")}, dict(exc.headers or {})


def numbers_in(obj) -> list[float]:
    """Every number in a JSON document (bools excluded), depth first."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, int | float):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in numbers_in(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in numbers_in(v)]
    return []


def answer_has_probability(answer, expected: float, tol: float = 1e-4) -> bool:
    """True when some number in the answer equals ``expected`` within ``tol``."""
    return any(abs(x - expected) <= tol for x in numbers_in(answer))


class CpuSampler:
    """Busy share of one CPU between two points in time, from /proc/stat."""

    def __init__(self, cpu: int | None):
        self.cpu = cpu
        self._start = self._read()

    def _read(self) -> tuple[float, float] | None:
        if self.cpu is None:
            return None
        try:
            with open("/proc/stat") as f:
                for line in f:
                    if line.startswith(f"cpu{self.cpu} "):
                        v = [float(x) for x in line.split()[1:]]
                        idle = v[3] + (v[4] if len(v) > 4 else 0.0)
                        return sum(v[:8]), idle  # user..steal; guest is already in user
        except OSError:
            return None
        return None

    def busy_seconds(self) -> float:
        """CPU-seconds the core was busy (any process) since construction."""
        end = self._read()
        if end is None or self._start is None:
            return float("nan")
        ticks = os.sysconf("SC_CLK_TCK")
        return ((end[0] - self._start[0]) - (end[1] - self._start[1])) / ticks
