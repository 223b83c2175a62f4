"""serving/Dockerfile, read with the official BuildKit parser (the ``dockerfile`` wheel).

No Docker engine runs here, so the image is never built in this suite; these checks pin the
properties that matter (multi-stage, non-root numeric user, no compilers in the final stage,
read-only-root friendly, the right entry point, a digest-pinned base, hash-checked pip installs)
and that every file it copies exists. serving/requirements-runtime.lock (serving/lock_runtime.py
writes it) is checked against requirements.lock and against the dependency metadata installed here.
"""

from __future__ import annotations

import re
from pathlib import Path

import dockerfile
import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "serving" / "Dockerfile"
RUNTIME_LOCK = ROOT / "serving" / "requirements-runtime.lock"
# `pip freeze`, and so requirements.lock, leaves it out (serving/lock_runtime.py: NOT_IN_REQUIREMENTS_LOCK)
NOT_IN_REQUIREMENTS_LOCK = {"setuptools"}
COMPILERS = re.compile(r"\b(gcc|g\+\+|cc|clang|build-essential|make|cmake|rustc|cargo|python3?-dev)\b")


@pytest.fixture(scope="module")
def stages():
    cmds = dockerfile.parse_file(str(DOCKERFILE))
    result: list[list] = []
    for c in cmds:
        if c.cmd == "FROM":
            result.append([])
        if result:
            result[-1].append(c)
    return result


def _all(stage, cmd):
    return [c for c in stage if c.cmd == cmd]


def test_multi_stage_with_a_slim_final_base(stages):
    assert len(stages) >= 2
    final_from = stages[-1][0].value
    assert final_from[0] == "${PYTHON_IMAGE}"
    arg = next(c for c in dockerfile.parse_file(str(DOCKERFILE)) if c.cmd == "ARG")
    assert "slim" in arg.value[0]


def test_final_stage_is_non_root_and_has_no_compilers(stages):
    final = stages[-1]
    (user,) = _all(final, "USER")
    uid, _, gid = user.value[0].partition(":")
    assert uid.isdigit() and int(uid) >= 10000 and (not gid or gid.isdigit())
    for c in _all(final, "RUN"):
        assert not COMPILERS.search(" ".join(c.value)), c.original
    assert not any("apt-get" in " ".join(c.value) for c in _all(final, "RUN"))


def test_read_only_root_friendly(stages):
    final = stages[-1]
    env = {}
    for c in _all(final, "ENV"):
        env.update(zip(c.value[::2], c.value[1::2], strict=True))
    assert env["HOME"].startswith("/tmp") and env["TMPDIR"].startswith("/tmp")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert any("/tmp" in v for c in _all(final, "VOLUME") for v in c.value)
    build_runs = " ".join(" ".join(c.value) for s in stages[:-1] for c in _all(s, "RUN"))
    assert "compileall" in build_runs  # bytecode written at build time, not at run time


def test_entrypoint_healthcheck_and_ports(stages):
    final = stages[-1]
    env = {}
    for c in _all(final, "ENV"):
        env.update(zip(c.value[::2], c.value[1::2], strict=True))
    assert env["MLROLLOUT_HTTP_PORT"] == "8080"
    (entry,) = _all(final, "ENTRYPOINT")
    # exec form; /bin/sh only adds --http_port from the env, then execs the server with the CMD / args
    assert entry.json and list(entry.value[:2]) == ["/bin/sh", "-c"] and len(entry.value) == 4
    script = entry.value[2]
    assert script.startswith("exec python -m serving ") and script.endswith(' "$@"')
    assert '--http_port="${MLROLLOUT_HTTP_PORT:-8080}"' in script
    (health,) = _all(final, "HEALTHCHECK")
    assert health.json and health.value[:2] == ("CMD", "python")
    probe = " ".join(health.value)
    assert "/v2/health/ready" in probe  # 503 until the model is loaded: urlopen raises, the check fails
    assert "MLROLLOUT_HTTP_PORT" in probe and ":8080" not in probe
    ports = {p for c in _all(final, "EXPOSE") for p in c.value}
    assert {"8080", "8081"} <= ports


def test_base_image_is_pinned_by_digest(stages):
    args = [c for c in dockerfile.parse_file(str(DOCKERFILE)) if c.cmd == "ARG"]
    (image,) = [a.value[0].partition("=")[2] for a in args if a.value[0].startswith("PYTHON_IMAGE=")]
    assert re.fullmatch(r"python:3\.11\.7-slim-bookworm@sha256:[0-9a-f]{64}", image), image
    for stage in stages:
        base = stage[0].value[0]
        assert base == "${PYTHON_IMAGE}" or re.search(r"@sha256:[0-9a-f]{64}$", base), stage[0].original


def test_pip_installs_only_the_hashed_lock(stages):
    installs = [c for s in stages for c in _all(s, "RUN") if "pip install" in " ".join(c.value)]
    assert installs
    for c in installs:
        for command in " ".join(c.value).split("&&"):
            if "pip install" in command:
                assert "--require-hashes" in command and "--no-deps" in command, command
                assert "-r requirements-runtime.lock" in command, command
    build_runs = " ".join(" ".join(c.value) for s in stages[:-1] for c in _all(s, "RUN"))
    assert "pip check" in build_runs
    copied = [c.value for s in stages[:-1] for c in _all(s, "COPY")]
    assert any("serving/requirements-runtime.lock" in v[:-1] for v in copied)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements_lock() -> dict[str, str]:
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith(("#", "-e")):
            name, version = line.split("==", 1)
            lock[_normalize(name.split("[")[0])] = version.strip()
    return lock


def _runtime_lock() -> tuple[dict[str, tuple[str, list[str], list[str]]], str]:
    """{normalized name: (version, hashes, wheel file names)} and the header comment."""
    entries: dict[str, tuple[str, list[str], list[str]]] = {}
    header, wheels = [], []
    text = RUNTIME_LOCK.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("#   "):
            wheels = line[1:].split()
        elif line.startswith("#"):
            header.append(line)
        elif line.strip():
            requirement, *options = line.split()
            name, version = requirement.split("==", 1)
            assert all(o.startswith("--hash=") for o in options), line
            hashes = [o.removeprefix("--hash=") for o in options]
            assert _normalize(name) not in entries, f"{name} twice"
            entries[_normalize(name)] = (version, hashes, wheels)
            wheels = []
    return entries, " ".join(header)


def test_runtime_lock_pins_requirements_lock_versions_with_hashes():
    entries, header = _runtime_lock()
    lock = _requirements_lock()
    assert len(entries) > 20
    for name, (version, hashes, wheels) in entries.items():
        assert hashes, f"{name} has no --hash"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name
        if name not in NOT_IN_REQUIREMENTS_LOCK:
            assert lock.get(name) == version, f"{name}=={version}: requirements.lock has {lock.get(name)}"
        # one hash per wheel: the pure-Python one, or the cp311 manylinux x86_64 and aarch64 ones
        assert wheels and len(hashes) == len(wheels), name
        if not all(w.endswith("-none-any.whl") for w in wheels):
            assert any("x86_64" in w for w in wheels), name
            # a missing aarch64 wheel must be declared in the header (Apple Silicon builds stop there)
            assert any("aarch64" in w for w in wheels) or f"{name}=={version}" in header, name


def test_runtime_lock_holds_the_runtime_requirements_and_their_whole_closure():
    """What requirements-runtime.txt needs, transitively, per the metadata installed here (the same
    versions: the test venv is installed from requirements.lock), is exactly what the lock holds."""
    from importlib.metadata import PackageNotFoundError, distribution

    entries, _ = _runtime_lock()
    roots = []
    for line in (ROOT / "serving" / "requirements-runtime.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            roots.append(req)
            assert entries.get(_normalize(req.name), ("",))[0] in req.specifier, f"{line} not in the lock"
    needed: set[str] = set()
    todo = [(r.name, frozenset(r.extras)) for r in roots]
    seen = set()
    while todo:
        name, extras = todo.pop()
        if (_normalize(name), extras) in seen:
            continue
        seen.add((_normalize(name), extras))
        needed.add(_normalize(name))
        try:
            dist = distribution(name)
        except PackageNotFoundError:  # pragma: no cover - the test venv holds every locked package
            pytest.fail(f"{name} is not installed here: cannot follow its dependencies")
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in {"", *extras}):
                continue
            todo.append((req.name, frozenset(req.extras)))
    assert needed == set(entries), (
        f"missing from the lock: {sorted(needed - set(entries))}; not needed: {sorted(set(entries) - needed)}"
    )


def test_every_copied_source_exists_and_the_runtime_code_is_in_the_image(stages):
    copied = []
    for stage in stages:
        for c in _all(stage, "COPY"):
            if any(f.startswith("--from") for f in c.flags):
                continue
            *sources, _dest = c.value
            copied += sources
    for src in copied:
        assert (ROOT / src).exists(), f"COPY source {src} does not exist"
    # packages are copied as folders, not file by file
    assert "serving/contract/" in copied and "serving/runtime/" in copied
    # the operator (helm/mlrollout-operator runs `python -m serving.rollout operator` from this image)
    assert "serving/rollout/" in copied
    assert "serving/__main__.py" in copied and "serving/__init__.py" in copied
    folders = [src for src in copied if (ROOT / src).is_dir()]
    files = {src for src in copied if (ROOT / src).is_file()}
    # every project module the runtime imports (from serving/__main__.py and serving/runtime, followed
    # transitively, imports inside functions included) is in a copied folder or is a copied file
    for module, path in _project_imports(
        ROOT / "serving" / "__main__.py",
        *(ROOT / "serving" / "runtime").glob("*.py"),
        *(ROOT / "serving" / "rollout").rglob("*.py"),
    ).items():
        rel = path.relative_to(ROOT).as_posix()
        inside = rel in files or any(rel.startswith(f.rstrip("/") + "/") for f in folders)
        assert inside, f"the runtime imports {module} ({rel}), which the image does not copy"
        for parent in path.relative_to(ROOT).parents[:-1]:  # and its packages' __init__.py
            init = (parent / "__init__.py").as_posix()
            assert init in files or any(init.startswith(f.rstrip("/") + "/") for f in folders), init


_PROJECT = ("serving", "pipelines")


def _module_path(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _project_imports(*roots: Path) -> dict[str, Path]:
    """``{module: file}`` for every project module that ``roots`` import, transitively (by AST)."""
    import ast

    found: dict[str, Path] = {}
    todo = list(roots)
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.split(".")[0] not in _PROJECT:
                    continue
                target = _module_path(name)
                if target is None:  # a name defined in a module, not a module
                    continue
                found[name] = target
                todo.append(target)
    return found


def test_the_runtime_import_walk_sees_the_contract():
    """The check above follows real imports: the runtime's model loader needs serving.contract."""
    imports = _project_imports(ROOT / "serving" / "runtime" / "model.py")
    assert "serving.contract.modelcard" in imports and "serving.runtime.core" in imports
    assert not any(m.startswith("pipelines") for m in imports)


def test_runtime_requirements_match_the_lock():
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith(("#", "-e")):
            name, version = line.split("==", 1)
            lock[re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()] = version.strip()
    for line in (ROOT / "serving" / "requirements-runtime.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, version = line.split("==", 1)
        key = re.sub(r"[-_.]+", "-", name).lower()
        assert lock.get(key) == version.strip(), f"{name}=={version} differs from requirements.lock"
