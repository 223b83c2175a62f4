"""The comparative statistics (serving/rollout/stats.py) against scipy.stats on the same inputs, the
mSPRT boundary against its closed form, and the sequential gates' verdicts (gates.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from serving.contract import signals
from serving.rollout import gates as g
from serving.rollout import machine
from serving.rollout.stats import (
    Snapshot,
    chi2_two_sample,
    conditional_boundary,
    conditional_log_lr,
    mann_whitney,
    mixture_boundary,
    mixture_log_lr,
    rate_ratios,
    two_proportion,
)

TABLES = [(3, 120, 1, 1080), (30, 1000, 10, 1000), (0, 50, 2, 500), (17, 60, 40, 600)]


@pytest.mark.parametrize("k_c,n_c,k_s,n_s", TABLES)
def test_two_proportion_z_squared_is_scipys_pearson_chi2(k_c, n_c, k_s, n_s):
    diff, z, _var = two_proportion(k_c, n_c, k_s, n_s)
    table = [[k_c, n_c - k_c], [k_s, n_s - k_s]]
    ref = sps.chi2_contingency(table, correction=False)
    assert z * z == pytest.approx(ref.statistic, rel=1e-12)
    assert diff == pytest.approx(k_c / n_c - k_s / n_s)
    # the one-sided p-value of the same z is scipy's two-proportion test (statsmodels' ztest formula)
    assert sps.norm.sf(z) == pytest.approx(ref.pvalue / 2 if diff > 0 else 1 - ref.pvalue / 2, rel=1e-9)


def test_two_proportion_without_events_is_no_evidence():
    assert two_proportion(0, 100, 0, 900)[1] == 0.0
    assert math.isnan(two_proportion(1, 0, 0, 10)[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chi2_two_sample_is_scipys_contingency_statistic_and_w(seed):
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 60, size=8).astype(float)
    s = rng.integers(0, 600, size=8).astype(float)
    c[3] = s[3] = 0  # a bin empty on both sides is dropped, as scipy needs
    x2, d, w = chi2_two_sample(list(c), list(s))
    keep = (c + s) > 0
    ref = sps.chi2_contingency(np.vstack([c[keep], s[keep]]), correction=False)
    assert x2 == pytest.approx(ref.statistic, rel=1e-10)
    assert d == ref.dof == 6
    n_eff = c.sum() * s.sum() / (c.sum() + s.sum())
    assert w == pytest.approx(math.sqrt(ref.statistic / n_eff), rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_mann_whitney_on_bins_is_scipys_with_ties(seed):
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 40, size=12)
    s = rng.integers(0, 200, size=12)
    eff, z, _var = mann_whitney(list(c.astype(float)), list(s.astype(float)))
    # the same samples, one value per bin (all ties within a bin)
    xc, xs = np.repeat(np.arange(12), c), np.repeat(np.arange(12), s)
    ref = sps.mannwhitneyu(xc, xs, alternative="greater", method="asymptotic", use_continuity=False)
    assert eff + 0.5 == pytest.approx(ref.statistic / (c.sum() * s.sum()), rel=1e-12)
    assert sps.norm.sf(z) == pytest.approx(ref.pvalue, rel=1e-9)


def test_mixture_lr_is_the_johari_closed_form_and_crosses_at_its_boundary():
    # Johari et al. (2017): Lambda = sqrt(V/(V+tau^2)) exp(tau^2 theta^2 / (2 V (V + tau^2)))
    theta, var, tau = 0.02, 4e-5, 0.005

    def lam(tau: float) -> float:
        return math.sqrt(var / (var + tau**2)) * math.exp(tau**2 * theta**2 / (2 * var * (var + tau**2)))

    assert mixture_log_lr(theta**2 / var, tau**2 / var, 1, scales=(1.0,)) == pytest.approx(math.log(lam(tau)))
    # the default: the equal-weight average over tau, 4 tau and 16 tau
    mean = (lam(tau) + lam(4 * tau) + lam(16 * tau)) / 3
    assert mixture_log_lr(theta**2 / var, tau**2 / var, 1) == pytest.approx(math.log(mean), rel=1e-12)
    for r, d in ((0.3, 1), (5.0, 4), (200.0, 9)):
        b = mixture_boundary(0.01, r, d)
        assert mixture_log_lr(b, r, d) == pytest.approx(math.log(100), rel=1e-9)
        # always wider than the fixed-sample chi-square cut-off at the same alpha: the price of peeking
        assert b > sps.chi2.ppf(0.99, d)
    assert mixture_log_lr(50.0, 0.0) == 0.0 and mixture_boundary(0.01, 0.0) == math.inf


def test_mixture_lr_has_mean_one_under_the_null():
    # the martingale property behind Ville's inequality: E[Lambda] = 1 when X^2 ~ chi2(d)
    from scipy.integrate import quad

    for r, d in ((0.5, 1), (3.0, 4), (40.0, 1), (10.0, 9)):
        mean, _ = quad(
            lambda x, r=r, d=d: math.exp(mixture_log_lr(x, r, d) + sps.chi2.logpdf(x, d)), 0, math.inf
        )
        assert mean == pytest.approx(1.0, rel=1e-6), (r, d)


# ----------------------------------------------------------------------------- the gates


def snap(ok: float = 0, err: float = 0, lat: dict | None = None, scores: dict | None = None, lab=(0, 0)):
    return Snapshot(
        requests={"200": ok, "500": err},
        latency=lat or {},
        scores=scores or {},
        labelled_correct=lab[0],
        labelled_total=lab[1],
    )


def test_error_rate_gate_fails_early_on_strong_evidence_and_passes_a_same_rate_canary():
    gate = g.ErrorRateVsStable(alpha=0.01 / 3)
    # 12 % errors on 100 canary requests vs 0.1 % on 900: fails within one short window
    bad = gate.evaluate(snap(88, 12), snap(), snap(899, 1), snap(88, 12))
    assert bad.verdict is g.Verdict.FAIL and bad.sequential
    assert bad.statistic >= bad.boundary and bad.effect == pytest.approx(0.12 - 1 / 900)
    assert (bad.samples, bad.baseline_samples) == (100, 900)
    same = gate.evaluate(snap(99, 1), snap(), snap(891, 9), snap(99, 1))
    assert same.verdict is g.Verdict.PASS and same.statistic < same.boundary
    # a better canary never fails a one-sided comparison
    assert gate.evaluate(snap(100, 0), snap(), snap(800, 100), snap(100, 0)).verdict is g.Verdict.PASS
    # too few canary requests in the step: inconclusive, with the evidence still shown
    thin = gate.evaluate(snap(5, 0), snap(), snap(891, 9), snap(5, 0))
    assert thin.verdict is g.Verdict.INCONCLUSIVE and thin.statistic is not None
    assert "effect" in bad.summary() and "canary errors=12 > " in bad.summary()
    assert bad.unit == "canary errors" and bad.statistic == 12
    # the boundary is the most canary errors (of these 13) that still pass: one more fails
    assert bad.boundary + 1 == conditional_boundary(
        13, 0.1, rate_ratios(13, 1000, gate.min_effect), gate.alpha
    )


def test_error_rate_gate_does_not_fail_on_a_handful_of_errors_the_normal_approximation_would():
    # from make bench-gates, a good canary at 100 req/s: 3 errors of 591 vs 1 of 5323 has a two-proportion
    # z of 4.3, past the normal mSPRT's boundary (the gate before the count test rolled it back); given
    # the 4 errors, 3 on a side with 10 % of the requests is no strong evidence
    gate = g.ErrorRateVsStable(alpha=0.01 / 3)
    _, z, var = two_proportion(3, 591, 1, 5323)
    r = gate.min_effect**2 / var
    assert z > math.sqrt(mixture_boundary(gate.alpha, r))  # the normal approximation would FAIL
    few = gate.evaluate(snap(588, 3), snap(), snap(5322, 1), snap(588, 3))
    assert few.verdict is not g.Verdict.FAIL and few.statistic == 3 and few.boundary >= 3
    # the same shares at 10 times the counts: decisive
    many = gate.evaluate(snap(5880, 30), snap(), snap(53220, 10), snap(5880, 30))
    assert many.verdict is g.Verdict.FAIL and many.statistic >= many.boundary


# ----------------------------------------------------------------------------- the exact count test


@pytest.mark.parametrize("k_c,k,pi", [(3, 4, 0.1), (23, 24, 0.46), (0, 9, 0.3), (40, 120, 0.25)])
def test_conditional_lr_is_the_ratio_of_scipys_binomial_pmfs(k_c, k, pi):
    for rho in (1.5, 6.0, 40.0):
        theta = rho * pi / (rho * pi + 1 - pi)
        want = sps.binom.logpmf(k_c, k, theta) - sps.binom.logpmf(k_c, k, pi)
        assert conditional_log_lr(k_c, k, pi, (rho,)) == pytest.approx(want, rel=1e-9, abs=1e-9)
    # the mixture is the mean of the ratios
    ratios = (2.0, 5.0, 30.0)
    mean = np.mean([math.exp(conditional_log_lr(k_c, k, pi, (x,))) for x in ratios])
    assert conditional_log_lr(k_c, k, pi, ratios) == pytest.approx(math.log(mean), rel=1e-9)


@pytest.mark.parametrize("n_c,n_s,k", [(60, 540, 3), (600, 600, 25), (1110, 1290, 24), (50, 5000, 40)])
def test_conditional_lr_has_mean_one_given_the_errors_and_at_most_one_without_replacement(n_c, n_s, k):
    pi, ratios = n_c / (n_c + n_s), rate_ratios(k, n_c + n_s, 0.005)
    lr = np.array([math.exp(conditional_log_lr(j, k, pi, ratios)) for j in range(k + 1)])
    # the same rate on both sides: Binomial(k, pi) of the canary's count, mean exactly 1
    assert float(sps.binom.pmf(np.arange(k + 1), k, pi) @ lr) == pytest.approx(1.0, rel=1e-9)
    # Bernoulli requests: the k errors fall on k of the n requests at random (hypergeometric), which
    # Hoeffding's convex order makes at most 1: the test is conservative there
    hyper = sps.hypergeom.pmf(np.arange(k + 1), n_c + n_s, k, n_c)
    assert float(hyper @ lr) <= 1.0 + 1e-12


def test_rate_ratios_and_the_count_boundary():
    r = rate_ratios(24, 2400, 0.005)  # pooled 1 %: +0.5 points is a ratio of 1.5
    assert r[0] == pytest.approx(1.5) and len(r) == 6
    assert [b / a for a, b in itertools.pairwise(r)] == pytest.approx([2.0] * 5)
    assert rate_ratios(0, 2400, 0.005) == () and conditional_log_lr(0, 0, 0.5, r) == 0.0
    alpha = 0.0025
    b = conditional_boundary(24, 0.46, r, alpha)
    assert conditional_log_lr(b, 24, 0.46, r) >= math.log(1 / alpha) > conditional_log_lr(b - 1, 24, 0.46, r)
    # 2 errors on an even split can never be strong evidence
    assert conditional_boundary(2, 0.5, rate_ratios(2, 200, 0.005), alpha) == math.inf


def test_latency_gate_compares_the_histograms_not_a_limit():
    gate = g.LatencyVsStable(alpha=0.01 / 3)
    bounds = (*signals.LATENCY_BUCKETS, math.inf)

    def hist(scale: float, n: int, seed: int) -> dict:
        x = np.random.default_rng(seed).lognormal(math.log(0.005 * scale), 0.5, n)
        return {b: float((x <= b).sum()) for b in bounds}

    slow = gate.evaluate(
        Snapshot(latency=hist(1.5, 300, 1)),
        Snapshot(),
        Snapshot(latency=hist(1, 900, 2)),
        Snapshot(latency=hist(1.5, 300, 1)),
    )
    assert slow.verdict is g.Verdict.FAIL and slow.effect > 0.1  # p99 far below any 500 ms limit
    same = gate.evaluate(
        Snapshot(latency=hist(1, 300, 3)),
        Snapshot(),
        Snapshot(latency=hist(1, 900, 4)),
        Snapshot(latency=hist(1, 300, 3)),
    )
    assert same.verdict is g.Verdict.PASS


def test_drift_test_boundary_moves_with_n():
    gate = g.DriftTest(alpha=0.01 / 3)
    bounds = (*signals.SCORE_BUCKETS, math.inf)

    def hist(p_pos: float, n: int) -> dict:
        # a deterministic two-mode score histogram: share p_pos near 1, the rest near 0
        cum, out = 0.0, {}
        for b in bounds:
            cum += (n * (1 - p_pos)) if b == 0.05 else (n * p_pos if b == 1.0 else 0.0)
            out[b] = cum
        return out

    # the same 5-point change of the positive share: not enough at 200 a side, decisive at 20000
    small = gate.evaluate(
        Snapshot(scores=hist(0.65, 200)),
        Snapshot(),
        Snapshot(scores=hist(0.6, 200)),
        Snapshot(scores=hist(0.65, 200)),
    )
    large = gate.evaluate(
        Snapshot(scores=hist(0.65, 20000)),
        Snapshot(),
        Snapshot(scores=hist(0.6, 20000)),
        Snapshot(scores=hist(0.65, 20000)),
    )
    assert small.verdict is g.Verdict.PASS and large.verdict is g.Verdict.FAIL
    assert small.effect == pytest.approx(large.effect)  # the same distance, judged against its noise


def test_accuracy_gate_needs_labels_and_catches_a_drop():
    gate = g.AccuracyVsStable(alpha=0.005)
    assert gate.evaluate(snap(), snap(), snap(), snap()).verdict is g.Verdict.INCONCLUSIVE
    r = gate.evaluate(snap(lab=(140, 200)), snap(), snap(lab=(950, 1000)), snap(lab=(140, 200)))
    assert r.verdict is g.Verdict.FAIL and r.effect == pytest.approx(0.30 - 0.05)


def test_compare_defaults_split_alpha_and_round_trip_config():
    gs = g.defaults(accuracy_min_effect=0.02)
    assert [type(x) for x in gs] == [
        g.LatencyGate,
        g.ErrorRateVsStable,
        g.LatencyVsStable,
        g.DriftTest,
        g.AccuracyVsStable,
    ]
    assert sum(x.alpha for x in gs[1:]) == pytest.approx(g.DEFAULTS["alpha"])
    assert g.gates_from_config(g.gates_to_config(gs)) == gs
    with pytest.raises(ValueError, match="alpha"):
        g.defaults(alpha=0.0)
    with pytest.raises(ValueError, match="max-error-increase"):
        g.defaults(compare=True, max_error_increase=-1)


def test_the_comparisons_are_the_default_of_the_operator_and_false_turns_them_off():
    from serving.rollout.operator import gates_from_spec

    assert gates_from_spec({}) == g.defaults() == gates_from_spec({"compareWithStable": True})
    assert any(isinstance(x, g.ErrorRateVsStable) for x in gates_from_spec({}))
    off = gates_from_spec({"compareWithStable": False, "maxP99Ms": 300})
    assert off == g.defaults(compare=False, max_p99_ms=300)
    assert not any(x.__class__.__name__.endswith(("VsStable", "Test")) for x in off)


# ----------------------------------------------------------------------------- the hold region


@pytest.mark.parametrize("alpha,r", [(0.0025, 1.4), (0.01, 20.0), (0.0025, 300.0)])
def test_a_harmful_look_between_the_hold_and_fail_boundaries_holds(alpha, r):
    # the hold boundary is the X^2 where the mixture ratio reaches 1/alpha ** HOLD_POWER: the same
    # mixture_boundary at alpha ** HOLD_POWER
    assert g.hold_log_lr(alpha) == pytest.approx(g.HOLD_POWER * math.log(1 / alpha))
    hold = mixture_boundary(alpha**g.HOLD_POWER, r)
    fail = mixture_boundary(alpha, r)
    assert 0 < hold < fail
    assert mixture_log_lr(hold, r) == pytest.approx(g.hold_log_lr(alpha), abs=1e-9)

    def look(x2: float, harmful: bool = True, enough: bool = True) -> g.GateResult:
        return g.sequential_verdict(
            "x", x2=x2, d=1, r=r, alpha=alpha, harmful=harmful, enough=enough, effect=0.01, n=100, m=900
        )

    assert look(hold * 0.99).verdict is g.Verdict.PASS
    held = look((hold + fail) / 2)
    assert held.verdict is g.Verdict.INCONCLUSIVE and "hold" in held.detail and not held.effect < 0
    assert held.boundary == pytest.approx(math.sqrt(fail))  # the FAIL boundary is still the one shown
    assert look(fail * 1.001).verdict is g.Verdict.FAIL
    # a better canary (one-sided) is never held, however large its statistic
    assert look((hold + fail) / 2, harmful=False).verdict is g.Verdict.PASS


def test_the_hold_delays_at_most_alpha_to_the_hold_power_of_same_model_canaries():
    # Ville's inequality for the hold boundary: under "the same model" the mixture ratio ever reaches
    # 1/alpha ** HOLD_POWER with probability <= alpha ** HOLD_POWER. 20000 simulated rollouts of 60
    # looks each: the two-proportion z of a growing sample is a random walk in information time.
    alpha, looks, paths = 0.0025, 60, 20000
    rng = np.random.default_rng(7)
    info = np.arange(1, looks + 1, dtype=float)  # information at each look, in units of the first
    walk = np.cumsum(rng.standard_normal((paths, looks)), axis=1)  # sum of i.i.d. N(0, 1) increments
    z = walk / np.sqrt(info)
    held = np.zeros(paths, dtype=bool)
    for j in range(looks):
        r = 0.05 * info[j]  # tau^2 * information: a small effect worth catching
        bound = math.sqrt(mixture_boundary(alpha**g.HOLD_POWER, r))
        held |= z[:, j] >= bound  # one-sided: only a harmful (positive) difference holds
    share = held.mean()
    assert share <= alpha**g.HOLD_POWER  # 5 %
    assert share > 0  # the boundary is reachable: the bound is not vacuous


def test_a_sequential_fail_rolls_back_at_once_an_absolute_one_waits_for_the_threshold():
    spec = machine.RolloutSpec(threshold=2)
    st, _ = machine.start(spec, 0.0)
    seq = g.GateResult(
        "error_rate_vs_stable",
        g.Verdict.FAIL,
        5.0,
        3.9,
        "<=",
        100,
        900,
        sequential=True,
        effect=0.1,
        statistic=5.0,
        boundary=3.9,
    )
    new, d = machine.analyse(st, spec, [seq], 30.0)
    assert d.action is machine.Action.ROLLBACK and new.phase is machine.Phase.ROLLED_BACK
    absolute = g.GateResult("success_rate", g.Verdict.FAIL, 0.9, 0.99, ">=", 100)
    new, d = machine.analyse(st, spec, [absolute], 30.0)
    assert d.action is machine.Action.HOLD


def test_gate_result_evidence_round_trips_and_infinite_boundary_is_dropped():
    r = g.GateResult(
        "x",
        g.Verdict.PASS,
        1.0,
        3.0,
        "<=",
        10,
        20,
        effect=0.01,
        statistic=1.0,
        boundary=math.inf,
        sequential=True,
    )
    d = r.to_dict()
    assert d["boundary"] is None and d["effect"] == 0.01 and d["sequential"] is True
    assert g.GateResult.from_dict(d).statistic == 1.0


# ------------------------------------------------------------------- through the controller loop


def _controller(tmp_path, world):
    from serving.rollout import controller as ctl
    from serving.rollout.store import FileStateStore
    from tests.unit.test_rollout_controller import CANARY, SCRAPE, STABLE

    store = FileStateStore(tmp_path / "state.json")
    rec = ctl.new_record(
        machine.RolloutSpec((10, 25, 50, 100), 10.0, 2, 3), g.defaults(), STABLE, CANARY,
        {"router": "local_proxy", "socket_path": "/nonexistent"}, SCRAPE,
    )  # fmt: skip
    ctl.begin(store, rec)
    logs: list[str] = []
    c = ctl.Controller(
        store, router=world, provider=world, clock=world.clock, sleep=world.sleep, log=logs.append
    )
    return c, logs


def test_controller_rolls_back_a_5pct_erroring_canary_at_its_first_analysis_with_the_evidence(tmp_path):
    from serving.rollout import crstore
    from serving.rollout.report import text_report
    from tests.unit.test_rollout_controller import World

    c, logs = _controller(tmp_path, World(error_rate=0.05))
    rec = c.run(max_seconds=60)
    assert rec.state["phase"] == "RolledBack" and rec.state["analyses"] == 1
    assert "sequential comparison failed" in rec.state["reason"]
    assert any("error_rate_vs_stable: effect +0.05" in line and "FAIL" in line for line in logs)
    text = text_report(rec)
    assert "evidence of the last analysis" in text and "error_rate_vs_stable: effect +0.05" in text
    # the operator's status.lastAnalysis carries the same evidence
    ev = next(e for e in rec.state["history"][-1]["evidence"] if e["gate"] == "error_rate_vs_stable")
    view = crstore.evidence_view(ev)
    assert view["effect"] == pytest.approx(0.05) and view["statistic"] >= view["boundary"] > 0
    assert view["n"] > 0 and view["baselineN"] > 0


def test_controller_promotes_a_good_canary_under_the_comparisons(tmp_path):
    from tests.unit.test_rollout_controller import World

    c, _ = _controller(tmp_path, World())
    rec = c.run(max_seconds=120)
    assert rec.state["phase"] == "Promoted" and rec.state["analyses"] == 4
