"""The comparative statistics (serving/rollout/stats.py) against scipy.stats on the same inputs, the
mSPRT boundary against its closed form, and the sequential gates' verdicts (gates.py)."""

from __future__ import annotations

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
    mann_whitney,
    mixture_boundary,
    mixture_log_lr,
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
    assert "effect" in bad.summary() and "z=" in bad.summary()


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
    gs = g.defaults(compare=True, accuracy_min_effect=0.02)
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
        machine.RolloutSpec((10, 25, 50, 100), 10.0, 2, 3), g.defaults(compare=True), STABLE, CANARY,
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
