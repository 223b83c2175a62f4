"""The pins of ``infra/versions.env``, read the way ``infra/lib.sh`` reads them.

The file is plain ``KEY=value`` lines. As in ``lib.sh``, a key set in the environment wins over the
file (``KSERVE_VERSION=... make controlplane`` builds that version).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

INFRA = Path(__file__).resolve().parents[1]
REPO_ROOT = INFRA.parent
VERSIONS_FILE = INFRA / "versions.env"

_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$")


def read_versions(path: Path = VERSIONS_FILE, environ: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = _LINE.match(line.strip())
        if m:
            key, value = m.groups()
            out[key] = env.get(key) or value
    return out


def parse_version(text: str) -> tuple[int, ...]:
    """``v1.34.0`` / ``go1.26.8`` / ``1.26.0`` -> (1, 34, 0); pre-release suffixes are ignored."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(g or 0) for g in m.groups())


def staging_version(kubernetes_version: str) -> str:
    """k8s.io/kubernetes v1.X.Y is built with its staging modules (k8s.io/api, ...) at v0.X.Y."""
    major, minor, patch = parse_version(kubernetes_version)
    if major != 1:
        raise ValueError(f"unexpected Kubernetes version {kubernetes_version}")
    return f"v0.{minor}.{patch}"
