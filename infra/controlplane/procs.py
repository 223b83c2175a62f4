"""The control plane's processes: started detached (own session), recorded by PID, stopped by PID.

``make controlplane`` returns while they run, so the record lives on disk (``<state>/pids.json``) and
``make controlplane-down`` stops exactly those processes: SIGTERM to each process group, SIGKILL after a
grace period. A process is identified by its PID *and* its start time (``/proc/<pid>/stat``, field 22),
so a recycled PID is never signalled. (Not by ``/proc/<pid>/cmdline``: right after ``Popen`` returns it
can still be empty while the child's exec completes, which made a live process look dead.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


class ProcessError(RuntimeError):
    pass


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, or None when there is none."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 onwards
    return fields[0], int(fields[19])


def _alive(entry: dict) -> bool:
    st = _stat(entry["pid"])
    return st is not None and st[0] != "Z" and st[1] == entry["starttime"]


class Supervisor:
    def __init__(self, state_dir: Path):
        self.dir = state_dir
        self.logs = state_dir / "logs"
        self.record = state_dir / "pids.json"

    def _load(self) -> list[dict]:
        try:
            return json.loads(self.record.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return []

    def _save(self, entries: list[dict]) -> None:
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        tmp.replace(self.record)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.dir,
                start_new_session=True,  # own process group: survives `make`, stopped as a group
            )
        finally:
            log.close()
        st = _stat(proc.pid)  # exists from the fork on, even while the exec completes
        entries = [e for e in self._load() if e["name"] != name]
        entries.append({"name": name, "pid": proc.pid, "binary": argv[0], "starttime": st[1] if st else -1})
        self._save(entries)
        return proc.pid

    def pids(self) -> dict[str, int]:
        return {e["name"]: e["pid"] for e in self._load() if _alive(e)}

    def check(self, name: str) -> None:
        """Raise with the exit status and the log's tail when ``name`` has exited."""
        for e in self._load():
            if e["name"] == name and not _alive(e):
                status = ""
                with contextlib.suppress(ChildProcessError):  # our own child (a test session): how it ended
                    pid, code = os.waitpid(e["pid"], os.WNOHANG)
                    if pid and os.WIFSIGNALED(code):
                        status = f" (signal {os.WTERMSIG(code)})"
                    elif pid:
                        status = f" (exit {os.WEXITSTATUS(code)})"
                raise ProcessError(
                    f"{name} exited{status}; last lines of {self.logs / (name + '.log')}:\n{self.tail(name)}"
                )

    def tail(self, name: str, lines: int = 15) -> str:
        try:
            return "\n".join((self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop_all(self, grace_s: float = 10.0) -> list[str]:
        """Stop in reverse start order; returns the names that were running."""
        entries = self._load()
        stopped = []
        for e in reversed(entries):
            if _alive(e):
                stopped.append(e["name"])
                self._signal(e["pid"], signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for e in reversed(entries):
            while _alive(e) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(e):
                self._signal(e["pid"], signal.SIGKILL)
        for e in entries:  # reap our own children (a test session starts them from this process)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(e["pid"], os.WNOHANG)
        self.record.unlink(missing_ok=True)
        return stopped

    @staticmethod
    def _signal(pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)  # started with start_new_session: its PID is its group


def wait_until(
    what: str, probe: Callable[[], bool], timeout_s: float, check: Callable[[], None] | None = None
) -> float:
    """Poll ``probe`` every 0.2 s; ``check`` raises when a process died. Returns the seconds waited."""
    start = time.monotonic()
    while True:
        if check:
            check()
        try:
            if probe():
                return time.monotonic() - start
        except (OSError, urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() - start > timeout_s:
            raise ProcessError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def http_ok(url: str, context=None) -> bool:
    with urllib.request.urlopen(url, timeout=2, context=context) as r:
        return r.status == 200
