"""The ASGI layer in front of KServe's FastAPI app: limits, version headers, metrics, and the fast path.

For every HTTP request it
- refuses KServe's model-repository extension (``/v2/repository/...``: load and *unload* a model): no
  client may change what the server serves (hardening.md S1);
- answers ``/v2/health/ready`` from the model's own readiness, so a server whose model is gone fails its
  readiness probe;
- refuses a body over ``--max_body_bytes`` with 413 before reading it (Content-Length) or as soon as the
  streamed body passes the limit; a body that does not start, or stalls, within ``body_timeout_s`` is a
  408; all bodies in flight together are bounded by ``--max_inflight_body_bytes`` (503 over it), so
  concurrent uploads cannot exhaust memory;
- adds ``x-model-name`` / ``x-model-version`` to every answer, errors and 404s included (and
  ``x-fault-injection`` while the test-only fault knob is on);
- counts inference requests *for this model and version* by protocol, status and version and times them:
  another model's name or version is a 404 that is not counted here, a wrong method is a 405, and every
  malformed request is a 4xx, so only the server's own failures are 5xx in the rollout's evidence (S2);
- serves ``/metrics`` (all worker processes' metrics with ``--workers > 1``).

The fast path answers ``POST /v1/models/<name>:predict`` and ``POST /v2/models/<name>[/versions/<v>]/infer``
(JSON and the binary-tensor extension) itself, with the same wire format as KServe's handlers: this skips
FastAPI routing over KServe's ~20 routes, pydantic validation of the V2 body, the DataPlane round trip and
per-request logging, which cost ~3/4 of KServe's CPU per request on a tiny model (reference measurements;
``make bench-runtime`` measures it). Health, metadata and unknown paths go to KServe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import orjson

from serving.runtime import core, feedback
from serving.runtime import metrics as runtime_metrics
from serving.runtime.metrics import exposition
from serving.runtime.model import InjectedFault, OnnxModel

log = logging.getLogger("kserve.mlrollout")

JSON = b"application/json"
BINARY_HEADER = b"inference-header-content-length"
REQUEST_ID_HEADER = b"x-request-id"
TOKEN_HEADER = b"x-feedback-token"
# an error echoes at most this much of what the client sent (a 10,000-dimension shape once made a gRPC
# status larger than its 16 KiB metadata limit: RESOURCE_EXHAUSTED instead of INVALID_ARGUMENT)
MAX_ERROR_CHARS = 1000


def bounded(message: str) -> str:
    cut = " ... (truncated)"
    return message if len(message) <= MAX_ERROR_CHARS else message[: MAX_ERROR_CHARS - len(cut)] + cut


def _error_body(message: str) -> bytes:
    return orjson.dumps({"error": bounded(message)})


class BodyBudget:
    """Bytes of request bodies held in memory at once, over all connections (one event loop: no lock).

    Only the part of a body above ``free_bytes`` counts: small requests (a batch-1 predict is ~700 bytes)
    are never refused because slow large uploads hold the budget. Their memory is bounded by the connection
    cap instead (``max_connections`` x ``free_bytes``, 64 MiB at the defaults)."""

    def __init__(self, max_bytes: int, free_bytes: int = 64 * 1024):
        self.max_bytes, self.free_bytes, self.used = max_bytes, free_bytes, 0

    def take(self, total: int, held: int) -> int:
        """Account for a body now ``total`` bytes long of which ``held`` are counted; returns the new held
        amount, or -1 when it does not fit."""
        want = max(0, total - self.free_bytes)
        extra = want - held
        if extra <= 0:
            return held
        if self.used + extra > self.max_bytes:
            return -1
        self.used += extra
        return want

    def give(self, held: int) -> None:
        self.used -= held


class RuntimeMiddleware:
    def __init__(
        self,
        app,
        model: OnnxModel,
        max_body_bytes: int = 8 << 20,
        body_timeout_s: float = 30.0,
        max_inflight_body_bytes: int = 256 << 20,
    ):
        self.app = app
        self.model = model
        self.spec = model.spec
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.budget = BodyBudget(max(max_inflight_body_bytes, max_body_bytes))
        name, version = self.spec.name, self.spec.version
        self.id_headers = [(b"x-model-name", name.encode()), (b"x-model-version", version.encode())]
        if model.faults.active:
            self.id_headers.append((b"x-fault-injection", model.faults.describe().encode()))
        self.v1_path = f"/v1/models/{name}:predict"
        self.v2_path = f"/v2/models/{name}/infer"
        self.v2_versioned_path = f"/v2/models/{name}/versions/{version}/infer"
        self.v2_versions_prefix = f"/v2/models/{name}/versions/"
        self.v1_model_prefix = f"/v1/models/{name}:"
        # KServe's metadata answer has no versions, platform or class names; ours comes from the card
        self.metadata_paths = (f"/v2/models/{name}", f"/v2/models/{name}/versions/{version}")
        self.metadata_body = orjson.dumps(core.model_metadata(self.spec))
        self.metrics = model.metrics
        self._init_feedback()

    # --- feedback (serving.runtime.feedback: the design; README "Feedback") -----------------------------

    def _init_feedback(self) -> None:
        # serving.runtime.server.main puts a generated key into the environment before any worker
        # starts, so every worker of one server signs alike; replicas need the shared Secret.
        key, _ = feedback.resolve_key(os.environ)
        self.signer = feedback.Signer(key, self.spec.classes)
        self.ledger = feedback.Ledger()
        self.feedback_path = f"/v2/models/{self.spec.name}/feedback"

    def _answer_id(self, scope, labels, body_id: str | None = None) -> tuple[str, list]:
        """The answer's request id and its headers (the id and its feedback token)."""
        header = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER), None)
        rid = feedback.request_id(header, body_id)
        token = self.signer.issue(rid, self.spec.version, labels.tolist(), int(time.time() * 1000))
        return rid, [(REQUEST_ID_HEADER, rid.encode()), (TOKEN_HEADER, token.encode())]

    @staticmethod
    def _error_id(scope) -> list:
        """A refused or failed answer's id: the caller's when it is a valid one, else a made one (no
        token: there is no prediction to give feedback on)."""
        header = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER), None)
        try:
            rid = feedback.request_id(header)
        except core.InputError:
            rid = feedback.request_id(None)
        return [(REQUEST_ID_HEADER, rid.encode())]

    async def _feedback(self, scope, receive, send) -> None:
        """``POST /v2/models/<name>/feedback``: validate the whole request, then count it (atomic)."""
        if scope["method"] != "POST":
            return await self._post_only(send, scope["method"], scope["path"])
        try:
            body, held = await self._read_body(scope, receive)
        except core.InputError as e:
            return await self._respond(send, e.status, _error_body(e.message), close=True)
        try:
            items = feedback.parse(self._loads(body), self.signer)
        except core.InputError as e:
            return await self._respond(send, e.status, _error_body(e.message))
        finally:
            self.budget.give(held)
        tally = feedback.count(items, self.ledger, int(time.time() * 1000))
        runtime_metrics.feedback(self.spec.name, self.spec.version, tally)
        return await self._respond(send, 200, orjson.dumps(tally.body()))

    # --- ASGI entry ---------------------------------------------------------------------------------------

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path = scope["path"]
        method = scope["method"]
        if path == "/metrics" and method == "GET":
            return await self._metrics(scope, send)
        if path.startswith("/v2/repository"):
            return await self._respond(
                send,
                404,
                _error_body(
                    "the model repository API is disabled: this server's model cannot be loaded or unloaded"
                ),
            )
        if path == "/v2/health/ready" and method == "GET":
            ready = bool(self.model.ready)
            body = orjson.dumps(
                {"ready": ready}
                if ready
                else {"ready": False, "error": f"model {self.spec.name} is not ready"}
            )
            return await self._respond(send, 200 if ready else 503, body)
        if path in self.metadata_paths and method == "GET":
            return await self._respond(send, 200, self.metadata_body)
        if path == self.feedback_path:
            return await self._feedback(scope, receive, send)
        protocol = self._inference_protocol(path)
        if protocol is None:
            return await self._not_ours(scope, receive, send, path, method)
        status = [500]
        try:
            if method != "POST":
                status[0] = 405
                return await self._post_only(send, method, path)
            try:
                body, held = await self._read_body(scope, receive)
            except core.InputError as e:
                status[0] = e.status
                return await self._respond(send, e.status, _error_body(e.message), close=True)
            try:
                status[0] = await self._fast(scope, send, body, protocol)
            finally:
                self.budget.give(held)
            return None
        finally:
            self.metrics.request(protocol, status[0], time.perf_counter() - start)

    def _inference_protocol(self, path: str) -> str | None:
        """The protocol of an inference request for *this* model and version, else None."""
        if path == self.v1_path:
            return "v1"
        if path == self.v2_path or path == self.v2_versioned_path:
            return "v2"
        return None

    async def _not_ours(self, scope, receive, send, path: str, method: str):
        """Anything but this model's inference: health, metadata, other names (KServe answers them)."""
        if path.startswith(self.v2_versions_prefix):
            version = path[len(self.v2_versions_prefix) :].split("/", 1)[0]
            return await self._respond(
                send,
                404,
                _error_body(
                    f"model {self.spec.name} has no version {version!r}: "
                    f"this server serves {self.spec.version}"
                ),
            )
        if path.startswith(self.v1_model_prefix):  # :explain and other verbs KServe would answer 501
            verb = path[len(self.v1_model_prefix) :]
            return await self._respond(
                send, 404, _error_body(f"{verb!r} is not served: this runtime answers :predict only")
            )
        if method in ("POST", "PUT", "PATCH"):
            try:
                body, held = await self._read_body(scope, receive)
            except core.InputError as e:
                return await self._respond(send, e.status, _error_body(e.message), close=True)
            try:
                return await self.app(scope, _replay(body, receive), self._wrap_send(send, [0]))
            finally:
                self.budget.give(held)
        return await self.app(scope, receive, self._wrap_send(send, [0]))

    # --- pieces -------------------------------------------------------------------------------------------

    def _wrap_send(self, send, status):
        id_headers = self.id_headers

        async def wrapped(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = dict(message, headers=[*message.get("headers", ()), *id_headers])
            await send(message)

        return wrapped

    async def _read_body(self, scope, receive) -> tuple[bytes, int]:
        """(the whole body, the bytes of it the in-flight budget counts), within the size limit, the
        deadline and the budget. The caller gives the counted bytes back when the request is done."""
        limit = self.max_body_bytes
        declared = 0
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
        held = 0  # bytes counted in the budget for this body

        def hold(total: int) -> None:
            nonlocal held
            got = self.budget.take(total, held)
            if got < 0:
                raise core.InputError(
                    "server busy: too many request bodies in flight (--max_inflight_body_bytes); "
                    "retry shortly",
                    status=503,
                )
            held = got

        try:
            hold(declared)
            # the first receive() waits for the first body byte: a client that declares a body and never
            # sends it must not hold the connection (and its budget) forever. When uvicorn's request cycle
            # (the receive callable's owner) already holds the whole body, nothing can wait: skip the timer
            # (one per request was measurable at 6,000 req/s on one core).
            cycle = getattr(receive, "__self__", None)
            whole = getattr(cycle, "more_body", True) is False
            async with contextlib.nullcontext() if whole else asyncio.timeout(self.body_timeout_s):
                chunks: list[bytes] = []
                total = 0
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
                        hold(total)
                        chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            self.budget.give(held)
            raise core.InputError(
                f"request body not received within {self.body_timeout_s:g} s", status=408
            ) from None
        except BaseException:
            self.budget.give(held)
            raise
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return body, held

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

    async def _post_only(self, send, method: str, path: str) -> None:
        await self._respond(
            send,
            405,
            _error_body(f"{method} is not allowed on {path}: use POST"),
            extra=[(b"allow", b"POST")],
        )

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
                return await self._v1(scope, send, body)
            return await self._v2(scope, send, body, json_len)
        except core.InputError as e:
            await self._respond(send, e.status, _error_body(e.message), extra=self._error_id(scope))
            return e.status
        except InjectedFault as e:
            await self._respond(send, 500, _error_body(str(e)), extra=self._error_id(scope))
            return 500
        except Exception as e:  # an unexpected fault is a 500 and is logged; the server stays up
            log.exception("inference failed")
            body = _error_body(f"internal error: {type(e).__name__}: {e}")
            await self._respond(send, 500, body, extra=self._error_id(scope))
            return 500

    @staticmethod
    def _loads(data: bytes):
        if not data:
            raise core.InputError("empty request body: send a JSON object")
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise core.InputError(f"request body is not valid JSON: {e}") from None

    async def _v1(self, scope, send, body: bytes) -> int:
        doc = self._loads(body)
        maybe_bool = b"true" in body or b"false" in body
        x, want = core.parse_v1(doc, self.spec, self.model.max_batch_size, maybe_bool=maybe_bool)
        labels, proba = await self.model.infer(x)
        _, ids = self._answer_id(scope, labels)
        answer = core.v1_response(labels, proba, want, self.spec.class_names)
        await self._respond(send, 200, orjson.dumps(answer), extra=ids)
        return 200

    async def _v2(self, scope, send, body: bytes, json_len: int | None) -> int:
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
        req.id, ids = self._answer_id(scope, labels, req.id)
        response, raws = core.v2_response(self.spec, req, core.output_arrays(labels, proba))
        head = orjson.dumps(response)
        if raws:
            await self._respond(
                send,
                200,
                b"".join([head, *raws]),
                b"application/octet-stream",
                extra=[(BINARY_HEADER, str(len(head)).encode()), *ids],
            )
        else:
            await self._respond(send, 200, head, extra=ids)
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
