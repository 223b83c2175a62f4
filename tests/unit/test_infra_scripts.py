"""The kind-platform scripts (infra/*.sh), checked with real tools and real bash.

- every script passes Debian's shellcheck (missing shellcheck fails the test, it never skips);
- `cluster-up.sh --dry-run` prints the whole ordered plan: cert-manager before KServe, Gateway API CRDs
  before Envoy Gateway, KFP cluster-scoped resources before env/platform-agnostic, waits with timeouts;
- without docker/kind, `cluster-up.sh` fails fast with ONE line naming what is missing and how to get it;
- the retry helper retries only known transient errors, bounded, and returns the command's exit code;
- a full non-dry run against recording stand-ins for kind/docker/kubectl/helm: an existing cluster is
  reused (idempotent), the KServe webhook race is retried until admission answers, and a failed wait
  stops the run with diagnostics.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SCRIPTS = sorted(INFRA.rglob("*.sh"))


def _bash(script: str, env: dict[str, str] | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def _plan(*args: str, env: dict[str, str] | None = None) -> list[str]:
    proc = subprocess.run(
        ["bash", str(INFRA / "cluster-up.sh"), "--dry-run", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]


def _index(plan: list[str], pattern: str) -> int:
    for i, line in enumerate(plan):
        if re.search(pattern, line):
            return i
    raise AssertionError(f"no plan line matches {pattern!r}:\n" + "\n".join(plan))


def test_there_are_scripts_to_check():
    names = {p.name for p in SCRIPTS}
    assert {"cluster-up.sh", "cluster-down.sh", "lib.sh"} <= names


def test_shellcheck_every_infra_script():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is not installed: run `make sysdeps` (Debian package shellcheck)"
    proc = subprocess.run(
        [shellcheck, "-x", "--severity=style", "--external-sources", *map(str, SCRIPTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_use_strict_mode(script):
    text = script.read_text()
    if script.name == "lib.sh":  # sourced, inherits the caller's options
        assert "set -" not in text.split("\n", 20)[-1]
        return
    assert re.search(r"^set -euo pipefail$", text, re.M), f"{script.name} lacks `set -euo pipefail`"


def test_dry_run_plan_is_ordered_and_waits_have_timeouts():
    plan = _plan()
    versions = dict(
        line.split("=", 1)
        for line in (INFRA / "versions.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    image = versions["MLROLLOUT_RUNTIME_IMAGE"] + ":" + versions["MLROLLOUT_VERSION"]
    order = [
        r"^kind create cluster .*--image " + re.escape(versions["KIND_NODE_IMAGE"]),
        r"^docker build -t " + re.escape(image),
        r"^kind load docker-image",
        rf"cert-manager/releases/download/{re.escape(versions['CERT_MANAGER_VERSION'])}/cert-manager\.yaml",
        r"-n cert-manager wait --for=condition=Available",
        rf"gateway-api/releases/download/{re.escape(versions['GATEWAY_API_VERSION'])}/standard-install\.yaml",
        r"wait --for=condition=Established .*crd/gateways\.gateway\.networking\.k8s\.io",
        r"helm upgrade --install eg oci://docker\.io/envoyproxy/gateway-helm --version "
        + re.escape(versions["ENVOY_GATEWAY_VERSION"]),
        r"render infra/manifests/gateway\.yaml",
        r"wait --for=condition=Programmed .*gateway/kserve-ingress-gateway",
        rf"kserve-crd --version v{re.escape(versions['KSERVE_VERSION'])}",
        rf"kserve-resources --version v{re.escape(versions['KSERVE_VERSION'])} .*kserve-values\.yaml",
        r"deployment/kserve-controller-manager",
        r"^wait_for .*KServe webhook",
        r"apply --dry-run=server -f .*kserve-webhook-probe\.yaml",
        r"render infra/manifests/storage-container\.yaml",
        r"apply -k .*/manifests/base/runtime$",
        rf"kustomize/cluster-scoped-resources\\?\?ref={re.escape(versions['KFP_VERSION'])}",
        r"wait --for=condition=Established .*crd/applications\.app\.k8s\.io",
        rf"kustomize/env/platform-agnostic\\?\?ref={re.escape(versions['KFP_VERSION'])}",
        r"-n kubeflow wait --for=condition=Available .*deployment/ml-pipeline ",
        r"render infra/manifests/prometheus\.yaml",
        r"render infra/manifests/model-namespace\.yaml",
        r"mlpipeline-minio-artifact -> models/kfp-s3-credentials",
    ]
    positions = [_index(plan, pat) for pat in order]
    assert positions == sorted(positions), list(zip(order, positions, strict=True))
    assert not any("env/dev" in line for line in plan), "KFP must use env/platform-agnostic, never env/dev"
    # every wait is bounded
    for line in plan:
        if re.search(r"\bwait\b|rollout status", line) and not line.startswith("wait_for"):
            assert re.search(r"--(timeout|wait)[= ]\d+s", line), f"unbounded wait: {line}"
        if line.startswith("helm upgrade"):
            assert "--wait" in line and re.search(r"--timeout \d+s", line), line
        if line.startswith("wait_for"):
            assert re.search(r"\(timeout \d+s\)", line), line
    # nothing is left unrendered
    assert not any("${" in line for line in plan)


def test_knative_profile_installs_knative_before_kserve():
    plan = _plan("--profile", "knative")
    knative_core = _index(plan, r"knative/serving/releases/download/knative-v[\d.]+/serving-core\.yaml")
    kourier = _index(plan, r"net-kourier/releases/download/knative-v[\d.]+/kourier\.yaml")
    kserve = _index(plan, r"kserve-resources")
    assert knative_core < kourier < kserve
    assert "kserve-values-knative.yaml" in plan[kserve]
    assert any("registries-skipping-tag-resolving" in line and "ghcr.io" in line for line in plan)
    default_plan = _plan()
    assert not any("knative" in line for line in default_plan)


def test_unknown_profile_is_one_clear_line():
    proc = _bash("bash infra/cluster-up.sh --dry-run --profile istio")
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0
    assert "unknown profile 'istio'" in proc.stderr and "knative" in proc.stderr


def _fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_preflight_without_kind_and_docker_fails_fast_in_one_line(tmp_path):
    proc = _bash(
        "bash infra/cluster-up.sh",
        env={"KIND": str(tmp_path / "no-kind"), "DOCKER": str(tmp_path / "no-docker")},
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("make cluster: missing docker, kind")
    assert "https://docs.docker.com/engine/install/" in lines[0] and "sigs.k8s.io/kind@v" in lines[0]


def test_preflight_reports_a_docker_cli_without_engine(tmp_path):
    docker = _fake_bin(tmp_path, "docker", 'echo "Cannot connect to the Docker daemon" >&2; exit 1\n')
    kind = _fake_bin(tmp_path, "kind", "exit 0\n")
    proc = _bash(
        "bash infra/cluster-up.sh --preflight-only",
        env={"KIND": str(kind), "DOCKER": str(docker)},
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "a running docker engine" in lines[0] and "Cannot connect" in lines[0]
    assert "kind" not in lines[0].split("->")[0].replace("docker info", "")


# --------------------------------------------------------------------------- retry / wait helpers

FLAKY = """
n=$(( $(cat "$COUNTER" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$COUNTER"
if [ "$n" -le "$FAILS" ]; then
  echo "Error from server (InternalError): Internal error occurred: failed calling webhook" \
       "\\"inferenceservice.kserve-webhook-server.validator\\":" \
       "dial tcp 10.96.1.2:443: connect: connection refused" >&2
  exit 1
fi
echo "inferenceservice.serving.kserve.io/probe created (server dry run)"
"""


@pytest.mark.parametrize(
    ("fails", "attempts", "want_rc", "want_calls"),
    [(0, 5, 0, 1), (2, 5, 0, 3), (4, 5, 0, 5), (5, 5, 1, 5), (9, 3, 1, 3)],
)
def test_retry_on_webhook_race(tmp_path, fails, attempts, want_rc, want_calls):
    flaky = _fake_bin(tmp_path, "flaky", FLAKY)
    counter = tmp_path / "count"
    proc = _bash(
        f". infra/lib.sh; retry {attempts} 0 {flaky}",
        env={"COUNTER": str(counter), "FAILS": str(fails)},
    )
    assert proc.returncode == want_rc, proc.stderr
    assert int(counter.read_text()) == want_calls
    if want_rc == 0:
        assert "created (server dry run)" in proc.stdout
    else:
        assert "giving up" in proc.stderr and "connection refused" in proc.stderr


def test_retry_does_not_retry_real_errors(tmp_path):
    bad = _fake_bin(
        tmp_path,
        "bad",
        'echo "$(( $(cat $COUNTER 2>/dev/null || echo 0) + 1 ))" > "$COUNTER"\n'
        "echo 'error: error parsing x.yaml: line 3: mapping values are not allowed' >&2; exit 7\n",
    )
    counter = tmp_path / "count"
    proc = _bash(f". infra/lib.sh; retry 5 0 {bad}", env={"COUNTER": str(counter)})
    assert proc.returncode == 7
    assert counter.read_text().strip() == "1"
    assert "not a known transient error" in proc.stderr


def test_wait_for_times_out_and_reports():
    proc = _bash(". infra/lib.sh; wait_for 'never ready' 1 false")
    assert proc.returncode == 1
    assert "timed out after 1s waiting for never ready" in proc.stderr
    ok = _bash(". infra/lib.sh; wait_for 'at once' 5 true")
    assert ok.returncode == 0 and re.search(r"ready: at once \(waited \d+s\)", ok.stderr)


def test_render_substitutes_versions_and_rejects_unknown_placeholders(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("image: ${PROMETHEUS_IMAGE}\nnamespace: ${MODEL_NAMESPACE}\n")
    proc = _bash(f". infra/lib.sh; render {good}", env={"MODEL_NAMESPACE": "team-a"})
    assert proc.returncode == 0, proc.stderr
    want = r"image: quay\.io/prometheus/prometheus:v\d+\.\d+\.\d+\nnamespace: team-a\n"
    assert re.fullmatch(want, proc.stdout)
    bad = tmp_path / "bad.yaml"
    bad.write_text("image: ${PROMETHEUS_IMAGEE}\n")
    proc = _bash(f". infra/lib.sh; render {bad}")
    assert proc.returncode != 0 and "unknown placeholder(s): ${PROMETHEUS_IMAGEE}" in proc.stderr


# --------------------------------------------------------------------------- full run on stand-ins

FAKE_CLI = r"""
echo "$(basename "$0") $*" >> "$FAKE_LOG"
case "$(basename "$0") $*" in
  "kind get clusters"*) echo mlrollout ;;
  "kind version"*) echo "kind v0.30.0 go1.24 linux/amd64" ;;
  "docker info"*) echo 28.0.0 ;;
  *"get secret mlpipeline-minio-artifact"*accesskey*) echo "$ACCESS_B64" ;;
  *"get secret mlpipeline-minio-artifact"*secretkey*) echo "$SECRET_B64" ;;
  *"get endpointslices"*) echo "true" ;;
  *"create secret generic"*) printf 'apiVersion: v1\nkind: Secret\nmetadata: {name: kfp-s3-credentials}\n' ;;
  *"apply --dry-run=server"*)
    n=$(( $(cat "$FAKE_DIR/webhook" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$FAKE_DIR/webhook"
    if [ "$n" -le 2 ]; then
      echo 'Error from server (InternalError): failed calling webhook' \
           '"inferenceservice.kserve-webhook-server.defaulter": connect: connection refused' >&2
      exit 1
    fi ;;
  *"apply -f -") cat >/dev/null ;;  # reads the manifest from stdin, like kubectl
  *"apply -f /"*)
    f="${!#}"; cp "$f" "$FAKE_DIR/applied-$(date +%s%N).yaml" ;;
  *"-n kubeflow wait"*)
    if [ -n "$FAIL_KFP_WAIT" ]; then
      echo "error: timed out waiting for the condition on deployments/ml-pipeline" >&2; exit 1
    fi ;;
esac
exit 0
"""


@pytest.fixture()
def stand_ins(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("kind", "docker", "kubectl", "helm"):
        _fake_bin(bindir, name, FAKE_CLI)
    log = tmp_path / "calls.log"
    env = {
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "KIND": str(bindir / "kind"),
        "DOCKER": str(bindir / "docker"),
        "KUBECTL": str(bindir / "kubectl"),
        "HELM": str(bindir / "helm"),
        "FAKE_LOG": str(log),
        "FAKE_DIR": str(tmp_path),
        "ACCESS_B64": base64.b64encode(b"minio").decode(),
        "SECRET_B64": base64.b64encode(b"minio123").decode(),
        "RETRY_DELAY_OVERRIDE": "0",
    }
    return tmp_path, env, log


def test_full_run_reuses_cluster_and_retries_the_webhook_race(stand_ins):
    tmp_path, env, log = stand_ins
    proc = _bash("bash infra/cluster-up.sh --skip-image", env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = log.read_text().splitlines()
    assert not any(c.startswith("kind create") for c in calls), "an existing cluster must be reused"
    assert "kubectl config use-context kind-mlrollout" in calls
    assert sum("apply --dry-run=server" in c for c in calls) == 3
    assert "succeeded on attempt 3/12" in proc.stderr
    # the storage secret got KServe's S3 annotations, path-style, no TLS
    annotate = next(c for c in calls if " annotate " in c)
    for want in (
        "serving.kserve.io/s3-endpoint=seaweedfs.kubeflow.svc.cluster.local:9000",
        "serving.kserve.io/s3-usehttps=0",
        "serving.kserve.io/s3-usevirtualbucket=0",
    ):
        assert want in annotate
    assert "--from-literal=AWS_ACCESS_KEY_ID=minio" in next(c for c in calls if "create secret generic" in c)
    applied = [p.read_text() for p in sorted(tmp_path.glob("applied-*.yaml"))]
    assert len(applied) == 4  # gateway, storage container, prometheus, model namespace
    assert all("${" not in text for text in applied)
    assert re.search(r"^timings", proc.stderr, re.M) is None  # step banner, not a bare line
    assert re.search(r"==> timings", proc.stderr) and "total " in proc.stderr
    assert "http://127.0.0.1:8080" in proc.stderr


def test_failed_wait_stops_the_run_with_diagnostics(stand_ins):
    _, env, log = stand_ins
    proc = _bash("bash infra/cluster-up.sh --skip-image", env={**env, "FAIL_KFP_WAIT": "1"}, timeout=120)
    assert proc.returncode != 0
    assert "step 'kfp' failed" in proc.stderr and "re-run 'make cluster' to resume" in proc.stderr
    calls = log.read_text().splitlines()
    assert any("get pods -A" in c for c in calls), "diagnostics must run on failure"
    assert not any("prometheus" in c for c in calls), "later steps must not run after a failure"


def test_cluster_down_is_idempotent(stand_ins):
    _, env, log = stand_ins
    plan = _bash("bash infra/cluster-down.sh --dry-run", env=env)
    assert plan.returncode == 0 and "+ " in plan.stdout and "delete cluster --name mlrollout" in plan.stdout
    gone = _bash("bash infra/cluster-down.sh", env={**env, "CLUSTER_NAME": "not-there"})
    assert gone.returncode == 0 and "nothing to do" in gone.stderr
    assert not any("delete" in c for c in log.read_text().splitlines())
    deleted = _bash("bash infra/cluster-down.sh", env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert "kind delete cluster --name mlrollout" in log.read_text().splitlines()
