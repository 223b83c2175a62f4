"""The ASGI layer in front of KServe's FastAPI app: limits, version headers, metrics, and the fast path.

For every HTTP request it
- refuses a body over ``--max_body_bytes`` with 413 before reading it (Content-Length) or as soon as
  the streamed body passes the limit (chunked uploads), so no unbounded body is held in memory;
- adds ``x-model-name`` / ``x-model-version`` to every answer, errors and 404s included;
- counts inference requests by protocol, status and model version and times them;
- serves ``/metrics`` (all worker processes' metrics with ``--workers > 1``).

The fast path answers ``POST /v1/models/<name>:predict`` and ``POST /v2/models/<name>/infer`` (JSON and
the binary-tensor extension) itself, with the same wire format as KServe's handlers: this skips
FastAPI routing over KServe's ~20 routes, pydantic validation of the V2 body, the DataPlane round
trip and per-request logging, which cost ~3/4 of KServe's CPU per request on a tiny model
(reference measurements; ``serving/bench.py`` measures it). Everything else (health, metadata,
other models' 404s, ``--fast_path false``) goes to KServe untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson

from serving.runtime import core
from serving.runtime.metrics import exposition
from serving.runtime.model import InjectedFault, OnnxModel

log = logging.getLogger("kserve.mlrollout")

JSON = b"application/json"
BINARY_HEADER = b"inference-header-content-length"


def _error_body(message: str) -> bytes:
    return orjson.dumps({"error": message})


class RuntimeMiddleware:
    def __init__(
        self,
        app,
        model: OnnxModel,
        max_body_bytes: int = 8 << 20,
        fast_path: bool = True,
        body_timeout_s: float = 30.0,
    ):
        self.app = app
        self.model = model
        self.spec = model.spec
        self.max_body_bytes = max_body_bytes
        self.fast_path = fast_path
        self.body_timeout_s = body_timeout_s
        name, version = self.spec.name, self.spec.version
        self.id_headers = [(b"x-model-name", name.encode()), (b"x-model-version", version.encode())]
        self.v1_path = f"/v1/models/{name}:predict"
        self.v2_paths = {f"/v2/models/{name}/infer", f"/v2/models/{name}/versions/{version}/infer"}
        self.metrics = model.metrics

    # --- ASGI entry ---------------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path = scope["path"]
        method = scope["method"]
        if path == "/metrics" and method == "GET":
            return await self._metrics(scope, send)
        protocol = None
        if method == "POST":
            if path.startswith("/v1/models/") and path.endswith(":predict"):
                protocol = "v1"
            elif path.startswith("/v2/models/") and path.endswith("/infer"):
                protocol = "v2"
        status = [500]
        try:
            if method in ("POST", "PUT", "PATCH"):
                try:
                    body = await self._read_body(scope, receive)
                except core.InputError as e:
                    status[0] = e.status
                    return await self._respond(send, e.status, _error_body(e.message), close=True)
                if self.fast_path and (path == self.v1_path or path in self.v2_paths):
                    status[0] = await self._fast(scope, send, body, protocol)
                    return None
                return await self.app(scope, _replay(body, receive), self._wrap_send(send, status))
            return await self.app(scope, receive, self._wrap_send(send, status))
        finally:
            if protocol is not None:
                self.metrics.request(protocol, status[0], time.perf_counter() - start)

    # --- pieces -------------------------------------------------------------------------------------------

    def _wrap_send(self, send, status):
        id_headers = self.id_headers

        async def wrapped(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = dict(message, headers=[*message.get("headers", ()), *id_headers])
            await send(message)

        return wrapped

    async def _read_body(self, scope, receive) -> bytes:
        limit = self.max_body_bytes
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    declared = int(v)
                except ValueError:
                    raise core.InputError(f"invalid Content-Length header {v[:20]!r}") from None
                if declared > limit:
                    raise core.InputError(
                        f"request body of {declared} bytes is over the limit of {limit} bytes "
                        "(--max_body_bytes)",
                        status=413,
                    )
                break
        first = await receive()
        if not first.get("more_body", False):  # the usual case: the whole body in one message
            body = first.get("body", b"")
            if len(body) > limit:
                raise core.InputError(
                    f"request body is over the limit of {limit} bytes (--max_body_bytes)", 413
                )
            return body
        chunks, total = [first.get("body", b"")], len(first.get("body", b""))
        if total > limit:
            raise core.InputError(f"request body is over the limit of {limit} bytes (--max_body_bytes)", 413)
        try:  # a streamed body that stalls midway must not hold the coroutine forever
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        break
                    chunk = message.get("body", b"")
                    if chunk:
                        total += len(chunk)
                        if total > limit:
                            raise core.InputError(
                                f"request body is over the limit of {limit} bytes (--max_body_bytes)",
                                status=413,
                            )
                        chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise core.InputError(
                f"request body not received within {self.body_timeout_s:g} s", status=408
            ) from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _respond(
        self,
        send,
        status: int,
        body: bytes,
        content_type: bytes = JSON,
        extra: list | None = None,
        close: bool = False,
    ) -> None:
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            *self.id_headers,
        ]
        if extra:
            headers.extend(extra)
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _metrics(self, scope, send) -> None:
        accept = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"accept"), None)
        body, content_type = exposition(accept)
        await self._respond(send, 200, body, content_type.encode())

    async def _fast(self, scope, send, body: bytes, protocol: str) -> int:
        """Answer one predict/infer request; returns the HTTP status sent."""
        try:
            if not self.model.ready:
                status, payload = 503, _error_body(f"Model with name {self.spec.name} is not ready.")
                await self._respond(send, status, payload)
                return status
            json_len = None
            for k, v in scope["headers"]:
                if k == BINARY_HEADER:
                    try:
                        json_len = int(v)
                    except ValueError:
                        json_len = -1
                    break
            if protocol == "v1":
                return await self._v1(send, body)
            return await self._v2(send, body, json_len)
        except core.InputError as e:
            await self._respond(send, e.status, _error_body(e.message))
            return e.status
        except InjectedFault as e:
            await self._respond(send, 500, _error_body(str(e)))
            return 500
        except Exception as e:  # an unexpected fault is a 500 and is logged; the server stays up
            log.exception("inference failed")
            await self._respond(send, 500, _error_body(f"internal error: {type(e).__name__}: {e}"))
            return 500

    @staticmethod
    def _loads(data: bytes):
        if not data:
            raise core.InputError("empty request body: send a JSON object")
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise core.InputError(f"request body is not valid JSON: {e}") from None

    async def _v1(self, send, body: bytes) -> int:
        doc = self._loads(body)
        maybe_bool = b"true" in body or b"false" in body
        x, want_proba = core.parse_v1(doc, self.spec, self.model.max_batch_size, maybe_bool=maybe_bool)
        labels, proba = await self.model.infer(x)
        await self._respond(send, 200, orjson.dumps(core.v1_response(labels, proba, want_proba)))
        return 200

    async def _v2(self, send, body: bytes, json_len: int | None) -> int:
        raw = None
        if json_len is not None:
            if not 0 < json_len <= len(body):
                raise core.InputError(
                    f"Inference-Header-Content-Length {json_len} does not fit the {len(body)}-byte body"
                )
            body, raw = body[:json_len], body[json_len:]
        doc = self._loads(body)
        maybe_bool = b"true" in body or b"false" in body
        req = core.parse_v2(doc, self.spec, self.model.max_batch_size, raw=raw, maybe_bool=maybe_bool)
        labels, proba = await self.model.infer(req.x)
        response, raws = core.v2_response(self.spec, req, core.output_arrays(labels, proba))
        head = orjson.dumps(response)
        if raws:
            await self._respond(
                send,
                200,
                b"".join([head, *raws]),
                b"application/octet-stream",
                extra=[(BINARY_HEADER, str(len(head)).encode())],
            )
        else:
            await self._respond(send, 200, head)
        return 200


def _replay(body: bytes, original):
    """Hand the already-read body to the app; later receive() calls wait on the real connection."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()

    return receive
