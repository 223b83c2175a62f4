"""Every place the runtime reaches into KServe's private hooks and attributes (and onnxruntime's).

KServe (pinned in pyproject.toml) documents ``kserve.Model`` and ``ModelServer(...).start(models)``;
what the runtime changes (see :mod:`serving.runtime.server`) needs more than that. Each reach is here,
once, behind a name of ours, and ``tests/unit/test_kserve_compat.py`` checks each one against the
installed KServe by name, so an upgrade that renames or reshapes a hook fails there, not in production:

- ``RESTServer``: the private hooks ``_add_middlewares``/``_add_exception_handlers``, and
  ``create_application``, which builds on the module global ``kserve.model_server.app``;
- ``RESTServerMultiProcess._rest_server``: the server each worker process runs;
- ``GRPCServer.start`` and the attributes it reads (``_data_plane``, ``_model_repository_extension``,
  ``_port``, ``_kwargs``) and sets (``_server``, which ``stop`` stops);
- ``ModelServer.start`` and what it uses: ``_register_and_check_atleast_one_model_is_ready``, the
  ``_rest_server``/``_rest_multiprocess_server``/``_grpc_server`` slots that ``stop`` reads,
  ``_custom_exception_handler``, ``_serve``;
- the module globals of ``kserve.model_server``: ``parser``, ``args`` (parsed from ``sys.argv`` at import;
  ModelServer reads the log config and gRPC message sizes from it) and ``app``;
- ``InferInput._raw_data`` (gRPC ``raw_input_contents``), and onnxruntime's ``InferenceSession._sess``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from kserve import model_server as kms
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.rest.multiprocess.server import RESTServerMultiProcess
from kserve.protocol.rest.server import RESTServer

FASTAPI_APP_IMPORT_STRING = kms.FASTAPI_APP_IMPORT_STRING


# --- module globals of kserve.model_server ----------------------------------------------------------------


def fastapi_app():
    """The FastAPI app KServe's RESTServer registers its routes on (``kserve.model_server.app``)."""
    return kms.app


def kserve_parser():
    """KServe's own argument parser (``kserve.model_server.parser``): the runtime's extends it."""
    return kms.parser


def set_server_args(args) -> None:
    """Replace ``kserve.model_server.args``, which KServe parsed from ``sys.argv`` on import with its own
    parser (where argparse may read one of our flags as an abbreviation of one of its own)."""
    kms.args = args


def server_args():
    return kms.args


# --- REST -------------------------------------------------------------------------------------------------


class RESTServerHooks(RESTServer):
    """KServe's RESTServer with its private hooks as methods of ours: :meth:`add_middlewares`,
    :meth:`add_exception_handlers`, :meth:`application_created`."""

    def _add_middlewares(self, app):  # KServe: called by create_application
        self.add_middlewares(app)

    def _add_exception_handlers(self, app):  # KServe: called by create_application
        super()._add_exception_handlers(app)
        self.add_exception_handlers(app)

    def create_application(self):
        super().create_application()
        self.application_created(fastapi_app())

    # ours to override
    def add_middlewares(self, app) -> None:
        """Default: KServe's (timing_asgi, and the access logger when a format is given)."""
        RESTServer._add_middlewares(self, app)

    def add_exception_handlers(self, app) -> None:
        """Called after KServe's own handlers are added."""

    def application_created(self, app) -> None:
        """Called with KServe's FastAPI app once its middlewares, routes and handlers are in."""


def rest_workers(rest: RESTServer, *args, log_config_file: str | None, **kwargs) -> RESTServerMultiProcess:
    """KServe's multi-process REST server (``--workers > 1``) whose processes run ``rest``, not the stock
    RESTServer it builds itself."""
    server = RESTServerMultiProcess(*args, log_config_file=log_config_file, **kwargs)
    server._rest_server = rest
    return server


# --- gRPC -------------------------------------------------------------------------------------------------


class GRPCServerHooks(GRPCServer):
    """KServe's GRPCServer, whose ``start`` serves the ``grpc.aio`` server :meth:`build_server` returns."""

    async def start(self, max_workers):
        self._server = self.build_server(max_workers)  # KServe's stop() stops self._server
        await self._server.start()
        await self._server.wait_for_termination()

    def build_server(self, max_workers: int):  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def data_plane(self):
        return self._data_plane

    @property
    def model_repository_extension(self):
        return self._model_repository_extension

    @property
    def port(self) -> int:
        return self._port

    def option(self, name: str) -> Any:
        """One of the ``kwargs`` KServe hands the gRPC server (the parsed command line)."""
        return self._kwargs.get(name)


# --- ModelServer ------------------------------------------------------------------------------------------


class ModelServerHooks(kms.ModelServer):
    """``kserve.ModelServer`` whose ``start`` registers the models, lets :meth:`add_servers` build the
    servers, and serves them all on one loop from :meth:`loop_factory` (KServe's ``start`` runs
    ``asyncio.run`` on the stock loop: its ``setup_event_loop`` configures a loop that is then not used)."""

    def start(self, models) -> None:
        self._register_and_check_atleast_one_model_is_ready(models)
        self.add_servers(models)
        self.register_signal_handler()
        with asyncio.Runner(loop_factory=self.loop_factory()) as runner:
            runner.run(self._serve_configured())

    async def _serve_configured(self):
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._custom_exception_handler or self.default_exception_handler)
        self.configure_loop(loop)
        await self._serve()

    # KServe's stop() stops what these slots hold
    def serve_rest(self, rest: RESTServer) -> None:
        self._rest_server = rest
        self.servers.append(rest.start())

    def serve_rest_workers(self, workers: RESTServerMultiProcess) -> None:
        self._rest_multiprocess_server = workers
        self.servers.append(workers.start())

    def serve_grpc(self, grpc_server: GRPCServer) -> None:
        self._grpc_server = grpc_server
        self.servers.append(grpc_server.start(self.max_threads))

    # ours to override
    def add_servers(self, models) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def loop_factory(self) -> Callable[[], asyncio.AbstractEventLoop] | None:
        return None

    def configure_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called on the running loop before the servers are awaited."""


# --- inference objects ------------------------------------------------------------------------------------


def raw_input_bytes(inp) -> bytes | None:
    """A KServe ``InferInput``'s binary payload (gRPC ``raw_input_contents``), or None."""
    raw = inp._raw_data
    return None if raw is None else bytes(raw)


def direct_session_run(session) -> Callable | None:
    """onnxruntime's bound C++ session's ``run(names, feed, run_options)``, or None when this build has
    none. The public ``InferenceSession.run`` re-validates input names, OrtValue ownership and
    graph-capture options on every call (~15 % of a batch-1 call)."""
    inner = getattr(session, "_sess", None)
    if inner is not None and hasattr(inner, "run"):
        return inner.run
    return None
