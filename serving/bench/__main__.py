"""Serving benchmark: ``python -m serving.bench [--quick]`` (``make bench-serving``).

One run, on loopback, same model, same load generator (wrk, pinned to its own core), every server
pinned to one core with one worker:

  runtime-v1        this project's runtime (``python -m serving``), V1 ``:predict``
  runtime-v2        the same process, V2 ``/infer``
  floor             bare FastAPI/uvicorn: parses the JSON body, returns a constant
  floor-asgi        bare ASGI callable on uvicorn (no FastAPI), orjson parse, constant bytes: the lower floor
  kserve-default    a plain ``kserve.Model`` (sync predict → onnxruntime) in ``kserve.ModelServer``, defaults
  mlserver-sklearn  MLServer 1.7.1 + mlserver-sklearn, defaults, serving the same fitted sklearn pipeline

Each round measures every endpoint once at every concurrency, back to back (endpoint order rotates
between rounds); ratios are taken within a round and summarised as median [min–max] over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from serving.bench import stats, wrk
from serving.bench.servers import CpuSampler, Endpoint, Server, answer_has_probability, free_port, post_json

ALL_ENDPOINTS = ("runtime-v1", "runtime-v2", "floor", "floor-asgi", "kserve-default", "mlserver-sklearn")
TARGETS = (
    stats.Target("issue 3: runtime ≥ 60% of the floor", "runtime-v2", "floor", 8, 0.60),
    stats.Target("issue 3: runtime ≥ 6x MLServer-sklearn", "runtime-v2", "mlserver-sklearn", 8, 6.0),
)


_T0 = time.monotonic()


def log(msg: str) -> None:
    """Progress on stdout; lines that start a phase (">>") carry the elapsed time."""
    if msg.startswith(">>"):
        msg = f">> [{time.monotonic() - _T0:5.0f} s]" + msg[2:]
    print(msg, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m serving.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 s cells, 1 s warm-up, 1 round")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per cell (default 10)")
    ap.add_argument(
        "--warmup", type=float, default=3.0, help="seconds of c=8 warm-up per endpoint (default 3; 0: none)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="rounds; every cell is measured once per round")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated wrk connection counts")
    ap.add_argument(
        "--endpoints",
        default=",".join(ALL_ENDPOINTS),
        help=f"comma-separated subset of {','.join(ALL_ENDPOINTS)}",
    )
    ap.add_argument("--server-cpu", type=int, default=0, help="core the servers are pinned to (default 0)")
    ap.add_argument("--client-cpu", type=int, default=1, help="core wrk is pinned to (default 1)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin (for machines with one core)")
    ap.add_argument("--out", type=Path, default=Path("bench_outputs/serving"), help="results folder")
    ap.add_argument("--mlserver-venv", type=Path, default=Path(".tools/mlserver-venv"))
    ap.add_argument(
        "--runtime-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `python -m serving` (repeatable, e.g. --runtime-arg=--workers=1)",
    )
    ap.add_argument(
        "--profile",
        metavar="ENDPOINT",
        help="after the rounds, profile ENDPOINT's server with py-spy under c=8 (installs .tools/pyspy-venv)",
    )
    ap.add_argument("--check-targets", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.repeats = 3.0, 1.0, 1
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--concurrency must be comma-separated integers, got {args.concurrency!r}")
    args.endpoints = [e.strip() for e in args.endpoints.split(",") if e.strip()]
    unknown = sorted(set(args.endpoints) - set(ALL_ENDPOINTS))
    if unknown:
        ap.error(f"unknown endpoint(s) {unknown}; choose from {list(ALL_ENDPOINTS)}")
    if args.duration < 1 or args.repeats < 1 or args.warmup < 0 or any(c < 1 for c in args.concurrency):
        ap.error("--duration >= 1, --warmup >= 0, --repeats >= 1 and every concurrency >= 1 are required")
    if args.profile and args.profile not in args.endpoints:
        ap.error(f"--profile {args.profile!r} is not among --endpoints")
    return args


def pinning(args) -> tuple[int | None, int | None]:
    if args.no_pin:
        return None, None
    allowed = os.sched_getaffinity(0)
    for cpu in (args.server_cpu, args.client_cpu):
        if cpu not in allowed:
            sys.exit(
                f"error: cpu {cpu} is not available (allowed: {sorted(allowed)}); pass --server-cpu/"
                "--client-cpu, or --no-pin on a one-core machine"
            )
    if args.server_cpu == args.client_cpu:
        sys.exit("error: --server-cpu and --client-cpu must differ (or pass --no-pin)")
    return args.server_cpu, args.client_cpu


def build_model(work: Path):
    """The one model every server serves: ONNX package + the fitted sklearn pipeline (joblib)."""
    try:
        from tests.modelfactory import breast_cancer, build_package
    except ImportError as exc:  # pragma: no cover - only outside the repository root
        sys.exit(f"error: run from the repository root (tests.modelfactory not importable: {exc})")
    import joblib
    import numpy as np

    package_dir, pipeline = build_package(work / "models")
    joblib_path = work / "model.joblib"
    joblib.dump(pipeline, joblib_path)
    X, *_ = breast_cancer()
    p1 = pipeline.predict_proba(X)[:, 1]
    row = int(np.argmin(np.abs(p1 - 0.5)))  # a row with a non-saturated probability to check answers
    card = json.loads((package_dir / "model-card.json").read_text())
    return package_dir, joblib_path, card, X[row].tolist(), float(p1[row])


def make_servers(args, package_dir: Path, joblib_path: Path, card: dict, work: Path) -> dict[str, Server]:
    py = sys.executable
    name = card["name"]
    servers: dict[str, Server] = {}
    wanted = set(args.endpoints)
    if wanted & {"runtime-v1", "runtime-v2"}:
        http, grpc = free_port(), free_port()
        servers["runtime"] = Server(
            "runtime",
            [
                py,
                "-m",
                "serving",
                "--model_dir",
                str(package_dir),
                "--http_port",
                str(http),
                "--grpc_port",
                str(grpc),
                "--model_name",
                name,
                *args.runtime_arg,
            ],
            "/v2/health/ready",
            http,
        )
    if "floor" in wanted:
        port = free_port()
        servers["floor"] = Server(
            "floor", [py, "-m", "serving.bench.floor", "--port", str(port)], "/v2/health/ready", port
        )
    if "floor-asgi" in wanted:
        port = free_port()
        servers["floor-asgi"] = Server(
            "floor-asgi",
            [py, "-m", "serving.bench.floor", "--port", str(port), "--asgi"],
            "/v2/health/ready",
            port,
        )
    if "kserve-default" in wanted:
        http, grpc = free_port(), free_port()
        servers["kserve-default"] = Server(
            "kserve-default",
            [
                py,
                "-m",
                "serving.bench.kserve_plain",
                "--model_onnx",
                str(package_dir / "1" / "model.onnx"),
                "--model_name",
                name,
                "--http_port",
                str(http),
                "--grpc_port",
                str(grpc),
            ],
            "/v2/health/ready",
            http,
        )
    if "mlserver-sklearn" in wanted:
        from serving.bench import mlserver_env

        exe = mlserver_env.ensure_venv(args.mlserver_venv, log=log)
        repo = mlserver_env.write_repository(work / "mlserver-repo", name, card["version"], joblib_path)
        http = free_port()
        servers["mlserver-sklearn"] = Server(
            "mlserver-sklearn",
            [str(exe.resolve()), "start", str(repo)],
            "/v2/health/ready",
            http,
            env={
                "MLSERVER_HOST": "127.0.0.1",
                "MLSERVER_HTTP_PORT": str(http),
                "MLSERVER_GRPC_PORT": str(free_port()),
                "MLSERVER_METRICS_PORT": str(free_port()),
            },
        )
    return servers


def make_endpoints(args, card: dict, row: list[float]) -> list[Endpoint]:
    name = card["name"]
    n = len(row)
    # the runtime's V1 answers labels only unless asked: ask, so every endpoint returns probabilities
    v1 = {"instances": [row], "parameters": {"probabilities": True}}
    v2 = {"inputs": [{"name": "input", "shape": [1, n], "datatype": "FP32", "data": row}]}
    # MLServer-sklearn answers `predict` unless asked: ask for the probabilities the others return
    v2_mlserver = {**v2, "outputs": [{"name": "predict_proba"}]}
    infer = f"/v2/models/{name}/infer"
    table = {
        "runtime-v1": Endpoint("runtime-v1", "runtime", f"/v1/models/{name}:predict", v1),
        "runtime-v2": Endpoint("runtime-v2", "runtime", infer, v2),
        "floor": Endpoint("floor", "floor", infer, v2, check=None),
        "floor-asgi": Endpoint("floor-asgi", "floor-asgi", infer, v2, check=None),
        "kserve-default": Endpoint("kserve-default", "kserve-default", infer, v2),
        "mlserver-sklearn": Endpoint("mlserver-sklearn", "mlserver-sklearn", infer, v2_mlserver),
    }
    return [table[e] for e in args.endpoints]


def check_answers(endpoints, servers, expected_p1: float) -> None:
    """Every endpoint must answer 200 with the sklearn probability before it is timed."""
    for ep in endpoints:
        url = servers[ep.server].base_url + ep.path
        status, answer, _ = post_json(url, ep.body)
        if status != 200:
            raise RuntimeError(f"{ep.name}: POST {url} answered HTTP {status}: {str(answer)[:300]}")
        if ep.check and not answer_has_probability(answer, expected_p1):
            raise RuntimeError(
                f"{ep.name}: answer lacks the expected probability {expected_p1:.6f}: "
                f"{json.dumps(answer)[:300]}"
            )
        log(f"   {ep.name:<17} answers 200" + (f" with p1={expected_p1:.6f}" if ep.check else " (constant)"))


def measure(
    ep: Endpoint,
    server: Server,
    script: Path,
    conc: int,
    duration: float,
    rnd: int,
    server_cpu: int | None,
    client_cpu: int | None,
) -> stats.Cell:
    core = CpuSampler(server_cpu)
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    res = wrk.run(server.base_url + ep.path, script, conc, duration, client_cpu)
    wall = time.monotonic() - t0
    used = server.cpu_seconds() - cpu0
    other = (core.busy_seconds() - used) / wall if server_cpu is not None else float("nan")
    return stats.Cell(
        server=ep.name,
        concurrency=conc,
        round=rnd,
        rps=res.rps,
        p50_ms=res.p50_ms,
        p99_ms=res.p99_ms,
        requests=res.requests,
        errors=res.error_count,
        server_cpu_s=used,
        server_cpu_share=used / wall,
        other_load_on_server_core=max(0.0, other) if other == other else other,
    )


def progress_line(cell: stats.Cell) -> str:
    return (
        f"c={cell.concurrency:<3} {cell.server:<17} {cell.rps:>7.0f} req/s  p50 {cell.p50_ms:6.2f} ms  "
        f"p99 {cell.p99_ms:6.2f} ms  server CPU {cell.server_cpu_share:4.0%}  "
        f"other load on its core {cell.other_load_on_server_core:4.0%}"
        + (f"  ERRORS {cell.errors}" if cell.errors else "")
    )


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("kserve", "fastapi", "uvicorn", "starlette", "onnxruntime", "scikit-learn"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out["wrk"] = (
            subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=5)
            .stdout.split("[")[0]
            .strip()
        )
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        # measured code that differs from that commit (uncommitted edits to the servers under test)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "serving", "pipelines/core"],
            capture_output=True, text=True, timeout=5,
        ).stdout.split("\n")  # fmt: skip
        out["uncommitted"] = [line[3:] for line in dirty if line.strip()]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        wrk.wrk_binary()
    except wrk.WrkError as exc:
        sys.exit(f"error: {exc}")
    server_cpu, client_cpu = pinning(args)
    out: Path = args.out
    work = out / "work"
    out.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    n_cells = len(args.endpoints) * len(args.concurrency) * args.repeats
    eta = n_cells * (args.duration + 0.5) + len(args.endpoints) * args.warmup + 30
    log(
        f">> serving benchmark: {len(args.endpoints)} endpoints x c={args.concurrency} x {args.repeats} "
        f"round(s), {args.duration:g} s per cell (~{eta / 60:.1f} min); servers on cpu {server_cpu}, "
        f"wrk on cpu {client_cpu}; load average {os.getloadavg()[0]:.2f}"
    )

    package_dir, joblib_path, card, row, p1 = build_model(work)
    servers = make_servers(args, package_dir, joblib_path, card, work)
    endpoints = make_endpoints(args, card, row)
    scripts = {}
    for ep in endpoints:
        scripts[ep.name] = work / f"{ep.name}.lua"
        scripts[ep.name].write_text(wrk.lua_script(json.dumps(ep.body, separators=(",", ":"))))

    cells: list[stats.Cell] = []
    failed: list[str] = []
    profile: dict | None = None
    try:
        log(">> starting servers (each pinned, 127.0.0.1, free ports)")
        for s in servers.values():
            s.start(out / "logs", server_cpu)
        for s in servers.values():
            s.wait_ready(timeout_s=180)
            log(f"   {s.name:<17} ready on {s.base_url} (pid {s.proc.pid})")
        check_answers(endpoints, servers, p1)
        if args.warmup > 0:
            log(f">> warm-up: {args.warmup:g} s at c=8 per endpoint")
            for ep in endpoints:
                wrk.run(servers[ep.server].base_url + ep.path, scripts[ep.name], 8, args.warmup, client_cpu)
        i = 0
        for rnd in range(1, args.repeats + 1):
            order = endpoints[(rnd - 1) % len(endpoints) :] + endpoints[: (rnd - 1) % len(endpoints)]
            for conc in args.concurrency:
                for ep in order:
                    i += 1
                    server = servers[ep.server]
                    try:
                        cell = measure(
                            ep, server, scripts[ep.name], conc, args.duration, rnd, server_cpu, client_cpu
                        )
                    except wrk.WrkError as exc:  # one lost cell must not lose the run: say so, go on
                        log(f"   [{i:>3}/{n_cells}] round {rnd} c={conc} {ep.name}: NOT MEASURED: {exc}")
                        failed.append(f"round {rnd} c={conc} {ep.name}: {exc}")
                        continue
                    cells.append(cell)
                    log(f"   [{i:>3}/{n_cells}] round {rnd} " + progress_line(cell))
                    if server.proc is not None and server.proc.poll() is not None:
                        raise RuntimeError(
                            f"{server.name} exited with code {server.proc.returncode} during the run; "
                            f"see {server.log_path}:\n{server.log_tail()}"
                        )
        if args.profile:
            from serving.bench import profile as prof

            ep = next(e for e in endpoints if e.name == args.profile)
            profile = prof.record(
                ep, servers[ep.server], scripts[ep.name], out, args.duration, client_cpu, log
            )
    finally:
        for s in servers.values():
            s.stop()
        log(">> servers stopped")

    summaries = stats.summarize(cells)
    names = [e.name for e in endpoints]
    results = stats.evaluate(cells, TARGETS)
    baselines = [b for b in ("floor", "mlserver-sklearn", "kserve-default") if b in names]
    ver = versions()
    report = "\n".join(
        [
            "",
            f"== serving benchmark, {started:%Y-%m-%d %H:%M} UTC, {args.repeats} round(s) x "
            f"{args.duration:g} s per cell; 1 server core + 1 wrk core; "
            f"load average now {os.getloadavg()[0]:.2f}",
            f"code: git {ver.get('git', '?')}"
            + (f" + uncommitted {', '.join(ver['uncommitted'])}" if ver.get("uncommitted") else ""),
            stats.format_table(summaries, names, "floor" if "floor" in names else names[0]),
            "",
            stats.format_ratios(cells, names, baselines),
            "",
            "targets (issue 3, V2 at c=8):",
            stats.format_targets(results),
        ]
    )
    log(report)
    if failed:
        log(f"\n{len(failed)} cell(s) not measured:\n  " + "\n  ".join(failed))
    noisy = [
        c
        for c in cells
        if c.other_load_on_server_core == c.other_load_on_server_core and c.other_load_on_server_core > 0.10
    ]
    if noisy:
        log(
            f"\nnote: in {len(noisy)}/{len(cells)} cells other processes used >10% of the server core "
            "(shared machine); the ratios above pair runs seconds apart, the CPU µs/request column is "
            "less sensitive to that than req/s."
        )

    data = {
        "started_utc": started.isoformat(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "pinning": {"server_cpu": server_cpu, "client_cpu": client_cpu, "nproc": os.cpu_count()},
        "versions": ver,
        "model": {"name": card["name"], "version": card["version"], "estimator": card.get("estimator")},
        "cells": [c.to_dict() for c in cells],
        "failed_cells": failed,
        "summary": [
            {
                "endpoint": s.server,
                "concurrency": s.concurrency,
                "rps": vars(s.rps),
                "p50_ms": vars(s.p50_ms),
                "p99_ms": vars(s.p99_ms),
                "cpu_us_per_request": vars(s.cpu_us_per_request),
                "errors": s.errors,
            }
            for s in summaries.values()
        ],
        "targets": [
            {
                "label": r.target.label,
                "numerator": r.target.numerator,
                "denominator": r.target.denominator,
                "concurrency": r.target.concurrency,
                "minimum": r.target.minimum,
                "ratio": vars(r.ratio),
                "cpu_ratio": vars(r.cpu_ratio),
                "met": r.met,
            }
            for r in results
        ],
        "profile": profile,
        "report": report,
    }
    (out / "results.json").write_text(json.dumps(data, indent=2))
    (out / "report.txt").write_text(report + "\n")
    if "floor" in names:
        peer = "mlserver-sklearn" if "mlserver-sklearn" in names else None
        md = stats.format_markdown(cells, names, "floor", peer)
        (out / "report.md").write_text(
            md
            + "\n\n"
            + "\n".join(f"- {line.strip()}" for line in stats.format_targets(results).splitlines())
            + "\n"
        )
    try:
        from serving.bench import plot

        png = plot.bar_chart(summaries, names, out / "serving_bench.png")
        log(f"\n>> wrote {out / 'results.json'}, {out / 'report.txt'}, {png}")
    except Exception as exc:  # the numbers above matter more than the picture
        log(f"\n>> wrote {out / 'results.json'}; plot failed: {exc}")
    if args.check_targets and any(r.met is False for r in results):
        return 1
    return 0


def cli() -> int:
    try:
        return main()
    except (RuntimeError, wrk.WrkError) as exc:  # a server or wrk failed: one clear message, exit 1
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(cli())
