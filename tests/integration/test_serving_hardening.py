"""The runtime under hostile input, abuse and faults: one test per reproduction of hardening.md.

Every server listens on 127.0.0.1 on a free port and is stopped by its PID at the end of its test or
module; every loop here is bounded in count and time.

- S1: the model-repository extension is off on REST and gRPC; readiness follows the model.
- S2 / area 1: client-caused requests are 4xx (datatype of the wrong JSON type, other versions and verbs,
  wrong methods, undecodable gRPC bytes, huge shapes echoed), other models' requests are not counted as
  this version's, and generated junk mixed into valid traffic leaves the success-rate gate passing.
- S3 / S4 / area 2: header size and count (431), header deadline and idle connections (408), a declared
  body that never starts (408), a connection cap that keeps serving while idle sockets pile up, and a
  memory budget for concurrent uploads (503 over it).
- Area 3: `--workers 2` leaves no orphan when the server is killed; a taken gRPC or HTTP port is one line.
- Area 4 / S7: a model card that disagrees with its graph, or carries unusable names, stops the server.
- S5: fault injection only with its flag; S11: no Host-header redirect.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from serving.contract import signals
from serving.rollout.gates import SuccessRateGate, Verdict
from serving.rollout.metrics import ScrapeProvider, Target
from serving.runtime.client import RuntimeServer, free_port

pytestmark = pytest.mark.integration

ROW = [1.0] * 30
ROOT = Path(__file__).resolve().parents[2]


def v2(name: str = "input", datatype="FP32", shape=(1, 30), data=ROW) -> dict:
    return {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}]}


@pytest.fixture(scope="module")
def server(model_package):
    with RuntimeServer(model_package, args=["--header_timeout", "2", "--body_timeout", "2"]) as srv:
        yield srv


def requests_by_status(srv) -> dict[str, float]:
    snap = ScrapeProvider().snapshot(Target(srv.name, srv.version, f"{srv.url}/metrics"))
    return dict(snap.requests)


# --------------------------------------------------------------------------- S1: no load/unload


def test_no_client_can_unload_or_load_the_model(server):
    for path in (
        f"/v2/repository/models/{server.name}/unload",
        f"/v2/repository/models/{server.name}/load",
        "/v2/repository/index",
    ):
        r = httpx.post(server.url + path, timeout=10)
        assert r.status_code == 404 and "repository API is disabled" in r.json()["error"], path
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for call, req in (
            (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=server.name)),
            (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=server.name)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call(req, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # the model is still there on every protocol
    assert httpx.get(f"{server.url}/v2/models/{server.name}/ready", timeout=10).status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready", timeout=10).json() == {"ready": True}
    assert server.predict_v1([ROW])["predictions"]
    big = [ROW] * 100  # a batch of more than 64 rows runs in the thread pool, which unload used to shut down
    assert len(server.predict_v1(big)["predictions"]) == 100


# --------------------------------------------------------------------------- S2: client errors are 4xx


@pytest.mark.parametrize("datatype", [[], {}, ["FP32"], 5, None])
def test_a_datatype_of_the_wrong_json_type_is_400(server, datatype):
    r = httpx.post(f"{server.url}/v2/models/{server.name}/infer", json=v2(datatype=datatype), timeout=10)
    assert r.status_code == 400 and "'datatype' of input 'input' must be a string" in r.json()["error"], (
        r.text
    )


def test_versions_verbs_and_methods_are_4xx_and_only_this_version_counts(server):
    before = requests_by_status(server)
    body = v2()
    own = httpx.post(
        f"{server.url}/v2/models/{server.name}/versions/{server.version}/infer", json=body, timeout=10
    )
    assert own.status_code == 200
    other = httpx.post(f"{server.url}/v2/models/{server.name}/versions/9.9.9/infer", json=body, timeout=10)
    assert other.status_code == 404 and "has no version '9.9.9'" in other.json()["error"]
    explain = httpx.post(
        f"{server.url}/v1/models/{server.name}:explain", json={"instances": [ROW]}, timeout=10
    )
    assert explain.status_code == 404
    for method in ("PUT", "PATCH", "GET", "DELETE"):
        r = httpx.request(method, f"{server.url}/v2/models/{server.name}/infer", json=body, timeout=10)
        assert r.status_code == 405 and r.headers["allow"] == "POST", (method, r.status_code)
    stranger = httpx.post(f"{server.url}/v2/models/someone-else/infer", json=body, timeout=10)
    assert stranger.status_code == 404
    after = requests_by_status(server)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    assert delta.get("200") == 1, delta
    assert delta.get("405") == 4, delta  # a wrong method on this model's path is this model's client error
    assert not any(k.startswith("5") for k, v in delta.items() if v), delta
    assert sum(delta.values()) == 5, f"other versions and other models must not be counted here: {delta}"


def _raw_grpc(target: str, payload: bytes):
    with grpc.insecure_channel(target) as ch:
        call = ch.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as err:
            call(payload, timeout=10)
        return err.value


@pytest.mark.parametrize("payload", [b"\x0a\x7fabc", b"\xff" * 40, b"\x0a\x05hello\x12", bytes(range(256))])
def test_undecodable_grpc_bytes_are_invalid_argument(server, payload):
    err = _raw_grpc(server.grpc_target, payload)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "not a valid inference.ModelInferRequest" in err.details()


def test_a_huge_shape_is_invalid_argument_with_a_bounded_message(server):
    req = pb.ModelInferRequest(model_name=server.name)
    req.inputs.add(name="input", datatype="FP32", shape=[1] * 10_000)
    with grpc.insecure_channel(server.grpc_target) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.code()
    assert len(err.value.details()) <= 1000


def test_grpc_for_another_version_is_not_found(server):
    req = pb.ModelInferRequest(model_name=server.name, model_version="9.9.9")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 30]).contents.fp32_contents.extend(ROW)
    with grpc.insecure_channel(server.grpc_target) as ch, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# junk a client can send: random JSON of every shape, wrong paths of this model, wrong methods
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
V2_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "name": JSON | st.just("input"),
        "shape": JSON | st.lists(st.integers(-3, 10**6), max_size=4),
        "datatype": JSON | st.sampled_from(["FP32", "FP64", "INT64", "BOOL", "BYTES", ""]),
        "data": JSON | st.lists(st.floats(), max_size=40),
        "parameters": JSON,
    },
)
JUNK = st.one_of(
    st.tuples(st.just("POST"), st.just("v2"), st.builds(lambda i: {"inputs": [i]}, V2_FIELDS)),
    st.tuples(st.just("POST"), st.just("v2"), JSON),
    st.tuples(st.just("POST"), st.just("v1"), st.builds(lambda x: {"instances": x}, JSON)),
    st.tuples(st.just("POST"), st.just("v1"), JSON),
    st.tuples(st.sampled_from(["PUT", "PATCH", "GET", "DELETE"]), st.sampled_from(["v1", "v2"]), JSON),
    st.tuples(st.just("POST"), st.sampled_from(["versioned", "explain", "other-model"]), JSON),
    st.tuples(st.just("POST"), st.sampled_from(["v1", "v2"]), st.binary(max_size=200)),
)


def test_generated_junk_mixed_into_valid_traffic_leaves_the_success_rate_gate_passing(server):
    """hardening.md S2: 16 junk requests in 1,016 failed the gate (0.9843 < 0.99) and two such windows rolled
    a healthy canary back. Now no junk request is a 5xx, so the gate passes on the very same window."""
    paths = {
        "v1": f"/v1/models/{server.name}:predict",
        "v2": f"/v2/models/{server.name}/infer",
        "versioned": f"/v2/models/{server.name}/versions/0/infer",
        "explain": f"/v1/models/{server.name}:explain",
        "other-model": "/v2/models/other/infer",
    }
    before = ScrapeProvider().snapshot(Target(server.name, server.version, f"{server.url}/metrics"))
    sent = {"junk": 0, "valid": 0}
    with httpx.Client(timeout=10) as client:

        @settings(
            max_examples=400,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(junk=JUNK)
        def send(junk):
            method, kind, body = junk
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = client.request(
                method,
                server.url + paths[kind],
                content=content,
                headers={"content-type": "application/json"},
            )
            assert r.status_code < 500, (method, kind, body, r.status_code, r.text[:300])
            sent["junk"] += 1
            for _ in range(3):  # valid traffic around it
                assert client.post(server.url + paths["v1"], json={"instances": [ROW]}).status_code == 200
                sent["valid"] += 1

        send()
    after = ScrapeProvider().snapshot(Target(server.name, server.version, f"{server.url}/metrics"))
    window = after - before
    result = SuccessRateGate(0.99, 20).evaluate(window, window, window)
    assert result.verdict is Verdict.PASS, (result.summary(), window.requests)
    assert result.value == 1.0 and sent["junk"] >= 300


# --------------------------------------------------------------------------- S3/S4: limits


def _raw_http(srv, data: bytes, read_timeout: float = 10.0) -> bytes:
    with socket.create_connection((srv.host, srv.http_port), timeout=read_timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_oversized_headers_are_431_and_the_server_stays_responsive(server):
    start = time.monotonic()
    big = b"x-big: " + b"a" * (1 << 20) + b"\r\n"  # 1 MiB: refused after at most the limit is buffered
    answer = _raw_http(server, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(200))
    answer = _raw_http(server, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ") and b"more than 100 request headers" in answer, answer[:200]
    assert time.monotonic() - start < 5
    assert server.predict_v1([ROW])["predictions"]


def test_slow_headers_and_idle_connections_are_closed_at_the_header_deadline(server):
    start = time.monotonic()
    with (
        socket.create_connection((server.host, server.http_port), timeout=10) as idle,
        socket.create_connection((server.host, server.http_port), timeout=10) as slow,
    ):
        slow.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        slow.sendall(b"x-a: 1\r\n")  # ... and never the end of the headers
        assert idle.recv(1000).startswith(b"HTTP/1.1 408 ")
        assert slow.recv(1000).startswith(b"HTTP/1.1 408 ")
    assert 1.5 < time.monotonic() - start < 6  # the server runs with --header_timeout 2


def test_the_header_deadline_holds_on_a_kept_alive_connection(server):
    """The deadline is armed only when a read leaves headers incomplete (no timer per whole request): a
    request that trickles in after a served one, or arrives half-way behind a pipelined one, still meets
    it, and trickling a byte every 0.4 s does not extend it."""
    whole = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    for first, rest in ((whole, b"GET /v2/health/live HTTP/1.1\r\n"), (whole + b"GET /v2/he", b"")):
        start = time.monotonic()
        with socket.create_connection((server.host, server.http_port), timeout=10) as sock:
            sock.sendall(first)
            got = b""
            while b"\r\n\r\n" not in got:
                got += sock.recv(1000)
            assert got.startswith(b"HTTP/1.1 200 "), got[:200]
            sock.sendall(rest)
            sock.settimeout(0.4)
            answer = b""
            while time.monotonic() - start < 8 and b"HTTP/1.1 408 " not in answer:
                try:
                    sock.send(b"x")  # one more header byte, never the end of the headers
                    answer += sock.recv(1000)
                except TimeoutError:
                    continue
                except OSError:
                    break
            assert b"HTTP/1.1 408 " in answer, (first, answer[:300])
        assert time.monotonic() - start < 5  # --header_timeout 2, not extended by the trickle


def test_a_declared_body_that_never_starts_is_408(server):
    start = time.monotonic()
    answer = _raw_http(
        server,
        f"POST /v1/models/{server.name}:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert 1.5 < time.monotonic() - start < 6  # --body_timeout 2


def test_idle_sockets_cannot_lock_out_a_client(model_package):
    """1,100 idle sockets on a server with 1,024 file descriptors were an outage (area 2 #5). With a cap of
    20 connections and 60 idle sockets held open, a client arriving later is still served: the oldest idle
    connection is dropped for it."""
    with RuntimeServer(model_package, args=["--max_connections", "20", "--header_timeout", "30"]) as srv:
        idle = []
        try:
            for _ in range(60):
                idle.append(socket.create_connection((srv.host, srv.http_port), timeout=5))
            time.sleep(0.5)
            ok = 0
            for _ in range(10):
                r = httpx.post(
                    f"{srv.url}/v1/models/{srv.name}:predict", json={"instances": [ROW]}, timeout=5
                )
                ok += r.status_code == 200
            assert ok == 10
            fds = len(os.listdir(f"/proc/{srv.proc.pid}/fd"))
            assert fds < 20 + 60, f"{fds} open fds: the cap did not hold"
        finally:
            for s in idle:
                s.close()


def test_concurrent_uploads_are_bounded_in_memory(model_package):
    """110 uploads of 8 MiB - 1 KiB holding back their last byte took RSS past the chart's 1 GiB (area 2 #11).
    Scaled down: 1 MiB bodies, an 8 MiB in-flight budget, 30 withheld uploads: the budget holds, the rest get
    503 at once, RSS stays bounded, and a normal request is served meanwhile."""
    args = [
        "--max_body_bytes",
        str(1 << 20),
        "--max_inflight_body_bytes",
        str(8 << 20),
        "--body_timeout",
        "20",
    ]
    with RuntimeServer(model_package, args=args) as srv:
        rss0 = _rss_kb(srv.proc.pid)
        head = f"POST /v1/models/{srv.name}:predict HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 20}\r\n\r\n"
        conns, refused = [], 0
        try:
            for _ in range(30):
                s = socket.create_connection((srv.host, srv.http_port), timeout=5)
                s.sendall(head.encode() + b"a" * ((1 << 20) - 1024))
                conns.append(s)
            time.sleep(1.0)
            for s in conns:
                s.settimeout(0.2)
                with contextlib.suppress(TimeoutError, BlockingIOError):
                    refused += s.recv(100).startswith(b"HTTP/1.1 503 ")
            assert 20 <= refused <= 23, refused  # 8 MiB / 1 MiB bodies fit (give or take the first receive)
            assert (
                httpx.post(
                    f"{srv.url}/v1/models/{srv.name}:predict", json={"instances": [ROW]}, timeout=5
                ).status_code
                == 200
            )
            assert _rss_kb(srv.proc.pid) - rss0 < 64 * 1024, "RSS grew by more than the budget allows"
        finally:
            for s in conns:
                s.close()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --------------------------------------------------------------------------- area 3: processes and ports


def test_killed_multi_worker_server_leaves_no_orphans(model_package):
    port = free_port("127.0.0.1")
    cmd = [sys.executable, "-m", "serving", "--model_dir", str(model_package), "--host", "127.0.0.1"]
    cmd += ["--http_port", str(port), "--grpc_port", str(free_port("127.0.0.1")), "--workers", "2"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        _wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", 60)
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers
        os.kill(proc.pid, signal.SIGKILL)  # the parent only: its workers must follow
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(
            Path(f"/proc/{w}").exists() and _state(w) != "Z" for w in workers
        ):
            time.sleep(0.2)
        alive = [w for w in workers if Path(f"/proc/{w}").exists() and _state(w) != "Z"]
        assert not alive, f"orphan workers still running: {alive}"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def _wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready")


@pytest.mark.parametrize("which", ["--grpc_port", "--http_port"])
def test_a_taken_port_is_one_line_naming_the_flag(server, model_package, which):
    taken = server.grpc_port if which == "--grpc_port" else server.http_port
    ports = {"--http_port": free_port("127.0.0.1"), "--grpc_port": free_port("127.0.0.1"), which: taken}
    cmd = [sys.executable, "-m", "serving", "--model_dir", str(model_package), "--host", "127.0.0.1"]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {which} {taken} on 127.0.0.1 is not free"), (
        proc.stderr
    )


# --------------------------------------------------------------------------- area 4: the model card


def _mutated(model_package: Path, tmp_path: Path, change) -> Path:
    pkg = tmp_path / model_package.name
    shutil.copytree(model_package, pkg)
    card = json.loads((pkg / "model-card.json").read_text())
    change(card)
    (pkg / "model-card.json").write_text(json.dumps(card))
    return pkg


def _out(card, output, **kv):
    for o in card["outputs"]:
        if o["name"] == output:
            o.update(kv)


CARD_MUTATIONS = {
    "CR/LF in the name": lambda c: c.update(name="bc\r\nx-injected: 1"),
    "CR/LF in the version": lambda c: c.update(version="1.0.0\r\nx: 1"),
    "an output renamed": lambda c: _out(c, "probabilities", name="scores"),
    "no outputs": lambda c: c.update(outputs=[]),
    "input datatype INT64": lambda c: c["inputs"][0].update(datatype="INT64"),
    "3 classes for a 2-class graph": lambda c: c.update(classes=[0, 1, 2]),
    "a name with a space": lambda c: c.update(name="Breast Cancer"),
    "a path as the name": lambda c: c.update(name="../../etc"),
    "a 500-character name": lambda c: c.update(name="a" * 500),
    "version latest": lambda c: c.update(version="latest"),
    "version 1.0": lambda c: c.update(version="1.0"),
    "output datatype wrong": lambda c: _out(c, "label", datatype="FP32"),
}


@pytest.mark.parametrize("case", CARD_MUTATIONS, ids=list(CARD_MUTATIONS))
def test_a_card_that_disagrees_with_its_graph_stops_the_server(model_package, tmp_path, case):
    pkg = _mutated(model_package, tmp_path, CARD_MUTATIONS[case])
    cmd = [sys.executable, "-m", "serving", "--model_dir", str(pkg), "--host", "127.0.0.1"]
    cmd += ["--http_port", str(free_port("127.0.0.1")), "--grpc_port", str(free_port("127.0.0.1"))]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr[-500:]
    errors = [line for line in proc.stderr.splitlines() if "refusing to start" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-1500:]


# --------------------------------------------------------------------------- S5, S11


def test_fault_variables_without_the_flag_stop_the_server(model_package):
    cmd = [sys.executable, "-m", "serving", "--model_dir", str(model_package), "--host", "127.0.0.1"]
    cmd += ["--http_port", str(free_port("127.0.0.1")), "--grpc_port", str(free_port("127.0.0.1"))]
    env = {**os.environ, "MLROLLOUT_FAULT_ERROR_RATE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: MLROLLOUT_FAULT_ERROR_RATE set but --enable_fault_injection is not: fault injection is for "
        "tests and demos only; unset the variable, or pass the flag on purpose"
    ]


def test_no_fault_injection_is_visible_as_zero(server):
    samples = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert f'{signals.FAULT_INJECTION}{{setting="error_rate"}} 0.0' in samples
    assert "x-fault-injection" not in httpx.get(f"{server.url}/v2/health/live", timeout=10).headers


def test_a_trailing_slash_does_not_redirect_to_the_host_header(server):
    r = httpx.post(
        f"{server.url}/v1/models/{server.name}:predict/",
        json={"instances": [ROW]},
        headers={"host": "evil.example.com"},
        timeout=10,
    )
    assert r.status_code == 404 and "location" not in r.headers
