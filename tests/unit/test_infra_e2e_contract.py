"""The platform and the Helm chart fit together, checked offline with the real helm binary.

The e2e suite installs releases with `tests/e2e/helpers.chart_sets` and drives the rollout controller with
the names from `helpers.release_names`; here those exact values are rendered with `helm template` and the
result is checked against what `make cluster` provides: the Gateway the HTTPRoute attaches to, the
ClusterServingRuntime it selects, the storage Secret, the Prometheus and Envoy namespaces/labels the
chart's NetworkPolicy admits, and the SeaweedFS pods its egress reaches. Nothing here needs a cluster.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e import helpers

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "mlrollout-model"
URIS = {
    "v1": "s3://mlpipeline/v2/artifacts/p/r/t/u/package",
    "v2": "s3://mlpipeline/e2e/v2/m",
    "bad": "s3://b/m",
}
VERSIONS = {"v1": "1.0.0", "v2": "2.0.0", "bad": "2.0.1"}


def helm_bin() -> str:
    tools = ROOT / ".tools" / "bin" / "helm"
    assert tools.exists(), "helm is not bootstrapped: run `make tools`"
    return str(tools)


def render(release: str, strategy: str) -> list[dict]:
    if not CHART.exists():
        pytest.fail("helm/mlrollout-model is missing: the e2e suite installs it")
    args = [helm_bin(), "template", release, str(CHART), "-n", "models"]
    for s in helpers.chart_sets(release, strategy, URIS, VERSIONS):
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def platform_docs(name: str) -> list[dict]:
    out = subprocess.run(
        ["bash", "-c", f'. infra/lib.sh; render infra/manifests/{name}'],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_canary_release_has_the_names_the_controller_is_given():
    docs = render("bc-progressive", "canary")
    names = helpers.release_names("bc-progressive", "models")
    route = next(d for d in docs if d["kind"] == "HTTPRoute")
    assert route["metadata"]["name"] == names["route"]
    assert route["spec"]["hostnames"] == [names["host"]]
    refs = [r["name"] for r in route["spec"]["rules"][0]["backendRefs"]]
    assert refs == [names["stable_backend"], names["canary_backend"]]
    isvcs = {d["metadata"]["name"] for d in docs if d["kind"] == "InferenceService"}
    assert isvcs == {names["stable_isvc"], names["canary_isvc"]}
    # KServe names each predictor Service `<isvc>-predictor`: the backends point at them
    assert {f"{i}-predictor" for i in isvcs} == set(refs)


@pytest.mark.parametrize("strategy", ["canary", "blueGreen", "rolling"])
def test_release_fits_the_platform(strategy):
    docs = render(f"bc-{strategy.lower()}", strategy)
    gateway = next(d for d in platform_docs("gateway.yaml") if d["kind"] == "Gateway")
    route = next(d for d in docs if d["kind"] == "HTTPRoute")
    parent = route["spec"]["parentRefs"][0]
    assert (parent["name"], parent.get("namespace")) == (
        gateway["metadata"]["name"],
        gateway["metadata"]["namespace"],
    )
    # the route's hostname must not be one KServe would claim (KServe's own routes are off: kserve-values)
    kserve_values = yaml.safe_load((ROOT / "infra" / "kserve-values.yaml").read_text())
    assert kserve_values["kserve"]["controller"]["gateway"]["disableIngressCreation"] is True

    runtime = yaml.safe_load(
        (ROOT / "manifests" / "base" / "runtime" / "clusterservingruntime.yaml").read_text()
    )
    for isvc in (d for d in docs if d["kind"] == "InferenceService"):
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    # the model's own ServiceAccount (the one its pods run as)
    isvc = next(d for d in docs if d["kind"] == "InferenceService")
    isvc_sa = isvc["spec"]["predictor"]["serviceAccountName"]
    sa = next(d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == isvc_sa)
    assert {"name": "kfp-s3-credentials"} in sa.get("secrets", []), "the Secret `make cluster` creates"

    policy = next(
        d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == route["metadata"]["name"]
    )
    prom = next(d for d in platform_docs("prometheus.yaml") if d["kind"] == "Deployment")
    prom_labels = prom["spec"]["template"]["metadata"]["labels"]
    sources = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]

    def admits(ns: str, labels: dict[str, str]) -> bool:
        for peer in sources:
            ns_sel = peer.get("namespaceSelector", {}).get("matchLabels")
            pod_sel = peer.get("podSelector", {}).get("matchLabels", {})
            if ns_sel == {"kubernetes.io/metadata.name": ns} and pod_sel.items() <= labels.items():
                return True
        return False

    assert admits(prom["metadata"]["namespace"], prom_labels), "chart NetworkPolicy must admit our Prometheus"
    assert admits("envoy-gateway-system", {"app.kubernetes.io/component": "proxy"}), "and the Envoy proxies"
    egress = [peer for rule in policy["spec"]["egress"] for peer in rule["to"]]
    assert any(
        p.get("namespaceSelector", {}).get("matchLabels") == {"kubernetes.io/metadata.name": "kubeflow"}
        and p.get("podSelector", {}).get("matchLabels") == {"app": "seaweedfs"}
        for p in egress
    ), "the storage-initializer must reach KFP's SeaweedFS (our kubeflow-side policy opens 8333 to `models`)"
