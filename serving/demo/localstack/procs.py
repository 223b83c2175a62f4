"""Every child process the local stack starts, by PID, stopped on exit, SIGINT and SIGTERM."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading
from pathlib import Path

from serving.runtime.client import stop_process_group


class ProcessRegistry:
    """Children are started in their own session (process group) and stopped group-wise by PID."""

    def __init__(self) -> None:
        self._procs: dict[int, tuple[str, subprocess.Popen]] = {}
        self._lock = threading.Lock()
        self._atexit = False
        self._signals = False

    def spawn(
        self,
        name: str,
        cmd: list[str],
        log_path: str | os.PathLike,
        env: dict | None = None,
        cwd: str | None = None,
    ) -> subprocess.Popen:
        self.install()
        log = open(Path(log_path), "ab")  # noqa: SIM115 (closed with the process)
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            log.close()
        self.track(name, proc)
        return proc

    def track(self, name: str, proc: subprocess.Popen) -> None:
        self.install()
        with self._lock:
            self._procs[proc.pid] = (name, proc)

    def forget(self, pid: int) -> None:
        with self._lock:
            self._procs.pop(pid, None)

    def pids(self) -> dict[int, str]:
        with self._lock:
            return {pid: name for pid, (name, _) in self._procs.items()}

    def stop(self, pid: int, timeout: float = 10.0) -> int | None:
        with self._lock:
            item = self._procs.pop(pid, None)
        if item is None:
            return None
        _, proc = item
        return stop_process_group(proc, timeout)

    def stop_all(self) -> None:
        for pid in list(self.pids()):
            self.stop(pid)

    def install(self) -> None:
        """atexit + SIGINT/SIGTERM handlers (main thread only) that stop every registered child."""
        if not self._atexit:
            self._atexit = True
            atexit.register(self.stop_all)
        if self._signals or threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread: the next call from it does
        self._signals = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)

            def handler(signum, frame, previous=previous):
                self.stop_all()
                if callable(previous):
                    previous(signum, frame)
                elif signum == signal.SIGINT:
                    raise KeyboardInterrupt
                else:
                    raise SystemExit(128 + signum)

            signal.signal(sig, handler)


REGISTRY = ProcessRegistry()
