"""What every metrics backend shares: the error, the :class:`Target` (which series belong to one side
of the rollout) and the :class:`MetricsProvider` interface.

Flagger's ``pkg/metrics/providers`` split: one small interface, one file per backend
(:mod:`.prometheus`, :mod:`.scrape`), a registry in :mod:`serving.rollout.metrics`. Every backend
returns a :class:`~serving.rollout.stats.Snapshot` of cumulative counters; the controller subtracts
snapshots to get the window a gate judges, so all backends give gates the same numbers. Metric names
and labels are ``serving.contract.signals`` (the README contract). Labelled feedback, when there is
any, is the optional counter ``signals.FEEDBACK_TOTAL`` by model, version and outcome (``correct`` or
``incorrect``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from serving.contract import signals
from serving.contract.errors import MlrolloutError
from serving.rollout.stats import Snapshot

REQUESTS = signals.REQUESTS_TOTAL
DURATION_BUCKET = signals.REQUEST_DURATION_BUCKET
SCORE_BUCKET = signals.PREDICTION_SCORE_BUCKET
CLASSES = signals.PREDICTED_CLASS_TOTAL
FEEDBACK = signals.FEEDBACK_TOTAL
AGREEMENT = signals.MIRROR_LABEL_ROWS_TOTAL


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

    # the registry's side (classmethods): the record's ``metrics`` config in and out
    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        """Raise ValueError naming the field when ``cfg`` cannot build this provider."""
        ...

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> MetricsProvider: ...
