"""``python -m serving.demo.stack up | traffic | down``: the demo's local stack on its own, so the rollout
CLI (``python -m serving.rollout start --router local_proxy ...``) can be tried by hand.

up       two runtimes (stable, canary), HAProxy in front (weights through its admin socket), Prometheus;
         they keep running after the command returns; it prints the addresses and the exact
         ``rollout start`` command for them, and writes ``<dir>/stack.json`` (PIDs, addresses)
traffic  send the bundled breast_cancer rows through the proxy for a while (the gates need traffic);
         ``--users N``: each request carries one of N user keys (a sticky cohort's users)
down     stop every process ``up`` started, by PID (each in its own process group), and remove stack.json

``up --cohort hash:header:x-user-id`` (or ``match:header:x-canary=always``, any ``serving.rollout.cohorts``
spec) puts a sticky cohort into HAProxy's config; the printed command then carries the matching flags.

Default packages: the ones ``make demo`` trains (``demo_outputs/models/v1.0.0``, ``.../v1.1.0``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from serving.contract import modelcard
from serving.demo.localstack import REGISTRY, LocalStack, TrafficGenerator
from serving.demo.localstack.stack import StackError
from serving.rollout import cohorts

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_MODELS = REPO_ROOT / "demo_outputs" / "models"
DEFAULT_DIR = REPO_ROOT / "demo_outputs" / "stack"
STATE = "stack.json"


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat): with the PID it names one
    process, so ``down`` never signals an unrelated process that reused a PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def rollout_command(info: dict[str, Any]) -> str:
    """The ``rollout start`` line for this stack (the CLI's defaults for everything else)."""
    d = Path(info["dir"])
    args = [
        ".venv/bin/python", "-m", "serving.rollout", "start", "--router", "local_proxy",
        "--haproxy-socket", info["haproxy_socket"], "--prometheus-url", info["prometheus_url"],
        "--model", info["model"], "--stable-version", info["stable_version"],
        "--canary-version", info["canary_version"], "--interval", "10s",
        "--state-file", str(d / "rollout.json"), "--report-dir", str(d / "report"),
    ]  # fmt: skip
    if info.get("cohort"):
        c = cohorts.parse(info["cohort"])
        flag = f"--{'cohort' if c.mode == 'hash' else 'match'}-{c.source}"
        args += [
            flag,
            c.name if c.mode == "hash" else f"{c.name}={c.value}",
            "--cohort-map",
            info["cohort_map"],
        ]
    return shlex.join(args)


def _load(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / STATE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise StackError(f"{d / STATE} is unreadable ({e}): remove it and stop the processes by hand") from e


def _alive(info: dict[str, Any]) -> list[int]:
    return [p["pid"] for p in info["processes"] if _start_time(p["pid"]) == p["start_time"]]


def _package(path: str | None, default: str) -> Path:
    where = Path(path) if path else DEMO_MODELS / default
    try:
        return modelcard.find_package(where)
    except modelcard.ModelPackageError as e:
        hint = "" if path else " (run `make demo` first, or pass --stable/--canary)"
        raise StackError(f"no model package at {where}{hint}: {e}") from None


def up(ns: argparse.Namespace) -> int:
    d = Path(ns.dir).resolve()
    old = _load(d)
    if old and _alive(old):
        raise StackError(f"a stack from {d / STATE} is already up: `python -m serving.demo.stack down` first")
    stable, canary = _package(ns.stable, "v1.0.0"), _package(ns.canary, "v1.1.0")
    versions = [modelcard.load_card(p)["version"] for p in (stable, canary)]
    if versions[0] == versions[1]:
        raise StackError(f"stable and canary are both version {versions[0]}: give two versions")
    try:
        cohort = cohorts.parse(ns.cohort).spec if ns.cohort else ""
    except ValueError as e:
        raise StackError(str(e)) from None
    stack = LocalStack(stable, canary, d, cohort=cohort).start()
    info = {
        "dir": str(d),
        "model": stack.model,
        "stable_version": stack.stable.version,
        "canary_version": stack.canary.version,
        "proxy_url": stack.proxy_url,
        "prometheus_url": stack.prometheus_url,
        "haproxy_socket": str(stack.haproxy_socket),
        **({"cohort": cohort, "cohort_map": str(stack.cohort_map)} if cohort else {}),
        "processes": [{"pid": pid, "start_time": _start_time(pid)} for pid in stack.pids()],
    }
    (d / STATE).write_text(json.dumps(info, indent=2))
    for pid in stack.pids():  # they outlive this command: `down` stops them
        REGISTRY.forget(pid)
    print(f"state: {d / STATE}\nsend traffic: .venv/bin/python -m serving.demo.stack traffic --seconds 120")
    print(f"roll out:     {rollout_command(info)}")
    print("stop it:      .venv/bin/python -m serving.demo.stack down")
    return 0


def traffic(ns: argparse.Namespace) -> int:
    from serving.demo.rollout import traffic_data

    info = _load(Path(ns.dir).resolve())
    if not info or not _alive(info):
        raise StackError("no stack is up: `python -m serving.demo.stack up` first")
    card = modelcard.load_card(_package(ns.stable, "v1.0.0"))
    x, _ = traffic_data(card)
    keys = [f"user-{i}" for i in range(ns.users)]
    c = cohorts.parse(info["cohort"]) if info.get("cohort") else None
    header = c.name if c and c.source == "header" and c.mode == "hash" else "x-user-id"
    tg = TrafficGenerator(
        info["proxy_url"],
        info["model"],
        x,
        rps=ns.rps,
        max_seconds=ns.seconds,
        user_keys=keys,
        key_header=header,
    )
    with tg:
        time.sleep(ns.seconds)
    res = tg.result()
    by = ", ".join(f"{v or '?'}={n}" for v, n in sorted(res.by_version().items()))
    print(f"{res.total} requests, {len(res.failures())} failed; answers by version: {by}")
    return 0


def down(ns: argparse.Namespace) -> int:
    d = Path(ns.dir).resolve()
    info = _load(d)
    if info is None:
        print(f"no stack in {d}: nothing to stop")
        return 0
    live = _alive(info)
    for pid in live:
        os.killpg(pid, signal.SIGTERM)  # each was started in its own session: pgid == pid
    deadline = time.monotonic() + 15
    while (live := _alive(info)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in live:
        os.killpg(pid, signal.SIGKILL)
    (d / STATE).unlink()
    print(f"stopped {len(info['processes'])} processes of the stack in {d}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m serving.demo.stack",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn in (("up", up), ("traffic", traffic), ("down", down)):
        sp = sub.add_parser(name)
        sp.add_argument(
            "--dir", default=str(DEFAULT_DIR), help="work folder and stack.json (default: demo_outputs/stack)"
        )
        sp.set_defaults(func=fn)
        if name != "down":
            sp.add_argument("--stable", help="stable package folder (default: demo_outputs/models/v1.0.0)")
        if name == "up":
            sp.add_argument("--canary", help="canary package folder (default: demo_outputs/models/v1.1.0)")
            sp.add_argument("--cohort", default="", help=f"a sticky cohort in HAProxy: {cohorts.SPEC_HELP}")
        if name == "traffic":
            sp.add_argument("--seconds", type=float, default=60.0, help="how long (default 60)")
            sp.add_argument("--rps", type=float, default=50.0, help="requests per second (default 50)")
            sp.add_argument(
                "--users",
                type=int,
                default=0,
                help="user keys user-0..N-1 in the cohort's header (default none)",
            )
    ns = p.parse_args(argv)
    try:
        return ns.func(ns)
    except (StackError, OSError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
