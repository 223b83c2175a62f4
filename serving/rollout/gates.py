"""Analysis gates: each judges one window of canary evidence (and the stable baseline).

A gate returns a :class:`GateResult` that carries its evidence: the gate's name, the measured
value, the threshold and comparator, and the sample counts it was computed from. Too few
samples is :attr:`Verdict.INCONCLUSIVE`: never a silent pass, never a promotion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from serving.rollout.stats import Snapshot, coarsen, histogram_quantile, js_distance, psi


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class GateResult:
    gate: str
    verdict: Verdict
    value: float | None
    threshold: float
    op: str  # the comparison that passes: "<=" or ">="
    samples: int  # canary samples the value was computed from
    baseline_samples: int | None = None  # stable samples, for comparative gates
    unit: str = ""
    detail: str = ""

    def summary(self) -> str:
        v = "n/a" if self.value is None or math.isnan(self.value) else _fmt(self.value, self.unit)
        t = _fmt(self.threshold, self.unit)
        n = f"n={self.samples}" + (
            f" vs {self.baseline_samples}" if self.baseline_samples is not None else ""
        )
        cmp = {Verdict.PASS: self.op, Verdict.FAIL: _negate(self.op), Verdict.INCONCLUSIVE: "?"}[self.verdict]
        s = f"{self.gate}={v} {cmp} {t} ({n}) {self.verdict.value.upper()}"
        return s + (f" [{self.detail}]" if self.detail else "")

    def to_dict(self) -> dict[str, Any]:
        value = None if self.value is None or math.isnan(self.value) else self.value
        return {
            "gate": self.gate,
            "verdict": self.verdict.value,
            "value": value,
            "threshold": self.threshold,
            "op": self.op,
            "samples": self.samples,
            "baseline_samples": self.baseline_samples,
            "unit": self.unit,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateResult:
        return cls(**{**d, "verdict": Verdict(d["verdict"])})


def _fmt(x: float, unit: str) -> str:
    if unit == "ms":
        return f"{x:.1f}ms"
    return f"{x:.4g}"


def _negate(op: str) -> str:
    return {"<=": ">", ">=": "<"}[op]


def overall_verdict(results: tuple[GateResult, ...] | list[GateResult]) -> Verdict:
    """FAIL if any gate fails; else INCONCLUSIVE if any lacks samples (or there are no gates); else PASS."""
    if any(r.verdict is Verdict.FAIL for r in results):
        return Verdict.FAIL
    if not results or any(r.verdict is Verdict.INCONCLUSIVE for r in results):
        return Verdict.INCONCLUSIVE
    return Verdict.PASS


def _judge(ok: bool) -> Verdict:
    return Verdict.PASS if ok else Verdict.FAIL


class Gate(Protocol):
    name: str

    def evaluate(self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot) -> GateResult:
        """``canary``/``stable``: this window's increments; ``stable_ref``: stable since the rollout began."""
        ...


@dataclass(frozen=True)
class SuccessRateGate:
    """Share of canary requests that did not fail on the server side (non-5xx / non-INTERNAL)."""

    min_rate: float = 0.99
    min_requests: int = 20
    name: str = "success_rate"

    def evaluate(self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot) -> GateResult:
        n = int(canary.total_requests)
        if n < self.min_requests:
            return GateResult(
                self.name,
                Verdict.INCONCLUSIVE,
                None,
                self.min_rate,
                ">=",
                n,
                detail=f"fewer than {self.min_requests} canary requests",
            )
        rate = 1.0 - canary.failed_requests / n
        return GateResult(self.name, _judge(rate >= self.min_rate), rate, self.min_rate, ">=", n)


@dataclass(frozen=True)
class LatencyGate:
    """Canary latency quantile (default p99) from the runtime's duration histogram."""

    max_ms: float = 500.0
    quantile: float = 0.99
    min_requests: int = 20
    name: str = "latency_p99"

    def evaluate(self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot) -> GateResult:
        n = int(canary.latency_count)
        if n < self.min_requests:
            return GateResult(
                self.name,
                Verdict.INCONCLUSIVE,
                None,
                self.max_ms,
                "<=",
                n,
                unit="ms",
                detail=f"fewer than {self.min_requests} canary requests",
            )
        q_ms = histogram_quantile(self.quantile, canary.latency) * 1000.0
        return GateResult(self.name, _judge(q_ms <= self.max_ms), q_ms, self.max_ms, "<=", n, unit="ms")


@dataclass(frozen=True)
class DriftGate:
    """Prediction drift canary vs stable over the runtime's score histograms (JS distance or PSI).

    The stable side is this window's stable predictions when it has ``min_samples`` of them,
    else the stable predictions since the rollout began (at a 100% step stable gets no traffic).
    """

    max_drift: float = 0.15
    method: str = "js"  # "js" (Jensen-Shannon distance, base 2) or "psi"
    min_samples: int = 400
    bins: int = 5  # score buckets merged into this many equal-width bins (0 = the runtime's 20)
    name: str = ""

    def __post_init__(self) -> None:
        if self.method not in ("js", "psi"):
            raise ValueError(f"drift method must be 'js' or 'psi', got {self.method!r}")
        if not self.name:
            object.__setattr__(self, "name", f"drift_{self.method}")

    def evaluate(self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot) -> GateResult:
        n = int(canary.predictions)
        base = stable if stable.predictions >= self.min_samples else stable_ref
        m = int(base.predictions)
        if n < self.min_samples or m < self.min_samples:
            return GateResult(
                self.name,
                Verdict.INCONCLUSIVE,
                None,
                self.max_drift,
                "<=",
                n,
                m,
                detail=f"fewer than {self.min_samples} predictions on a side",
            )
        fn = js_distance if self.method == "js" else psi
        d = fn(coarsen(canary.scores, self.bins), coarsen(base.scores, self.bins))
        return GateResult(self.name, _judge(d <= self.max_drift), d, self.max_drift, "<=", n, m)


@dataclass(frozen=True)
class AccuracyGate:
    """Canary accuracy on labelled feedback: at least ``min_accuracy`` and (when the stable side
    has labels) no more than ``max_drop`` below stable's accuracy over the rollout."""

    min_accuracy: float = 0.0
    max_drop: float | None = 0.05
    min_labelled: int = 50
    name: str = "accuracy"

    def evaluate(self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot) -> GateResult:
        n = int(canary.labelled_total)
        m = int(stable_ref.labelled_total)
        threshold = self.min_accuracy
        if self.max_drop is not None and m >= self.min_labelled:
            threshold = max(threshold, stable_ref.labelled_correct / m - self.max_drop)
        if n < self.min_labelled:
            return GateResult(
                self.name,
                Verdict.INCONCLUSIVE,
                None,
                threshold,
                ">=",
                n,
                m,
                detail=f"fewer than {self.min_labelled} labelled canary answers",
            )
        acc = canary.labelled_correct / n
        return GateResult(self.name, _judge(acc >= threshold), acc, threshold, ">=", n, m)


def evaluate_all(
    gates: list[Gate], canary: Snapshot, stable: Snapshot, stable_ref: Snapshot
) -> list[GateResult]:
    return [g.evaluate(canary, stable, stable_ref) for g in gates]


def gates_to_config(gates: list[Gate]) -> list[dict[str, Any]]:
    return [{"kind": type(g).__name__, **{k: v for k, v in vars(g).items()}} for g in gates]


_KINDS = {c.__name__: c for c in (SuccessRateGate, LatencyGate, DriftGate, AccuracyGate)}


def gates_from_config(cfg: list[dict[str, Any]]) -> list[Gate]:
    out = []
    for c in cfg:
        c = dict(c)
        kind = c.pop("kind")
        if kind not in _KINDS:
            raise ValueError(f"unknown gate kind {kind!r}; known: {sorted(_KINDS)}")
        out.append(_KINDS[kind](**c))
    return out
