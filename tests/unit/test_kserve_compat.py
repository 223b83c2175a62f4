"""The private KServe (and onnxruntime) hooks ``serving/runtime/kserve_compat.py`` relies on, checked
one by one against the installed, pinned packages: an upgrade that renames, drops or reshapes one
fails here, by its name, instead of in a running server."""

from __future__ import annotations

import argparse
import inspect

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fastapi import FastAPI
from kserve import model_server as kms
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.infer_type import InferInput
from kserve.protocol.rest.multiprocess.server import RESTServerMultiProcess
from kserve.protocol.rest.server import RESTServer
from onnx import TensorProto, helper

from serving.runtime import kserve_compat as compat


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def source(fn) -> str:
    return inspect.getsource(fn)


def hook(cls, name: str):
    fn = cls.__dict__.get(name)
    assert fn is not None, f"KServe's {cls.__name__} no longer defines {name}: kserve_compat overrides it"
    return fn


# --- kserve.model_server module globals -------------------------------------------------------------------


def test_model_server_app_is_the_fastapi_app_rest_server_builds_on():
    assert isinstance(getattr(kms, "app", None), FastAPI), "kserve.model_server.app is gone"
    assert kms.FASTAPI_APP_IMPORT_STRING == "kserve.model_server:app"
    assert compat.fastapi_app() is kms.app
    assert '"kserve.model_server:app"' in source(RESTServer.create_application)


def test_model_server_args_is_the_namespace_model_server_reads():
    assert isinstance(getattr(kms, "args", None), argparse.Namespace), "kserve.model_server.args is gone"
    for use in ("log_config_file=args.log_config_file", "kwargs=vars(args)"):
        assert use in source(kms.ModelServer.start), f"ModelServer.start no longer reads {use}"
    saved = kms.args
    try:
        ns = argparse.Namespace(log_config_file=None)
        compat.set_server_args(ns)
        assert kms.args is ns and compat.server_args() is ns
    finally:
        kms.args = saved


def test_model_server_parser_is_kserves_argument_parser():
    assert isinstance(getattr(kms, "parser", None), argparse.ArgumentParser)
    assert compat.kserve_parser() is kms.parser


# --- RESTServer -------------------------------------------------------------------------------------------


def test_rest_server_add_middlewares():
    assert params(hook(RESTServer, "_add_middlewares")) == ["self", "app"]
    assert "self._add_middlewares(app)" in source(RESTServer.create_application)


def test_rest_server_add_exception_handlers():
    assert params(hook(RESTServer, "_add_exception_handlers")) == ["self", "app"]
    assert "self._add_exception_handlers(app)" in source(RESTServer.create_application)


def test_rest_server_create_application():
    assert params(hook(RESTServer, "create_application")) == ["self"]
    for caller in (RESTServer.start, RESTServer.run):
        assert "self.create_application()" in source(caller), f"{caller.__name__} no longer builds the app"


def test_rest_server_constructor_takes_what_the_runtime_passes():
    want = {"app", "data_plane", "model_repository_extension", "http_port", "access_log_format", "workers"}
    want |= {"grace_period", "event_loop", "timeout_keep_alive", "ssl_certfile", "ssl_keyfile"}
    assert want <= set(params(RESTServer.__init__))
    assert params(RESTServer.run) == ["self", "sockets"]


def test_rest_multiprocess_server_rest_server():
    assert "log_config_file" in params(RESTServerMultiProcess.__init__)
    assert "self._rest_server = RESTServer(" in source(RESTServerMultiProcess.__init__)
    # the worker processes run what _rest_server holds: the runtime's RESTServer, set by rest_workers()
    assert "self._rest_server.run" in source(RESTServerMultiProcess.init_processes)


# --- GRPCServer -------------------------------------------------------------------------------------------


def test_grpc_server_private_attributes():
    assert params(GRPCServer.__init__) == [
        "self", "port", "data_plane", "model_repository_extension", "kwargs", "grace_period",
    ]  # fmt: skip
    dp, ext = object(), object()
    s = compat.GRPCServerHooks(8081, dp, ext, kwargs={"grpc_max_send_message_length": 7})
    for attr in ("_port", "_data_plane", "_model_repository_extension", "_kwargs", "_server"):
        assert hasattr(s, attr), f"GRPCServer no longer has {attr}"
    assert (s.port, s.data_plane, s.model_repository_extension) == (8081, dp, ext)
    assert s.option("grpc_max_send_message_length") == 7 and s.option("nope") is None


def test_grpc_server_start():
    start = hook(GRPCServer, "start")
    assert inspect.iscoroutinefunction(start) and params(start) == ["self", "max_workers"]
    assert "self._server.stop(" in source(GRPCServer.stop), "GRPCServer.stop no longer stops self._server"


# --- ModelServer ------------------------------------------------------------------------------------------


def test_model_server_start():
    assert params(hook(kms.ModelServer, "start")) == ["self", "models"]


def test_model_server_register_and_check_atleast_one_model_is_ready():
    fn = hook(kms.ModelServer, "_register_and_check_atleast_one_model_is_ready")
    assert params(fn) == ["self", "models"]
    assert "self._register_and_check_atleast_one_model_is_ready(models)" in source(kms.ModelServer.start)


def test_model_server_serve():
    assert inspect.iscoroutinefunction(hook(kms.ModelServer, "_serve"))
    assert "self.servers" in source(kms.ModelServer._serve)


def test_model_server_server_slots_and_exception_handler():
    ms = kms.ModelServer(enable_grpc=False)
    for attr in ("_rest_server", "_rest_multiprocess_server", "_grpc_server", "_custom_exception_handler"):
        assert hasattr(ms, attr), f"ModelServer no longer has {attr}"
    assert ms.servers == []
    stop = source(kms.ModelServer.stop)
    for attr in ("self._rest_multiprocess_server", "self._grpc_server"):
        assert attr in stop, f"ModelServer.stop no longer stops {attr}"
    assert "self._custom_exception_handler = handler" in source(kms.ModelServer.register_exception_handler)


# --- InferInput and onnxruntime ---------------------------------------------------------------------------


def test_infer_input_raw_data():
    plain = InferInput("input", [1, 2], "FP32", data=[1.0, 2.0])
    assert hasattr(plain, "_raw_data"), "InferInput no longer has _raw_data"
    assert compat.raw_input_bytes(plain) is None
    arr = np.array([[1.0, 2.0]], dtype=np.float32)
    binary = InferInput("input", [1, 2], "FP32")
    binary.set_data_from_numpy(arr, binary_data=True)
    assert compat.raw_input_bytes(binary) == arr.tobytes()


@pytest.fixture
def identity_session(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_onnxruntime_session_sess(identity_session):
    assert hasattr(identity_session, "_sess"), "onnxruntime's InferenceSession no longer has _sess"
    run = compat.direct_session_run(identity_session)
    assert run is not None, "InferenceSession._sess has no run()"
    feed = {"x": np.array([[1.0, 2.0]], dtype=np.float32)}
    np.testing.assert_array_equal(run(["y"], feed, None)[0], identity_session.run(["y"], feed)[0])
