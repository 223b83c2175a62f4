"""What the hermetic components run on: base image, pinned packages, and the embedded core.

Pins come from one place, ``requirements.lock`` (the versions the tests ran with). A component
lists the distributions it imports; :func:`requirements` adds their dependency closure, pinned,
so a stock KFP cluster installs exactly the tested versions at step start-up.

The plain-function core (``pipelines/core``) reaches the cluster inside the compiled YAML:
:func:`stage_core` copies its ``.py`` files into a scratch ``pipelines/core`` tree that kfp's
``embedded_artifact_path`` tars into every component; at run time kfp extracts it and puts it
first on ``sys.path``, so ``from pipelines.core import ...`` resolves to the embedded copy.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

BASE_IMAGE = "python:3.11-slim"
REPO_ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE = REPO_ROOT / "requirements.lock"
CORE_DIR = Path(__file__).resolve().parents[1] / "core"
EMBEDDED_PACKAGE = "pipelines"  # the top-level package name inside the embedded archive
_FIXED_MTIME = 315532800  # 1980-01-01: staged files carry no checkout time


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock_file: Path = LOCK_FILE) -> dict[str, str]:
    """``{normalised name: version}`` from requirements.lock."""
    out = {}
    for line in lock_file.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;]+)", line)
        if m:
            out[_norm(m.group(1))] = m.group(2)
    return out


def _closure(dists: tuple[str, ...]) -> set[str]:
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [_norm(d) for d in dists]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for spec in reqs:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(_norm(req.name))
    return seen


def requirements(*dists: str) -> list[str]:
    """Exact pins for ``dists`` and everything they depend on, e.g. ``['joblib==1.6.0', ...]``."""
    locked = pins()
    missing = [d for d in dists if _norm(d) not in locked]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)} not pinned in {LOCK_FILE}: add to requirements.in and re-lock"
        )
    return sorted(f"{n}=={locked[n]}" for n in _closure(dists) if n in locked)


def core_closure(*modules: str) -> list[str]:
    """``modules`` of ``pipelines.core`` plus every core module they import (transitively, by AST)."""
    import ast

    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = CORE_DIR / f"{name}.py"
        if not path.is_file():
            raise ValueError(f"pipelines.core has no module {name!r}")
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pipelines.core":
                todo.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipelines.core."):
                todo.append(node.module.split(".")[2])
            elif isinstance(node, ast.Import):
                todo.extend(a.name.split(".")[2] for a in node.names if a.name.startswith("pipelines.core."))
    return sorted(seen)


def stage_core(*modules: str) -> tempfile.TemporaryDirectory:
    """A scratch tree ``pipelines/__init__.py`` + ``pipelines/core/`` for ``embedded_artifact_path``:
    the core modules named (and what they import), or all of them when none are named. Only ``.py``
    files, with a fixed mtime, so the archive depends on the code alone."""
    names = core_closure(*modules) if modules else sorted(p.stem for p in CORE_DIR.glob("*.py"))
    names = sorted(set(names) | {"__init__"})
    tmp = tempfile.TemporaryDirectory(prefix="mlrollout-core-")
    pkg = Path(tmp.name) / EMBEDDED_PACKAGE
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Embedded copy of mlrollout\'s pipeline core."""\n')
    for name in names:
        shutil.copyfile(CORE_DIR / f"{name}.py", pkg / "core" / f"{name}.py")
    for p in sorted(Path(tmp.name).rglob("*")):
        os.utime(p, (_FIXED_MTIME, _FIXED_MTIME))
    return tmp
