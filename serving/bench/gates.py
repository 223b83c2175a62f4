"""Gate-quality benchmark: ``python -m serving.bench.gates`` (``make bench-gates``).

Simulated metric streams go through the real state machine (``serving.rollout.machine``) and the real
gates (``serving.rollout.gates``), with the runtime's metric buckets (``serving.contract.signals``):
per rollout and 1-minute interval, the requests of that minute are split by the canary weight the
policy has set (steps 10 -> 25 -> 50 -> 100), and each side's counters grow by its draws: server
errors, the latency histogram, the score histogram, labelled feedback. Good canaries are the stable
model; bad ones add errors, latency, swapped classes or a score shift. Four policies judge the same
kinds of streams (each rollout index has the same seed under every policy; its draws diverge once the
policies set different weights):

  before    this project's gates before issue 14 (gates.defaults(compare=False, min_accuracy=0.5)):
            success rate >= 99 %, p99 <= 500 ms, drift JS <= 0.15
            (400 predictions a side), accuracy >= stable's - 5 points; the window since the step began;
            rollback after 2 failed analyses, pause after 5 inconclusive in a row
  flagger   Flagger's built-in checks per interval: request-success-rate >= 99 % and request-duration
            p99 <= 500 ms over the last interval; ``threshold`` 2 failed checks roll back
  argo      an Argo Rollouts AnalysisTemplate per interval: successCondition success >= 99 % and
            p99 <= 500 ms, failureCondition success < 95 % or p99 > 1000 ms, in between (or no data)
            inconclusive; the defaults failureLimit 0 and inconclusiveLimit 0 (the first failed
            measurement rolls back, the first inconclusive one pauses)
  compare   issue 14, the default gates: gates.defaults(accuracy_min_effect=0.02, min_labelled=10): the
            p99 <= 500 ms limit and the sequential comparisons with stable at alpha = 0.01 for the whole
            rollout (a harmful look between the hold and the FAIL boundary holds the step); rollback
            after 2 failed analyses of the limit, at once on a comparison's FAIL

It prints per cell the false-rollback rate (good canaries), the missed-bad rate (bad canaries promoted),
the median canary requests a bad canary answered before its rollback, the median minutes to promote a
good one, and writes a PNG (detection vs traffic per policy) and a JSON of every cell.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.contract import signals
from serving.rollout import gates, machine
from serving.rollout.gates import GateResult, Verdict
from serving.rollout.machine import Phase, RolloutSpec
from serving.rollout.stats import RATIO_STEPS, SCALES, Snapshot, histogram_quantile

STEPS = (10, 25, 50, 100)
INTERVAL_S = 60.0
RATES = (1, 10, 100, 1000)  # total requests per second
MAX_INTERVALS = 20  # a rollout still live after 20 minutes counts as stalled
BASE_ERROR = 0.001  # stable's server-error share
BASE_LATENCY_MEDIAN_S, LATENCY_SIGMA = 0.008, 0.6  # log-normal: p99 about 32 ms
LABELLED_SHARE, BASE_ACCURACY = 0.2, 0.95  # labelled feedback on a share of the answers
LAT_BOUNDS = (*signals.LATENCY_BUCKETS, math.inf)
SCORE_BOUNDS = (*signals.SCORE_BUCKETS, math.inf)
POLICIES = ("before", "flagger", "argo", "compare")


@dataclass(frozen=True)
class Kind:
    """One canary: ``family`` (good, error, latency, swap, shift), ``size`` its label."""

    family: str
    size: str
    error_add: float = 0.0  # added server-error share
    latency_factor: float = 1.0
    swap: float = 0.0  # share of inputs whose classes are swapped
    shift: float = 0.0  # logit shift of the score

    @property
    def name(self) -> str:
        return self.family if self.family == "good" else f"{self.family} {self.size}"

    @property
    def smallest(self) -> bool:
        """The smallest effect of its family (the targets exempt it)."""
        return self.size in ("+0.5pt", "+20%", "5%", "small")


KINDS = (
    Kind("good", ""),
    Kind("error", "+0.5pt", error_add=0.005),
    Kind("error", "+2pt", error_add=0.02),
    Kind("error", "+10pt", error_add=0.10),
    Kind("latency", "+20%", latency_factor=1.2),
    Kind("latency", "+50%", latency_factor=1.5),
    Kind("latency", "x3", latency_factor=3.0),
    Kind("swap", "100%", swap=1.0),
    Kind("swap", "20%", swap=0.2),
    Kind("swap", "5%", swap=0.05),
    Kind("shift", "small", shift=0.2),
    Kind("shift", "medium", shift=0.5),
    Kind("shift", "large", shift=1.0),
)


# ----------------------------------------------------------------------------- the simulated world


def _norm_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def latency_pvals(factor: float) -> np.ndarray:
    """Share of requests per runtime latency bucket (last = +Inf) of the log-normal latency."""
    mu = math.log(BASE_LATENCY_MEDIAN_S * factor)
    cdf = [_norm_cdf((math.log(b) - mu) / LATENCY_SIGMA) for b in LAT_BOUNDS[:-1]] + [1.0]
    return np.diff(np.array([0.0, *cdf]))


def score_pvals(swap: float, shift: float, n: int = 400_000, seed: int = 0) -> np.ndarray:
    """Share of predictions per runtime score bucket: a two-mode binary model (63 % positive), whose
    score P(positive) is 1 - score on the ``swap`` share, and moved by ``shift`` in logit space."""
    rng = np.random.default_rng(seed)
    pos = rng.random(n) < 0.63
    s = np.where(pos, rng.beta(8.0, 1.5, n), rng.beta(1.5, 8.0, n))
    if shift:
        logit = np.log(s / (1 - s)) + shift
        s = 1 / (1 + np.exp(-logit))
    if swap:
        s = np.where(rng.random(n) < swap, 1 - s, s)
    idx = np.searchsorted(np.array(SCORE_BOUNDS[:-1]), np.clip(s, 0, 1), side="left")
    return np.bincount(idx, minlength=len(SCORE_BOUNDS)) / n


@dataclass
class Side:
    """One side's cumulative counters, one row per rollout."""

    rows: int
    req: np.ndarray = field(init=False)
    err: np.ndarray = field(init=False)
    lat: np.ndarray = field(init=False)
    score: np.ndarray = field(init=False)
    lab: np.ndarray = field(init=False)
    cor: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.req, self.err = np.zeros(self.rows), np.zeros(self.rows)
        self.lat = np.zeros((self.rows, len(LAT_BOUNDS)))
        self.score = np.zeros((self.rows, len(SCORE_BOUNDS)))
        self.lab, self.cor = np.zeros(self.rows), np.zeros(self.rows)

    def copy(self) -> Side:
        out = Side(0)
        for k in ("req", "err", "lat", "score", "lab", "cor"):
            setattr(out, k, getattr(self, k).copy())
        out.rows = self.rows
        return out

    def window(self, rows: np.ndarray, base: Side | None = None) -> list[Snapshot]:
        """The counters of rollouts ``rows`` (minus ``base``'s) as a metrics provider would read them:
        cumulative histograms, computed for all rows at once (numpy), one Snapshot per row."""

        def d(name: str) -> np.ndarray:
            v = getattr(self, name)[rows]
            return v if base is None else v - getattr(base, name)[rows]

        req, err = d("req").tolist(), d("err").tolist()
        lat, score = np.cumsum(d("lat"), axis=1).tolist(), np.cumsum(d("score"), axis=1).tolist()
        cor, lab = d("cor").tolist(), d("lab").tolist()
        return [
            Snapshot(
                requests={"200": req[k] - err[k], "500": err[k]},
                latency=dict(zip(LAT_BOUNDS, lat[k], strict=True)),
                scores=dict(zip(SCORE_BOUNDS, score[k], strict=True)),
                labelled_correct=cor[k],
                labelled_total=lab[k],
            )
            for k in range(len(req))
        ]


def draw(rng: np.random.Generator, side: Side, live: np.ndarray, n: np.ndarray, world: dict) -> None:
    """Add one interval's outcomes of ``n`` requests (per live rollout) to ``side``."""
    err = rng.binomial(n, world["error"])
    ok = n - err
    side.req[live] += n
    side.err[live] += err
    side.lat[live] += rng.multinomial(n, world["lat"])
    side.score[live] += rng.multinomial(ok, world["score"])
    lab = rng.binomial(ok, LABELLED_SHARE)
    side.lab[live] += lab
    side.cor[live] += rng.binomial(lab, world["accuracy"])


@functools.cache
def worlds(kind: Kind) -> tuple[dict, dict]:
    stable = {
        "error": BASE_ERROR,
        "lat": latency_pvals(1.0),
        "score": score_pvals(0.0, 0.0),
        "accuracy": BASE_ACCURACY,
    }
    canary = {
        "error": BASE_ERROR + kind.error_add,
        "lat": latency_pvals(kind.latency_factor),
        "score": score_pvals(kind.swap, kind.shift),
        "accuracy": BASE_ACCURACY * (1 - kind.swap) + (1 - BASE_ACCURACY) * kind.swap,
    }
    return stable, canary


# ----------------------------------------------------------------------------- the policies


@dataclass(frozen=True)
class ArgoBand:
    """An Argo Rollouts metric with successCondition and failureCondition: pass, fail, or (in between,
    or no data) inconclusive, judged on one interval's measurement."""

    name: str = "argo_success_and_p99"
    threshold: float = 0.99

    def evaluate(self, canary: Snapshot, stable: Snapshot, stable_ref: Snapshot, canary_ref=None):
        n = int(canary.total_requests)
        if n == 0:
            return GateResult.inconclusive(self.name, 0.99, ">=", 0, why="no data (NaN)")
        sr = 1 - canary.failed_requests / n
        p99 = histogram_quantile(0.99, canary.latency) * 1000
        if sr < 0.95 or p99 > 1000:
            v = Verdict.FAIL
        elif sr >= 0.99 and p99 <= 500:
            v = Verdict.PASS
        else:
            v = Verdict.INCONCLUSIVE
        return GateResult(self.name, v, sr, 0.99, ">=", n, detail=f"p99 {p99:.1f}ms")


@dataclass(frozen=True)
class Policy:
    name: str
    gates: tuple
    spec: RolloutSpec
    window: str  # "step" (since the step began) or "interval" (the last interval only)


def policies() -> dict[str, Policy]:
    before = tuple(gates.defaults(compare=False, min_accuracy=0.5))
    flagger = (
        gates.SuccessRateGate(min_rate=0.99, min_requests=1),
        gates.LatencyGate(max_ms=500.0, min_requests=1),
    )
    # labelled feedback is sparse (a fifth of the answers): 10 labelled canary answers in a step's window
    # make a PASS possible, as 20 requests do for the others
    compare = tuple(gates.defaults(accuracy_min_effect=0.02, min_labelled=10))
    many = 10**6  # Flagger has no inconclusive state: a window with no requests waits
    return {
        "before": Policy("before", before, RolloutSpec(STEPS, INTERVAL_S, 2, 5), "step"),
        "flagger": Policy("flagger", flagger, RolloutSpec(STEPS, INTERVAL_S, 2, many), "interval"),
        "argo": Policy("argo", (ArgoBand(),), RolloutSpec(STEPS, INTERVAL_S, 1, 1), "interval"),
        "compare": Policy("compare", compare, RolloutSpec(STEPS, INTERVAL_S, 2, 5), "step"),
    }


# ----------------------------------------------------------------------------- one cell


@dataclass
class Outcome:
    phase: np.ndarray  # per rollout: "Promoted", "RolledBack", or "stalled"
    minutes: np.ndarray  # when it ended
    canary_requests: np.ndarray  # requests the canary answered until then


@dataclass
class World:
    """A cell's random source and counters: each side's since the rollout began (``c``, ``s``), the
    rollout's baselines (zero) and each rollout's step (or interval) baselines."""

    rng: np.random.Generator
    stable: dict
    canary: dict
    c: Side
    s: Side
    c0: Side
    s0: Side
    cs: Side
    ss: Side

    @classmethod
    def new(cls, kind: Kind, rollouts: int, seed: int) -> World:
        w_stable, w_canary = worlds(kind)
        c, s = Side(rollouts), Side(rollouts)
        return cls(
            np.random.default_rng(seed), w_stable, w_canary, c, s, c.copy(), s.copy(), c.copy(), s.copy()
        )

    def interval(self, idx: np.ndarray, weights: np.ndarray, rate: float) -> None:
        """One interval's requests of the live rollouts ``idx``, split by each one's canary weight."""
        total = self.rng.poisson(rate * INTERVAL_S, idx.size)
        n_c = self.rng.binomial(total, weights)
        draw(self.rng, self.c, idx, n_c, self.canary)
        draw(self.rng, self.s, idx, total - n_c, self.stable)

    def rebase(self, rows: np.ndarray) -> None:
        """A new analysis window for ``rows``: their step baselines move to now."""
        for cur, base in ((self.c, self.cs), (self.s, self.ss)):
            for k in ("req", "err", "lat", "score", "lab", "cor"):
                getattr(base, k)[rows] = getattr(cur, k)[rows]


def run_cell(policy: Policy, kind: Kind, rate: float, rollouts: int, seed: int) -> Outcome:
    """``rollouts`` rollouts of ``kind`` at ``rate`` req/s under ``policy``: the real machine and gates."""
    w = World.new(kind, rollouts, seed)
    states = [machine.start(policy.spec, 0.0)[0] for _ in range(rollouts)]
    phase = np.array(["stalled"] * rollouts, dtype=object)
    minutes = np.full(rollouts, float(MAX_INTERVALS))
    live = np.ones(rollouts, dtype=bool)
    for t in range(1, MAX_INTERVALS + 1):
        idx = np.flatnonzero(live)
        if idx.size == 0:
            break
        w.interval(idx, np.array([states[i].weight for i in idx]) / 100.0, rate)
        now = t * INTERVAL_S
        windows = zip(
            w.c.window(idx, w.cs),
            w.s.window(idx, w.ss),
            w.s.window(idx, w.s0),
            w.c.window(idx, w.c0),
            strict=True,
        )
        for i, args in zip(idx, windows, strict=True):
            results = [g.evaluate(*args) for g in policy.gates]
            new, d = machine.analyse(states[i], policy.spec, results, now)
            states[i] = new
            if policy.window == "interval" or d.reset_window:
                w.rebase(np.array([i]))
            if new.phase is not Phase.PROGRESSING:
                live[i] = False
                minutes[i] = t
                phase[i] = new.phase.value if new.phase.terminal else "stalled"
    return Outcome(phase, minutes, w.c.req.copy())


# ----------------------------------------------------------------------------- the same, vectorised
# run_cell judges each rollout with the real gates and machine: exact, but about 1-3 ms per look in
# Python, so 1600 rollouts x 208 cells would take over an hour. run_cell_fast does the same arithmetic
# on arrays (every rollout of a cell at once); check_equivalence runs both on the same draws and
# requires identical outcomes, rollout by rollout (the bench does it on every run, the tests too).

PASS_, FAIL_, INC_ = 0, 1, 2
_LOG = {}


class W:
    """One side's window (counts per live rollout) as arrays."""

    def __init__(self, side: Side, rows: np.ndarray, base: Side | None = None) -> None:
        def d(name: str) -> np.ndarray:
            v = getattr(side, name)[rows]
            return v if base is None else v - getattr(base, name)[rows]

        self.req, self.err, self.lat, self.score = d("req"), d("err"), d("lat"), d("score")
        self.lab, self.cor = d("lab"), d("cor")
        self.pred = self.score.sum(axis=1)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def v_quantile(q: float, counts: np.ndarray) -> np.ndarray:
    """stats.histogram_quantile per row of per-bucket counts over LAT_BOUNDS (seconds); NaN when empty."""
    cum = np.cumsum(counts, axis=1)
    total = cum[:, -1]
    rank = q * total
    j = np.argmax(cum >= rank[:, None], axis=1)
    bounds = np.array(LAT_BOUNDS)
    finite_max = LAT_BOUNDS[-2]
    lo_b = np.where(j > 0, bounds[np.maximum(j - 1, 0)], 0.0)
    lo_c = np.where(j > 0, np.take_along_axis(cum, np.maximum(j - 1, 0)[:, None], 1)[:, 0], 0.0)
    c = np.take_along_axis(cum, j[:, None], 1)[:, 0]
    b = bounds[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = np.where(c == lo_c, b, lo_b + (b - lo_b) * (rank - lo_c) / (c - lo_c))
    out = np.where(np.isinf(b), finite_max, inner)
    return np.where(total > 0, out, np.nan)


def v_coarsen(score: np.ndarray, bins: int) -> np.ndarray:
    idx = np.array(_bin_of_scores(bins))
    out = np.zeros((score.shape[0], bins))
    for k in range(bins):
        out[:, k] = score[:, idx == k].sum(axis=1)
    return out


def _bin_of_scores(bins: int) -> tuple[int, ...]:
    from serving.rollout.stats import _bin_of

    return _bin_of(SCORE_BOUNDS, bins)


def v_js(c: np.ndarray, s: np.ndarray) -> np.ndarray:
    sp, sq = c.sum(axis=1, keepdims=True), s.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p, q = c / sp, s / sq
        m = (p + q) / 2
        tp = np.where(p > 0, 0.5 * p * np.log2(np.where(p > 0, p, 1) / np.where(m > 0, m, 1)), 0.0)
        tq = np.where(q > 0, 0.5 * q * np.log2(np.where(q > 0, q, 1) / np.where(m > 0, m, 1)), 0.0)
    jsd = (tp + tq).sum(axis=1)
    return np.where((sp[:, 0] > 0) & (sq[:, 0] > 0), np.sqrt(np.maximum(jsd, 0.0)), np.nan)


def v_sequential(x2, r, d, alpha, harmful, enough) -> tuple[np.ndarray, np.ndarray]:
    """gates.sequential_verdict on arrays: (verdict code, failed)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rk = [np.maximum(r, 0) * k * k for k in SCALES]
        logs = np.stack([-0.5 * d * np.log1p(q) + q / (1 + q) * x2 / 2 for q in rk])
        log_lr = np.where(r > 0, np.logaddexp.reduce(logs, axis=0) - math.log(len(SCALES)), 0.0)
    nan = np.isnan(x2)
    failed = ~nan & harmful & (log_lr >= math.log(1.0 / alpha))
    held = ~nan & harmful & ~failed & (log_lr >= gates.hold_log_lr(alpha))
    code = np.where(nan, INC_, np.where(failed, FAIL_, np.where(enough & ~held, PASS_, INC_)))
    return code, failed


def v_conditional(g: Any, kc, nc, ks, ns, nwin) -> tuple[np.ndarray, np.ndarray]:
    """gates.ErrorRateVsStable (stats.conditional_log_lr, the exact count test) on arrays."""
    k, n = kc + ks, nc + ns
    ok = (nc > 0) & (ns > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        pi = nc / np.where(ok, n, 1)
        lo = 1.0 + g.min_effect / np.where(k > 0, k / np.where(n > 0, n, 1), 1)
        logs = np.stack(
            [kc * np.log(lo * 2.0**j) - k * np.log1p((lo * 2.0**j - 1.0) * pi) for j in range(RATIO_STEPS)]
        )
        log_lr = np.logaddexp.reduce(logs, axis=0) - math.log(RATIO_STEPS)
    informative = ok & (k > 0) & (pi > 0) & (pi < 1)
    log_lr = np.where(informative, log_lr, 0.0)
    harmful = ok & (kc * ns > ks * nc)
    failed = harmful & (log_lr >= math.log(1.0 / g.alpha))
    held = harmful & ~failed & (log_lr >= gates.hold_log_lr(g.alpha))
    enough = (nwin >= g.min_n) & (ns >= g.min_n)
    code = np.where(~ok, INC_, np.where(failed, FAIL_, np.where(enough & ~held, PASS_, INC_)))
    return code, failed


def v_two_prop(k_c, n_c, k_s, n_s):
    ok = (n_c > 0) & (n_s > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = (k_c + k_s) / np.where(ok, n_c + n_s, 1)
        diff = k_c / np.where(n_c > 0, n_c, 1) - k_s / np.where(n_s > 0, n_s, 1)
        var = p * (1 - p) * (1 / np.where(n_c > 0, n_c, 1) + 1 / np.where(n_s > 0, n_s, 1))
        z = np.where(var > 0, diff / np.sqrt(np.where(var > 0, var, 1)), 0.0)
    return np.where(ok, diff, np.nan), np.where(ok, z, np.nan), np.where(ok, var, np.nan)


def v_gate(g: Any, cw: W, sw: W, sref: W, cref: W) -> tuple[np.ndarray, np.ndarray]:
    """One real gate's verdict for every live rollout: (code, sequential FAIL)."""
    no = np.zeros(cw.req.shape[0], dtype=bool)
    if isinstance(g, gates.SuccessRateGate):
        n = cw.req
        inc = (n < g.min_requests) | (n <= 0)
        rate = 1 - _div(cw.err, n)
        return np.where(inc, INC_, np.where(rate >= g.min_rate, PASS_, FAIL_)), no
    if isinstance(g, gates.LatencyGate):
        n = cw.lat.sum(axis=1)
        q = v_quantile(g.quantile, cw.lat) * 1000
        inc = (n < g.min_requests) | np.isnan(q)
        return np.where(inc, INC_, np.where(q <= g.max_ms, PASS_, FAIL_)), no
    if isinstance(g, gates.DriftGate):
        use_win = sw.pred >= g.min_samples
        base = np.where(use_win[:, None], sw.score, sref.score)
        n, m = cw.pred, np.where(use_win, sw.pred, sref.pred)
        d = v_js(v_coarsen(cw.score, g.bins), v_coarsen(base, g.bins))
        d = np.where(np.minimum(n, m) >= max(g.min_samples, 1), d, np.nan)
        return np.where(np.isnan(d), INC_, np.where(d <= g.max_drift, PASS_, FAIL_)), no
    if isinstance(g, gates.AccuracyGate):
        n, m = cw.lab, sref.lab
        thr = np.full(n.shape, g.min_accuracy)
        if g.max_drop is not None:
            thr = np.where(m >= max(g.min_labelled, 1), np.maximum(thr, _div(sref.cor, m) - g.max_drop), thr)
        inc = (n < g.min_labelled) | (n <= 0)
        return np.where(inc, INC_, np.where(_div(cw.cor, n) >= thr, PASS_, FAIL_)), no
    if isinstance(g, ArgoBand):
        n = cw.req
        sr = 1 - _div(cw.err, n)
        p99 = v_quantile(0.99, cw.lat) * 1000
        code = np.where((sr < 0.95) | (p99 > 1000), FAIL_, np.where((sr >= 0.99) & (p99 <= 500), PASS_, INC_))
        return np.where(n == 0, INC_, code), no
    if isinstance(g, gates.ErrorRateVsStable):
        return v_conditional(g, cref.err, cref.req, sref.err, sref.req, cw.req)
    if isinstance(g, gates.AccuracyVsStable):
        kc, nc, ks, ns, nwin = cref.lab - cref.cor, cref.lab, sref.lab - sref.cor, sref.lab, cw.lab
        diff, z, var = v_two_prop(kc, nc, ks, ns)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(var > 0, g.min_effect**2 / np.where(var > 0, var, 1), 0.0)
        enough = (nwin >= g.min_n) & (ns >= g.min_n)
        return v_sequential(z * z, r, 1, g.alpha, diff > 0, enough)
    if isinstance(g, gates.LatencyVsStable):
        c, s = cref.lat, sref.lat
        nc, ns = c.sum(axis=1), s.sum(axis=1)
        below = np.cumsum(s, axis=1) - s
        u = (c * (below + 0.5 * s)).sum(axis=1)
        t = c + s
        ties = (t**3 - t).sum(axis=1)
        n = nc + ns
        ok = (nc > 0) & (ns > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            var_u = nc * ns / 12.0 * ((n + 1) - ties / np.where(ok, n * (n - 1), 1))
            eff = u / np.where(ok, nc * ns, 1) - 0.5
            z = np.where(var_u > 0, (u - nc * ns / 2) / np.sqrt(np.where(var_u > 0, var_u, 1)), 0.0)
            var = var_u / np.where(ok, (nc * ns) ** 2, 1)
            r = np.where(var > 0, g.min_effect**2 / np.where(var > 0, var, 1), 0.0)
        z = np.where(ok, z, np.nan)
        enough = (cw.lat.sum(axis=1) >= g.min_requests) & (ns >= g.min_requests)
        return v_sequential(z * z, r, 1, g.alpha, eff > 0, enough)
    if isinstance(g, gates.DriftTest):
        c, s = v_coarsen(cref.score, g.bins), v_coarsen(sref.score, g.bins)
        keep = (c + s) > 0
        nc, ns = (c * keep).sum(axis=1), (s * keep).sum(axis=1)
        k = keep.sum(axis=1)
        ok = (nc > 0) & (ns > 0) & (k >= 2)
        n = nc + ns
        with np.errstate(divide="ignore", invalid="ignore"):
            term = np.where(keep, (c / nc[:, None] - s / ns[:, None]) ** 2 / ((c + s) / n[:, None]), 0.0)
            x2 = np.where(ok, nc * ns / n * term.sum(axis=1), np.nan)
            d = np.where(ok, k - 1, 0)
            pn, pm = cref.pred, sref.pred
            n_eff = np.where(pn + pm > 0, pn * pm / np.where(pn + pm > 0, pn + pm, 1), 0.0)
            r = np.where(d > 0, g.min_effect**2 * n_eff / np.maximum(d, 1), 0.0)
        enough = (cw.pred >= g.min_samples) & (pm >= g.min_samples)
        return v_sequential(x2, r, np.maximum(d, 1), g.alpha, np.ones_like(ok), enough)
    raise TypeError(f"no vectorised form of {type(g).__name__}")


def run_cell_fast(policy: Policy, kind: Kind, rate: float, rollouts: int, seed: int) -> Outcome:
    """:func:`run_cell` with the gates and the machine's analyse() on arrays (the same draws)."""
    w = World.new(kind, rollouts, seed)
    spec, steps = policy.spec, np.array(policy.spec.steps)
    step = np.zeros(rollouts, dtype=int)
    failed = np.zeros(rollouts, dtype=int)
    inconc = np.zeros(rollouts, dtype=int)
    phase = np.array(["stalled"] * rollouts, dtype=object)
    minutes = np.full(rollouts, float(MAX_INTERVALS))
    live = np.ones(rollouts, dtype=bool)
    for t in range(1, MAX_INTERVALS + 1):
        idx = np.flatnonzero(live)
        if idx.size == 0:
            break
        w.interval(idx, steps[step[idx]] / 100.0, rate)
        args = (W(w.c, idx, w.cs), W(w.s, idx, w.ss), W(w.s, idx, w.s0), W(w.c, idx, w.c0))
        codes, seq = zip(*(v_gate(g, *args) for g in policy.gates), strict=True)
        codes, seq = np.vstack(codes), np.vstack(seq)
        fail, inc = (codes == FAIL_).any(axis=0), (codes == INC_).any(axis=0)
        decisive = (seq & (codes == FAIL_)).any(axis=0)
        nf, ni = failed[idx] + 1, inconc[idx] + 1
        rollback = fail & (decisive | (nf >= spec.threshold))
        pause = ~fail & inc & (ni >= spec.max_inconclusive)
        hold_inc = ~fail & inc & ~pause
        ok = ~fail & ~inc
        promote = ok & (step[idx] == len(steps) - 1)
        advance = ok & ~promote
        failed[idx] = np.where(fail, nf, failed[idx])
        inconc[idx] = np.where(hold_inc | pause, ni, 0)
        step[idx] = np.where(advance, step[idx] + 1, step[idx])
        w.rebase(idx if policy.window == "interval" else idx[advance])
        ended = rollback | pause | promote
        rows = idx[ended]
        live[rows] = False
        minutes[rows] = t
        phase[idx[rollback]] = Phase.ROLLED_BACK.value
        phase[idx[promote]] = Phase.PROMOTED.value
    return Outcome(phase, minutes, w.c.req.copy())


def check_equivalence(rollouts: int = 40, seed: int = 3, kinds=KINDS, rates=RATES) -> int:
    """The vectorised and the real path on the same draws: the number of rollouts whose outcome differs
    (phase, minute, canary requests), over every policy, kind and rate given."""
    pols, bad = policies(), 0
    for ki, kind in enumerate(kinds):
        for rate in rates:
            for p in pols.values():
                a = run_cell(p, kind, rate, rollouts, seed + ki)
                b = run_cell_fast(p, kind, rate, rollouts, seed + ki)
                same = (
                    (a.phase == b.phase) & (a.minutes == b.minutes) & (a.canary_requests == b.canary_requests)
                )
                bad += int((~same).sum())
    return bad


# ----------------------------------------------------------------------------- summary


def summarise(kind: Kind, out: Outcome) -> dict[str, Any]:
    n = len(out.phase)
    rolled = out.phase == Phase.ROLLED_BACK.value
    promoted = out.phase == Phase.PROMOTED.value
    row: dict[str, Any] = {
        "rollouts": n,
        "rolled_back": float(rolled.mean()),
        "promoted": float(promoted.mean()),
        "stalled": float(1 - rolled.mean() - promoted.mean()),
    }
    if rolled.any():
        row["median_requests_before_rollback"] = float(np.median(out.canary_requests[rolled]))
    if promoted.any():
        row["median_minutes_to_promote"] = float(np.median(out.minutes[promoted]))
    return row


def ci95(p: float, n: int) -> float:
    """Half-width of the normal 95 % interval of a rate ``p`` over ``n`` rollouts."""
    return 1.96 * math.sqrt(max(p * (1 - p), 1e-12) / n)


def run(rollouts: int, rates=RATES, kinds=KINDS, names=POLICIES, seed: int = 14) -> list[dict[str, Any]]:
    pols = policies()
    cells = []
    for ki, kind in enumerate(kinds):
        for rate in rates:
            for name in names:
                cell_seed = seed * 1_000_003 + ki * 1009 + int(rate)  # the same under every policy
                out = run_cell_fast(pols[name], kind, rate, rollouts, cell_seed)
                cells.append({"kind": kind.name, "family": kind.family, "smallest": kind.smallest,
                              "rate": rate, "policy": name, **summarise(kind, out)})  # fmt: skip
    return cells


def _fmt_req(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def table(cells: list[dict[str, Any]]) -> str:
    """Markdown: one row per kind and traffic, the policies side by side."""
    names = [p for p in POLICIES if any(c["policy"] == p for c in cells)]
    head = "| canary | req/s | " + " | ".join(names) + " |"
    lines = [
        "good canaries: false rollbacks, stalled, median minutes to promote; bad canaries: missed "
        "(promoted), median canary requests before rollback",
        "",
        head,
        "|" + " --- |" * (2 + len(names)),
    ]
    by = {(c["kind"], c["rate"], c["policy"]): c for c in cells}
    for kind in dict.fromkeys(c["kind"] for c in cells):
        for rate in dict.fromkeys(c["rate"] for c in cells):
            parts = []
            for p in names:
                c = by.get((kind, rate, p))
                if c is None:
                    parts.append("")
                elif kind == "good":
                    m = c.get("median_minutes_to_promote")
                    parts.append(
                        f"FR {100 * c['rolled_back']:.1f}% · stall {100 * c['stalled']:.1f}% · "
                        f"{'-' if m is None else f'{m:.0f}'} min"
                    )
                else:
                    parts.append(
                        f"missed {100 * c['promoted']:.1f}% · "
                        f"{_fmt_req(c.get('median_requests_before_rollback'))} req"
                    )
            lines.append(f"| {kind} | {rate:g} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def check_targets(cells: list[dict[str, Any]]) -> list[str]:
    """Issue 14's targets at >= 10 req/s, each line PASS/MISS with the figures."""
    by = {(c["kind"], c["rate"], c["policy"]): c for c in cells}
    out = []
    for rate in sorted({c["rate"] for c in cells if c["rate"] >= 10}):
        g = by.get(("good", rate, "compare"))
        f = by.get(("good", rate, "flagger"))
        if g:
            ok = g["rolled_back"] <= 0.01
            out.append(f"{'PASS' if ok else 'MISS'} {rate:g} req/s good: false rollbacks "
                       f"{100 * g['rolled_back']:.2f}% <= 1%")  # fmt: skip
        if g and f:
            mg, mf = g.get("median_minutes_to_promote"), f.get("median_minutes_to_promote")
            ok = mg is not None and (mf is None or mg <= mf)
            out.append(f"{'PASS' if ok else 'MISS'} {rate:g} req/s good: promoted in {mg} min "
                       f"(flagger {mf} min)")  # fmt: skip
        for c in cells:
            if c["rate"] != rate or c["policy"] != "compare" or c["kind"] == "good":
                continue
            if not c["smallest"]:
                ok = c["promoted"] <= 0.01
                out.append(f"{'PASS' if ok else 'MISS'} {rate:g} req/s {c['kind']}: missed "
                           f"{100 * c['promoted']:.2f}% <= 1%")  # fmt: skip
            fl = by.get((c["kind"], rate, "flagger"))
            mc, mf = (
                c.get("median_requests_before_rollback"),
                (fl or {}).get("median_requests_before_rollback"),
            )
            fr = f"false rollbacks {100 * g['rolled_back']:.2f}% vs flagger {100 * f['rolled_back']:.2f}%"
            if mc is not None and mf is not None and fl["rolled_back"] > 0.5:
                ok = 2 * mc <= mf
                out.append(f"{'PASS' if ok else 'MISS'} {rate:g} req/s {c['kind']}: {mc:.0f} requests before "
                           f"rollback vs flagger {mf:.0f} (>= 2x fewer; {fr})")  # fmt: skip
            elif mc is not None:
                share = 100 * (fl or {}).get("rolled_back", 0)
                out.append(f"PASS {rate:g} req/s {c['kind']}: {mc:.0f} requests before rollback; flagger "
                           f"rolls back {share:.1f}% ({fr})")  # fmt: skip
    return out


def plot(cells: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [f for f in ("error", "latency", "swap", "shift") if any(c["family"] == f for c in cells)]
    fig, axes = plt.subplots(1, len(families) + 1, figsize=(4.2 * (len(families) + 1), 3.8), sharex=True)
    names = [p for p in POLICIES if any(c["policy"] == p for c in cells)]
    rates = sorted({c["rate"] for c in cells})
    for ax, fam in zip(axes[:-1], families, strict=True):
        for p in names:
            ys = []
            for r in rates:
                xs = [
                    c["rolled_back"]
                    for c in cells
                    if c["family"] == fam and c["rate"] == r and c["policy"] == p
                ]
                ys.append(100 * sum(xs) / len(xs) if xs else math.nan)
            ax.plot(rates, ys, marker="o", label=p)
        ax.set_title(f"bad: {fam} (mean of its 3 sizes)")
        ax.set_ylabel("rolled back (%)")
        ax.set_ylim(-3, 103)
    ax = axes[-1]
    for p in names:
        ys = [100 * next((c["rolled_back"] for c in cells if c["kind"] == "good" and c["rate"] == r
                          and c["policy"] == p), math.nan) for r in rates]  # fmt: skip
        ax.plot(rates, ys, marker="o", label=p)
    ax.axhline(1.0, color="tab:red", ls="--", lw=1, label="1 % target")
    ax.set_title("good: false rollbacks")
    ax.set_ylabel("rolled back (%)")
    for a in axes:
        a.set_xscale("log")
        a.set_xlabel("total traffic (req/s)")
        a.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[-1].legend(fontsize=8)
    fig.suptitle("Gate quality: detection of bad canaries and false rollbacks vs traffic, per policy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.bench.gates", description=__doc__.splitlines()[0])
    ap.add_argument(
        "--rollouts",
        type=int,
        default=1600,
        help="rollouts per cell (default 1600: a 95 %% interval of +-0.49 points on a 1 %% rate)",
    )
    ap.add_argument("--out", default="bench_outputs/gates", help="where the PNG and JSON go")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument(
        "--check",
        type=int,
        default=8,
        help="rollouts per cell also run through the real gates and machine, rollout by rollout, "
        "whose outcomes must equal the vectorised path's (default 8; 0: skip)",
    )
    a = ap.parse_args(argv)  # fmt: skip
    if a.rollouts < 1:
        ap.error(f"--rollouts must be >= 1, got {a.rollouts}")
    t0 = time.perf_counter()
    cells = run(a.rollouts, seed=a.seed)
    took = time.perf_counter() - t0
    if a.check:
        t1 = time.perf_counter()
        differ = check_equivalence(a.check, seed=a.seed)
        n = a.check * len(cells)
        print(f"cross-check: {n} rollouts through the real gates and machine (serving.rollout), "
              f"{differ} differ from the vectorised path ({time.perf_counter() - t1:.0f} s)")  # fmt: skip
        if differ:
            print("error: the vectorised path disagrees with the real gates and machine")
            return 1
    print(table(cells))
    print()
    print(f"{a.rollouts} rollouts per cell ({len(cells)} cells); a rate p has a 95 % interval of "
          f"+-{100 * ci95(0.01, a.rollouts):.2f} points at p = 1 %; took {took:.0f} s")  # fmt: skip
    print()
    print("\n".join(check_targets(cells)))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gates.json").write_text(
        json.dumps({"rollouts": a.rollouts, "seconds": took, "cells": cells}, indent=1)
    )
    print(f"wrote {plot(cells, out / 'gates.png')} and {out / 'gates.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
