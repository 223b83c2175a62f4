"""The import-layer check (``lint-imports``, contracts in pyproject.toml ``[tool.importlinter]``) passes
on the tree and fails, naming the broken contract, on a copy of it with one wrong import added."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

LAYERS = "Layers: demo/bench, then the KFP side, then the domain packages, then serving.contract"
INDEPENDENT = "Domain packages are independent of each other"
FORBIDDEN = "The product never imports the demo or the benchmarks"
CONTRACTS = (LAYERS, INDEPENDENT, FORBIDDEN)


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} missing: import-linter is a dev dependency (make venv)"
    env = {**os.environ, "PYTHONPATH": str(cwd), "COLUMNS": "200", "NO_COLOR": "1"}
    # lint-imports puts its working directory first on sys.path: the packages found are cwd's
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_the_tree_keeps_every_contract():
    r = lint_imports(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert verdicts(r.stdout) == dict.fromkeys(CONTRACTS, "KEPT"), r.stdout


@pytest.fixture
def tree_copy(tmp_path) -> Path:
    skip = shutil.ignore_patterns("__pycache__", "compiled", "*.md", "*.lock", "Dockerfile")
    for pkg in ("pipelines", "serving"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def verdicts(stdout: str) -> dict[str, str]:
    """The summary's ``<contract name> KEPT|BROKEN`` lines, by contract name."""
    found = re.findall(r"^(.+?) (KEPT|BROKEN)(?: \(\d+ ignored imports?\))?$", stdout, re.MULTILINE)
    return dict(found)


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("serving/runtime/x.py", "import serving.demo\n", {FORBIDDEN, LAYERS}),
        ("pipelines/components/x.py", "from serving.bench import stats\n", {FORBIDDEN, LAYERS}),
        ("serving/rollout/x.py", "from serving.runtime import core\n", {INDEPENDENT}),
        ("pipelines/core/x.py", "import pipelines.submit\n", {LAYERS}),
    ],
)
def test_a_wrong_import_breaks_the_check_by_name(tree_copy, module, line, broken):
    (tree_copy / module).write_text(line)
    r = lint_imports(tree_copy)
    assert r.returncode != 0, r.stdout + r.stderr
    assert verdicts(r.stdout) == {c: "BROKEN" if c in broken else "KEPT" for c in CONTRACTS}, r.stdout
    importer = module.removesuffix(".py").replace("/", ".")
    assert f"- {importer} -> " in r.stdout  # the offending import is named
