"""checkov (Kubernetes framework) over everything the chart and the overlays render.

checkov lives in its own venv, `.tools/checkov` (`bash infra/bootstrap-tools.sh .tools --checkov`, which
`make chart-test` runs), because its dependency tree clashes with the project's pinned .venv and its
install takes ~2 minutes, too long for every `make test`. Without it this test skips and says so.

checkov inspects Pods/workloads, RBAC, ServiceAccounts and NetworkPolicy coverage; it does not look
inside InferenceService or ClusterServingRuntime (see test_chart.py / test_manifests.py for those).
The operator chart (helm/mlrollout-operator, its ci/ values: the image pinned by digest) is scanned too.
The only skips are the four documented on each helm-test Pod (`checkov.io/skipN` annotations).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.chart.conftest import CHART, MANIFESTS, NAMESPACE, ROOT, versions_env

pytestmark = pytest.mark.chart

CHECKOV = ROOT / ".tools" / "checkov" / "bin" / "checkov"
ALLOWED_SKIPS = {"CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_15", "CKV_K8S_43"}
OPERATOR_CHART = ROOT / "helm" / "mlrollout-operator"
TEST_PODS = ("-test-predict", "-test-health")  # the two charts' helm test Pods


@pytest.mark.skipif(
    not CHECKOV.exists(),
    reason="checkov not installed: run `bash infra/bootstrap-tools.sh .tools --checkov` or `make chart-test`",
)
def test_checkov_finds_nothing(tools, tmp_path):
    out = tmp_path / "rendered"
    out.mkdir()
    for values in sorted((CHART / "ci").glob("*-values.yaml")):
        proc = tools.run(tools.helm, "template", "bc", CHART, "-n", NAMESPACE, "-f", values, check=True)
        (out / f"chart-{values.stem}.yaml").write_text(proc.stdout)
    for values in sorted((OPERATOR_CHART / "ci").glob("*-values.yaml")):
        args = ["template", "mlrollout-operator", OPERATOR_CHART, "-n", "mlrollout-system", "-f", values]
        proc = tools.run(tools.helm, *args, check=True)
        (out / f"operator-{values.stem}.yaml").write_text(proc.stdout)
    overlays = sorted(p for p in (MANIFESTS / "overlays").iterdir() if (p / "kustomization.yaml").exists())
    for overlay in overlays:
        proc = tools.run(tools.kubectl, "kustomize", overlay, check=True)
        (out / f"kustomize-{overlay.name}.yaml").write_text(proc.stdout)

    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "ERROR"}
    proc = subprocess.run(
        [str(CHECKOV), "-d", str(out), "--framework", "kubernetes", "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.stdout.strip(), proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["summary"]["checkov_version"] == versions_env()["CHECKOV_VERSION"]
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["resource_count"] >= 50
    failed = [(c["check_id"], c["resource"], c["file_path"]) for c in report["results"]["failed_checks"]]
    assert not failed, failed
    skipped = report["results"].get("skipped_checks", [])
    assert {c["check_id"] for c in skipped} <= ALLOWED_SKIPS
    assert all(c["resource"].startswith("Pod.") and c["resource"].endswith(TEST_PODS) for c in skipped)
