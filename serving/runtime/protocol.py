"""uvicorn's httptools protocol with the limits it lacks: header size and count, a deadline for the
request headers, and a connection cap that evicts idle connections before it refuses anybody.

Why here and not in the ASGI layer: by the time the ASGI app sees a request, httptools has already
buffered and parsed every header byte. One request with a 256 MiB header stalled the event loop for 70 s
(hardening.md, area 2 #12); 1,100 sockets that never sent a byte exhausted the file descriptors and took
the server down for every client (#5); both happen below ASGI.

* **Header size and count**: more than ``max_header_bytes`` (request line + headers) or more than
  ``max_headers`` header lines -> ``431 Request Header Fields Too Large`` and the connection closes, after
  at most ``max_header_bytes`` were buffered.
* **Header deadline**: a request's headers must be complete within ``header_timeout_s`` of its first byte,
  and a fresh connection must send its first request within the same time -> ``408`` and close.
  (Between requests uvicorn's own keep-alive timeout applies; the body has its own deadline in the ASGI
  layer.)
* **Connection cap**: at ``max_connections`` open connections a new one first evicts the oldest *idle*
  connection (no request in progress, no byte of a new one received): busy clients keep being served
  while idle sockets are dropped. Only when none is idle does the new connection get a ``503`` and close.
"""

from __future__ import annotations

import time

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_REASONS = {
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


_SLICE = 16 * 1024  # bytes fed to the parser at a time while a request's headers are incomplete


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    # Class-level settings: uvicorn builds one protocol object per connection from ``Config.http`` (this
    # class). ``configure`` sets them once per process; with --workers > 1 each spawned worker re-imports
    # this module, so RuntimeRESTServer.run configures again there.
    max_header_bytes = 64 * 1024
    max_headers = 100
    header_timeout_s = 10.0
    max_connections = 1000

    @classmethod
    def configure(cls, **settings) -> type[LimitedHttpToolsProtocol]:
        unknown = set(settings) - {"max_header_bytes", "max_headers", "header_timeout_s", "max_connections"}
        if unknown:
            raise TypeError(f"unknown protocol settings: {sorted(unknown)}")
        for k, v in settings.items():
            setattr(cls, k, v)
        return cls

    # --- connection -----------------------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self._awaiting = True  # the headers of the connection's next request are not complete yet
        self._began = False  # a byte of that request has arrived (its headers are in progress)
        self._header_bytes = 0  # bytes fed to the parser since that request began
        self._header_size = 0
        self._header_count = 0
        self._too_large = ""
        self._idle_since = time.monotonic()
        self._deadline = None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._evict_idle():
            self._reject(503, "too many connections: retry shortly")
            return
        self._arm_deadline()  # a fresh connection must start its first request in time

    def connection_lost(self, exc) -> None:
        self._disarm_deadline()
        super().connection_lost(exc)

    def _evict_idle(self) -> bool:
        idle = [
            c
            for c in self.connections
            if c is not self and isinstance(c, LimitedHttpToolsProtocol) and c._is_idle()
        ]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._idle_since)
        oldest._disarm_deadline()
        oldest.transport.close()
        oldest.connections.discard(oldest)
        return True

    def _is_idle(self) -> bool:
        return (
            self._awaiting
            and not self._began
            and self._header_bytes == 0
            and not self._in_request()
            and not self.transport.is_closing()
        )

    def _in_request(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    # --- deadline for the request headers -------------------------------------------------------------

    def _arm_deadline(self) -> None:
        self._disarm_deadline()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._deadline_passed)

    def _disarm_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self._awaiting and not self._in_request() and not self.transport.is_closing():
            self._reject(408, f"request headers not received within {self.header_timeout_s:g} s")

    # --- parsing ----------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._awaiting:
            return self._feed(data)
        if self._header_bytes == 0 and len(data) <= _SLICE:
            # The common case: a whole small request in one read. Parse it without slicing; the parser's
            # own callbacks (_count) still enforce the size and count limits.
            self._feed(data)
            if self._began:
                self._header_bytes = len(data)
        else:
            # While headers are incomplete feed small slices, so the header bytes are counted exactly
            # enough and a flood is refused after max_header_bytes, never after the whole of it is buffered.
            view, i = memoryview(data), 0
            while i < len(data):
                if not self._awaiting:
                    return self._feed(bytes(view[i:]))
                piece = bytes(view[i : i + _SLICE])
                i += len(piece)
                self._header_bytes += len(piece)
                if self._header_bytes > self.max_header_bytes + _SLICE:
                    return self._reject(431, f"request headers are over {self.max_header_bytes} bytes")
                self._feed(piece)
                if self.transport.is_closing():
                    return None
        # Headers still incomplete after this read: their deadline runs from now (or from the connection's
        # start, which armed it already). Never re-armed while armed, so trickled bytes cannot extend it;
        # a request that arrives whole in one read never costs a timer.
        if self._began and self._deadline is None and not self.transport.is_closing():
            self._arm_deadline()
        return None

    def _feed(self, data: bytes) -> None:
        super().data_received(data)
        if self._too_large and not self.transport.is_closing():
            self._reject(431, self._too_large)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting = True
        self._began = True
        self._too_large = ""
        self._header_count = 0
        self._header_size = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count(len(url), 0)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 1)
        if not self._too_large:
            super().on_header(name, value)

    def _count(self, size: int, lines: int) -> None:
        self._header_size += size
        self._header_count += lines
        if self._too_large:
            return
        if self._header_size > self.max_header_bytes:
            self._too_large = f"request headers are over {self.max_header_bytes} bytes"
        elif self._header_count > self.max_headers:
            self._too_large = f"more than {self.max_headers} request headers"

    def on_headers_complete(self) -> None:
        if self._too_large:
            return  # _feed answers 431 once the parser returns
        self._awaiting = False
        self._began = False
        self._header_bytes = 0
        self._disarm_deadline()
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._too_large:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._too_large:
            return
        super().on_message_complete()
        self._awaiting = True  # the next bytes on this connection begin a new request
        self._header_bytes = 0
        self._idle_since = time.monotonic()

    # --- answers ------------------------------------------------------------------------------------------

    def _reject(self, status: int, message: str) -> None:
        """A JSON error and close: the request never reached the ASGI app."""
        self._disarm_deadline()
        if self.transport.is_closing():
            return
        body = orjson.dumps({"error": message})
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body))
        )
        self.transport.write(head + body)
        self.transport.close()
        self.connections.discard(self)
