"""The README's quick start, run as written: the block after ``<!-- quickstart -->`` is extracted and
executed by bash, and every answer is compared with the ``# ->`` line under its command.

Only step 1 (training, ~30 s of kfp.local) is not executed here: its flags are parsed by the real CLI
parser and a package of the same contract is built with the pipeline's own core functions
(``tests/modelfactory.py``); ``tests/integration/test_pipeline_local.py`` runs the training itself.
The ports are the README's own (8080, 8081): inside a fresh network namespace when the kernel allows
one (so a busy port on the machine cannot interfere), else directly when both are free, else skipped.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.modelfactory import build_package

REPO = Path(__file__).resolve().parents[2]
MARK = "<!-- quickstart -->"
EXPECT = "# -> "
TRAIN = ".venv/bin/python -m pipelines run"

pytestmark = pytest.mark.integration


def quickstart_lines(readme: str) -> list[str]:
    """The lines of the fenced block right after the marker."""
    after = readme.split(MARK, 1)[1].lstrip("\n")
    assert after.startswith("```bash\n"), "the quick-start marker must precede a ```bash block"
    return after.removeprefix("```bash\n").split("\n```", 1)[0].splitlines()


def steps(lines: list[str]) -> list[tuple[str, object]]:
    """(command, expected JSON answer or None) for every command line; comments are dropped."""
    out: list[tuple[str, object]] = []
    for line in lines:
        if line.startswith(EXPECT):
            assert out and out[-1][1] is None, f"an expectation with no command before it: {line}"
            out[-1] = (out[-1][0], json.loads(line.removeprefix(EXPECT)))
        elif line.strip() and not line.lstrip().startswith("#"):
            out.append((line, None))
    return out


def matches(expected: object, actual: object) -> bool:
    """Equal, where an expected ``"..."`` stands for any value (the README abbreviates long lists)."""
    if expected == "...":
        return True
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and expected.keys() == actual.keys()
            and all(matches(v, actual[k]) for k, v in expected.items())
        )
    return expected == actual


def test_matches_wildcards_values_not_keys():
    assert matches({"a": "...", "b": [1]}, {"a": [1, 2], "b": [1]})
    assert not matches({"a": "..."}, {"a": 1, "b": 2})
    assert not matches({"b": [1]}, {"b": [0]})


def _ports_free(*ports: int) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _netns_prefix() -> list[str] | None:
    """``unshare`` into a private network namespace (own loopback, no other process's ports), if allowed."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return None
    probe = ["unshare", "--user", "--map-root-user", "--net", "ip", "link", "set", "lo", "up"]
    if subprocess.run(probe, capture_output=True, timeout=10).returncode != 0:
        return None
    return [
        "unshare",
        "--user",
        "--map-root-user",
        "--net",
        "bash",
        "-c",
        'ip link set lo up && exec "$@"',
        "-",
    ]


def test_readme_quickstart_runs_as_written(tmp_path):
    plan = steps(quickstart_lines((REPO / "README.md").read_text()))
    assert plan and plan[-1][0] == "kill %1", "the quick start must end by stopping its server"

    # step 1: the README's flags are the CLI's; the package it would write is built the fast way
    (train,) = [cmd for cmd, _ in plan if cmd.startswith(TRAIN)]
    from pipelines.cli import _parser

    ns = _parser().parse_args(shlex.split(train)[3:])
    build_package(tmp_path / "models", version=ns.version)

    script = ["set -e", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for cmd, expected in plan:
        script.append(f": {shlex.quote(cmd)}" if cmd.startswith(TRAIN) else cmd)
        if expected is not None:
            script.append("printf '\\n'")  # one answer per line (curl adds no newline)
    (tmp_path / "quickstart.sh").write_text("\n".join(script) + "\n")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # the README's .venv/bin/python: this venv

    prefix = _netns_prefix()
    if prefix is None and not _ports_free(8080, 8081):
        pytest.skip("ports 8080/8081 are busy and no private network namespace is allowed here")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [*(prefix or []), "bash", "quickstart.sh"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, (
        f"quick start failed (rc {run.returncode}):\n{run.stdout}\n{run.stderr[-3000:]}"
    )
    answers = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    expected = [e for _, e in plan if e is not None]
    assert len(answers) == len(expected), run.stdout
    for want, got in zip(expected, answers, strict=True):
        assert matches(want, got), f"README says {want}, the server answered {got}"
