"""The chart's `helm test` hook against the project's REAL runtime (python -m serving) on 127.0.0.1.

The predictor is started the way KServe starts it from the chart's InferenceService: the
ClusterServingRuntime's args (`--model_name=<InferenceService name>`, ...) followed by the
InferenceService's own `model.args` as the chart renders them. The hook Pod's own shell script (real sh and
curl) then sends its configured row to the rendered path. This proves the three pieces fit: the row fits
the default breast_cancer model, every track answers under `model.name`, and the script's checks pass.
"""

from __future__ import annotations

import shutil

import pytest

from serving.runtime.client import RuntimeServer
from tests.chart.test_chart import CANARY, FULL, kinds, one, run_hook_script

pytestmark = [
    pytest.mark.chart,
    pytest.mark.integration,
    pytest.mark.skipif(
        not shutil.which("curl"), reason="curl is not installed: the hook script cannot run here"
    ),
]


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_hook_gets_a_real_prediction_from_the_runtime(render, model_package, tmp_path, protocol):
    objs = render(CANARY, sets=(f"model.protocolVersion={protocol}",))
    stable = next(o for o in kinds(objs, "InferenceService") if o["metadata"]["name"] == f"{FULL}-stable")
    isvc_args = stable["spec"]["predictor"]["model"]["args"]
    assert isvc_args == ["--model_name=breast-cancer"]
    # RuntimeServer passes --model_name <name> first; then the runtime's {{.Name}} arg, then the chart's args
    server = RuntimeServer(
        model_package,
        name="breast-cancer",
        args=[f"--model_name={FULL}-stable", *isvc_args],
        ready_timeout=90,
    )
    with server:
        proc = run_hook_script(one(objs, "Pod"), server.url, tmp_path, attempts=3)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout
    assert ('"predictions"' if protocol == "v1" else '"outputs"') in proc.stdout
