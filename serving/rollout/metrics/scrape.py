"""Scrape: read each runtime's ``/metrics`` directly, for a stack without Prometheus."""

from __future__ import annotations

import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from serving.contract import signals
from serving.rollout.metrics.base import (
    CLASSES,
    DURATION_BUCKET,
    FEEDBACK,
    REQUESTS,
    SCORE_BUCKET,
    MetricsError,
    Target,
)
from serving.rollout.stats import Snapshot, parse_le


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

    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        """Nothing to check: the URLs are the targets' (``Target.metrics_url``)."""

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ScrapeProvider:
        return cls()

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
