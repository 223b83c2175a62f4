"""Metrics providers: where the gates' evidence comes from.

Flagger's ``pkg/metrics/providers`` split: one small interface, one implementation per backend.

* :class:`PrometheusProvider` asks a Prometheus server (HTTP API, PromQL) for the runtime's
  counters of one model version; any Prometheus scraping the runtimes works (the local stack's
  Debian ``prometheus``, or a cluster's).
* :class:`ScrapeProvider` reads the runtime's ``/metrics`` itself, for a stack without Prometheus.

Both return a :class:`~serving.rollout.stats.Snapshot` of cumulative counters; the controller
subtracts snapshots to get the window a gate judges, so both providers give gates the same
numbers. Metric names and labels are ``serving.contract.signals`` (the README contract). Labelled
feedback, when there is any, is the optional counter ``signals.FEEDBACK_TOTAL`` by model, version
and outcome (``correct`` or ``incorrect``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

from serving.contract import signals
from serving.contract.errors import MlrolloutError
from serving.rollout.stats import Snapshot, parse_le

REQUESTS = signals.REQUESTS_TOTAL
DURATION_BUCKET = signals.REQUEST_DURATION_BUCKET
SCORE_BUCKET = signals.PREDICTION_SCORE_BUCKET
CLASSES = signals.PREDICTED_CLASS_TOTAL
FEEDBACK = signals.FEEDBACK_TOTAL


class MetricsError(MlrolloutError, RuntimeError):
    """The metrics backend could not be read (down, bad query, unexpected answer)."""


@dataclass(frozen=True)
class Target:
    """One side of the rollout: which series belong to it."""

    model: str
    version: str
    metrics_url: str = ""  # for ScrapeProvider: the runtime's /metrics URL
    extra: dict[str, str] = field(default_factory=dict)  # extra label matchers (e.g. namespace)

    def selector(self) -> str:
        labels = {signals.MODEL: self.model, signals.VERSION: self.version, **self.extra}
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items()))
        return "{" + inner + "}"

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "version": self.version,
            "metrics_url": self.metrics_url,
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Target:
        return cls(d["model"], d["version"], d.get("metrics_url", ""), dict(d.get("extra", {})))


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"')


class MetricsProvider(Protocol):
    name: str

    def online(self) -> bool:
        """True when the backend answers (Flagger's ``IsOnline``)."""
        ...

    def snapshot(self, target: Target) -> Snapshot:
        """The cumulative counters of ``target`` now; raises :class:`MetricsError`."""
        ...


class PrometheusProvider:
    """PromQL over the Prometheus HTTP API (``/api/v1/query``)."""

    name = "prometheus"

    def __init__(self, url: str, timeout_s: float = 5.0, client: httpx.Client | None = None):
        self.url = url.rstrip("/")
        self._client = client or httpx.Client(timeout=timeout_s)

    def online(self) -> bool:
        try:
            return self._client.get(f"{self.url}/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def query_vector(self, expr: str, at: float | None = None) -> list[tuple[dict[str, str], float]]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        try:
            r = self._client.get(f"{self.url}/api/v1/query", params=params)
        except httpx.HTTPError as e:
            raise MetricsError(f"prometheus at {self.url} unreachable: {e}") from e
        try:
            body = r.json()
        except ValueError as e:
            raise MetricsError(f"prometheus answered {r.status_code} with no JSON: {r.text[:200]}") from e
        if r.status_code != 200 or body.get("status") != "success":
            raise MetricsError(
                f"prometheus query {expr!r} failed ({r.status_code}): {body.get('error', body)}"
            )
        data = body["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise MetricsError(f"prometheus query {expr!r} returned a {data['resultType']}, not a vector")
        return [(s["metric"], float(s["value"][1])) for s in data["result"]]

    def query(self, expr: str, at: float | None = None) -> float:
        """One number (Flagger's ``RunQuery``): the single sample of ``expr``; NaN when it is empty."""
        v = self.query_vector(expr, at)
        if not v:
            return math.nan
        if len(v) > 1:
            raise MetricsError(f"prometheus query {expr!r} returned {len(v)} series; aggregate it to one")
        return v[0][1]

    def snapshot(self, target: Target) -> Snapshot:
        sel = target.selector()
        now = time.time()

        def by(metric: str, label: str) -> dict[str, float]:
            return {
                m.get(label, ""): v for m, v in self.query_vector(f"sum by ({label}) ({metric}{sel})", now)
            }

        fb = by(FEEDBACK, signals.OUTCOME)
        return Snapshot(
            requests=by(REQUESTS, signals.STATUS),
            latency={parse_le(k): v for k, v in by(DURATION_BUCKET, signals.LE).items()},
            scores={parse_le(k): v for k, v in by(SCORE_BUCKET, signals.LE).items()},
            classes=by(CLASSES, signals.CLASS),
            labelled_correct=fb.get(signals.CORRECT, 0.0),
            labelled_total=fb.get(signals.CORRECT, 0.0) + fb.get(signals.INCORRECT, 0.0),
            at=now,
        )


def parse_exposition(text: str, target: Target) -> Snapshot:
    """The ``target``'s counters from Prometheus text exposition (what ``/metrics`` serves)."""
    snap = Snapshot(at=time.time())
    want = {signals.MODEL: target.model, signals.VERSION: target.version, **target.extra}

    def add(d: dict, k, v: float) -> None:
        d[k] = d.get(k, 0.0) + v

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if any(s.labels.get(k) != v for k, v in want.items()):
                continue
            if s.name == REQUESTS:
                add(snap.requests, s.labels.get(signals.STATUS, ""), s.value)
            elif s.name == DURATION_BUCKET:
                add(snap.latency, parse_le(s.labels[signals.LE]), s.value)
            elif s.name == SCORE_BUCKET:
                add(snap.scores, parse_le(s.labels[signals.LE]), s.value)
            elif s.name == CLASSES:
                add(snap.classes, s.labels.get(signals.CLASS, ""), s.value)
            elif s.name == FEEDBACK:
                snap.labelled_total += s.value
                if s.labels.get(signals.OUTCOME) == signals.CORRECT:
                    snap.labelled_correct += s.value
    return snap


class ScrapeProvider:
    """Reads each target's ``/metrics`` directly (no Prometheus needed)."""

    name = "scrape"

    def __init__(self, timeout_s: float = 5.0, client: httpx.Client | None = None):
        self._client = client or httpx.Client(timeout=timeout_s)
        self._urls: set[str] = set()

    def _get(self, url: str) -> str:
        try:
            r = self._client.get(url)
        except httpx.HTTPError as e:
            raise MetricsError(f"cannot scrape {url}: {e}") from e
        if r.status_code != 200:
            raise MetricsError(f"scraping {url} answered HTTP {r.status_code}")
        return r.text

    def online(self) -> bool:
        try:
            for u in self._urls:
                self._get(u)
        except MetricsError:
            return False
        return True

    def snapshot(self, target: Target) -> Snapshot:
        if not target.metrics_url:
            raise MetricsError(f"the scrape provider needs a metrics URL for {target.model}:{target.version}")
        self._urls.add(target.metrics_url)
        return parse_exposition(self._get(target.metrics_url), target)
