"""One real control plane per test session (infra/controlplane): etcd, kube-apiserver, controller-manager,
scheduler, kwok nodes and the KServe controller with its webhooks, installed as `make cluster` installs.

- Every test in this folder gets the `controlplane` marker.
- The binaries come from the cache `make controlplane-build` fills (`make test` runs it first). Without
  them, and without a Go toolchain or module proxy to build them, the tests skip with one line naming what
  is missing; with MLROLLOUT_CONTROLPLANE_REQUIRED=1 (.ci/run sets it) that line is a failure instead.
- MLROLLOUT_CONTROLPLANE_DIR=<state dir of a running `make controlplane`> reuses that one (fast local
  iteration); otherwise the session starts its own in a temporary folder and stops it, by PID, at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.controlplane.build import Builder, missing_prerequisite
from infra.controlplane.cluster import ControlPlane, Settings
from infra.controlplane.procs import ProcessError

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
CHART = ROOT / "helm" / "mlrollout-model"
NS = "models"
REQUIRED = os.environ.get("MLROLLOUT_CONTROLPLANE_REQUIRED") == "1"

_reason: list[str | None] = []


def _why_not() -> str | None:
    if not _reason:
        try:
            _reason.append(missing_prerequisite())
        except Exception as e:  # a broken toolchain is a reason too, not a crash at collection
            _reason.append(f"cannot check the Go toolchain: {e}")
    return _reason[0]


def pytest_collection_modifyitems(config, items):
    mine = [i for i in items if Path(str(i.fspath)).is_relative_to(HERE)]
    for item in mine:
        # on pytest-xdist workers all of them run on one worker (tests/conftest.py's scheduler)
        item.add_marker(pytest.mark.controlplane)
    if not mine or REQUIRED:
        return
    reason = _why_not()
    if reason:
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=f"no control plane: {reason} (see infra/README.md)"))


def pytest_runtest_setup(item):
    if REQUIRED and Path(str(item.fspath)).is_relative_to(HERE):
        reason = _why_not()
        if reason:
            pytest.fail(f"MLROLLOUT_CONTROLPLANE_REQUIRED=1 but {reason}", pytrace=False)


@pytest.fixture(scope="session")
def controlplane(tmp_path_factory) -> Iterator[ControlPlane]:
    reuse = os.environ.get("MLROLLOUT_CONTROLPLANE_DIR")
    if reuse and ControlPlane(Path(reuse)).procs.pids():
        yield ControlPlane(Path(reuse), Builder().cached())
        return
    builder = Builder()
    binaries = builder.cached() or builder.all()
    cp = ControlPlane(tmp_path_factory.mktemp("controlplane"), binaries)
    try:
        try:
            cp.up(Settings())
        except ProcessError as first:
            # one retry on a fresh folder and fresh ports; the first failure stays visible in the output
            warnings.warn(f"control plane bring-up failed once, retrying: {first}", stacklevel=1)
            cp = ControlPlane(tmp_path_factory.mktemp("controlplane"), binaries)
            cp.up(Settings())
        yield cp
    finally:
        cp.down()


class Kube:
    """kubectl and helm against the control plane, as one identity (admin unless a kubeconfig is given)."""

    def __init__(self, cp: ControlPlane, kubeconfig: Path | None = None):
        self.cp = cp
        self.env = {**cp.env(), "KUBECONFIG": str(kubeconfig or cp.kubeconfig)}
        tools = cp.tools()
        self.kubectl_bin, self.helm_bin = tools["kubectl"], tools["helm"]

    def run(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [self.kubectl_bin, *args],
            env=self.env,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}"
            )
        return proc

    def json(self, *args: str) -> dict[str, Any]:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def get(self, kind: str, name: str, ns: str = NS) -> dict[str, Any] | None:
        proc = self.run("-n", ns, "get", kind, name, "-o", "json", "--ignore-not-found")
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def items(self, kind: str, *selector: str, ns: str = NS) -> list[dict[str, Any]]:
        return self.json("-n", ns, "get", kind, *selector)["items"]

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [self.helm_bin, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}"
            )
        return proc

    def api(self):
        """A kubernetes-client CustomObjectsApi for this identity (the rollout code's own client)."""
        from kubernetes import client, config

        api_client = config.new_client_from_config(config_file=self.env["KUBECONFIG"])
        return client.CustomObjectsApi(api_client)

    def wait(self, what: str, probe, timeout_s: float = 60, every_s: float = 0.5):
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            last = probe()
            if last:
                return last
            time.sleep(every_s)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")

    def isvc_ready(self, name: str, ns: str = NS) -> bool:
        obj = self.get("inferenceservice", name, ns) or {}
        return any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in obj.get("status", {}).get("conditions", [])
        )


@pytest.fixture(scope="session")
def k(controlplane) -> Kube:
    return Kube(controlplane)


@pytest.fixture(scope="session")
def runner(controlplane) -> Kube:
    """kubectl/helm/kubernetes-client as `kubeflow/pipeline-runner`, with that account's own token."""
    return Kube(controlplane, controlplane.service_account_kubeconfig("kubeflow", "pipeline-runner"))
