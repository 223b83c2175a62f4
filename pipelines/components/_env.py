"""The step environment of every KFP component: base image, pinned packages, and the embedded code.

Pins come from one place, ``requirements.lock`` (the versions the tests ran with). A component
lists the distributions it imports; :func:`requirements` adds their dependency closure, pinned,
so a stock KFP cluster installs exactly the tested versions at step start-up.

The project's own code reaches the cluster inside the compiled YAML. :func:`component` is the one
way a component is declared: the project modules its function imports (``pipelines.*``,
``serving.*``), and every project module those import in turn (by AST, function-level imports
included, parent packages' ``__init__`` too: :func:`closure`), are copied by :func:`stage` into a
scratch tree that kfp's ``embedded_artifact_path`` tars into the component; at run time kfp
extracts it and puts it first on ``sys.path``, so ``from serving.batch import engine`` resolves to
the embedded copy. No list of modules is kept by hand.

Staging happens when a component is first *built* (compiling a pipeline, or running it with
``kfp.local``), not when its module is imported: :func:`component` and :func:`pipeline` return
deferred objects that build the kfp component / pipeline on first use, inside one
``with stage(...)`` whose scratch tree is gone as soon as kfp has archived it.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import os
import re
import shutil
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

BASE_IMAGE = "python:3.11-slim"
REPO_ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE = REPO_ROOT / "requirements.lock"
PROJECT_PACKAGES = ("pipelines", "serving")  # top-level packages whose modules are embedded
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


def _closure_of_dists(dists: tuple[str, ...]) -> set[str]:
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
    return sorted(f"{n}=={locked[n]}" for n in _closure_of_dists(dists) if n in locked)


# --------------------------------------------------------------------------- embedded code


def module_file(module: str, root: Path = REPO_ROOT) -> Path | None:
    """The source file of a project module (``a/b.py`` or ``a/b/__init__.py``), else None."""
    if module.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(source: str, module: str = "", is_package: bool = False) -> set[str]:
    """Project modules that ``source`` imports anywhere (module level or inside functions).

    ``from a.b import c`` counts ``a.b.c`` when that is a module, else ``a.b``; relative imports are
    resolved against ``module`` (the importing module's dotted name)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(p for p in [*parts, base] if p)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}"))
    return {m for m in found if module_file(m) is not None}


def closure(*modules: str) -> list[str]:
    """``modules`` plus every project module they import, transitively, plus the packages above
    each (their ``__init__`` runs on import, so it is embedded and followed too); sorted."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name)
        if path is None:
            raise ValueError(f"{name!r} is not a module of this project ({', '.join(PROJECT_PACKAGES)})")
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(imported_modules(path.read_text(), name, path.name == "__init__.py"))
    return sorted(seen)


def entry_modules(func: Callable[..., Any]) -> list[str]:
    """The project modules a component function itself imports (its entry points)."""
    return sorted(imported_modules(textwrap.dedent(inspect.getsource(func))))


@contextlib.contextmanager
def stage(*modules: str) -> Iterator[Path]:
    """A scratch tree holding :func:`closure` of ``modules`` (their ``.py`` files at their package
    paths, fixed mtimes, so kfp's archive depends on the code alone); removed on exit."""
    with tempfile.TemporaryDirectory(prefix="mlrollout-kfp-") as tmp:
        root = Path(tmp)
        for name in closure(*modules):
            src = module_file(name)
            dst = root / src.relative_to(REPO_ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        for p in sorted(root.rglob("*")):
            os.utime(p, (_FIXED_MTIME, _FIXED_MTIME))
        yield root


class _Deferred:
    """Builds a kfp object on first use and stands in for it (calls and attributes go to it)."""

    def build(self) -> Any:
        if self._built is None:
            self._built = self._build()
        return self._built

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.build()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.build(), name)


class Component(_Deferred):
    """A lightweight KFP component whose project code is staged when it is built, not imported."""

    def __init__(self, func: Callable[..., Any], packages: tuple[str, ...]):
        self.python_func, self.packages, self._built = func, packages, None
        self.__doc__, self.__name__ = func.__doc__, func.__name__

    @property
    def modules(self) -> list[str]:
        """Every project module the step embeds: the closure of what its function imports."""
        return closure(*entry_modules(self.python_func))

    def _build(self) -> Any:
        from kfp import dsl

        with stage(*entry_modules(self.python_func)) as tree:
            return dsl.component(
                self.python_func,
                base_image=BASE_IMAGE,
                packages_to_install=requirements(*self.packages),
                embedded_artifact_path=str(tree),
            )


def component(*packages: str) -> Callable[[Callable[..., Any]], Component]:
    """``@component("onnxruntime", ...)``: a hermetic step on :data:`BASE_IMAGE` that installs the
    pinned ``packages`` (and their dependencies) and embeds the project code its function imports.

    The function takes one ``dsl.EmbeddedInput[dsl.Dataset]`` parameter (the embedded tree, which
    kfp injects at run time; it is not part of the component's interface)."""
    return lambda func: Component(func, packages)


class Pipeline(_Deferred):
    """A ``dsl.pipeline`` built on first use: building it builds (and stages) its components."""

    def __init__(self, func: Callable[..., Any], **options: Any):
        self.python_func, self.options, self._built = func, options, None
        self.__doc__, self.__name__ = func.__doc__, func.__name__

    def _build(self) -> Any:
        from kfp import dsl

        return dsl.pipeline(self.python_func, **self.options)


def pipeline(**options: Any) -> Callable[[Callable[..., Any]], Pipeline]:
    """``@pipeline(name=..., description=...)``: ``dsl.pipeline`` with the same options, deferred."""
    return lambda func: Pipeline(func, **options)


def built(obj: Any) -> Any:
    """The kfp object behind a deferred component or pipeline (anything else is returned as is)."""
    return obj.build() if isinstance(obj, _Deferred) else obj
