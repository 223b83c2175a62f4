"""Analysis gates: each judges one window of canary evidence (and the stable baseline).

A gate returns a :class:`GateResult` that carries its evidence: the gate's name, the measured
value, the threshold and comparator, and the sample counts it was computed from. Too few
samples is :attr:`Verdict.INCONCLUSIVE`: never a silent pass, never a promotion.

Two families:

* **absolute limits** (:class:`SuccessRateGate`, :class:`LatencyGate`, :class:`DriftGate`,
  :class:`AccuracyGate`): the canary's window against a fixed number, as Flagger and Argo Rollouts do;
* **comparisons with stable at a stated error rate** (:class:`ErrorRateVsStable`,
  :class:`LatencyVsStable`, :class:`DriftTest`, :class:`AccuracyVsStable`): canary vs stable over the
  whole rollout so far, a chi-square-type statistic judged by the normal-mixture sequential
  probability ratio test (mSPRT; Johari, Koomen, Pekelis & Walsh 2017, "Peeking at A/B tests"), so a
  FAIL keeps its false-rollback rate ``alpha`` however many intervals are checked, and fails as soon
  as the evidence is strong, whatever the step's window holds. :func:`defaults` (``compare=True``, the
  default) uses them beside the absolute p99 limit and splits the rollout's ``alpha`` over them
  (Bonferroni); ``compare=False`` is the absolute limits alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, NotRequired, Protocol, TypedDict, Unpack

from serving.rollout.stats import (
    Snapshot,
    aligned_counts,
    chi2_two_sample,
    coarsen,
    conditional_boundary,
    conditional_log_lr,
    histogram_quantile,
    js_distance,
    mann_whitney,
    mixture_boundary,
    mixture_log_lr,
    psi,
    rate_ratios,
    two_proportion,
)


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
    # the evidence of a sequential comparison (None for an absolute limit): the effect size (canary
    # minus stable, in the gate's own scale), and the test statistic with its decision boundary at this
    # look (a z-scale: the signed z, or sqrt(X^2) for the two-sided drift test); ``sequential``: a FAIL
    # already holds its error rate, so the state machine rolls back at once
    effect: float | None = None
    statistic: float | None = None
    boundary: float | None = None
    sequential: bool = False

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
        # a comparison without information (no spread on either side) has no boundary yet
        t = "n/a" if self.sequential and self.boundary is None else _fmt(self.threshold, self.unit)
        n = f"n={self.samples}" + (
            f" vs {self.baseline_samples}" if self.baseline_samples is not None else ""
        )
        cmp = {Verdict.PASS: self.op, Verdict.FAIL: _negate(self.op), Verdict.INCONCLUSIVE: "?"}[self.verdict]
        s = f"{self.gate}={v} {cmp} {t} ({n}) {self.verdict.value.upper()}"
        if self.sequential and self.effect is not None and not math.isnan(self.effect):
            # a comparison's statistic: a z unless the gate names it (the count test: canary errors)
            label, verdict = self.unit or "z", self.verdict.value.upper()
            s = f"{self.gate}: effect {self.effect:+.4g}, {label}={v} {cmp} {t} ({n}) {verdict}"
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
            "effect": _finite(self.effect),
            "statistic": _finite(self.statistic),
            "boundary": _finite(self.boundary),
            "sequential": self.sequential,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateResult:
        return cls(**{**d, "verdict": Verdict(d["verdict"])})


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


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

    def evaluate(
        self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot, canary_ref: Snapshot | None = None
    ) -> GateResult:
        """``canary``/``stable``: this window's increments; ``stable_ref``/``canary_ref``: each side since
        the rollout began (the absolute limits judge the window only)."""
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

    def evaluate(
        self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot, canary_ref: Snapshot | None = None
    ) -> GateResult:
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

    def evaluate(
        self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot, canary_ref: Snapshot | None = None
    ) -> GateResult:
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

    def evaluate(
        self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot, canary_ref: Snapshot | None = None
    ) -> GateResult:
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

    def evaluate(
        self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot, canary_ref: Snapshot | None = None
    ) -> GateResult:
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


@dataclass(frozen=True)
class AgreementGate:
    """The shadow step's label agreement: of the rows of mirrored requests, the share whose predicted
    label the canary's answer and stable's answer to the *same* request agree on, at least
    ``min_agreement``. Paired per request (the local stack's HAProxy mirror counts them), so it needs no
    ground truth and no traffic-split noise: a class-swapped canary agrees on almost no row."""

    min_agreement: float = 0.9
    min_rows: int = 200
    name: str = "label_agreement"

    def __post_init__(self) -> None:
        _in_range("label agreement", "min_agreement", "--min-agreement", self.min_agreement, 0.0, 1.0, False)
        _count("label agreement", "min_rows", "--min-agreement-rows", self.min_rows)
        _name(self.name)

    @property
    def threshold(self) -> float:
        return self.min_agreement

    def evaluate(
        self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot, canary_ref: Snapshot | None = None
    ) -> GateResult:
        n = int(canary.compared_rows)
        if n < self.min_rows or n <= 0:
            return GateResult.inconclusive(
                self.name,
                self.min_agreement,
                ">=",
                n,
                why=f"fewer than {self.min_rows} mirrored rows compared with stable",
            )
        share = canary.agreed_rows / n
        return GateResult(self.name, _judge(share >= self.min_agreement), share, self.min_agreement, ">=", n)


# ------------------------------------------------------------------ comparisons with stable (sequential)


# The continuation region of the sequential rule, as in Wald's SPRT (Wald 1945, "Sequential tests of
# statistical hypotheses"): a look passes only while the mixture likelihood ratio stays below
# 1/alpha ** HOLD_POWER; between that and 1/alpha it holds the step (INCONCLUSIVE) and collects more.
# Without it a gate passed as soon as the step's window held min_requests and the ratio had not yet
# reached 1/alpha, so at thin traffic a bad canary walked through the steps before its evidence was
# in (make bench-gates at 10 req/s: 8.4 % of +2-point canaries promoted without the hold). The price
# is bounded by the same Ville inequality: a same-model canary's ratio ever reaches
# 1/alpha ** HOLD_POWER with probability at most alpha ** HOLD_POWER (5 % per gate at alpha 0.0025),
# and a held good canary only waits an interval; the FAIL boundary and its error rate are unchanged.
HOLD_POWER = 0.5


def hold_log_lr(alpha: float) -> float:
    """log of the mixture likelihood ratio from which a harmful look holds instead of passing."""
    return HOLD_POWER * math.log(1.0 / alpha)


class _Look(TypedDict):
    """What every sequential look is judged with, beside its likelihood ratio."""

    alpha: float
    harmful: bool
    enough: bool
    effect: float
    n: int
    m: int
    detail: NotRequired[str]
    unit: NotRequired[str]


def sequential_verdict(
    gate: str, *, x2: float, d: int, r: float, signed: float | None = None, **look: Unpack[_Look]
) -> GateResult:
    """The verdict of one look of a sequential comparison (pure; every comparative gate ends here).

    FAIL when the mixture likelihood ratio (:func:`stats.mixture_log_lr` of ``x2`` with ``d`` degrees
    of freedom and information ``r``) reaches 1/``alpha`` and the difference is ``harmful`` (canary
    worse; a one-sided gate ignores a better canary, which only makes it more conservative). HOLD
    (INCONCLUSIVE) while a harmful difference has a ratio of at least 1/``alpha`` ** :data:`HOLD_POWER`
    (:func:`hold_log_lr`): "not failed yet" is not a pass. Else PASS when ``enough`` samples back the
    look, else INCONCLUSIVE. The result carries the effect, the statistic (``signed`` z, or sqrt(X^2))
    and its boundary (sqrt of the X^2 the ratio needs to FAIL) at this n.
    """
    stat = math.sqrt(x2) if signed is None else signed
    if math.isnan(x2) or math.isnan(stat):
        why = look.get("detail") or "no samples to compare"
        return GateResult(
            gate, Verdict.INCONCLUSIVE, None, 0.0, "<=", look["n"], look["m"], detail=why, sequential=True
        )
    bound = mixture_boundary(alpha=look["alpha"], r=r, d=d)
    boundary = math.sqrt(bound) if math.isfinite(bound) else None
    return _sequential_result(gate, mixture_log_lr(x2, r, d), stat, boundary, **look)


def _sequential_result(
    gate: str, log_lr: float, stat: float, boundary: float | None, **look: Unpack[_Look]
) -> GateResult:
    # FAIL / hold / PASS / INCONCLUSIVE from a look's log likelihood ratio (every sequential gate)
    alpha, harmful, enough, detail = look["alpha"], look["harmful"], look["enough"], look.get("detail", "")
    failed = harmful and log_lr >= math.log(1.0 / alpha)
    held = harmful and not failed and log_lr >= hold_log_lr(alpha)
    verdict = Verdict.FAIL if failed else Verdict.PASS if enough and not held else Verdict.INCONCLUSIVE
    why = f"log LR {log_lr:.2f} vs log(1/alpha) {math.log(1 / alpha):.2f}, alpha {alpha:.3g}"
    if held:
        why += f"; hold: log LR >= {hold_log_lr(alpha):.2f}, evidence of harm, keep collecting"
    return GateResult(
        gate,
        verdict,
        stat,
        0.0 if boundary is None else boundary,
        "<=",
        look["n"],
        look["m"],
        unit=look.get("unit", ""),
        detail=f"{detail}; {why}" if detail else why,
        effect=look["effect"],
        statistic=stat,
        boundary=boundary,
        sequential=True,
    )


def _rollout_sides(canary: Snapshot, stable_ref: Snapshot, canary_ref: Snapshot | None) -> Snapshot:
    # the evidence of a comparison accumulates over the whole rollout (canary and stable since it began:
    # the same period, so both sides saw the same load and inputs); without canary_ref, the step window
    return canary if canary_ref is None else canary_ref


def _check_alpha(gate: str, alpha: Any) -> None:
    _in_range(gate, "alpha", "--alpha", alpha, 0.0, 0.5, lo_open=True)


def _proportion_vs_stable(
    gate: str,
    alpha: float,
    min_effect: float,
    min_n: int,
    bad: Callable[[Snapshot], tuple[float, float]],
    what: str,
    canary: Snapshot,
    stable_ref: Snapshot,
    canary_ref: Snapshot | None,
) -> GateResult:
    # one-sided two-proportion comparison of the share of ``bad`` outcomes ((bad, trials) of a side)
    c = _rollout_sides(canary, stable_ref, canary_ref)
    (k_c, n_c), (k_s, n_s) = bad(c), bad(stable_ref)
    n, m = int(n_c), int(n_s)
    diff, z, var = two_proportion(k_c, n_c, k_s, n_s)
    r = min_effect**2 / var if var and var > 0 else 0.0
    enough = bad(canary)[1] >= min_n and m >= min_n
    detail = (
        f"canary {_pct(k_c, n)} vs stable {_pct(k_s, m)} {what}"
        if n and m
        else f"fewer than {min_n} {what} counted on a side"
    )
    return sequential_verdict(
        gate,
        x2=z * z if z == z else math.nan,
        d=1,
        r=r,
        alpha=alpha,
        harmful=diff > 0,
        enough=enough,
        effect=diff,
        n=n,
        m=m,
        signed=z,
        detail=detail,
    )


def _errors(s: Snapshot) -> tuple[float, float]:
    return s.failed_requests, s.total_requests


def _wrong(s: Snapshot) -> tuple[float, float]:
    return s.labelled_total - s.labelled_correct, s.labelled_total


@dataclass(frozen=True)
class _Comparison:
    """What every comparison with stable shares: its ``alpha`` and the smallest effect worth catching
    (the scale tau of its mSPRT mixture, so the test is most sensitive there)."""

    alpha: float = 0.01
    min_effect: float = 0.05

    @property
    def threshold(self) -> float:
        """The smallest effect worth catching (the decision boundary itself moves with n)."""
        return self.min_effect


@dataclass(frozen=True)
class _ProportionVsStable(_Comparison):
    """A share of bad outcomes, canary vs stable (two proportions), one-sided: FAIL only when the
    canary is worse; ``min_effect``, the smallest increase worth catching in absolute share, is the
    mixture's scale tau (the test is most sensitive there); ``min_n`` trials in the step's window and
    on stable make a PASS."""

    min_effect: float = 0.005
    min_n: int = 20
    name: str = ""
    # per subclass: what is counted, the flags that set min_effect and min_n
    what: ClassVar[str] = ""
    flags: ClassVar[tuple[str, str]] = ("", "")
    counts: ClassVar[Callable[[Snapshot], tuple[float, float]]]

    def __post_init__(self) -> None:
        _check_alpha(self.name, self.alpha)
        _in_range(self.name, "min_effect", self.flags[0], self.min_effect, 0.0, 1.0, lo_open=True)
        _count(self.name, "min_n", self.flags[1], self.min_n)
        _name(self.name)

    def evaluate(
        self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot, canary_ref: Snapshot | None = None
    ) -> GateResult:
        return _proportion_vs_stable(
            self.name, self.alpha, self.min_effect, self.min_n, type(self).counts, self.what,
            canary, stable_ref, canary_ref,
        )  # fmt: skip


@dataclass(frozen=True)
class ErrorRateVsStable(_ProportionVsStable):
    """Server-error share canary vs stable, one-sided, by the exact count test: given all k errors of
    both sides, the canary's count against Binomial(k, its share of the requests)
    (:func:`stats.conditional_log_lr`, a mixture over rate ratios from the one that adds ``min_effect``,
    0.005 = 0.5 points, to the pooled rate). Errors are rare, and with a handful of them the normal
    approximation of the other proportion gates is liberal (make bench-gates at 10 req/s, both with the
    hold: 0.6 % false rollbacks with it, 0.38 % with this test; 8 of 1600 more +2-point canaries caught).

    The statistic is the canary's error count, the boundary the most of the k errors that still pass
    at this split (one fewer than :func:`stats.conditional_boundary`; unit "canary errors"), so a FAIL
    reads ``canary errors=5 > 3`` (5 of 5 errors on 10 % of the requests, 3 would still pass)."""

    name: str = "error_rate_vs_stable"
    what: ClassVar[str] = "errors"
    flags: ClassVar[tuple[str, str]] = ("--max-error-increase", "--min-requests")
    counts = staticmethod(_errors)

    def evaluate(
        self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot, canary_ref: Snapshot | None = None
    ) -> GateResult:
        c = _rollout_sides(canary, stable_ref, canary_ref)
        (k_c, n_c), (k_s, n_s) = _errors(c), _errors(stable_ref)
        n, m = int(n_c), int(n_s)
        if n_c <= 0 or n_s <= 0:
            why = "no requests counted on a side"
            return GateResult(
                self.name, Verdict.INCONCLUSIVE, None, 0.0, "<=", n, m, detail=why, sequential=True
            )
        k, pi = k_c + k_s, n_c / (n_c + n_s)
        ratios = rate_ratios(k, n_c + n_s, self.min_effect)
        bound = conditional_boundary(k, pi, ratios, self.alpha)
        diff = k_c / n_c - k_s / n_s
        return _sequential_result(
            self.name,
            conditional_log_lr(k_c, k, pi, ratios),
            k_c,
            bound - 1 if math.isfinite(bound) else None,
            alpha=self.alpha,
            harmful=diff > 0,
            enough=_errors(canary)[1] >= self.min_n and m >= self.min_n,
            effect=diff,
            n=n,
            m=m,
            detail=f"canary {_pct(k_c, n)} vs stable {_pct(k_s, m)} errors; {k:g} in all, "
            f"{100 * pi:.1f}% of the requests canary's",
            unit="canary errors",
        )


@dataclass(frozen=True)
class AccuracyVsStable(_ProportionVsStable):
    """Wrong-answer share on labelled feedback; ``min_effect`` 0.02 = a 2-point accuracy drop."""

    min_effect: float = 0.02
    min_n: int = 50
    name: str = "accuracy_vs_stable"
    what: ClassVar[str] = "wrong (labelled)"
    flags: ClassVar[tuple[str, str]] = ("--accuracy-min-effect", "--min-labelled")
    counts = staticmethod(_wrong)


@dataclass(frozen=True)
class LatencyVsStable(_Comparison):
    """The two latency histograms compared whole: the Mann-Whitney rank statistic over the runtime's
    duration buckets (ties within a bucket), one-sided (FAIL only when the canary is slower).

    The effect is AUC - 1/2: the chance that a canary request is slower than a stable one, minus 1/2
    (ties count half). ``min_effect`` 0.05 means "slower in 55 % of pairs"; a +20 % slowdown of a
    log-normal latency with sigma 0.5 is about 0.14 before bucketing."""

    min_requests: int = 20
    name: str = "latency_vs_stable"

    def __post_init__(self) -> None:
        _check_alpha("latency", self.alpha)
        _in_range("latency", "min_effect", "--latency-min-effect", self.min_effect, 0.0, 0.5, lo_open=True)
        _count("latency", "min_requests", "--min-requests", self.min_requests)
        _name(self.name)

    def evaluate(
        self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot, canary_ref: Snapshot | None = None
    ) -> GateResult:
        c = _rollout_sides(canary, stable_ref, canary_ref)
        n, m = int(c.latency_count), int(stable_ref.latency_count)
        cc, sc = aligned_counts(c.latency, stable_ref.latency)
        eff, z, var = mann_whitney(cc, sc)
        r = self.min_effect**2 / var if var and var > 0 else 0.0
        enough = canary.latency_count >= self.min_requests and m >= self.min_requests
        p99 = ""
        if n and m:
            q_c = histogram_quantile(0.99, c.latency) * 1000
            q_s = histogram_quantile(0.99, stable_ref.latency) * 1000
            p99 = f"p99 canary {q_c:.1f}ms vs stable {q_s:.1f}ms"
        return sequential_verdict(
            self.name,
            x2=z * z if z == z else math.nan,
            d=1,
            r=r,
            alpha=self.alpha,
            harmful=eff > 0,
            enough=enough,
            effect=eff,
            n=n,
            m=m,
            signed=z,
            detail=p99,
        )


@dataclass(frozen=True)
class DriftTest(_Comparison):
    """Prediction drift as a test: the Pearson chi-square of the two score histograms (merged into
    ``bins`` equal-width bins), two-sided, judged against its sampling noise at the n on each side.

    The effect is Cohen's w between the two histograms (:func:`stats.chi2_two_sample`); ``min_effect``
    0.1 is Cohen's "small" w. Two samples of the same model have w about sqrt((bins-1)/n_eff), so a
    fixed cut-off on a distance fails thin windows and passes shifts at high traffic; the boundary here
    moves with n instead."""

    min_effect: float = 0.1
    min_samples: int = 20
    bins: int = 5
    name: str = "drift_chi2"

    def __post_init__(self) -> None:
        _check_alpha("drift", self.alpha)
        _in_range("drift", "min_effect", "--drift-min-effect", self.min_effect, 0.0, 2.0, lo_open=True)
        _count("drift", "min_samples", "--min-requests", self.min_samples)
        _count("drift", "bins", "--drift-bins", self.bins, lo=2, hi=100)
        _name(self.name)

    def evaluate(
        self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot, canary_ref: Snapshot | None = None
    ) -> GateResult:
        c = _rollout_sides(canary, stable_ref, canary_ref)
        n, m = int(c.predictions), int(stable_ref.predictions)
        cc, sc = aligned_counts(coarsen(c.scores, self.bins), coarsen(stable_ref.scores, self.bins))
        x2, d, w = chi2_two_sample(cc, sc)
        n_eff = n * m / (n + m) if n + m else 0.0
        # an isotropic N(0, tau^2/d) mixture per standardised bin: the expected w^2 is tau^2
        r = self.min_effect**2 * n_eff / d if d else 0.0
        enough = canary.predictions >= self.min_samples and m >= self.min_samples
        return sequential_verdict(
            self.name,
            x2=x2,
            d=max(d, 1),
            r=r,
            alpha=self.alpha,
            harmful=True,
            enough=enough,
            effect=w,
            n=n,
            m=m,
            detail=f"{d + 1} bins" if d else "fewer than 2 non-empty bins",
        )


def _pct(k: float, n: float) -> str:
    return f"{100 * k / n:.2f}% of {int(n)}" if n else "n/a"


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
    # the comparisons with stable (defaults(), compare=True): the rollout's false-rollback rate, split
    # over them, and the smallest effect worth catching per gate
    "alpha": _field_default(ErrorRateVsStable, "alpha"),
    "max_error_increase": _field_default(ErrorRateVsStable, "min_effect"),
    "latency_min_effect": _field_default(LatencyVsStable, "min_effect"),
    "drift_min_effect": _field_default(DriftTest, "min_effect"),
    "accuracy_min_effect": None,  # None: no accuracy comparison (it needs labelled feedback)
}
assert DEFAULTS["min_requests"] == _field_default(LatencyGate, "min_requests")
assert DEFAULTS["min_requests"] == _field_default(DriftTest, "min_samples")


def comparisons(*, drift: bool = True, **overrides: Any) -> list[Gate]:
    """The comparisons with stable: error rate, latency, drift (unless ``drift=False``), and accuracy
    when ``accuracy_min_effect`` is given, each at ``alpha`` / (their number), so the rollout's
    false-rollback rate from all of them together stays at most ``alpha`` (a union bound)."""
    o = {**DEFAULTS, **overrides}
    k = 2 + int(drift) + int(o["accuracy_min_effect"] is not None)
    _check_alpha("comparison", o["alpha"])
    a = o["alpha"] / k
    out: list[Gate] = [
        ErrorRateVsStable(alpha=a, min_effect=o["max_error_increase"], min_n=o["min_requests"]),
        LatencyVsStable(alpha=a, min_effect=o["latency_min_effect"], min_requests=o["min_requests"]),
    ]
    if drift:
        out.append(
            DriftTest(
                alpha=a, min_effect=o["drift_min_effect"], min_samples=o["min_requests"], bins=o["drift_bins"]
            )
        )
    if o["accuracy_min_effect"] is not None:
        out.append(AccuracyVsStable(alpha=a, min_effect=o["accuracy_min_effect"], min_n=o["min_labelled"]))
    return out


def defaults(*, drift: bool = True, compare: bool = True, **overrides: Any) -> list[Gate]:
    """The standard gates. By default (``compare=True``) the absolute p99 limit beside the comparisons
    with stable (:func:`comparisons`: error rate, latency histograms, drift unless ``drift=False``,
    accuracy when ``accuracy_min_effect`` is given), plus the absolute accuracy floor when
    ``min_accuracy`` is given. With ``compare=False`` the absolute limits alone: success rate, p99
    latency, drift, and accuracy when ``min_accuracy`` is given. ``overrides`` use the names of
    :data:`DEFAULTS` (TypeError for another); every setting is checked either way, so a bad one is
    refused whichever set is chosen."""
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
    compared = comparisons(drift=drift, **overrides)  # after the absolute gates: their refusals first
    if compare:
        # the absolute p99 limit beside the comparisons; an accuracy floor the caller asked for too
        # (min_accuracy has no default: dropping it would silently stop judging accuracy)
        return [gates[1], *compared, *gates[3 if drift else 2 :]]
    return gates


def evaluate_all(
    gates: list[Gate],
    canary: Snapshot,
    stable: Snapshot,
    stable_ref: Snapshot,
    canary_ref: Snapshot | None = None,
) -> list[GateResult]:
    return [g.evaluate(canary, stable, stable_ref, canary_ref) for g in gates]


# Gates that judge the canary's answers by the labels callers send back for them (feedback). In the
# shadow step no caller ever sees a canary answer, so no label comes back for one: these would only
# ever be inconclusive there and pause the rollout.
LABEL_GATES: tuple[type, ...] = (AccuracyGate, AccuracyVsStable)
# Gates that need mirrored requests (two answers to one request): only the shadow step has them.
SHADOW_ONLY_GATES: tuple[type, ...] = (AgreementGate,)


def shadow_gates(gates: list[Gate]) -> list[Gate]:
    """The gates that judge the shadow step: all but :data:`LABEL_GATES`. Mirrored copies are the same
    requests stable answered, so errors, latency and the score/label distributions compare directly."""
    return [g for g in gates if not isinstance(g, LABEL_GATES)]


def live_gates(gates: list[Gate]) -> list[Gate]:
    """The gates that judge a live step: all but :data:`SHADOW_ONLY_GATES` (no request is mirrored)."""
    return [g for g in gates if not isinstance(g, SHADOW_ONLY_GATES)]


def gates_to_config(gates: list[Gate]) -> list[dict[str, Any]]:
    return [{"kind": type(g).__name__, **{k: v for k, v in vars(g).items()}} for g in gates]


_KINDS = {
    c.__name__: c
    for c in (
        SuccessRateGate,
        LatencyGate,
        DriftGate,
        AccuracyGate,
        AgreementGate,
        ErrorRateVsStable,
        LatencyVsStable,
        DriftTest,
        AccuracyVsStable,
    )
}


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
