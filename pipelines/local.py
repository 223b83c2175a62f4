"""Run a pipeline locally with ``kfp.local`` (SubprocessRunner, no venv) and keep the view readable.

kfp.local prints every task's full executor input/output and streamed logs to stdout. This module
captures all of it into ``<pipeline_root>/<run>.log``, shows one line per step as it starts and
finishes (with its time), and on failure turns the failing step's exception into one line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.contract.errors import MlrolloutError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
# the last "SomethingError: message" line of a step's streamed traceback
_EXC = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception)): (.+)$")


class PipelineRunError(MlrolloutError, RuntimeError):
    """A local pipeline run failed; ``str()`` is one line naming the step and the reason."""

    def __init__(self, message: str, step: str = "", log_path: Path | None = None):
        super().__init__(message)
        self.step = step
        self.log_path = log_path


@dataclass
class StepTiming:
    name: str
    seconds: float
    status: str


@dataclass
class LocalRun:
    output: Any  # the pipeline's returned artifact (a dsl.Model for the training pipeline)
    log_path: Path
    seconds: float
    steps: list[StepTiming] = field(default_factory=list)


class _ProgressStream(io.TextIOBase):
    """A stdout stand-in: records everything, reports step start/finish through ``emit``."""

    def __init__(self, emit: Callable[[str], None], verbose: bool, echo: Any):
        self.emit, self.verbose, self.echo = emit, verbose, echo
        self.buf = io.StringIO()
        self._partial = ""
        self.started: dict[str, float] = {}
        self.steps: list[StepTiming] = []
        self.step_lines: dict[str, list[str]] = {}
        self.current: str | None = None

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.buf.write(s)
        if self.verbose:
            self.echo.write(s)
        self._partial += s
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self._line(_ANSI.sub("", line))
        return len(s)

    def _line(self, line: str) -> None:
        if m := _START.search(line):
            self.current = m.group(1)
            self.started[self.current] = time.perf_counter()
            self.step_lines[self.current] = []
            if not self.verbose:
                self.emit(f"  ... {self.current}")
        elif m := _END.search(line):
            name, status = m.group(1), m.group(2)
            took = time.perf_counter() - self.started.get(name, time.perf_counter())
            self.steps.append(StepTiming(name, took, status))
            if not self.verbose:
                mark = "ok  " if status == "SUCCESS" else "FAIL"
                self.emit(f"  {mark} {name:<16} {took:6.1f} s")
            self.current = None
        elif self.current is not None:
            self.step_lines[self.current].append(line)

    def failure_reason(self) -> tuple[str, str]:
        """(step, one-line reason) for the first failed step."""
        failed = next((s.name for s in self.steps if s.status != "SUCCESS"), None)
        if failed is None:
            return "", ""
        reason = ""
        for line in self.step_lines.get(failed, []):
            if m := _EXC.match(line):
                reason = f"{m.group(1)}: {m.group(2).strip()}"
        return failed, reason or "see the log for the traceback"


def run_local(
    pipeline_func: Callable[..., Any],
    arguments: dict[str, Any],
    pipeline_root: str | Path,
    *,
    verbose: bool = False,
    emit: Callable[[str], None] | None = None,
) -> LocalRun:
    """Run ``pipeline_func(**arguments)`` under kfp.local. ``pipeline_root`` receives the run's
    artifacts and its log. Raises :class:`PipelineRunError` (one-line message) on failure."""
    from kfp import local

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-%f")
    log_path = root / f"run-{stamp}.log"
    # workspace_root stays unset: kfp.local deletes the workspace after each run
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    out = sys.stdout  # captured before the redirect below: progress goes to the real terminal
    if emit is None:

        def emit(line: str) -> None:
            print(line, file=out, flush=True)

    stream = _ProgressStream(emit, verbose, out)
    t0 = time.perf_counter()
    error: BaseException | None = None
    task = None
    try:
        with contextlib.redirect_stdout(stream):
            task = pipeline_func(**arguments)
    except Exception as e:  # kfp raises RuntimeError for a failed task; anything else is ours
        error = e
    finally:
        log_path.write_text(stream.buf.getvalue() + stream._partial)
    seconds = time.perf_counter() - t0
    if error is not None:
        step, reason = stream.failure_reason()
        if step:
            raise PipelineRunError(
                f"step {step} failed: {reason} (full log: {log_path})", step, log_path
            ) from error
        raise PipelineRunError(f"{_ANSI.sub('', str(error))} (full log: {log_path})", "", log_path) from error
    output = task.output if task is not None and len(getattr(task, "outputs", {}) or {}) == 1 else task
    return LocalRun(output=output, log_path=log_path, seconds=seconds, steps=stream.steps)
