"""The GitHub Actions workflows, checked offline with real tools.

- schema: check-jsonschema's vendored GitHub-workflow schema (no network at run time), which is shown
  to reject a broken workflow;
- every `run:` block passes shellcheck (as actionlint would run it);
- every action is pinned by a full 40-character commit SHA;
- ci runs `make test`; e2e-kind installs kind at KIND_VERSION from infra/versions.env, raises inotify
  limits, runs `make cluster` then `make e2e`, refuses to pass on skipped e2e tests and keeps diagnostics.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
CHECK_JSONSCHEMA = Path(sys.executable).with_name("check-jsonschema")


def _load(path: Path) -> dict:
    # PyYAML (YAML 1.1) reads the key `on` as True; map it back
    doc = yaml.safe_load(path.read_text())
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def _schema_check(*paths: Path) -> subprocess.CompletedProcess:
    assert CHECK_JSONSCHEMA.exists(), "check-jsonschema is not installed in the venv: run `make venv`"
    return subprocess.run(
        [str(CHECK_JSONSCHEMA), "--builtin-schema", "vendor.github-workflows", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_both_workflows_exist():
    assert {p.name for p in WORKFLOWS} >= {"ci.yaml", "e2e-kind.yaml"}


def test_workflows_match_the_github_schema(tmp_path):
    proc = _schema_check(*WORKFLOWS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "name: x\non: push\njobs:\n  a:\n    runs-on: ubuntu-24.04\n    step:\n      - run: true\n"
    )
    assert _schema_check(broken).returncode != 0, "the schema check must reject a job without steps"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_actions_are_pinned_by_commit_sha(path):
    uses = re.findall(r"uses:\s*([^\s#]+)", path.read_text())
    assert uses
    for ref in uses:
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref), f"{ref} is not pinned by full commit SHA"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_run_blocks_pass_shellcheck(path, tmp_path):
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed: run `make sysdeps`"
    doc = _load(path)
    n = 0
    for job_name, job in doc["jobs"].items():
        for i, step in enumerate(job["steps"]):
            if "run" not in step:
                continue
            # GitHub substitutes ${{ ... }} before the shell sees it
            body = re.sub(r"\$\{\{[^}]*\}\}", "EXPR", step["run"])
            script = tmp_path / f"{job_name}-{i}.sh"
            script.write_text("#!/usr/bin/env bash\nset -eo pipefail\n" + body)
            proc = subprocess.run(
                [shellcheck, "-s", "bash", str(script)], capture_output=True, text=True, timeout=60
            )
            assert proc.returncode == 0, f"{path.name} job {job_name} step {i}:\n{proc.stdout}"
            n += 1
    assert n >= 1


def test_ci_runs_make_test():
    doc = _load(ROOT / ".github" / "workflows" / "ci.yaml")
    runs = [s.get("run", "") for job in doc["jobs"].values() for s in job["steps"]]
    assert "make test" in runs
    assert "pull_request" in doc["on"]
    assert doc["permissions"] == {"contents": "read"}


def test_e2e_workflow_runs_the_cluster_suite_on_kind():
    doc = _load(ROOT / ".github" / "workflows" / "e2e-kind.yaml")
    (job,) = doc["jobs"].values()
    steps = job["steps"]
    runs = [s.get("run", "") for s in steps]

    def pos(pred) -> int:
        return next(i for i, s in enumerate(steps) if pred(s))

    read_versions = pos(
        lambda s: "infra/versions.env" in s.get("run", "") and "GITHUB_ENV" in s.get("run", "")
    )
    kind = pos(lambda s: s.get("uses", "").startswith("helm/kind-action@"))
    inotify = pos(lambda s: "fs.inotify.max_user_instances" in s.get("run", ""))
    cluster = pos(lambda s: s.get("run", "").startswith("make cluster"))
    e2e = pos(lambda s: s.get("run", "") == "make e2e")
    assert read_versions < kind < cluster < e2e and inotify < cluster
    assert steps[kind]["with"]["version"] == "${{ env.KIND_VERSION }}"
    assert (
        steps[kind]["with"]["install_only"] is True
    )  # `make cluster` creates the cluster with infra/kind-config
    assert job["env"]["MLROLLOUT_E2E_REQUIRED"] == "1"
    diag = [s for s in steps if s.get("if") == "failure()"]
    assert any(
        "kubectl get events" in s.get("run", "") and "describe inferenceservices" in s.get("run", "")
        for s in diag
    )
    assert any(s.get("uses", "").startswith("actions/upload-artifact@") for s in diag)
    assert job["timeout-minutes"] <= 90
    assert not any("kind create cluster" in r for r in runs)
