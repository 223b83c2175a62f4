"""The operator's HTTP endpoint: Prometheus metrics on ``/metrics`` and a health check on ``/healthz``.

``/healthz`` answers ``200 ok`` while ``check()`` returns None and ``503 <reason>`` when it names a problem,
so a kubelet probe restarts an operator whose lease or watch thread died (the process would otherwise
live on, serving stale metrics and driving nothing). Every other path is prometheus_client's own WSGI app,
so ``/metrics`` keeps its content negotiation and gzip. Standby replicas are healthy too: not leading is
normal, and the PodDisruptionBudget counts them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


def app(registry: Any, check: Callable[[], str | None]) -> Callable:
    from prometheus_client import make_wsgi_app

    metrics = make_wsgi_app(registry)

    def wsgi(environ, start_response):
        if environ.get("PATH_INFO") == "/healthz":
            problem = check()
            status = "503 Service Unavailable" if problem else "200 OK"
            body = f"{problem}\n".encode() if problem else b"ok\n"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [body]
        return metrics(environ, start_response)

    return wsgi


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):  # probes every few seconds: not worth a log line each
        pass


def serve(port: int, registry: Any, check: Callable[[], str | None], addr: str = "0.0.0.0") -> WSGIServer:
    """Serve ``app`` on ``addr:port`` in a daemon thread; returns the server (``shutdown()`` stops it)."""
    server = make_server(addr, port, app(registry, check), server_class=_Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
