"""Counters, windows and the math behind the gates (plain numbers in, plain numbers out).

A :class:`Snapshot` is what a metrics provider reads for one side (stable or canary) of a
rollout: the cumulative counters of the runtime's metrics (README "Interfaces between the parts").
The difference of two snapshots is the *window* a gate judges. Histograms are kept as
Prometheus does: cumulative counts per upper bound ``le`` (``inf`` included).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

# HTTP 5xx and the gRPC codes that mean "the server failed", as Flagger counts request success:
# client errors (4xx, INVALID_ARGUMENT, NOT_FOUND, ...) are the caller's fault, not the canary's.
GRPC_SERVER_ERRORS = {"INTERNAL", "UNAVAILABLE", "UNKNOWN", "DEADLINE_EXCEEDED", "DATA_LOSS", "UNIMPLEMENTED"}


def is_server_error(status: str) -> bool:
    s = str(status).strip()
    return s.startswith("5") if s[:1].isdigit() else s.upper() in GRPC_SERVER_ERRORS


def _sub(a: dict, b: dict) -> dict:
    out = {}
    for k, v in a.items():
        d = v - b.get(k, 0.0)
        # a counter that went down was reset (process restart): count from zero, as Prometheus does
        out[k] = v if d < 0 else d
    return out


@dataclass
class Snapshot:
    """Cumulative counters for one side, or (after ``-``) the increments over a window."""

    requests: dict[str, float] = field(default_factory=dict)  # status -> count
    latency: dict[float, float] = field(default_factory=dict)  # le (seconds) -> cumulative count
    scores: dict[float, float] = field(default_factory=dict)  # le (score) -> cumulative count
    classes: dict[str, float] = field(default_factory=dict)  # predicted class -> count
    labelled_correct: float = 0.0  # labelled feedback (optional accuracy gate)
    labelled_total: float = 0.0
    # the shadow step: rows of mirrored requests compared with stable's answer to the same request
    agreed_rows: float = 0.0
    compared_rows: float = 0.0
    at: float = 0.0  # when it was read (provider clock, seconds since the epoch)

    def __sub__(self, base: Snapshot) -> Snapshot:
        lt = self.labelled_total - base.labelled_total
        lc = self.labelled_correct - base.labelled_correct
        if lt < 0 or lc < 0:
            lt, lc = self.labelled_total, self.labelled_correct
        cr, ar = self.compared_rows - base.compared_rows, self.agreed_rows - base.agreed_rows
        if cr < 0 or ar < 0:  # the counters restarted (HAProxy restarted): count from zero
            cr, ar = self.compared_rows, self.agreed_rows
        return Snapshot(
            requests=_sub(self.requests, base.requests),
            latency=_sub(self.latency, base.latency),
            scores=_sub(self.scores, base.scores),
            classes=_sub(self.classes, base.classes),
            labelled_correct=lc,
            labelled_total=lt,
            agreed_rows=ar,
            compared_rows=cr,
            at=self.at,
        )

    @property
    def total_requests(self) -> float:
        return float(sum(self.requests.values()))

    @property
    def failed_requests(self) -> float:
        return float(sum(v for k, v in self.requests.items() if is_server_error(k)))

    @property
    def predictions(self) -> float:
        return float(self.scores.get(math.inf, max(self.scores.values(), default=0.0)))

    @property
    def latency_count(self) -> float:
        return float(self.latency.get(math.inf, max(self.latency.values(), default=0.0)))

    def to_dict(self) -> dict[str, Any]:
        d = {
            "requests": self.requests,
            "latency": {_le_str(k): v for k, v in self.latency.items()},
            "scores": {_le_str(k): v for k, v in self.scores.items()},
            "classes": self.classes,
            "labelled_correct": self.labelled_correct,
            "labelled_total": self.labelled_total,
            "at": self.at,
        }
        if self.compared_rows:  # only a mirrored side has them: other records are written as before
            d["agreed_rows"], d["compared_rows"] = self.agreed_rows, self.compared_rows
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Snapshot:
        return cls(
            requests={str(k): float(v) for k, v in d.get("requests", {}).items()},
            latency={parse_le(k): float(v) for k, v in d.get("latency", {}).items()},
            scores={parse_le(k): float(v) for k, v in d.get("scores", {}).items()},
            classes={str(k): float(v) for k, v in d.get("classes", {}).items()},
            labelled_correct=float(d.get("labelled_correct", 0.0)),
            labelled_total=float(d.get("labelled_total", 0.0)),
            agreed_rows=float(d.get("agreed_rows", 0.0)),
            compared_rows=float(d.get("compared_rows", 0.0)),
            at=float(d.get("at", 0.0)),
        )


def _le_str(le: float) -> str:
    return "+Inf" if math.isinf(le) else repr(float(le))


def parse_le(le: str | float) -> float:
    if isinstance(le, str) and le.strip() in ("+Inf", "Inf", "inf", "+inf"):
        return math.inf
    return float(le)


def bucket_counts(cumulative: dict[float, float]) -> tuple[list[float], list[float]]:
    """Cumulative ``{le: count}`` -> (upper bounds, per-bucket counts), sorted by bound."""
    bounds = sorted(cumulative)
    counts, prev = [], 0.0
    for b in bounds:
        c = cumulative[b]
        counts.append(max(c - prev, 0.0))
        prev = max(c, prev)
    return bounds, counts


def histogram_quantile(q: float, cumulative: dict[float, float]) -> float:
    """Prometheus ``histogram_quantile`` over cumulative buckets (linear inside a bucket).

    Returns NaN for an empty histogram; when the quantile falls in the ``+Inf`` bucket, the
    largest finite bound (what Prometheus returns too: "at least this slow").
    """
    if not 0 <= q <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    bounds = sorted(cumulative)
    if not bounds:
        return math.nan
    total = cumulative[bounds[-1]]
    if total <= 0:
        return math.nan
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for b in bounds:
        c = cumulative[b]
        if c >= rank:
            if math.isinf(b):
                finite = [x for x in bounds if not math.isinf(x)]
                return finite[-1] if finite else math.nan
            if c == lower_count:
                return b
            return lower_bound + (b - lower_bound) * (rank - lower_count) / (c - lower_count)
        lower_bound, lower_count = b, c
    return bounds[-1]


def aligned_counts(p_cum: dict[float, float], q_cum: dict[float, float]) -> tuple[list[float], list[float]]:
    """Per-bucket counts of two cumulative histograms over the union of their bounds."""
    bounds = sorted(set(p_cum) | set(q_cum))

    # a bound missing on one side: carry the cumulative count of the bound below it
    def fill(c: dict[float, float]) -> dict[float, float]:
        out, last = {}, 0.0
        for b in bounds:
            last = c.get(b, last)
            out[b] = last
        return out

    _, p = bucket_counts(fill(p_cum))
    _, q = bucket_counts(fill(q_cum))
    return p, q


@functools.lru_cache(maxsize=64)
def _bin_of(bounds: tuple[float, ...], bins: int) -> tuple[int, ...]:
    # which of ``bins`` equal-width bins each score bucket bound falls in (the bounds rarely change:
    # they are the runtime's buckets, so this is computed once)
    return tuple(
        bins - 1 if math.isinf(b) or b >= 1 else max(math.ceil(round(b * bins, 9)) - 1, 0) for b in bounds
    )


def coarsen(cumulative: dict[float, float], bins: int) -> dict[float, float]:
    """Merge score buckets (bounds in (0, 1], plus ``+Inf``) into ``bins`` equal-width bins.

    Fewer bins means less sampling noise in PSI/JS at the few hundred predictions an analysis
    window holds (the expected JSD of two samples of one distribution grows with bins/n).
    Anything above 1 (``+Inf``) joins the last bin.
    """
    if bins <= 0:
        return dict(cumulative)
    bounds, counts = bucket_counts(cumulative)
    per_bin = [0.0] * bins
    for i, c in zip(_bin_of(tuple(bounds), bins), counts, strict=True):
        per_bin[i] += c
    out, run = {}, 0.0
    for i, c in enumerate(per_bin):
        run += c
        out[(i + 1) / bins] = run
    return out


def psi(canary_cum: dict[float, float], stable_cum: dict[float, float], alpha: float = 0.5) -> float:
    """Population stability index  PSI = sum_i (c_i - s_i) * ln(c_i / s_i)  over score buckets.

    ``c_i``/``s_i`` are the canary/stable shares of bucket i after additive (Laplace) smoothing
    with ``alpha`` pseudo-counts, so an empty bucket on one side stays finite.
    """
    p, q = aligned_counts(canary_cum, stable_cum)
    k = len(p)
    if k == 0 or sum(p) <= 0 or sum(q) <= 0:
        return math.nan
    np_, nq = sum(p) + k * alpha, sum(q) + k * alpha
    total = 0.0
    for a, b in zip(p, q, strict=True):
        pa, qb = (a + alpha) / np_, (b + alpha) / nq
        if pa == 0 and qb == 0:
            continue
        if pa == 0 or qb == 0:
            return math.inf  # only without smoothing (alpha=0)
        total += (pa - qb) * math.log(pa / qb)
    return total


def js_distance(canary_cum: dict[float, float], stable_cum: dict[float, float]) -> float:
    """Jensen-Shannon distance, base 2, in [0, 1]: sqrt(JSD), JSD = (KL(P||M) + KL(Q||M))/2, M = (P+Q)/2."""
    p, q = aligned_counts(canary_cum, stable_cum)
    sp, sq = sum(p), sum(q)
    if sp <= 0 or sq <= 0:
        return math.nan
    jsd = 0.0
    for a, b in zip(p, q, strict=True):
        pa, qb = a / sp, b / sq
        m = (pa + qb) / 2
        if pa > 0:
            jsd += 0.5 * pa * math.log2(pa / m)
        if qb > 0:
            jsd += 0.5 * qb * math.log2(qb / m)
    return math.sqrt(max(jsd, 0.0))


# --------------------------------------------------------------------------- comparative statistics
# Canary vs stable on counts, each reduced to a chi-square-type statistic X^2 with d degrees of freedom
# (asymptotically chi2(d) when the two versions behave the same), judged by one sequential rule
# (:func:`mixture_log_lr`). Plain floats in and out; the tests compare each with scipy.stats.


def two_proportion(k_c: float, n_c: float, k_s: float, n_s: float) -> tuple[float, float, float]:
    """Canary vs stable share of "bad" outcomes (errors, wrong answers): (difference, z, variance).

    ``difference = k_c/n_c - k_s/n_s``; ``z`` its pooled-variance score statistic (z^2 is the Pearson
    chi-square of the 2x2 table without continuity correction, scipy's ``chi2_contingency(...,
    correction=False)``); ``variance`` = p(1-p)(1/n_c + 1/n_s) with the pooled p. No bad outcome on
    either side (or all bad) is no evidence of a difference: z = 0.
    """
    if n_c <= 0 or n_s <= 0:
        return math.nan, math.nan, math.nan
    p = (k_c + k_s) / (n_c + n_s)
    diff = k_c / n_c - k_s / n_s
    var = p * (1.0 - p) * (1.0 / n_c + 1.0 / n_s)
    if var <= 0:
        return diff, 0.0, 0.0
    return diff, diff / math.sqrt(var), var


def chi2_two_sample(c: list[float], s: list[float]) -> tuple[float, int, float]:
    """Pearson chi-square of the 2 x k table (canary and stable counts per histogram bin):
    (X^2, degrees of freedom, Cohen's w).

    Bins empty on both sides are dropped (d = non-empty bins - 1). ``w = sqrt(sum (c_i - s_i)^2 / m_i)``
    over the canary's and stable's shares c_i, s_i and the pooled share m_i is the distance between the
    two histograms; X^2 = n_eff * w^2 exactly, with n_eff = n_c n_s / (n_c + n_s). Under "same
    distribution" w is not 0 but about sqrt(d / n_eff): the sampling noise a fixed cut-off ignores.
    """
    pairs = [(a, b) for a, b in zip(c, s, strict=True) if a + b > 0]
    n_c, n_s = sum(a for a, _ in pairs), sum(b for _, b in pairs)
    if n_c <= 0 or n_s <= 0 or len(pairs) < 2:
        return math.nan, 0, math.nan
    n = n_c + n_s
    w2 = sum((a / n_c - b / n_s) ** 2 / ((a + b) / n) for a, b in pairs)
    return n_c * n_s / n * w2, len(pairs) - 1, math.sqrt(w2)


def mann_whitney(c: list[float], s: list[float]) -> tuple[float, float, float]:
    """Mann-Whitney U of binned samples (counts per ordered bin, ties within a bin): (AUC - 1/2, z, var).

    ``AUC = U / (n_c n_s)`` is P(a canary value > a stable one) + P(equal)/2, so AUC - 1/2 > 0 means the
    canary is slower (for latency). ``z`` uses the tie-corrected variance (scipy's ``mannwhitneyu``,
    ``method="asymptotic"``, ``use_continuity=False``); ``var`` is the variance of AUC under "same
    distribution".
    """
    n_c, n_s = sum(c), sum(s)
    if n_c <= 0 or n_s <= 0:
        return math.nan, math.nan, math.nan
    u, below, ties = 0.0, 0.0, 0.0
    for a, b in zip(c, s, strict=True):
        u += a * (below + 0.5 * b)
        below += b
        t = a + b
        ties += t**3 - t
    n = n_c + n_s
    var_u = n_c * n_s / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    auc = u / (n_c * n_s)
    if var_u <= 0:
        return auc - 0.5, 0.0, 0.0
    return auc - 0.5, (u - n_c * n_s / 2.0) / math.sqrt(var_u), var_u / (n_c * n_s) ** 2


# The mixture's scales, in multiples of the smallest effect worth catching: tau = min_effect alone is
# most sensitive at that effect but slow for a large one (at a few hundred samples the N(0, tau^2) prior
# finds a 20-fold effect unlikely); an equal-weight mixture over tau, 4 tau and 16 tau is still a test
# martingale (an average of them) and catches a gross regression in the first interval, for log(3) more
# evidence at the smallest effect.
SCALES = (1.0, 4.0, 16.0)


def _log_lr_one(x2: float, r: float, d: int) -> float:
    return -0.5 * d * math.log1p(r) + r / (1.0 + r) * x2 / 2.0


def mixture_log_lr(x2: float, r: float, d: int = 1, scales: tuple[float, ...] = SCALES) -> float:
    """log of the normal-mixture likelihood ratio (the mSPRT statistic) for a chi-square-type X^2.

    Johari, Koomen, Pekelis & Walsh (2017), "Peeking at A/B tests: why it matters, and what to do about
    it" (KDD), the mixture SPRT: with an effect estimate of variance V and a N(0, tau^2) mixture over
    the true effect, Lambda = sqrt(V / (V + tau^2)) exp(tau^2 theta^2 / (2 V (V + tau^2))). With
    z^2 = theta^2 / V and r = tau^2 / V (the information at this look times tau^2) that is
    ``-d/2 log(1 + r) + r / (1 + r) * X^2 / 2``, for d independent coordinates (an isotropic mixture;
    X^2 = the squared length of the standardised difference vector). Averaged with equal weights over
    tau * ``scales`` (:data:`SCALES`). Lambda is a nonnegative martingale with mean 1 when the versions
    are the same, so by Ville's inequality P(Lambda ever >= 1/alpha) <= alpha: rejecting at the first
    look where it crosses keeps the error rate however often one looks.
    """
    if not (r > 0) or math.isnan(x2):
        return 0.0
    logs = [_log_lr_one(x2, r * k * k, d) for k in scales]
    top = max(logs)
    return top + math.log(sum(math.exp(v - top) for v in logs) / len(logs))


def mixture_boundary(alpha: float, r: float, d: int = 1, scales: tuple[float, ...] = SCALES) -> float:
    """The X^2 at which :func:`mixture_log_lr` reaches log(1/alpha) (inf when there is no information);
    found by bisection (the ratio grows with X^2), to 1e-12 relative."""
    if not (r > 0):
        return math.inf
    target = math.log(1.0 / alpha)
    # at this X^2 one scale alone reaches len(scales)/alpha, so the average reaches 1/alpha
    extra = math.log(len(scales))
    hi = min(
        (1 + r * k * k) / (r * k * k) * (2 * (target + extra) + d * math.log1p(r * k * k)) for k in scales
    )
    lo = 0.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mixture_log_lr(mid, r, d, scales) >= target:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi


# --------------------------------------------------------------------------- exact test for rare events
# Server errors are rare (0.1 % of requests): at 10 req/s a step's canary window holds a handful, where
# the normal approximation of two_proportion is liberal (3 canary errors against 1 of stable's already
# reach a z of 4). The count test below conditions on the errors instead of approximating them.

# the rate ratios of the mixture: RATIO_STEPS of them, each twice the one before
RATIO_STEPS = 6


def rate_ratios(k: float, n: float, min_effect: float) -> tuple[float, ...]:
    """The mixture's rate ratios rho (canary's error rate over stable's): from the ratio that adds
    ``min_effect`` to the pooled rate k/n (the smallest effect worth catching) up to 32 times that.

    k and n are what the test conditions on (every error and request of both sides), so the grid is
    fixed given the conditioning and the single-look guarantee below holds exactly."""
    if k <= 0 or n <= 0:
        return ()
    lo = 1.0 + min_effect / (k / n)
    return tuple(lo * 2.0**j for j in range(RATIO_STEPS))


def conditional_log_lr(k_c: float, k: float, pi: float, ratios: tuple[float, ...]) -> float:
    """log of the mixture likelihood ratio of the canary's share of the errors, given all ``k`` of them.

    Given k errors in all and the canary's share ``pi`` = n_c / (n_c + n_s) of the requests, the
    canary's count is Binomial(k, pi) when both versions err at the same rate (errors as Poisson
    events), and Binomial(k, theta) with theta = rho pi / (rho pi + 1 - pi) when the canary's rate is
    rho times stable's. The ratio of the two pmfs is rho^k_c / (1 + (rho - 1) pi)^k; averaged with equal
    weights over ``ratios`` it is a mixture likelihood ratio as in Lindon & Malek (2022), "Anytime-valid
    inference for multinomial count data" (NeurIPS), here for the two-sided split of counts.
    Under "same rate" its mean given k is exactly 1 for the binomial and at most 1 for the exact
    hypergeometric law of Bernoulli requests (sampling without replacement is smaller in convex order,
    Hoeffding 1963), so P(ratio >= 1/alpha) <= alpha at a look (Markov); the bench measures the rate
    over every look of a rollout.
    """
    if k <= 0 or not ratios or not 0 < pi < 1:
        return 0.0  # no errors, or one side without requests: no evidence either way
    logs = [k_c * math.log(r) - k * math.log1p((r - 1.0) * pi) for r in ratios]
    top = max(logs)
    return top + math.log(sum(math.exp(v - top) for v in logs) / len(logs))


def conditional_boundary(k: float, pi: float, ratios: tuple[float, ...], alpha: float) -> float:
    """The fewest canary errors, of ``k`` in all, at which :func:`conditional_log_lr` reaches
    log(1/alpha) (the ratio grows with k_c), or inf when even all k do not."""
    target = math.log(1.0 / alpha)
    lo, hi = 0, math.floor(k)
    if hi <= 0 or conditional_log_lr(hi, k, pi, ratios) < target:
        return math.inf
    while lo < hi:  # bisection over whole counts
        mid = (lo + hi) // 2
        if conditional_log_lr(mid, k, pi, ratios) >= target:
            hi = mid
        else:
            lo = mid + 1
    return float(lo)
