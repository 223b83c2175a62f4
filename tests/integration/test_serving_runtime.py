"""The ONNX runtime as users run it: ``python -m serving`` on 127.0.0.1, driven by real clients.

V1 REST (httpx), V2 REST (tritonclient.http, JSON and binary tensors), V2 gRPC (KServe's own
InferenceGRPCClient and protobuf stub). Predictions are compared with onnxruntime run in-process.

tritonclient.grpc is not used on purpose: its protobuf module registers the same ``inference.*``
symbols as KServe's, and both in one pytest process fail with "duplicate symbol".
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as thttp
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from serving.contract import modelcard, signals
from serving.runtime.client import RuntimeServer
from tests.modelfactory import breast_cancer

pytestmark = pytest.mark.integration

MAX_BATCH = 64
MAX_BODY = 64 * 1024
ARGS = ("--max_batch_size", str(MAX_BATCH), "--max_body_bytes", str(MAX_BODY))


@pytest.fixture(scope="module")
def data():
    X, _y, features, _ = breast_cancer()
    return X, features


@pytest.fixture(scope="module")
def reference(model_package):
    sess = ort.InferenceSession(str(modelcard.onnx_path(model_package)), providers=["CPUExecutionProvider"])

    def run(x):
        labels, proba = sess.run(["label", "probabilities"], {"input": np.asarray(x, dtype=np.float32)})
        return labels, proba

    return run


@pytest.fixture(scope="module")
def server(model_package):
    with RuntimeServer(model_package, args=ARGS) as srv:
        yield srv


def _v1(srv, body, **kw):
    return httpx.post(f"{srv.url}/v1/models/{srv.name}:predict", timeout=10, **kw, **_body(body))


def _v2(srv, body, **kw):
    return httpx.post(f"{srv.url}/v2/models/{srv.name}/infer", timeout=10, **kw, **_body(body))


def _body(body):
    return {"content": body} if isinstance(body, (bytes, str)) else {"json": body}


def _metric_samples(srv) -> list:
    return [s for fam in text_string_to_metric_families(srv.metrics_text()) for s in fam.samples]


def _value(samples, name, **labels) -> float:
    return sum(
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


# --- predictions equal in-process onnxruntime on every protocol ---


def test_v1_positional_and_named_match_onnxruntime(server, data, reference):
    srv = server
    X, features = data
    rows = X[:40]
    labels, proba = reference(rows)
    r = _v1(srv, {"instances": rows.tolist(), "parameters": {"probabilities": True}})
    assert r.status_code == 200, r.text
    assert r.headers["x-model-name"] == srv.name and r.headers["x-model-version"] == srv.version
    out = r.json()
    assert out["predictions"] == labels.tolist()
    np.testing.assert_allclose(out["probabilities"], proba, rtol=0, atol=1e-7)
    # named features, keys in a different order than the card's
    named = [dict(reversed(list(zip(features, row, strict=True)))) for row in rows[:5].tolist()]
    r = _v1(srv, {"instances": named})
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": labels[:5].tolist()}
    # the names behind the indices, when asked for
    r = _v1(srv, {"instances": rows[:5].tolist(), "parameters": {"class_names": True}})
    names = ["malignant", "benign"]  # sklearn's breast_cancer target_names: index 0, 1
    assert r.json()["class_names"] == [names[i] for i in labels[:5].tolist()]


def test_v2_rest_tritonclient_json_and_binary_match_onnxruntime(server, data, reference):
    X, _ = data
    rows = X[100:133]
    labels, proba = reference(rows)
    client = thttp.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        assert client.is_model_ready(server.name)
        meta = client.get_model_metadata(server.name)
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
        assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
            "label": ("INT64", [-1]),
            "probabilities": ("FP32", [-1, 2]),
        }
        assert meta["versions"] == [server.version]
        assert meta["parameters"]["class_names"] == ["malignant", "benign"]
        for binary in (False, True):
            inp = thttp.InferInput("input", list(rows.shape), "FP32")
            inp.set_data_from_numpy(rows, binary_data=binary)
            outs = [thttp.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities")]
            res = client.infer(server.name, [inp], outputs=outs, request_id="req-7")
            np.testing.assert_array_equal(res.as_numpy("label"), labels)
            np.testing.assert_allclose(res.as_numpy("probabilities"), proba, rtol=0, atol=1e-7)
            resp = res.get_response()
            assert resp["model_version"] == server.version and resp["id"] == "req-7"
        # FP64 input is accepted and cast; only the requested output comes back
        inp = thttp.InferInput("input", list(rows.shape), "FP64")
        inp.set_data_from_numpy(rows.astype(np.float64), binary_data=False)
        res = client.infer(
            server.name, [inp], outputs=[thttp.InferRequestedOutput("label", binary_data=False)]
        )
        np.testing.assert_array_equal(res.as_numpy("label"), labels)
        assert res.as_numpy("probabilities") is None
    finally:
        client.close()


def test_v2_grpc_kserve_client_matches_onnxruntime(server, data, reference):
    srv = server
    X, _ = data
    rows = X[200:217]
    labels, proba = reference(rows)

    async def call(binary: bool):
        async with InferenceGRPCClient(srv.grpc_target, timeout=10) as client:
            assert await client.is_model_ready(srv.name)
            inp = InferInput("input", list(rows.shape), "FP32")
            inp.set_data_from_numpy(rows, binary_data=binary)  # raw_input_contents or fp32_contents
            res = await client.infer(InferRequest(model_name=srv.name, infer_inputs=[inp], request_id="g1"))
            return res

    for binary in (True, False):
        res = asyncio.run(call(binary))
        outs = {o.name: o.as_numpy() for o in res.outputs}
        np.testing.assert_array_equal(outs["label"], labels)
        np.testing.assert_allclose(outs["probabilities"], proba, rtol=0, atol=1e-7)
        assert res.model_version == srv.version and res.id == "g1"
    with grpc.insecure_channel(srv.grpc_target) as channel:
        meta = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            pb.ModelMetadataRequest(name=srv.name), timeout=10
        )
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 30])]
    assert {t.name for t in meta.outputs} == {"label", "probabilities"}


def test_grpc_answers_carry_version_metadata_and_bad_input_is_invalid_argument(server, data):
    X, _ = data
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = pb.ModelInferRequest(model_name=server.name)
        t = req.inputs.add(name="input", datatype="FP32", shape=[1, 30])
        t.contents.fp32_contents.extend(X[0].tolist())
        _res, call = stub.ModelInfer.with_call(req, timeout=10)
        md = dict(call.initial_metadata())
        assert md["x-model-name"] == server.name and md["x-model-version"] == server.version

        bad = pb.ModelInferRequest(model_name=server.name)
        t = bad.inputs.add(name="input", datatype="FP32", shape=[2, 30])  # shape says 60 values, data has 30
        t.contents.fp32_contents.extend(X[0].tolist())
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "needs 60 values" in err.value.details()
        assert dict(err.value.initial_metadata())["x-model-version"] == server.version


# --- bad input: 4xx with a message naming the problem, never a 5xx ---

ROW = [1.0] * 30


def _v2_body(data=None, shape=None, datatype="FP32", name="input", **extra):
    data = ROW if data is None else data
    shape = [1, 30] if shape is None else shape
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}], **extra}


BAD_V1 = [
    ("wrong feature count", {"instances": [[1.0] * 29]}, 400, "wrong feature count: got 29"),
    ("unknown feature name", {"instances": [{"nope": 1}]}, 400, "unknown feature name(s): 'nope'"),
    ("missing feature name", {"instances": [{"mean radius": 1.0}]}, 400, "missing 29 feature(s)"),
    ("string value", {"instances": [["x", *ROW[1:]]]}, 400, "'x' (a string)"),
    ("null value", {"instances": [[None, *ROW[1:]]]}, 400, "is null"),
    ("boolean value", {"instances": [[True, *ROW[1:]]]}, 400, "booleans are not feature values"),
    ("float32 overflow", {"instances": [[1e39, *ROW[1:]]]}, 400, "not finite"),
    ("ragged rows", {"instances": [ROW, ROW[:3]]}, 400, "different lengths"),
    ("flat row", {"instances": ROW}, 400, "wrap it as [[...]]"),
    ("empty batch", {"instances": []}, 400, "empty batch"),
    ("batch over max", {"instances": [ROW] * (MAX_BATCH + 1)}, 400, f"maximum of {MAX_BATCH}"),
    ("no instances", {"rows": [ROW]}, 400, "no 'instances'"),
    ("not an object", [ROW], 400, "must be a JSON object"),
    ("bad parameters", {"instances": [ROW], "parameters": {"top_k": 3}}, 400, "unknown V1 parameter"),
    ("invalid JSON", b'{"instances": [[1, 2', 400, "not valid JSON"),
    ("NaN literal", b'{"instances": [[NaN' + b", 1.0" * 29 + b"]]}", 400, "not valid JSON"),
]

BAD_V2 = [
    ("shape does not match data", _v2_body(shape=[2, 30]), 400, "needs 60 values but 'data' holds 30"),
    ("wrong datatype", _v2_body(datatype="INT64", data=[1] * 30), 400, "wrong datatype 'INT64'"),
    ("unknown datatype", _v2_body(datatype="FLOAT"), 400, "wrong datatype 'FLOAT'"),
    ("wrong input name", _v2_body(name="x"), 400, "unknown input 'x'"),
    ("wrong feature count", _v2_body(data=[1.0] * 29, shape=[1, 29]), 400, "wrong feature count"),
    ("1-D shape", _v2_body(shape=[30]), 400, "must be [batch, 30]"),
    ("string in data", _v2_body(data=["a"] * 30), 400, "(a string)"),
    ("float32 overflow", _v2_body(data=[3.5e38] * 30), 400, "not finite"),
    ("empty batch", _v2_body(data=[], shape=[0, 30]), 400, "empty batch"),
    ("batch over max", _v2_body(data=ROW * (MAX_BATCH + 1), shape=[MAX_BATCH + 1, 30]), 400, "maximum of"),
    ("unknown output", _v2_body(outputs=[{"name": "scores"}]), 400, "unknown requested output 'scores'"),
    ("no inputs", {"inputs": []}, 400, "non-empty 'inputs'"),
    ("two inputs", {"inputs": [_v2_body()["inputs"][0]] * 2}, 400, "has 2 inputs"),
    ("binary header too big", b'{"inputs": []}', 400, "does not fit"),
]


@pytest.mark.parametrize(("case", "body", "status", "message"), BAD_V1, ids=[c[0] for c in BAD_V1])
def test_v1_bad_input(server, case, body, status, message):
    r = _v1(server, body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert r.headers["x-model-version"] == server.version


@pytest.mark.parametrize(("case", "body", "status", "message"), BAD_V2, ids=[c[0] for c in BAD_V2])
def test_v2_bad_input(server, case, body, status, message):
    headers = {"inference-header-content-length": "9999"} if case == "binary header too big" else {}
    r = _v2(server, body, headers=headers)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert r.headers["x-model-name"] == server.name


STOCK_CASES = [
    c
    for c in BAD_V2
    if c[0]
    in (
        "shape does not match data",
        "wrong datatype",
        "wrong input name",
        "float32 overflow",
        "empty batch",
        "batch over max",
        "unknown output",
        "string in data",
    )
]


@pytest.mark.parametrize(("case", "body", "status", "message"), STOCK_CASES, ids=[c[0] for c in STOCK_CASES])
def test_v2_bad_input_the_stock_handler_answered_500_is_400(server, case, body, status, message):
    """KServe's own handler turns numpy's ValueError (shape vs data) into a 500; the runtime answers 400."""
    r = _v2(server, body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert r.headers["x-model-version"] == server.version


def test_body_over_limit_is_refused_before_reading(server):
    big = b'{"instances": [' + b"[" + b"1.0," * (MAX_BODY // 4) + b"1.0]]}"
    r = _v1(server, big)  # Content-Length over the limit
    assert r.status_code == 413 and "--max_body_bytes" in r.json()["error"]
    assert r.headers["x-model-version"] == server.version

    def chunks():  # no Content-Length: chunked upload, refused once the stream passes the limit
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    r = httpx.post(f"{server.url}/v1/models/{server.name}:predict", content=chunks(), timeout=10)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    assert _v1(server, {"instances": [ROW]}).status_code == 200  # and the server is still fine


def test_unknown_model_is_404_with_headers(server):
    r = httpx.post(f"{server.url}/v1/models/other:predict", json={"instances": [ROW]}, timeout=10)
    assert r.status_code == 404
    assert r.headers["x-model-name"] == server.name


# --- metrics ---


def test_metrics_count_requests_scores_and_classes_per_version(server, data, reference):
    X, _ = data
    rows = X[300:310]
    labels, proba = reference(rows)
    before = _metric_samples(server)
    v = server.version
    assert _v1(server, {"instances": rows.tolist()}).status_code == 200
    assert _v1(server, {"instances": [[1.0] * 3]}).status_code == 400
    assert _v2(server, _v2_body(shape=[5, 30])).status_code == 400
    after = _metric_samples(server)

    def delta(name, **labels_):
        return _value(after, name, **labels_) - _value(before, name, **labels_)

    assert delta(signals.REQUESTS_TOTAL, version=v, protocol="v1", status="200") == 1
    assert delta(signals.REQUESTS_TOTAL, version=v, protocol="v1", status="400") == 1
    assert delta(signals.REQUESTS_TOTAL, version=v, protocol="v2", status="400") == 1
    assert delta(signals.REQUEST_DURATION_COUNT, version=v, protocol="v1") == 2
    assert delta(signals.PREDICTION_SCORE_COUNT, model=server.name, version=v) == 10
    # score = P(class 1): each row lands in the bucket of its probability
    expected_low = int((proba[:, 1] <= 0.05).sum())
    assert delta(signals.PREDICTION_SCORE_BUCKET, version=v, le="0.05") == expected_low
    for cls in (0, 1):
        assert delta(signals.PREDICTED_CLASS_TOTAL, version=v, **{"class": str(cls)}) == (labels == cls).sum()
    buckets = sorted(
        float(s.labels["le"])
        for s in after
        if s.name == signals.PREDICTION_SCORE_BUCKET and s.labels["le"] != "+Inf"
    )
    assert buckets == pytest.approx(list(signals.SCORE_BUCKETS))


# --- start-up refusals, faults, load, workers ---


def test_sha256_mismatch_refuses_to_start(model_package, tmp_path):
    broken = tmp_path / model_package.name
    shutil.copytree(model_package, broken)
    onnx = modelcard.onnx_path(broken)
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving",
            "--model_dir",
            str(tmp_path),
            "--host",
            "127.0.0.1",
            "--http_port",
            "0",
            "--grpc_port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "refusing to start" in errors[0] and "sha256 mismatch" in errors[0], (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_fault_knob_answers_500_on_every_protocol_with_version(model_package):
    env = {"MLROLLOUT_FAULT_ERROR_RATE": "1"}
    with RuntimeServer(model_package, env=env, args=["--enable_fault_injection"]) as srv:
        r = _v1(srv, {"instances": [ROW]})
        assert r.status_code == 500 and "injected fault" in r.json()["error"]
        assert r.headers["x-model-version"] == srv.version
        assert r.headers["x-fault-injection"] == "error_rate=1; latency_ms=0"
        assert _value(_metric_samples(srv), signals.FAULT_INJECTION, setting="error_rate") == 1.0
        assert _v2(srv, _v2_body()).status_code == 500
        assert _v1(srv, {"instances": [[1.0]]}).status_code == 400  # bad input is still bad input
        with grpc.insecure_channel(srv.grpc_target) as channel:
            req = pb.ModelInferRequest(model_name=srv.name)
            t = req.inputs.add(name="input", datatype="FP32", shape=[1, 30])
            t.contents.fp32_contents.extend(ROW)
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
            assert err.value.code() == grpc.StatusCode.INTERNAL
        samples = _metric_samples(srv)
        assert _value(samples, signals.REQUESTS_TOTAL, version=srv.version, status="500") == 2
        assert _value(samples, signals.REQUESTS_TOTAL, protocol="grpc-v2", status="INTERNAL") == 1
        assert srv.stop() == 0  # SIGTERM: a clean exit


@pytest.mark.slow
def test_32_concurrent_clients_for_20_seconds_see_no_failure(server, data, reference):
    X, _ = data
    rows = X[:32]
    labels, _ = reference(rows)
    v1_url = f"{server.url}/v1/models/{server.name}:predict"
    v2_url = f"{server.url}/v2/models/{server.name}/infer"
    failures: list[str] = []
    counts = [0]

    async def client(i: int, http: httpx.AsyncClient, until: float):
        row = rows[i].tolist()
        while asyncio.get_running_loop().time() < until:
            try:
                if i % 2:
                    r = await http.post(v1_url, json={"instances": [row]})
                    ok = r.status_code == 200 and r.json()["predictions"] == [int(labels[i])]
                else:
                    r = await http.post(v2_url, json=_v2_body(data=row))
                    ok = r.status_code == 200 and r.json()["outputs"][0]["data"] == [int(labels[i])]
                if not ok:
                    failures.append(f"client {i}: {r.status_code} {r.text[:200]}")
            except httpx.HTTPError as e:
                failures.append(f"client {i}: {type(e).__name__}: {e}")
            counts[0] += 1

    async def main():
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(timeout=10, limits=limits) as http:
            until = asyncio.get_running_loop().time() + 20
            await asyncio.gather(*(client(i, http, until) for i in range(32)))

    asyncio.run(main())
    assert not failures, failures[:5]
    assert counts[0] > 32


@pytest.mark.slow
def test_two_workers_share_one_metrics_view(model_package):
    with RuntimeServer(model_package, args=("--workers", "2"), ready_timeout=90) as srv:
        with httpx.Client(timeout=10) as http:  # new connections: spread over both worker processes
            answers = []
            for _ in range(30):
                r = http.post(
                    f"{srv.url}/v1/models/{srv.name}:predict",
                    json={"instances": [ROW]},
                    headers={"connection": "close"},
                )
                assert r.status_code == 200
                answers.append((r.headers["x-request-id"], r.headers["x-feedback-token"]))
            # one feedback key for all workers (made before they start): any worker verifies any token
            for rid, token in answers:
                r = http.post(
                    f"{srv.url}/v2/models/{srv.name}/feedback",
                    json={"feedback": [{"id": rid, "token": token, "label": 0}]},
                    headers={"connection": "close"},
                )
                assert r.status_code == 200 and r.json()["unknown"] == [], r.text
        samples = _metric_samples(srv)
        assert _value(samples, signals.REQUESTS_TOTAL, protocol="v1", status="200") == 30
        assert _value(samples, signals.PREDICTION_SCORE_COUNT) == 30
        assert _value(samples, signals.FEEDBACK_TOTAL) == 30


def test_every_protocol_gives_the_same_predictions(model_package, data, reference):
    X, _ = data
    rows = X[:3].tolist()
    labels, proba = reference(X[:3])
    features = modelcard.load_card(modelcard.find_package(model_package))["inputs"][0]["features"]
    with RuntimeServer(model_package) as srv:
        v1 = srv.predict_v1(rows, probabilities=True)
        v1_named = srv.predict_v1([dict(zip(features, rows[0], strict=True))])
        v2 = {o["name"]: o["data"] for o in srv.infer_v2(rows)["outputs"]}
        over_grpc = srv.infer_grpc(rows)
        bad = httpx.post(f"{srv.url}/v1/models/{srv.name}:predict", json={"instances": [rows[0][:-1]]})
    assert v1["predictions"] == labels.tolist() == v2["label"] == over_grpc["outputs"]["label"]
    np.testing.assert_allclose(np.reshape(over_grpc["outputs"]["probabilities"], (3, 2)), proba, atol=1e-7)
    assert v1_named["predictions"] == labels[:1].tolist()
    assert over_grpc["metadata"]["x-model-version"] == "1.0.0"
    assert bad.status_code == 400 and bad.json()["error"]


MALFORMED = [
    b"",
    b"\xff\xfe\x00garbage",
    b"null",
    b"42",
    b'"instances"',
    b"[" * 5000 + b"]" * 5000,
    b'{"instances": [[' + b"[" * 200 + b"]" * 200 + b"]]}",
    b'{"instances": [[1e400]]}',
    b'{"instances": [[' + b"9" * 400 + b"]]}",
    b'{"instances": {"a": 1}}',
    b'{"instances": [[{"a": 1}]]}',
    '{"instances": [["\u00e9\u4e2d"]]}'.encode(),
    b'{"inputs": [{"name": "input", "shape": [1e3, 30], "datatype": "FP32", "data": []}]}',
    b'{"inputs": [{"name": "input", "shape": [99999999999, 99999999999], "datatype": "FP32", "data": [1]}]}',
    b'{"inputs": [{"name": "input", "shape": null, "datatype": "FP32", "data": [1]}]}',
    b'{"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": "1,2,3"}]}',
    b'{"inputs": "x", "outputs": 3}',
    b'{"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [1], "parameters": 5}]}',
]


@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_bodies_get_a_4xx_never_a_5xx(server, body):
    for send in (_v1, _v2):
        r = send(server, body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (send.__name__, r.status_code, r.text[:300])
        assert r.json()["error"]
    assert _v1(server, {"instances": [ROW]}).status_code == 200


def test_a_stalled_upload_does_not_hold_up_other_clients(server):
    import socket

    path = f"/v1/models/{server.name}:predict"
    with socket.create_connection((server.host, server.http_port), timeout=10) as stalled:
        stalled.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n".encode()
            + b'{"instances": [[1.0, '
        )  # ... and never the rest
        for _ in range(5):
            assert _v1(server, {"instances": [ROW]}).status_code == 200
