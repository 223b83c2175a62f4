"""MLServer for the benchmark: a separate pinned venv under .tools/ and a one-model repository.

MLServer 1.7.1 cannot share the project venv with kserve 0.21 (starlette ranges do not overlap),
so it gets ``.tools/mlserver-venv`` built from ``mlserver.lock`` (exact pins) the first time the
benchmark needs it. The venv is reused while its stamp matches the lock file's hash.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

LOCK = Path(__file__).with_name("mlserver.lock")


def _lock_hash() -> str:
    return hashlib.sha256(LOCK.read_bytes()).hexdigest()[:12]


def ensure_venv(venv: Path, python: str | None = None, log=print) -> Path:
    """Create or reuse the MLServer venv; return its ``mlserver`` executable."""
    stamp = venv / f".installed-{_lock_hash()}"
    exe = venv / "bin" / "mlserver"
    if stamp.exists() and exe.exists():
        return exe
    python = python or sys.executable
    # the project venv's python may itself be a venv: use its base interpreter for the new venv
    base = subprocess.run(
        [python, "-c", "import sys; print(sys._base_executable)"], capture_output=True, text=True, check=True
    ).stdout.strip()
    log(f">> building {venv} from {LOCK.name} (first run only, ~1 min)")
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "pip==25.3"], check=True)
    subprocess.run([*pip, "--no-deps", "-r", str(LOCK)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "check"], check=True)
    for old in venv.glob(".installed-*"):
        old.unlink()
    stamp.touch()
    return exe


def write_repository(root: Path, model_name: str, version: str, joblib_path: Path) -> Path:
    """An MLServer model repository serving ``joblib_path`` with the official sklearn runtime.

    Only what MLServer needs to find the model is set; everything else (parallel_workers=1,
    metrics server, gRPC server) stays at MLServer's defaults. Host and ports come from env vars.
    """
    model_dir = root / model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / "model.joblib"
    if target.resolve() != joblib_path.resolve():
        target.write_bytes(joblib_path.read_bytes())
    (model_dir / "model-settings.json").write_text(
        json.dumps(
            {
                "name": model_name,
                "implementation": "mlserver_sklearn.SKLearnModel",
                "parameters": {"uri": "./model.joblib", "version": version},
            },
            indent=2,
        )
    )
    (root / "settings.json").write_text(json.dumps({}, indent=2))
    return root
