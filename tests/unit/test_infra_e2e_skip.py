"""The cluster e2e suite skips (or, under MLROLLOUT_E2E_REQUIRED=1, fails) with a reason that names what is
missing and how to get it: checked against stand-in kubectl binaries for each situation, and end to end by
running pytest on tests/e2e with a kubeconfig that has no cluster."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import cluster_unreachable_reason

ROOT = Path(__file__).resolve().parents[2]


def fake_kubectl(tmp_path: Path, body: str) -> str:
    path = tmp_path / "kubectl"
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize(
    ("body", "want"),
    [
        ('[ "$1" = config ] && exit 1\nexit 0\n', "no current kube context"),
        (
            '[ "$1" = config ] && { echo kind-mlrollout; exit 0; }\n'
            '[ "$1" = cluster-info ] && { echo "dial tcp 127.0.0.1:6443: connect: refused" >&2; exit 1; }\n'
            "exit 0\n",
            "no Kubernetes cluster reachable (context 'kind-mlrollout': dial tcp 127.0.0.1:6443",
        ),
        (
            '[ "$1" = config ] && { echo kind-mlrollout; exit 0; }\n'
            '[ "$1 $2 $3" = "get crd inferenceservices.serving.kserve.io" ] && exit 1\n'
            "exit 0\n",
            "is reachable but KServe is not installed",
        ),
        (
            '[ "$1 $2 $3" = "get crd workflows.argoproj.io" ] && exit 1\nexit 0\n',
            "Kubeflow Pipelines is not installed",
        ),
    ],
    ids=["no-context", "api-down", "no-kserve", "no-kfp"],
)
def test_reason_names_what_is_missing_and_make_cluster(tmp_path, body, want):
    reason = cluster_unreachable_reason(kubectl=fake_kubectl(tmp_path, body), timeout=10)
    assert reason is not None and want in reason, reason
    assert "make cluster" in reason and "\n" not in reason


def test_platform_present_means_no_skip(tmp_path):
    assert cluster_unreachable_reason(kubectl=fake_kubectl(tmp_path, "exit 0\n"), timeout=10) is None


def test_kubectl_hanging_is_bounded(tmp_path):
    reason = cluster_unreachable_reason(kubectl=fake_kubectl(tmp_path, "sleep 30\n"), timeout=1)
    assert reason is not None and "timed out" in reason


def test_e2e_suite_is_collected_and_skipped_with_the_reason(tmp_path):
    # (with MLROLLOUT_E2E_REQUIRED=1 the same reason errors every test instead: see conftest)
    required, word = "0", "skipped"
    kubeconfig = tmp_path / "empty-kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "MLROLLOUT_E2E_REQUIRED": required}

    def pytest(*args: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *args,
            "tests/e2e/test_platform.py",
        ]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    proc = pytest("-rsE")
    assert proc.returncode == (0 if required == "0" else 1), proc.stdout[-2000:]
    # every test the file has is skipped: the count from collecting it, not a number kept here
    co = pytest("--co")
    collected = sum(1 for line in co.stdout.splitlines() if "::" in line)
    assert collected >= 9, co.stdout[-2000:]
    assert f"{collected} {word}" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
    assert "no current kube context" in proc.stdout and "run `make cluster`" in proc.stdout
