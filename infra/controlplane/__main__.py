"""``python -m infra.controlplane build|up|down|status|check``: see the package docstring."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from infra.controlplane.build import Builder, BuildError, missing_prerequisite
from infra.controlplane.cluster import ControlPlane, Settings, default_state_dir
from infra.controlplane.procs import ProcessError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.controlplane", description=__doc__)
    parser.add_argument("command", choices=("build", "up", "down", "status", "check"))
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="state folder (default .controlplane, or $MLROLLOUT_CONTROLPLANE_DIR)",
    )
    parser.add_argument("--nodes", type=int, default=Settings.nodes, help="fake nodes (default %(default)s)")
    parser.add_argument("--pod-ready-delay-ms", type=int, default=Settings.pod_ready_delay_ms)
    args = parser.parse_args(argv)
    state_dir = args.dir or default_state_dir()
    try:
        if args.command == "check":
            reason = missing_prerequisite()
            print(reason or "ok")
            return 1 if reason else 0
        if args.command == "build":
            Builder().all()
            return 0
        if args.command == "up":
            builder = Builder()
            binaries = builder.cached() or builder.all()
            cp = ControlPlane(state_dir, binaries)
            cp.up(Settings(nodes=args.nodes, pod_ready_delay_ms=args.pod_ready_delay_ms))
            print(f"export KUBECONFIG={cp.kubeconfig}")
            print(f"# stop it with: make controlplane-down   (logs: {cp.procs.logs})", file=sys.stderr)
            return 0
        cp = ControlPlane(state_dir)
        if args.command == "down":
            stopped = cp.down()
            print(f"stopped {', '.join(stopped) if stopped else 'nothing (no control plane was running)'}")
            return 0
        print(json.dumps(cp.status(), indent=1))
        return 0
    except (BuildError, ProcessError) as e:
        print(f"controlplane {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
