"""``python -m serving``: the command line and a ``kserve.ModelServer`` wired for this runtime.

The server is KServe's: its FastAPI app and routes (V1, V2, health, metadata), its gRPC servicer
(Open Inference Protocol), its multi-process REST workers. What this module changes, and why:

- binds ``--host`` (KServe hard-codes 0.0.0.0 / [::]; tests bind 127.0.0.1), and refuses to start with
  one line when the HTTP or gRPC port is taken (gRPC's SO_REUSEPORT is off, so two servers never share one);
- replaces KServe's per-request middleware (timing_asgi logging two lines per request) with
  :class:`serving.runtime.asgi.RuntimeMiddleware` (limits, version headers, metrics, fast path) and
  uvicorn's HTTP protocol with :class:`serving.runtime.protocol.LimitedHttpToolsProtocol` (header size
  and count, header deadline, connection cap);
- turns KServe's model-repository extension off on both protocols: no client can load or unload the model;
- the uvicorn access log and latency log lines are off unless asked for (``--access_log``,
  ``--enable_latency_logging``): per-request logging cost KServe 30-40 % of its throughput;
- gRPC: answers carry ``x-model-name``/``x-model-version`` metadata and are counted per status for this
  model and version; undecodable request bytes are INVALID_ARGUMENT (grpcio says UNKNOWN); messages
  echo at most MAX_ERROR_CHARS of the request;
- fault injection (test/demo only) needs ``--enable_fault_injection``; without it a fault variable in the
  environment stops the server from starting, and with it the setting shows as a metric and a header;
- with ``--workers > 1`` every worker dies with the server (PR_SET_PDEATHSIG): a killed server leaves no
  orphan still answering on its port.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from concurrent import futures

import grpc
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from google.protobuf.message import DecodeError
from grpc import StatusCode, aio
from kserve import errors as kerrors
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor
from kserve.protocol.grpc.servicer import InferenceServicer

from serving.contract import signals
from serving.contract.modelcard import ModelPackageError
from serving.runtime import feedback
from serving.runtime import kserve_compat as compat
from serving.runtime.asgi import RuntimeMiddleware, bounded
from serving.runtime.metrics import set_fault_injection
from serving.runtime.model import FAULT_ENV_PREFIX, Faults, InjectedFault, OnnxModel
from serving.runtime.protocol import LimitedHttpToolsProtocol

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
        parents=[compat.kserve_parser()],
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
        "--max_inflight_body_bytes",
        type=_positive(int),
        default=256 << 20,
        help="request bodies held in memory at once, over all connections (503 over it)",
    )
    p.add_argument(
        "--body_timeout",
        type=_positive(float),
        default=30.0,
        help="seconds for a declared request body to arrive, first byte included (408 after)",
    )
    p.add_argument(
        "--max_header_bytes",
        type=_positive(int),
        default=64 * 1024,
        help="request line + headers (431 over it)",
    )
    p.add_argument(
        "--max_headers", type=_positive(int), default=100, help="header lines per request (431 over it)"
    )
    p.add_argument(
        "--header_timeout",
        type=_positive(float),
        default=10.0,
        help="seconds for a request's headers to arrive, and for a new connection's first request (408)",
    )
    p.add_argument(
        "--max_connections",
        type=_positive(int),
        default=None,
        help="open connections; at the cap an idle one is dropped first, else 503 "
        "(default: 1000, or less to stay under the open-file limit)",
    )
    p.add_argument(
        "--enable_fault_injection",
        action="store_true",
        help=f"test/demo only: honour {FAULT_ENV_PREFIX}ERROR_RATE / {FAULT_ENV_PREFIX}LATENCY_MS "
        f"(shown as the metric {signals.FAULT_INJECTION} and the header x-fault-injection)",
    )
    p.add_argument("--access_log", type=_bool, default=False, help="one uvicorn access-log line per request")
    p.set_defaults(model_name=None, enable_latency_logging=False)
    return p


def quiet_request_logging(access_log: bool, latency_logging: bool) -> None:
    """Per-request log lines off (they are re-applied in every worker, after KServe reconfigures logging)."""
    logging.getLogger("uvicorn.access").setLevel(logging.INFO if access_log else logging.WARNING)
    logging.getLogger("kserve.trace").setLevel(logging.INFO if latency_logging else logging.WARNING)


def die_with_parent(parent_pid: int) -> None:
    """Linux: this process gets SIGTERM when the process that started it dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        # a parent that died while this worker was still starting sent nothing: it is already orphaned
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)


class RuntimeRESTServer(compat.RESTServerHooks):
    """KServe's RESTServer with our host, HTTP protocol and middleware (picklable for --workers > 1)."""

    def __init__(self, *args, host: str, model_name: str, runtime: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.config.host = host
        self.config.http = LimitedHttpToolsProtocol
        self.config.limit_concurrency = None  # the protocol's connection cap evicts idle ones first
        self.model_name = model_name
        self.runtime = runtime
        self.parent_pid = os.getpid()  # pickled into each --workers process, which checks it is still ours
        LimitedHttpToolsProtocol.configure(**runtime["protocol"])

    def add_middlewares(self, app):
        """KServe's timing_asgi middleware (two log lines per request) is left out on purpose."""

    def application_created(self, app):
        """KServe's FastAPI app, wrapped (outside FastAPI's own middleware stack, which costs tens of
        µs per request even when idle) by the runtime's ASGI layer; uvicorn serves the wrapper."""
        # FastAPI's redirect_slashes builds a 307 Location from the Host header (an open redirect)
        app.router.redirect_slashes = False
        model = self.dataplane.model_registry.get_model(self.model_name)
        self.config.app = RuntimeMiddleware(
            app,
            model=model,
            max_body_bytes=self.runtime["max_body_bytes"],
            body_timeout_s=self.runtime["body_timeout_s"],
            max_inflight_body_bytes=self.runtime["max_inflight_body_bytes"],
        )

    def add_exception_handlers(self, app):
        # FastAPI's default 422 echoes the offending input, and an input like 1e400 (inf) then fails
        # to serialise: a 500. Answer schema failures of the V2 body as 400 with the field paths only.
        app.add_exception_handler(RequestValidationError, _schema_error)

    def run(self, sockets=None):  # the entry point of each --workers process
        die_with_parent(self.parent_pid)
        LimitedHttpToolsProtocol.configure(**self.runtime["protocol"])  # a spawned worker re-imported it
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
    """KServe's Open Inference Protocol servicer, plus version metadata and metrics on ModelInfer, and
    without the model-repository RPCs."""

    def __init__(self, data_plane, model_repository_extension, model: OnnxModel):
        super().__init__(data_plane, model_repository_extension)
        self.model = model
        self.id_metadata = (("x-model-name", model.spec.name), ("x-model-version", model.spec.version))
        if model.faults.active:
            self.id_metadata += (("x-fault-injection", model.faults.describe()),)

    async def ModelInfer(self, request, context):
        spec = self.model.spec
        if request.model_name != spec.name or request.model_version not in ("", spec.version):
            # another model's or version's request is not this version's evidence: answered, not counted
            await context.send_initial_metadata(self.id_metadata)
            await context.abort(
                StatusCode.NOT_FOUND,
                bounded(
                    f"model {request.model_name!r} version {request.model_version or '(any)'!r} is not "
                    f"served here: this server serves {spec.name} {spec.version}"
                ),
            )
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

    async def RepositoryModelLoad(self, request, context):
        await context.abort(StatusCode.UNIMPLEMENTED, "the model repository API is disabled on this server")

    async def RepositoryModelUnload(self, request, context):
        await context.abort(StatusCode.UNIMPLEMENTED, "the model repository API is disabled on this server")


class _Undecodable:
    """What a request deserializer returns for bytes that are not the expected protobuf message."""

    def __init__(self, message: str, error: Exception):
        self.detail = f"request is not a valid inference.{message} protobuf message: {error}"


def _guarded_handlers(servicer) -> grpc.GenericRpcHandler:
    """The GRPCInferenceService handlers, with deserializers that turn undecodable bytes into
    INVALID_ARGUMENT (grpcio answers UNKNOWN "Unexpected DecodeError" before any servicer code runs)."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers = {}
    for method in service.methods:
        request_cls = getattr(pb, method.input_type.name)
        response_cls = getattr(pb, method.output_type.name)

        def parse(data: bytes, cls=request_cls):
            try:
                return cls.FromString(data)
            except DecodeError as e:
                return _Undecodable(cls.__name__, e)

        def guard(fn):
            async def call(request, context):
                if isinstance(request, _Undecodable):
                    await context.abort(StatusCode.INVALID_ARGUMENT, bounded(request.detail))
                return await fn(request, context)

            return call

        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            guard(getattr(servicer, method.name)),
            request_deserializer=parse,
            response_serializer=response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class _BoundedStatusInterceptor(ExceptionToStatusInterceptor):
    """KServe's exception -> status mapping, with status messages bounded in size."""

    async def handle_exception(self, ex, request_or_iterator, context, method_name):
        if hasattr(ex, "reason") and isinstance(getattr(ex, "reason", None), str):
            ex.reason = bounded(ex.reason)
        return await super().handle_exception(ex, request_or_iterator, context, method_name)


class RuntimeGRPCServer(compat.GRPCServerHooks):
    def __init__(self, *args, host: str, model: OnnxModel, **kwargs):
        super().__init__(*args, **kwargs)
        self.host = host
        self.model = model

    def build_server(self, max_workers):
        servicer = RuntimeServicer(self.data_plane, self.model_repository_extension, self.model)
        # KServe's LoggingInterceptor (one INFO line per call) is left out on purpose
        server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(_BoundedStatusInterceptor(),),
            options=[
                ("grpc.max_send_message_length", self.option("grpc_max_send_message_length")),
                ("grpc.max_receive_message_length", self.option("grpc_max_receive_message_length")),
                # a second server on the same port must fail, not silently share it (grpc's default)
                ("grpc.so_reuseport", 0),
            ],
        )
        server.add_generic_rpc_handlers((_guarded_handlers(servicer),))
        host = "[::]" if self.host in ("0.0.0.0", "::", "[::]") else self.host
        server.add_insecure_port(f"{host}:{self.port}")
        log.info("gRPC server on %s:%s", host, self.port)
        return server


class RuntimeModelServer(compat.ModelServerHooks):
    """``kserve.ModelServer`` whose ``start`` builds the runtime's REST and gRPC servers."""

    def __init__(self, *, host: str, runtime: dict, **kwargs):
        super().__init__(**kwargs)
        self.host = host
        self.runtime = runtime

    def add_servers(self, models) -> None:
        model = models[0]
        rest_args = (
            compat.FASTAPI_APP_IMPORT_STRING,
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
            log_config_file = compat.server_args().log_config_file
            self.serve_rest_workers(
                compat.rest_workers(rest, *rest_args, log_config_file=log_config_file, **rest_kwargs)
            )
        else:
            self.serve_rest(rest)
        if self.enable_grpc:
            self.serve_grpc(
                RuntimeGRPCServer(
                    self.grpc_port,
                    self.dataplane,
                    self.model_repository_extension,
                    kwargs=vars(compat.server_args()),
                    grace_period=self.grace_period,
                    host=self.host,
                    model=model,
                )
            )

    def loop_factory(self):
        # the REST and gRPC servers share one loop: pick uvloop here as uvicorn would
        return _loop_factory(self.event_loop)

    def configure_loop(self, loop) -> None:
        if self.max_asyncio_workers is None:
            self.max_asyncio_workers = min(32, (os.cpu_count() or 1) + 4)
        loop.set_default_executor(futures.ThreadPoolExecutor(max_workers=self.max_asyncio_workers))


def _loop_factory(event_loop: str):
    if event_loop in ("auto", "uvloop"):
        try:
            import uvloop

            return uvloop.new_event_loop
        except ImportError:
            if event_loop == "uvloop":
                raise
    return None


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound, or None. (uvicorn and grpc would otherwise fail later, or, for
    gRPC with SO_REUSEPORT, not at all.)"""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # what uvicorn sets: TIME_WAIT is no clash
        try:
            s.bind((host.strip("[]"), port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def default_max_connections() -> int:
    """1000, or fewer so that connections never exhaust the open-file limit (which is an outage)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return 1000
    if soft == resource.RLIM_INFINITY:
        return 1000
    return max(16, min(1000, soft - 128))


def feedback_key_ready() -> bool:
    """Check the feedback key, or make one: put into the environment before any --workers process is
    spawned, so every worker of this server signs alike (replicas need the shared Secret instead)."""
    try:
        key, generated = feedback.resolve_key(os.environ)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    if generated:
        os.environ[feedback.KEY_ENV] = key.decode()
        log.warning(
            "%s is not set: a key of this server's own signs feedback tokens, so feedback verifies only "
            "here; give every replica the same key (a Secret) to take feedback on any of them",
            feedback.KEY_ENV,
        )
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # kserve.model_server parsed sys.argv on import with its own parser, where argparse may read one of
    # our flags as an abbreviation of one of its own (--access_log -> --access_log_format); what
    # ModelServer reads from that module (log config, gRPC message sizes) must come from our parse.
    compat.set_server_args(args)
    fault_env = sorted(k for k in os.environ if k.startswith(FAULT_ENV_PREFIX) and os.environ[k].strip())
    if fault_env and not args.enable_fault_injection:
        print(
            f"error: {', '.join(fault_env)} set but --enable_fault_injection is not: fault injection is for "
            "tests and demos only; unset the variable, or pass the flag on purpose",
            file=sys.stderr,
        )
        return 2
    try:
        faults = Faults.from_env() if args.enable_fault_injection else Faults()
    except ValueError as e:
        print(f"error: fault-injection setting: {e}", file=sys.stderr)
        return 2
    for flag, port in (
        ("--http_port", args.http_port),
        ("--grpc_port", args.grpc_port if args.enable_grpc else None),
    ):
        if port is None:
            continue
        why = port_in_use(args.host, port)
        if why:
            print(
                f"error: {flag} {port} on {args.host} is not free ({why}): "
                "stop what uses it or pick another port",
                file=sys.stderr,
            )
            return 2
    if not feedback_key_ready():  # after the checks above: a refused start-up stays one line
        return 2
    runtime = {
        "max_body_bytes": args.max_body_bytes,
        "body_timeout_s": args.body_timeout,
        "max_inflight_body_bytes": args.max_inflight_body_bytes,
        "protocol": {
            "max_header_bytes": args.max_header_bytes,
            "max_headers": args.max_headers,
            "header_timeout_s": args.header_timeout,
            "max_connections": args.max_connections or default_max_connections(),
        },
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
    set_fault_injection(faults.error_rate, faults.latency_ms)
    if faults.active:
        log.warning("FAULT INJECTION ON (test/demo only): %s", faults.describe())
    server.start([model])
    return 0
