"""Analysis gates: each judges one window of canary evidence (and the stable baseline).

A gate returns a :class:`GateResult` that carries its evidence: the gate's name, the measured
value, the threshold and comparator, and the sample counts it was computed from. Too few
samples is :attr:`Verdict.INCONCLUSIVE`: never a silent pass, never a promotion.
"""

from __future__ import annotations

import dataclasses
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

    @classmethod
    def inconclusive(
        cls,
        gate: str,
        threshold: float,
        op: str,
        n: int,
        m: int | None = None,
        why: str = "",
        unit: str = "",
    ) -> GateResult:
        """Too little evidence: no value, ``n`` (and ``m``) samples, and ``why`` in the detail."""
        return cls(gate, Verdict.INCONCLUSIVE, None, threshold, op, n, m, unit=unit, detail=why)

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


# Threshold checks shared by the gates' constructors, so the CLI, the KFP step and a stored record
# all get the same refusal (a ValueError naming the field, and the CLI flag in parentheses).
def _number(gate: str, field: str, flag: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{gate} gate: {field} ({flag}) must be a finite number, got {v!r}")
    return float(v)


def _in_range(gate: str, field: str, flag: str, v: Any, lo: float, hi: float, lo_open: bool) -> None:
    x = _number(gate, field, flag, v)
    if not ((lo < x if lo_open else lo <= x) and x <= hi):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ValueError(f"{gate} gate: {field} ({flag}) must be in {interval}, got {v!r}")


def _positive(gate: str, field: str, flag: str, v: Any) -> None:
    if not _number(gate, field, flag, v) > 0:
        raise ValueError(f"{gate} gate: {field} ({flag}) must be > 0, got {v!r}")


def _count(gate: str, field: str, flag: str, v: Any, lo: int = 1, hi: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        want = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise ValueError(f"{gate} gate: {field} ({flag}) must be a whole number {want}, got {v!r}")


def _name(v: Any) -> None:
    if not isinstance(v, str) or not v:
        raise ValueError(f"a gate's name must be a non-empty string, got {v!r}")


class Gate(Protocol):
    name: str

    @property
    def threshold(self) -> float:
        """The value the gate compares with (what a report draws as the line)."""
        ...

    def evaluate(self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot) -> GateResult:
        """``canary``/``stable``: this window's increments; ``stable_ref``: stable since the rollout began."""
        ...


@dataclass(frozen=True)
class SuccessRateGate:
    """Share of canary requests that did not fail on the server side (non-5xx / non-INTERNAL)."""

    min_rate: float = 0.99
    min_requests: int = 20
    name: str = "success_rate"

    def __post_init__(self) -> None:
        _in_range("success_rate", "min_rate", "--min-success-rate", self.min_rate, 0.0, 1.0, lo_open=True)
        _count("success_rate", "min_requests", "--min-requests", self.min_requests)
        _name(self.name)

    @property
    def threshold(self) -> float:
        """What the measured value is compared with."""
        return self.min_rate

    def evaluate(self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot) -> GateResult:
        n = int(canary.total_requests)
        if n < self.min_requests or n <= 0:  # n <= 0: never divide by zero, whatever min_requests says
            return GateResult.inconclusive(
                self.name, self.min_rate, ">=", n, why=f"fewer than {self.min_requests} canary requests"
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

    def __post_init__(self) -> None:
        _positive("latency", "max_ms", "--max-p99-ms", self.max_ms)
        _in_range("latency", "quantile", "quantile", self.quantile, 0.0, 1.0, lo_open=True)
        _count("latency", "min_requests", "--min-requests", self.min_requests)
        _name(self.name)

    @property
    def threshold(self) -> float:
        """What the measured value is compared with."""
        return self.max_ms

    def evaluate(self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot) -> GateResult:
        n = int(canary.latency_count)
        q_ms = histogram_quantile(self.quantile, canary.latency) * 1000.0 if n > 0 else math.nan
        if n < self.min_requests or math.isnan(q_ms):  # an empty histogram is no evidence, not a FAIL
            return GateResult.inconclusive(
                self.name,
                self.max_ms,
                "<=",
                n,
                unit="ms",
                why=f"fewer than {self.min_requests} canary requests",
            )
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
    bins: int = 5  # score buckets merged into this many equal-width bins (2..100)
    name: str = ""

    def __post_init__(self) -> None:
        if self.method not in ("js", "psi"):
            raise ValueError(f"drift method must be 'js' or 'psi', got {self.method!r}")
        if self.method == "js":  # a Jensen-Shannon distance (base 2) lies in [0, 1]
            _in_range("drift", "max_drift", "--max-drift", self.max_drift, 0.0, 1.0, lo_open=True)
        else:
            _positive("drift", "max_drift", "--max-drift", self.max_drift)
        _count("drift", "min_samples", "--min-predictions", self.min_samples)
        _count("drift", "bins", "--drift-bins", self.bins, lo=2, hi=100)
        if not self.name:
            object.__setattr__(self, "name", f"drift_{self.method}")
        _name(self.name)

    @property
    def threshold(self) -> float:
        """What the measured value is compared with."""
        return self.max_drift

    def evaluate(self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot) -> GateResult:
        n = int(canary.predictions)
        base = stable if stable.predictions >= self.min_samples else stable_ref
        m = int(base.predictions)
        fn = js_distance if self.method == "js" else psi
        d = math.nan
        if min(n, m) >= max(self.min_samples, 1):
            d = fn(coarsen(canary.scores, self.bins), coarsen(base.scores, self.bins))
        if math.isnan(d):  # too few predictions on a side (or none at all): no evidence, never a FAIL
            return GateResult.inconclusive(
                self.name,
                self.max_drift,
                "<=",
                n,
                m,
                why=f"fewer than {self.min_samples} predictions on a side",
            )
        return GateResult(self.name, _judge(d <= self.max_drift), d, self.max_drift, "<=", n, m)


@dataclass(frozen=True)
class AccuracyGate:
    """Canary accuracy on labelled feedback: at least ``min_accuracy`` and (when the stable side
    has labels) no more than ``max_drop`` below stable's accuracy over the rollout."""

    min_accuracy: float = 0.0
    max_drop: float | None = 0.05
    min_labelled: int = 50
    name: str = "accuracy"

    def __post_init__(self) -> None:
        _in_range("accuracy", "min_accuracy", "--min-accuracy", self.min_accuracy, 0.0, 1.0, lo_open=False)
        if self.max_drop is not None:
            _in_range("accuracy", "max_drop", "--max-accuracy-drop", self.max_drop, 0.0, 1.0, lo_open=False)
        _count("accuracy", "min_labelled", "--min-labelled", self.min_labelled)
        _name(self.name)

    @property
    def threshold(self) -> float:
        """The configured floor (a stable baseline may raise it per analysis)."""
        return self.min_accuracy

    def evaluate(self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot) -> GateResult:
        n = int(canary.labelled_total)
        m = int(stable_ref.labelled_total)
        threshold = self.min_accuracy
        if self.max_drop is not None and m >= max(self.min_labelled, 1):
            threshold = max(threshold, stable_ref.labelled_correct / m - self.max_drop)
        if n < self.min_labelled or n <= 0:
            return GateResult.inconclusive(
                self.name,
                threshold,
                ">=",
                n,
                m,
                why=f"fewer than {self.min_labelled} labelled canary answers",
            )
        acc = canary.labelled_correct / n
        return GateResult(self.name, _judge(acc >= threshold), acc, threshold, ">=", n, m)


def _field_default(cls: type, field: str) -> Any:
    return {f.name: f.default for f in dataclasses.fields(cls)}[field]


# The gates' settings under the names of the CLI flags (and the KFP step's parameters), each taken from
# the gate's own dataclass field: the thresholds are written there and nowhere else.
DEFAULTS: dict[str, Any] = {
    "min_success_rate": _field_default(SuccessRateGate, "min_rate"),
    "max_p99_ms": _field_default(LatencyGate, "max_ms"),
    "min_requests": _field_default(SuccessRateGate, "min_requests"),
    "max_drift": _field_default(DriftGate, "max_drift"),
    "drift_method": _field_default(DriftGate, "method"),
    "drift_bins": _field_default(DriftGate, "bins"),
    "min_predictions": _field_default(DriftGate, "min_samples"),
    "min_accuracy": None,  # None: no accuracy gate (it needs labelled feedback)
    "max_accuracy_drop": _field_default(AccuracyGate, "max_drop"),
    "min_labelled": _field_default(AccuracyGate, "min_labelled"),
}
assert DEFAULTS["min_requests"] == _field_default(LatencyGate, "min_requests")


def defaults(*, drift: bool = True, **overrides: Any) -> list[Gate]:
    """The standard gates: success rate, p99 latency, drift (unless ``drift=False``), and accuracy when
    ``min_accuracy`` is given. ``overrides`` use the names of :data:`DEFAULTS` (TypeError for another)."""
    if unknown := sorted(set(overrides) - set(DEFAULTS)):
        raise TypeError(f"unknown gate settings {unknown}; known: {sorted(DEFAULTS)}")
    o = {**DEFAULTS, **overrides}
    gates: list[Gate] = [
        SuccessRateGate(min_rate=o["min_success_rate"], min_requests=o["min_requests"]),
        LatencyGate(max_ms=o["max_p99_ms"], min_requests=o["min_requests"]),
    ]
    if drift:
        gates.append(
            DriftGate(
                max_drift=o["max_drift"],
                method=o["drift_method"],
                min_samples=o["min_predictions"],
                bins=o["drift_bins"],
            )
        )
    if o["min_accuracy"] is not None:
        gates.append(
            AccuracyGate(
                min_accuracy=o["min_accuracy"],
                max_drop=o["max_accuracy_drop"],
                min_labelled=o["min_labelled"],
            )
        )
    return gates


def evaluate_all(
    gates: list[Gate], canary: Snapshot, stable: Snapshot, stable_ref: Snapshot
) -> list[GateResult]:
    return [g.evaluate(canary, stable, stable_ref) for g in gates]


def gates_to_config(gates: list[Gate]) -> list[dict[str, Any]]:
    return [{"kind": type(g).__name__, **{k: v for k, v in vars(g).items()}} for g in gates]


_KINDS = {c.__name__: c for c in (SuccessRateGate, LatencyGate, DriftGate, AccuracyGate)}


def gates_from_config(cfg: list[dict[str, Any]]) -> list[Gate]:
    """Gates from their stored config; a ValueError naming the entry (``gates[i]``) for a bad one."""
    if not isinstance(cfg, list):
        raise ValueError(f"gates must be a list, got {type(cfg).__name__}")
    out = []
    for i, c in enumerate(cfg):
        if not isinstance(c, dict):
            raise ValueError(f"gates[{i}] must be an object, got {type(c).__name__}")
        c = dict(c)
        kind = c.pop("kind", None)
        if kind not in _KINDS:
            raise ValueError(f"gates[{i}]: unknown gate kind {kind!r}; known: {sorted(_KINDS)}")
        fields = {f.name for f in dataclasses.fields(_KINDS[kind])}
        if unknown := sorted(set(c) - fields):
            raise ValueError(f"gates[{i}] ({kind}): unknown fields {unknown}")
        try:
            out.append(_KINDS[kind](**c))
        except ValueError as e:
            raise ValueError(f"gates[{i}]: {e}") from None
    return out
