"""serving/Dockerfile, read with the official BuildKit parser (the ``dockerfile`` wheel).

No Docker engine runs here, so the image is never built in this suite; these checks pin the
properties that matter (multi-stage, non-root numeric user, no compilers in the final stage,
read-only-root friendly, the right entry point) and that every file it copies exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import dockerfile
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "serving" / "Dockerfile"
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
    (entry,) = _all(final, "ENTRYPOINT")
    assert entry.json and list(entry.value) == ["python", "-m", "serving"]
    (health,) = _all(final, "HEALTHCHECK")
    assert "/v2/health/ready" in health.original
    ports = {p for c in _all(final, "EXPOSE") for p in c.value}
    assert {"8080", "8081"} <= ports


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
    assert "pipelines/core/modelcard.py" in copied  # the runtime imports pipelines.core.modelcard
    assert "serving/runtime/" in copied and "serving/__main__.py" in copied


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
