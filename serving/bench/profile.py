"""Where a server's CPU goes under load: py-spy (sampling) while wrk drives it at c=8.

py-spy lives in its own venv (``.tools/pyspy-venv``, pinned), never in the project venv. The raw
(collapsed-stack) profile is kept for flame graphs (``flamegraph.pl``, speedscope import); this
module summarises it as inclusive/self shares per function and per named bucket.

    python -m serving.bench --endpoints runtime-v2 --profile runtime-v2 --repeats 1
    python -m serving.bench.profile bench_outputs/serving/profile-runtime-v2.collapsed  # re-summarise
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

PYSPY_VERSION = "0.4.3"
PYSPY_VENV = Path(".tools/pyspy-venv")

# Self time by layer: each sample goes to the package of its innermost frame that matches one of
# these (first match wins); stdlib helpers without a layer (dataclasses, enum ...) count toward
# their caller. py-spy prints paths from the package root, e.g. "emit (logging/__init__.py:1110)".
LAYERS: dict[str, str] = {
    "onnxruntime": r"\(onnxruntime/",
    "scikit-learn": r"\(sklearn/",
    "numpy": r"\(numpy/",
    "logging (stdlib + uvicorn formatters)": r"\((logging/|uvicorn/logging\.py)",
    "timing_asgi (KServe timing middleware)": r"\(timing_asgi/",
    "prometheus_client": r"\(prometheus_client/",
    "pydantic": r"\(pydantic",
    "json (stdlib)": r"\(json/",
    "fastapi": r"\(fastapi/",
    "starlette": r"\(starlette/",
    "uvicorn / httptools": r"\((uvicorn|httptools)/",
    "event loop (asyncio; uvloop native work shows as Runner.run)": r"\(asyncio/",
    "kserve": r"\(kserve/",
    "mlserver": r"\(mlserver/",
    "this project (serving/)": r"\(serving/(?!bench/)",
}
# Inclusive probes: share of samples whose stack contains a matching frame (they overlap).
PROBES: dict[str, str] = {
    "per-request logging (any logging/ frame)": r"\(logging/",
    "route matching (fastapi/starlette routing matches)": r"^\S*_?match(es)? \((fastapi|starlette)/routing",
    "pydantic (any frame)": r"\(pydantic",
    "prometheus_client (any frame)": r"\(prometheus_client/",
    "onnxruntime run": r"\(onnxruntime/",
    "scikit-learn (any frame)": r"\(sklearn/",
    "runtime request code (serving/runtime/*)": r"\(serving/runtime/(asgi|core|model|metrics)\.py",
}

# A sample whose innermost frame is the selector's poll is the event loop waiting for I/O (or, on a
# busy machine, runnable but not yet scheduled after epoll returned): not CPU work, kept apart.
WAIT_LEAF = re.compile(r"^\S*select \(selectors\.py")

_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def ensure_pyspy(venv: Path = PYSPY_VENV) -> Path:
    exe = venv / "bin" / "py-spy"
    if exe.exists():
        return exe
    base = subprocess.run(
        [sys.executable, "-c", "import sys; print(sys._base_executable)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"py-spy=={PYSPY_VERSION}"], check=True)
    return exe


def parse_collapsed(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    """``frame;frame;...;frame count`` lines (py-spy ``--format raw``) → [(frames root-first, count)]."""
    out = []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        out.append((stack.split(";"), n))
    return out


def _function(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    # keep the path from the package root on: ".../site-packages/kserve/model.py" → "kserve/model.py"
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{m.group('fn')} ({file})"


def split_threads(stacks: list[tuple[list[str], int]]) -> tuple[list, list]:
    """(main-thread stacks, other-thread stacks): a thread started by ``threading`` roots at
    ``Thread._bootstrap``; the main thread (where uvicorn's event loop runs) does not."""
    main, other = [], []
    for frames, n in stacks:
        real = [f for f in frames if _FRAME.match(f)]
        (other if real and real[0].startswith("Thread._bootstrap ") else main).append((frames, n))
    return main, other


def summarize(stacks: list[tuple[list[str], int]], top: int = 40) -> dict:
    """Self time per layer, inclusive probes, and top functions (self, inclusive) as sample shares."""
    waiting = sum(n for frames, n in stacks if frames and WAIT_LEAF.match(frames[-1]))
    stacks = [(frames, n) for frames, n in stacks if not (frames and WAIT_LEAF.match(frames[-1]))]
    total = sum(n for _, n in stacks)
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    probes: Counter[str] = Counter()
    layer_rx = [(name, re.compile(rx)) for name, rx in LAYERS.items()]
    probe_rx = [(name, re.compile(rx)) for name, rx in PROBES.items()]
    for frames, n in stacks:
        # py-spy's "process N:..." pseudo-frame is not a function
        frames = [f for f in frames if _FRAME.match(f)]
        if not frames:
            continue
        for fn in {_function(f) for f in frames}:
            inclusive[fn] += n
        self_[_function(frames[-1])] += n
        layer = next(
            (name for f in reversed(frames) for name, rx in layer_rx if rx.search(f)), "other (stdlib, main)"
        )
        layers[layer] += n
        for name, rx in probe_rx:
            if any(rx.search(f) for f in frames):
                probes[name] += n

    def share(counter: Counter[str], k: int | None) -> list[dict]:
        return [{"function": fn, "share": c / total} for fn, c in counter.most_common(k)] if total else []

    return {
        "samples": total,
        "selector_wait_samples": waiting,
        "layers": {row["function"]: row["share"] for row in share(layers, None)},
        "probes": {name: probes[name] / total if total else 0.0 for name in PROBES},
        "inclusive": share(inclusive, top),
        "self": share(self_, top),
    }


def format_summary(summary: dict, title: str) -> str:
    lines = [
        f"py-spy profile of {title}: {summary['samples']} samples of work "
        f"(idle and {summary.get('selector_wait_samples', 0)} samples waiting in selectors.select excluded)"
    ]
    lines.append("  self time by layer (each sample counted once, innermost known package):")
    lines.extend(f"    {sh:6.1%}  {name}" for name, sh in summary["layers"].items() if sh >= 0.005)
    lines.append("  inclusive probes (share of samples whose stack contains it; they overlap):")
    lines.extend(f"    {sh:6.1%}  {name}" for name, sh in summary["probes"].items() if sh > 0)
    lines.append("  top functions by self time:")
    lines.extend(f"    {row['share']:6.1%}  {row['function']}" for row in summary["self"][:15])
    lines.append("  top functions by inclusive time (below the entry point's ~100%):")
    rows = [row for row in summary["inclusive"] if row["share"] < 0.98]
    lines.extend(f"    {row['share']:6.1%}  {row['function']}" for row in rows[:20])
    return "\n".join(lines)


def format_other(summary: dict) -> str:
    """Non-main threads (thread pools, gRPC): py-spy cannot always tell them idle from busy when
    they wait in native code, so they are listed apart and left out of the main summary."""
    lines = [f"  other threads: {summary['samples']} samples; top self frames:"]
    lines.extend(f"    {row['share']:6.1%}  {row['function']}" for row in summary["self"][:5])
    return "\n".join(lines)


def record(ep, server, script: Path, out: Path, duration: float, client_cpu: int | None, log) -> dict:
    """Profile ``server`` (and its child processes) while wrk drives ``ep`` at c=8."""
    from serving.bench import wrk

    exe = ensure_pyspy()
    raw = out / f"profile-{ep.name}.collapsed"
    cmd = [
        str(exe), "record", "--pid", str(server.proc.pid), "--rate", "250", "--subprocesses", "--nonblocking",
        "--duration", str(max(1, round(duration))), "--format", "raw", "--output", str(raw),
    ]  # fmt: skip
    if client_cpu is not None:
        cmd = ["taskset", "-c", str(client_cpu), *cmd]
    log(f">> profiling {ep.name} (pid {server.proc.pid}), py-spy {PYSPY_VERSION}, {duration:g} s at c=8")
    spy = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result: dict = {}

    def load() -> None:
        try:
            result["wrk"] = wrk.run(server.base_url + ep.path, script, 8, duration, client_cpu)
        except wrk.WrkError as exc:
            result["error"] = str(exc)

    t = threading.Thread(target=load)
    t.start()
    try:
        spy_out, _ = spy.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy_out, _ = spy.communicate()
    t.join(timeout=duration + 60)
    if spy.returncode != 0 or not raw.exists():
        log(f"   py-spy failed (exit {spy.returncode}): {spy_out.strip()[-400:]}")
        return {"error": spy_out.strip()[-400:]}
    main_stacks, other_stacks = split_threads(parse_collapsed(raw.read_text().splitlines()))
    summary = summarize(main_stacks)
    others = summarize(other_stacks, top=10)
    text = format_summary(summary, f"{ep.name} under wrk c=8, main threads (event loop)")
    text += "\n" + format_other(others)
    if "wrk" in result:
        text += f"\n  (req/s while sampled at 250 Hz: {result['wrk'].rps:.0f})"
    (out / f"profile-{ep.name}.txt").write_text(text + "\n")
    log(text)
    return {"endpoint": ep.name, "collapsed": str(raw), "main_threads": summary, "other_threads": others}


def main(argv: list[str] | None = None) -> None:
    paths = argv if argv is not None else sys.argv[1:]
    if not paths:
        sys.exit("usage: python -m serving.bench.profile PROFILE.collapsed [...]")
    for p in paths:
        path = Path(p)
        if not path.exists():
            sys.exit(f"error: {path} does not exist")
        main_stacks, other_stacks = split_threads(parse_collapsed(path.read_text().splitlines()))
        print(format_summary(summarize(main_stacks), f"{path.name}, main threads"))
        print(format_other(summarize(other_stacks, top=10)))


if __name__ == "__main__":
    main()
