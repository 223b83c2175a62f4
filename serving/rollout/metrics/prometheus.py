"""Prometheus: PromQL over the HTTP API, for the runtime's counters of one model version. Any Prometheus
scraping the runtimes works (the local stack's Debian ``prometheus``, or a cluster's)."""

from __future__ import annotations

import math
import time
from typing import Any

import httpx

from serving.contract import signals
from serving.rollout.metrics.base import (
    AGREEMENT,
    CLASSES,
    DURATION_BUCKET,
    FEEDBACK,
    REQUESTS,
    SCORE_BUCKET,
    MetricsError,
    Target,
)
from serving.rollout.stats import Snapshot, parse_le


class PrometheusProvider:
    """PromQL over the Prometheus HTTP API (``/api/v1/query``)."""

    name = "prometheus"

    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        if not (isinstance(cfg.get("url"), str) and cfg["url"]):
            raise ValueError("url: the prometheus provider needs a URL")

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> PrometheusProvider:
        return cls(cfg["url"])

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
        ag = by(AGREEMENT, signals.RESULT)  # only the local stack's mirror exports it (shadow step)
        return Snapshot(
            requests=by(REQUESTS, signals.STATUS),
            latency={parse_le(k): v for k, v in by(DURATION_BUCKET, signals.LE).items()},
            scores={parse_le(k): v for k, v in by(SCORE_BUCKET, signals.LE).items()},
            classes=by(CLASSES, signals.CLASS),
            labelled_correct=fb.get(signals.CORRECT, 0.0),
            labelled_total=fb.get(signals.CORRECT, 0.0) + fb.get(signals.INCORRECT, 0.0),
            agreed_rows=ag.get(signals.AGREE, 0.0),
            compared_rows=ag.get(signals.AGREE, 0.0) + ag.get(signals.DISAGREE, 0.0),
            at=now,
        )
