"""A bounded, concurrent traffic generator that records who answered each request.

Sends V2 (Open Inference Protocol) requests of ``batch`` rows through the proxy, at most
``max_requests`` and for at most ``max_seconds``, at about ``rps`` requests per second from
``concurrency`` keep-alive clients. For every request it records the time, HTTP status, the
``x-model-version`` header (which side answered) and latency: the record that proves "no failed
request was caused by a weight change" (a failure *without* a version header came from the proxy or
the network, not from a model).

When rows carry labels it is also the ground-truth caller: it sends each answer's label back through
the proxy to ``POST /v2/models/<name>/feedback`` with the answer's ``x-request-id`` and
``x-feedback-token`` (``feedback_batch`` answers per request), as a real client would; the runtimes
count it and the accuracy gate reads those counters from the metrics backend. What the endpoint
answered is summed in :attr:`TrafficResult.feedback`.

With ``user_keys`` each request carries one of them, drawn at random, in the ``key_header`` header: the
users of a sticky cohort (``serving.rollout.cohorts``); each answer records its key.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np


@dataclass(frozen=True)
class Answer:
    t: float
    status: int  # HTTP status, 0 for a transport error
    version: str  # x-model-version, "" when absent
    latency_s: float
    error: str = ""
    key: str = ""  # the user key sent (user_keys), "" without one


@dataclass
class TrafficResult:
    answers: list[Answer] = field(default_factory=list)
    # what the feedback endpoint answered, summed: rows "correct"/"incorrect", ids "duplicate"/
    # "unknown"/"expired" (not counted), "failed" (feedback requests that were not a 200)
    feedback: Counter = field(default_factory=Counter)

    def window(self, t0: float, t1: float) -> TrafficResult:
        return TrafficResult([a for a in self.answers if t0 <= a.t < t1])

    @property
    def total(self) -> int:
        return len(self.answers)

    def by_version(self) -> Counter:
        return Counter(a.version for a in self.answers if a.status == 200)

    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]

    def proxy_failures(self) -> list[Answer]:
        """Failures no model answered: transport errors and proxy-made errors (no version header)."""
        return [a for a in self.answers if a.status != 200 and not a.version]

    def model_failures(self, version: str) -> list[Answer]:
        return [a for a in self.answers if a.status != 200 and a.version == version]


class TrafficGenerator:
    def __init__(
        self,
        url: str,
        model: str,
        x: np.ndarray,
        y: np.ndarray | None = None,
        *,
        rps: float = 50.0,
        concurrency: int = 4,
        batch: int = 8,
        max_requests: int = 100_000,
        max_seconds: float = 600.0,
        input_name: str = "input",
        timeout_s: float = 10.0,
        seed: int = 0,
        feedback_batch: int = 8,
        user_keys: list[str] | None = None,
        key_header: str = "x-user-id",
    ):
        if len(x) == 0:
            raise ValueError("the traffic generator needs at least one input row")
        self.url = f"{url.rstrip('/')}/v2/models/{model}/infer"
        self.feedback_url = f"{url.rstrip('/')}/v2/models/{model}/feedback"
        self.feedback_batch = feedback_batch
        self._feedback: Counter = Counter()
        self.x, self.y = np.asarray(x, dtype=np.float32), None if y is None else np.asarray(y)
        self.rps, self.concurrency, self.batch = rps, concurrency, batch
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.input_name, self.timeout_s = input_name, timeout_s
        self.user_keys, self.key_header = list(user_keys or ()), key_header
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._sent = 0
        self._answers: list[Answer] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._t0 = 0.0

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> TrafficGenerator:
        self._t0 = time.monotonic()
        self._threads = [
            threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(self.concurrency)
        ]
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 15.0) -> TrafficResult:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        return self.result()

    def __enter__(self) -> TrafficGenerator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def result(self) -> TrafficResult:
        with self._lock:
            return TrafficResult(sorted(self._answers, key=lambda a: a.t), Counter(self._feedback))

    # ----------------------------------------------------------------- work
    def _next_slot(self) -> float | None:
        with self._lock:
            if self._sent >= self.max_requests:
                return None
            slot = self._t0 + self._sent / self.rps
            self._sent += 1
        return slot

    def _body(self) -> tuple[dict, np.ndarray | None]:
        with self._lock:
            idx = self._rng.integers(0, len(self.x), self.batch)
        rows = self.x[idx]
        body = {
            "inputs": [
                {
                    "name": self.input_name,
                    "datatype": "FP32",
                    "shape": list(rows.shape),
                    "data": rows.ravel().tolist(),
                }
            ]
        }
        return body, None if self.y is None else self.y[idx]

    def _worker(self, i: int) -> None:
        deadline = self._t0 + self.max_seconds
        pending: list[dict] = []  # feedback items not sent yet
        with httpx.Client(timeout=self.timeout_s) as client:
            try:
                while not self._stop.is_set():
                    slot = self._next_slot()
                    if slot is None or slot >= deadline:
                        return
                    delay = slot - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        return
                    self._one(client, pending)
                    if len(pending) >= self.feedback_batch:
                        self._send_feedback(client, pending)
            finally:
                self._send_feedback(client, pending)

    def _one(self, client: httpx.Client, pending: list[dict]) -> None:
        body, labels = self._body()
        key = ""
        if self.user_keys:
            with self._lock:
                key = self.user_keys[int(self._rng.integers(0, len(self.user_keys)))]
        t = time.time()
        t_start = time.perf_counter()
        try:
            r = client.post(self.url, json=body, headers={self.key_header: key} if key else None)
            status, version, err = r.status_code, r.headers.get("x-model-version", ""), ""
        except httpx.HTTPError as e:
            r, status, version, err = None, 0, "", f"{type(e).__name__}: {e}"
        latency = time.perf_counter() - t_start
        if r is not None and status == 200 and labels is not None:
            rid, token = r.headers.get("x-request-id"), r.headers.get("x-feedback-token")
            if rid and token:
                pending.append({"id": rid, "token": token, "labels": labels.tolist()})
            else:
                err = "answer without x-request-id / x-feedback-token: no feedback possible"
        elif r is not None and status != 200:
            err = r.text[:200]
        with self._lock:
            self._answers.append(Answer(t, status, version, latency, err, key))

    def _send_feedback(self, client: httpx.Client, pending: list[dict]) -> None:
        if not pending:
            return
        items = pending[:]
        pending.clear()
        try:
            r = client.post(self.feedback_url, json={"feedback": items})
            ok = r.status_code == 200
            got = r.json() if ok else {}
        except (httpx.HTTPError, ValueError):
            ok, got = False, {}
        with self._lock:
            if not ok:
                self._feedback["failed"] += 1
                return
            for k in ("correct", "incorrect"):
                self._feedback[k] += int(got.get(k, 0))
            for k in ("duplicate", "unknown", "expired"):
                self._feedback[k] += len(got.get(k, ()))
