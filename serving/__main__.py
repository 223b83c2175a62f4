"""``python -m serving``: start the ONNX KServe runtime (see serving/README.md for every flag)."""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path


def _prepare_multiprocess_metrics(argv: list[str]) -> None:
    """With --workers > 1, prometheus_client must run in multiprocess mode, which it decides when it is
    first imported: point PROMETHEUS_MULTIPROC_DIR at an empty folder before anything imports it."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--workers", type=int, default=1)
    ns, _ = pre.parse_known_args(argv)
    if ns.workers <= 1:
        return
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for stale in Path(folder).glob("*.db"):  # left by an earlier run: would be summed in
            stale.unlink()
    else:
        _remove_stale_metric_folders()
        folder = tempfile.mkdtemp(prefix=f"mlrollout-prometheus-{os.getpid()}-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
        parent = os.getpid()
        # only the parent removes it (spawned workers inherit the variable, not this hook)
        atexit.register(lambda: os.getpid() == parent and shutil.rmtree(folder, ignore_errors=True))


def _remove_stale_metric_folders() -> None:
    """Folders of servers that were killed (SIGKILL runs no atexit hook): named after their PID."""
    for folder in Path(tempfile.gettempdir()).glob("mlrollout-prometheus-*-*"):
        pid = folder.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    _prepare_multiprocess_metrics(sys.argv[1:])
    from serving.runtime.server import main

    sys.exit(main())
