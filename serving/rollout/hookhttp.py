"""The HTTP side of webhooks and notifications (httpx): a JSON POST per call, bounded in time and in
retries, and a background sender for the fire-and-forget ones. What to call and what an answer means is
``hooks.py``; this module only moves bytes.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from serving.rollout.hooks import (
    FIRE_ATTEMPTS,
    GATE_ATTEMPTS,
    Outcome,
    Webhook,
    answer,
    backoff_s,
    first_no,
    retryable,
)

log = logging.getLogger("mlrollout.hooks")
BODY_LIMIT = 2000  # characters of an answer kept for the reason
QUEUE_LIMIT = 256  # fire-and-forget calls waiting; more are dropped (and logged), never block a rollout


class HookClient:
    """JSON POSTs with one timeout per attempt (connect, read and write alike), no redirects followed
    (a webhook that redirects is a misconfiguration to see, not to chase), bounded retries."""

    def __init__(
        self, transport: httpx.BaseTransport | None = None, sleep: Callable[[float], None] = time.sleep
    ):
        self.client = httpx.Client(
            transport=transport, follow_redirects=False, headers={"User-Agent": "mlrollout-operator"}
        )
        self.sleep = sleep

    def post(self, url: str, body: dict[str, Any], timeout_s: float) -> Outcome:
        try:
            r = self.client.post(url, json=body, timeout=timeout_s)
        except httpx.HTTPError as e:
            return Outcome(error=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        return Outcome(status=r.status_code, body=r.text[:BODY_LIMIT])

    def call(self, url: str, body: dict[str, Any], timeout_s: float, attempts: int) -> Outcome:
        o = Outcome(error="not called")
        for attempt in range(1, attempts + 1):
            o = self.post(url, body, timeout_s)
            if not retryable(o) or attempt == attempts:
                return o
            self.sleep(backoff_s(attempt))
        return o

    def ask(self, gate: list[Webhook], body: dict[str, Any]) -> str | None:
        """A gate's verdict (``hooks.first_no``): every webhook in turn until one says no."""
        answers: list[str | None] = []
        for h in gate:
            answers.append(answer(h, self.call(h.url, {**body, "type": h.type}, h.timeout_s, GATE_ATTEMPTS)))
            if answers[-1] is not None:
                break
        return first_no(answers)

    def close(self) -> None:
        self.client.close()


class Sender:
    """Fire and forget: one daemon thread posts queued calls in order, each with ``FIRE_ATTEMPTS``
    attempts; a full queue drops the call (logged). ``close`` gives the queue a bounded time to drain."""

    def __init__(self, client: HookClient):
        self.client = client
        self.q: queue.Queue = queue.Queue(maxsize=QUEUE_LIMIT)
        self.thread = threading.Thread(target=self._run, name="hooks-sender", daemon=True)
        self.thread.start()

    def submit(self, what: str, url: str, body: dict[str, Any], timeout_s: float) -> None:
        try:
            self.q.put_nowait((what, url, body, timeout_s))
        except queue.Full:
            log.warning("%s to %s dropped: %d calls already waiting", what, url, QUEUE_LIMIT)

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            what, url, body, timeout_s = item
            try:
                o = self.client.call(url, body, timeout_s, FIRE_ATTEMPTS)
            except Exception as e:  # a body httpx cannot send, ...: this call is lost, the sender lives on
                o = Outcome(error=f"{type(e).__name__}: {e}")
            finally:
                self.q.task_done()
            if o.yes:
                log.info("%s to %s: HTTP %s", what, url, o.status)
            else:
                log.warning("%s to %s failed after %d attempts: %s", what, url, FIRE_ATTEMPTS,
                            o.error or f"HTTP {o.status}")  # fmt: skip

    def close(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        # Queue.join has no timeout: watch its counter of calls not yet done instead
        while self.q.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(queue.Full):
            self.q.put_nowait(None)
        self.thread.join(timeout=max(deadline - time.monotonic(), 0.1))
