"""``python -m serving``: the command line and a ``kserve.ModelServer`` wired for this runtime.

The server is KServe's: its FastAPI app and routes (V1, V2, health, metadata), its gRPC servicer
(Open Inference Protocol), its multi-process REST workers. What this module changes, and why:

- binds ``--host`` (KServe hard-codes 0.0.0.0 / [::]; tests bind 127.0.0.1);
- replaces KServe's per-request middleware (timing_asgi logging two lines per request) with
  :class:`serving.runtime.asgi.RuntimeMiddleware` (limits, version headers, metrics, fast path);
- the uvicorn access log and latency log lines are off unless asked for (``--access_log``,
  ``--enable_latency_logging``): per-request logging cost KServe 30-40 % of its throughput;
- gRPC answers carry ``x-model-name``/``x-model-version`` metadata and are counted per status.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from concurrent import futures

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc import StatusCode, aio
from kserve import errors as kerrors
from kserve import model_server as kms
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.rest.multiprocess.server import RESTServerMultiProcess
from kserve.protocol.rest.server import RESTServer

from pipelines.core.modelcard import ModelPackageError
from serving.runtime.asgi import RuntimeMiddleware
from serving.runtime.model import Faults, InjectedFault, OnnxModel

log = logging.getLogger("kserve.mlrollout")


def _positive(kind):
    def parse(text: str):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v

    return parse


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serving",
        parents=[kms.parser],
        description="Serve an mlrollout ONNX model package with KServe (V1, V2 REST, V2 gRPC).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model_dir",
        default="/mnt/models",
        help="repository root holding one <name>/, the <name>/ folder, or its version folder",
    )
    p.add_argument("--host", default="0.0.0.0", help="address the HTTP and gRPC servers bind")
    p.add_argument("--max_batch_size", type=_positive(int), default=1024, help="most rows in one request")
    p.add_argument(
        "--max_body_bytes",
        type=_positive(int),
        default=8 << 20,
        help="largest request body accepted (larger: 413 before the body is read)",
    )
    p.add_argument(
        "--ort_threads",
        type=_positive(int),
        default=1,
        help="onnxruntime intra-op threads per worker (scale with --workers instead)",
    )
    p.add_argument(
        "--inline_max_rows",
        type=int,
        default=64,
        help="batches up to this many rows run on the event loop; bigger ones in a thread",
    )
    p.add_argument(
        "--fast_path",
        type=_bool,
        default=True,
        help="answer V1 predict / V2 infer in the runtime's ASGI layer instead of KServe's handlers",
    )
    p.add_argument("--access_log", type=_bool, default=False, help="one uvicorn access-log line per request")
    p.set_defaults(model_name=None, enable_latency_logging=False)
    return p


def quiet_request_logging(access_log: bool, latency_logging: bool) -> None:
    """Per-request log lines off (they are re-applied in every worker, after KServe reconfigures logging)."""
    logging.getLogger("uvicorn.access").setLevel(logging.INFO if access_log else logging.WARNING)
    logging.getLogger("kserve.trace").setLevel(logging.INFO if latency_logging else logging.WARNING)


class RuntimeRESTServer(RESTServer):
    """KServe's RESTServer with our host binding and middleware (picklable for --workers > 1)."""

    def __init__(self, *args, host: str, model_name: str, runtime: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.config.host = host
        self.model_name = model_name
        self.runtime = runtime

    def _add_middlewares(self, app):
        """KServe's timing_asgi middleware (two log lines per request) is left out on purpose."""

    def create_application(self):
        """KServe's FastAPI app, wrapped (outside FastAPI's own middleware stack, which costs tens of
        µs per request even when idle) by the runtime's ASGI layer; uvicorn serves the wrapper."""
        super().create_application()
        model = self.dataplane.model_registry.get_model(self.model_name)
        self.config.app = RuntimeMiddleware(
            kms.app,
            model=model,
            max_body_bytes=self.runtime["max_body_bytes"],
            fast_path=self.runtime["fast_path"],
        )

    def _add_exception_handlers(self, app):
        super()._add_exception_handlers(app)
        # FastAPI's default 422 echoes the offending input, and an input like 1e400 (inf) then fails
        # to serialise: a 500. Answer schema failures of the V2 body as 400 with the field paths only.
        app.add_exception_handler(RequestValidationError, _schema_error)

    def run(self, sockets=None):  # the entry point of each --workers process
        quiet_request_logging(self.runtime["access_log"], self.runtime["latency_logging"])
        super().run(sockets=sockets)


async def _schema_error(_request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors()[:5]
    )
    return JSONResponse(
        status_code=400, content={"error": f"request does not match the V2 schema: {problems}"}
    )


_GRPC_CODES = (
    (
        (kerrors.InferenceError, kerrors.InvalidInput, kerrors.UnsupportedProtocol),
        StatusCode.INVALID_ARGUMENT,
    ),
    ((kerrors.ServerNotReady, kerrors.ServerNotLive, kerrors.ModelNotReady), StatusCode.UNAVAILABLE),
    ((NotImplementedError,), StatusCode.UNIMPLEMENTED),
    ((kerrors.ModelNotFound,), StatusCode.NOT_FOUND),
)


def _grpc_code(exc: BaseException) -> StatusCode:
    for types, code in _GRPC_CODES:
        if isinstance(exc, types):
            return code
    return StatusCode.INTERNAL


class RuntimeServicer(InferenceServicer):
    """KServe's Open Inference Protocol servicer, plus version metadata and metrics on ModelInfer."""

    def __init__(self, data_plane, model_repository_extension, model: OnnxModel):
        super().__init__(data_plane, model_repository_extension)
        self.model = model
        self.id_metadata = (("x-model-name", model.spec.name), ("x-model-version", model.spec.version))

    async def ModelInfer(self, request, context):
        start = time.perf_counter()
        code = StatusCode.OK
        try:
            await context.send_initial_metadata(self.id_metadata)
            return await super().ModelInfer(request, context)
        except InjectedFault as e:
            code = StatusCode.INTERNAL
            await context.abort(code, str(e))
        except BaseException as e:
            code = _grpc_code(e) if isinstance(e, Exception) else StatusCode.CANCELLED
            raise
        finally:
            self.model.metrics.request("grpc-v2", code.name, time.perf_counter() - start)


class RuntimeGRPCServer(GRPCServer):
    def __init__(self, *args, host: str, model: OnnxModel, **kwargs):
        super().__init__(*args, **kwargs)
        self.host = host
        self.model = model

    async def start(self, max_workers):
        servicer = RuntimeServicer(self._data_plane, self._model_repository_extension, self.model)
        # KServe's LoggingInterceptor (one INFO line per call) is left out on purpose
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(ExceptionToStatusInterceptor(),),
            options=[
                ("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length")),
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        host = "[::]" if self.host in ("0.0.0.0", "::", "[::]") else self.host
        self._server.add_insecure_port(f"{host}:{self._port}")
        log.info("gRPC server on %s:%s", host, self._port)
        await self._server.start()
        await self._server.wait_for_termination()


class RuntimeModelServer(kms.ModelServer):
    """``kserve.ModelServer`` whose ``start`` builds the runtime's REST and gRPC servers."""

    def __init__(self, *, host: str, runtime: dict, **kwargs):
        super().__init__(**kwargs)
        self.host = host
        self.runtime = runtime

    def start(self, models) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        model = models[0]
        rest_args = (
            kms.FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
        )
        rest_kwargs = dict(
            access_log_format=self.access_log_format,
            workers=self.workers,
            grace_period=self.grace_period,
            event_loop=self.event_loop,
            timeout_keep_alive=self.timeout_keep_alive,
            ssl_certfile=self.ssl_certfile,
            ssl_keyfile=self.ssl_keyfile,
        )
        rest = RuntimeRESTServer(
            *rest_args, host=self.host, model_name=model.name, runtime=self.runtime, **rest_kwargs
        )
        if self.workers > 1:
            self._rest_multiprocess_server = RESTServerMultiProcess(
                *rest_args, log_config_file=kms.args.log_config_file, **rest_kwargs
            )
            self._rest_multiprocess_server._rest_server = rest
            self.servers.append(self._rest_multiprocess_server.start())
        else:
            self._rest_server = rest
            self.servers.append(rest.start())
        if self.enable_grpc:
            self._grpc_server = RuntimeGRPCServer(
                self.grpc_port,
                self.dataplane,
                self.model_repository_extension,
                kwargs=vars(kms.args),
                grace_period=self.grace_period,
                host=self.host,
                model=model,
            )
            self.servers.append(self._grpc_server.start(self.max_threads))
        self.register_signal_handler()
        # KServe runs asyncio.run() on the stock loop (its setup_event_loop() configures a loop that is
        # then not used); the REST and gRPC servers share this loop, so pick uvloop here as uvicorn would.
        with asyncio.Runner(loop_factory=_loop_factory(self.event_loop)) as runner:
            runner.run(self._serve_configured())

    async def _serve_configured(self):
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._custom_exception_handler or self.default_exception_handler)
        if self.max_asyncio_workers is None:
            self.max_asyncio_workers = min(32, (os.cpu_count() or 1) + 4)
        loop.set_default_executor(futures.ThreadPoolExecutor(max_workers=self.max_asyncio_workers))
        await self._serve()


def _loop_factory(event_loop: str):
    if event_loop in ("auto", "uvloop"):
        try:
            import uvloop

            return uvloop.new_event_loop
        except ImportError:
            if event_loop == "uvloop":
                raise
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # kserve.model_server parsed sys.argv on import with its own parser, where argparse may read one of
    # our flags as an abbreviation of one of its own (--access_log -> --access_log_format); what
    # ModelServer reads from that module (log config, gRPC message sizes) must come from our parse.
    kms.args = args
    try:
        faults = Faults.from_env()
    except ValueError as e:
        print(f"error: fault-injection setting: {e}", file=sys.stderr)
        return 2
    runtime = {
        "max_body_bytes": args.max_body_bytes,
        "fast_path": args.fast_path,
        "access_log": args.access_log,
        "latency_logging": args.enable_latency_logging,
    }
    server = RuntimeModelServer(
        host=args.host,
        runtime=runtime,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=args.workers,
        max_threads=args.max_threads,
        max_asyncio_workers=args.max_asyncio_workers,
        enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url,
        enable_latency_logging=args.enable_latency_logging,
        access_log_format=args.access_log_format,
        event_loop=args.event_loop,
        timeout_keep_alive=args.timeout_keep_alive,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    quiet_request_logging(args.access_log, args.enable_latency_logging)
    try:
        model = OnnxModel(
            args.model_dir,
            name=args.model_name,
            max_batch_size=args.max_batch_size,
            ort_threads=args.ort_threads,
            inline_max_rows=args.inline_max_rows,
            faults=faults,
        )
        model.load()
    except (ModelPackageError, OSError) as e:
        log.error("refusing to start: %s", e)
        return 1
    except Exception as e:  # onnxruntime cannot open the graph, card fields of the wrong type, ...
        log.error(
            "refusing to start: cannot load the model in %s: %s: %s", args.model_dir, type(e).__name__, e
        )
        return 1
    if faults.active:
        log.warning(
            "FAULT INJECTION ON (test/demo only): error_rate=%g latency_ms=%g",
            faults.error_rate,
            faults.latency_ms,
        )
    server.start([model])
    return 0
