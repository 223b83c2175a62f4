"""Start the runtime as a subprocess on free 127.0.0.1 ports, wait until it is ready, stop it.

Shared by ``make demo``, the rollout controller's local stack, the tests and the benchmark::

    from serving.runtime.client import RuntimeServer

    with RuntimeServer("models/breast-cancer") as srv:
        srv.predict_v1([[...30 numbers...]])            # {"predictions": [...]}
        srv.infer_v2([[...]])                            # V2 response dict
        srv.url, srv.grpc_target, srv.name, srv.version  # for your own clients

Environment variables in ``env`` (e.g. the fault knobs ``MLROLLOUT_FAULT_ERROR_RATE``) are added to
the server's environment.

``srv.infer_grpc(rows)`` sends the same rows over V2 gRPC (``ModelInfer``). The demo's use of it all is
``serving.demo.__main__.serve_and_predict``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from serving.contract import modelcard
from serving.contract.errors import MlrolloutError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session=True``), SIGKILL after
    ``timeout`` seconds; returns the exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


class ServerStartError(MlrolloutError, RuntimeError):
    """The runtime exited or did not become ready; ``log`` holds its output."""

    def __init__(self, message: str, returncode: int | None, log: str):
        super().__init__(f"{message}\n--- server log (tail) ---\n{log[-4000:]}")
        self.returncode = returncode
        self.log = log


class RuntimeServer:
    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        name: str | None = None,
        args: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        ready_timeout: float = 60.0,
        python: str = sys.executable,
        cwd: str | os.PathLike | None = None,
        taskset: str | None = None,
        http_port: int = 0,
        grpc_port: int = 0,
    ):
        self.model_dir = Path(model_dir)
        self.name = name
        self.extra_args = list(args)
        self.env = dict(env or {})
        self.host = host
        self.ready_timeout = ready_timeout
        self.python = python
        self.cwd = cwd
        self.taskset = taskset
        self.fixed_ports = (http_port, grpc_port)  # 0: pick a free port
        self.http_port = self.grpc_port = 0
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self.version: str | None = None
        self.input_name = "input"

    # --- addresses ----------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def log(self) -> str:
        if self._log_file is None:
            return ""
        self._log_file.flush()
        return Path(self._log_file.name).read_text(errors="replace")

    # --- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> RuntimeServer:
        card = modelcard.load_card(modelcard.find_package(self.model_dir))
        self.name = self.name or card["name"]
        self.version = card["version"]
        self.input_name = card["inputs"][0]["name"]
        last_error: ServerStartError | None = None
        for _attempt in range(3):  # a free port can be taken between asking and binding: retry
            self.http_port = self.fixed_ports[0] or free_port(self.host)
            self.grpc_port = self.fixed_ports[1] or free_port(self.host)
            try:
                self._start_once()
                return self
            except ServerStartError as e:
                last_error = e
                self.stop()
                if "address already in use" not in e.log.lower():
                    raise
        raise last_error  # type: ignore[misc]

    def _start_once(self) -> None:
        cmd = [
            self.python,
            "-m",
            "serving",
            "--model_dir",
            str(self.model_dir),
            "--host",
            self.host,
            "--http_port",
            str(self.http_port),
            "--grpc_port",
            str(self.grpc_port),
            "--model_name",
            self.name,
            *self.extra_args,
        ]
        if self.taskset:
            cmd = ["taskset", "-c", self.taskset, *cmd]
        self._log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (lives as long as the server)
            "w+", prefix="mlrollout-runtime-", suffix=".log", delete=False
        )
        env = {**os.environ, **self.env}
        self.proc = subprocess.Popen(
            cmd,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.cwd,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.ready_timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                rc = self.proc.poll()
                if rc is not None:
                    raise ServerStartError(f"runtime exited with code {rc} before it was ready", rc, self.log)
                try:
                    r = client.get(f"{self.url}/v2/models/{self.name}/ready")
                    if r.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise ServerStartError(f"runtime not ready within {self.ready_timeout:g} s", None, self.log)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the server's process group, SIGKILL after ``timeout``; returns the exit code."""
        proc, self.proc = self.proc, None
        return None if proc is None else stop_process_group(proc, timeout)

    def __enter__(self) -> RuntimeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._log_file is not None:
            self._log_file.close()
            Path(self._log_file.name).unlink(missing_ok=True)
            self._log_file = None

    # --- convenience clients ------------------------------------------------------------------------------
    def predict_v1(self, instances: list, probabilities: bool = False, timeout: float = 10.0) -> dict:
        body: dict = {"instances": instances}
        if probabilities:
            body["parameters"] = {"probabilities": True}
        r = httpx.post(f"{self.url}/v1/models/{self.name}:predict", json=body, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def infer_v2(self, rows: list[list[float]], timeout: float = 10.0) -> dict:
        body = {
            "inputs": [
                {
                    "name": self.input_name,
                    "datatype": "FP32",
                    "shape": [len(rows), len(rows[0])],
                    "data": [v for row in rows for v in row],
                }
            ]
        }
        r = httpx.post(f"{self.url}/v2/models/{self.name}/infer", json=body, timeout=timeout)
        r.raise_for_status()
        return r.json()

    def infer_grpc(self, rows: list[list[float]]) -> dict:
        """V2 gRPC ``ModelInfer``: ``{"outputs": {name: values}, "metadata": {...}}``."""
        return _grpc_infer(self.grpc_target, self.name, self.input_name, rows)

    def metrics_text(self, timeout: float = 10.0) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=timeout).text


def _grpc_infer(target: str, name: str, input_name: str, rows: list[list[float]]) -> dict:
    import grpc

    _argv, sys.argv = sys.argv, sys.argv[:1]  # importing kserve parses sys.argv
    try:
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
        from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
    finally:
        sys.argv = _argv
    req = pb.ModelInferRequest(model_name=name)
    t = req.inputs.add(name=input_name, datatype="FP32", shape=[len(rows), len(rows[0])])
    t.contents.fp32_contents.extend(v for row in rows for v in row)
    with grpc.insecure_channel(target) as channel:
        res, call = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(req, timeout=10)
    out = {o.name: (list(o.contents.int64_contents) or list(o.contents.fp32_contents)) for o in res.outputs}
    if res.raw_output_contents:
        import numpy as np

        dtypes = {"INT64": np.int64, "FP32": np.float32}
        out = {
            o.name: np.frombuffer(raw, dtypes[o.datatype]).tolist()
            for o, raw in zip(res.outputs, res.raw_output_contents, strict=True)
        }
    return {"outputs": out, "metadata": dict(call.initial_metadata())}
