"""The chart's `helm test` hook against the project's REAL runtime (python -m serving) on 127.0.0.1.

The predictor is started the way KServe starts it from the chart's InferenceService: the
ClusterServingRuntime's args (`--model_name=<InferenceService name>`, ...) followed by the
InferenceService's own `model.args` as the chart renders them. The hook Pod's own shell script (real sh and
curl) then sends its configured row to the rendered path. This proves the three pieces fit: the row fits
the default breast_cancer model, every track answers under `model.name`, and the script's checks pass.
"""

from __future__ import annotations

import shutil
import socket

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


@pytest.mark.parametrize(("runtime", "grpc"), [("mlrollout-onnx", True), ("mlrollout-onnx-knative", False)])
def test_runtime_args_serve_the_ports_the_runtime_declares(render, model_package, runtime, grpc):
    """Each ClusterServingRuntime's own args, run by the real runtime: mlrollout-onnx serves REST and gRPC;
    mlrollout-onnx-knative (one declared port, the only one Knative routes to) serves REST and opens no
    gRPC port. The port flags are replaced by free local ports; every other arg is the rendered one."""
    csr = next(
        o
        for o in kinds(render(CANARY, sets=("clusterServingRuntime.create=true",)), "ClusterServingRuntime")
        if o["metadata"]["name"] == runtime
    )
    (container,) = csr["spec"]["containers"]
    local = ("--model_dir=", "--http_port=", "--grpc_port=")
    args = [a.replace("{{.Name}}", f"{FULL}-stable") for a in container["args"] if not a.startswith(local)]
    declared = {p["containerPort"] for p in container["ports"]}
    assert declared == ({8080, 8081} if grpc else {8080})
    server = RuntimeServer(model_package, name="breast-cancer", args=[*args, "--model_name=breast-cancer"])
    with server:
        assert len(server.predict_v1([[0.0] * 30])["predictions"]) == 1
        with socket.socket() as sock:
            sock.settimeout(2)
            listening = sock.connect_ex((server.host, server.grpc_port)) == 0
        assert listening is grpc, f"gRPC port {server.grpc_port} listening={listening}:\n{server.log}"
