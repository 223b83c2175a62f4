"""Gate math (quantiles, PSI, Jensen-Shannon), verdicts with evidence, and metric parsing."""

from __future__ import annotations

import math

import pytest

from serving.rollout.gates import (
    AccuracyGate,
    DriftGate,
    GateResult,
    LatencyGate,
    SuccessRateGate,
    Verdict,
    gates_from_config,
    gates_to_config,
    overall_verdict,
)
from serving.rollout.metrics import Target, parse_exposition
from serving.rollout.stats import Snapshot, coarsen, histogram_quantile, is_server_error, js_distance, psi

INF = math.inf


def cum(counts: list[float], bounds: list[float] | None = None) -> dict[float, float]:
    bounds = bounds or [round(0.05 * (i + 1), 2) for i in range(len(counts))]
    out, run = {}, 0.0
    for b, c in zip(bounds, counts, strict=True):
        run += c
        out[b] = run
    out[INF] = run
    return out


def test_histogram_quantile_matches_prometheus_interpolation():
    h = {0.1: 50.0, 0.2: 100.0, INF: 100.0}
    assert histogram_quantile(0.5, h) == pytest.approx(0.1)
    assert histogram_quantile(0.75, h) == pytest.approx(0.15)
    assert histogram_quantile(0.25, h) == pytest.approx(0.05)
    assert histogram_quantile(0.99, {0.1: 0.0, 0.5: 0.0, INF: 10.0}) == 0.5  # only +Inf: largest finite bound
    assert math.isnan(histogram_quantile(0.99, {0.1: 0.0, INF: 0.0}))
    with pytest.raises(ValueError):
        histogram_quantile(1.5, h)


def test_js_distance_bounds_symmetry_and_a_hand_computed_value():
    a, b = cum([10, 0, 0, 30]), cum([0, 20, 20, 0])
    assert js_distance(a, a) == pytest.approx(0.0)
    assert js_distance(a, b) == pytest.approx(1.0)  # disjoint supports
    p, q = cum([50, 50]), cum([90, 10])
    assert js_distance(p, q) == pytest.approx(js_distance(q, p))
    # hand: P=(.5,.5) Q=(.9,.1) M=(.7,.3); JSD = .5*KL(P||M) + .5*KL(Q||M) in bits
    kl = lambda x, y: sum(xi * math.log2(xi / yi) for xi, yi in zip(x, y, strict=True))  # noqa: E731
    jsd = 0.5 * kl((0.5, 0.5), (0.7, 0.3)) + 0.5 * kl((0.9, 0.1), (0.7, 0.3))
    assert js_distance(p, q) == pytest.approx(math.sqrt(jsd))


def test_psi_zero_for_equal_shares_and_matches_the_formula():
    assert psi(cum([1000, 3000]), cum([10000, 30000])) == pytest.approx(0.0, abs=1e-3)
    assert psi(cum([10, 30]), cum([10, 30]), alpha=0.0) == 0.0
    a, s = (0.2, 0.8), (0.5, 0.5)
    expected = sum((x - y) * math.log(x / y) for x, y in zip(a, s, strict=True))
    assert psi(cum([2000, 8000]), cum([5000, 5000]), alpha=0.0) == pytest.approx(expected)
    assert math.isfinite(psi(cum([10, 0]), cum([0, 10])))  # smoothing keeps empty buckets finite


def test_coarsen_preserves_counts_and_folds_overflow_into_the_last_bin():
    h = cum([1] * 20)
    h[INF] = 25.0  # 5 scores above 1.0 (float rounding in a runtime)
    c = coarsen(h, 5)
    assert list(c) == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert c[0.2] == 4 and c[1.0] == 25


def test_snapshot_difference_handles_counter_resets():
    before = Snapshot(requests={"200": 100.0, "500": 5.0}, scores={0.5: 10.0, INF: 20.0})
    after = Snapshot(requests={"200": 130.0, "500": 2.0}, scores={0.5: 15.0, INF: 30.0})
    w = after - before
    assert w.requests == {"200": 30.0, "500": 2.0}  # 500 went down: the process restarted
    assert w.scores == {0.5: 5.0, INF: 10.0} and w.predictions == 10
    again = Snapshot.from_dict(after.to_dict())
    assert again.scores == after.scores and again.requests == after.requests


@pytest.mark.parametrize(
    "status, server_error",
    [("200", False), ("400", False), ("404", False), ("500", True), ("503", True), ("OK", False),
     ("INVALID_ARGUMENT", False), ("INTERNAL", True), ("UNAVAILABLE", True)],
)  # fmt: skip
def test_only_server_side_failures_count_against_the_canary(status, server_error):
    assert is_server_error(status) is server_error


def snap(ok=100, err=0, client_err=0, lat=0.01, scores=(35, 2, 2, 2, 59), labelled=(0, 0)) -> Snapshot:
    n = ok + err + client_err
    return Snapshot(
        requests={"200": ok, "500": err, "400": client_err},
        latency={0.005: 0.0, 0.01: float(n) if lat <= 0.01 else 0.0, 0.5: float(n) if lat <= 0.5 else 0.0,
                 1.0: float(n), INF: float(n)},
        scores=cum([float(s) for s in scores], [0.2, 0.4, 0.6, 0.8, 1.0]),
        labelled_correct=labelled[0], labelled_total=labelled[1],
    )  # fmt: skip


def test_success_rate_gate():
    gate = SuccessRateGate(min_rate=0.99, min_requests=20)
    r = gate.evaluate(snap(ok=95, err=5), snap(), snap())
    assert (r.verdict, r.value, r.samples) == (Verdict.FAIL, pytest.approx(0.95), 100)
    assert (
        gate.evaluate(snap(ok=100, client_err=30), snap(), snap()).verdict is Verdict.PASS
    )  # 4xx: client's fault
    r = gate.evaluate(snap(ok=10), snap(), snap())
    assert r.verdict is Verdict.INCONCLUSIVE and r.value is None and "fewer than 20" in r.detail


def test_latency_gate_uses_the_p99_of_the_window():
    gate = LatencyGate(max_ms=250, min_requests=20)
    fast = gate.evaluate(snap(lat=0.01), snap(), snap())
    slow = gate.evaluate(snap(lat=0.6), snap(), snap())
    assert fast.verdict is Verdict.PASS and fast.value <= 10
    assert slow.verdict is Verdict.FAIL and slow.value > 500 and slow.unit == "ms"
    assert "latency_p99=" in slow.summary() and "> 250.0ms" in slow.summary() and "FAIL" in slow.summary()


def test_drift_gate_passes_same_distribution_fails_mirrored_and_needs_samples():
    gate = DriftGate(max_drift=0.15, method="js", min_samples=400)
    base = snap(scores=(350, 20, 20, 20, 590))
    assert gate.evaluate(snap(scores=(340, 25, 15, 20, 600)), base, base).verdict is Verdict.PASS
    bad = gate.evaluate(snap(scores=(590, 20, 20, 20, 350)), base, base)
    assert bad.verdict is Verdict.FAIL and bad.value > 0.15 and bad.samples == 1000
    few = gate.evaluate(snap(scores=(35, 2, 2, 2, 59)), base, base)
    assert few.verdict is Verdict.INCONCLUSIVE
    # at a 100% step stable gets no traffic: the gate compares with stable since the rollout began
    r = gate.evaluate(snap(scores=(340, 25, 15, 20, 600)), snap(scores=(0, 0, 0, 0, 0)), base)
    assert r.verdict is Verdict.PASS and r.baseline_samples == 1000
    assert DriftGate(method="psi").name == "drift_psi"
    with pytest.raises(ValueError, match="js"):
        DriftGate(method="kl")


def test_accuracy_gate_relative_to_stable():
    gate = AccuracyGate(min_accuracy=0.5, max_drop=0.05, min_labelled=50)
    stable = snap(labelled=(950, 1000))
    r = gate.evaluate(snap(labelled=(85, 100)), snap(), stable)
    assert r.verdict is Verdict.FAIL and r.threshold == pytest.approx(0.90)
    assert gate.evaluate(snap(labelled=(93, 100)), snap(), stable).verdict is Verdict.PASS
    assert gate.evaluate(snap(labelled=(9, 10)), snap(), stable).verdict is Verdict.INCONCLUSIVE


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SuccessRateGate(min_rate=2), r"min_rate \(--min-success-rate\) must be in \(0, 1\], got 2"),
        (lambda: SuccessRateGate(min_rate=-1), "--min-success-rate"),
        (lambda: SuccessRateGate(min_rate=0), "--min-success-rate"),
        (lambda: SuccessRateGate(min_rate=math.nan), "must be a finite number"),
        (
            lambda: SuccessRateGate(min_requests=0),
            r"min_requests \(--min-requests\) must be a whole number >= 1",
        ),
        (lambda: SuccessRateGate(min_requests=-5), "--min-requests"),
        (lambda: SuccessRateGate(min_requests=2.5), "--min-requests"),
        (lambda: LatencyGate(max_ms=-5), r"max_ms \(--max-p99-ms\) must be > 0, got -5"),
        (lambda: LatencyGate(max_ms=math.inf), "--max-p99-ms"),
        (lambda: LatencyGate(min_requests=0), "--min-requests"),
        (lambda: LatencyGate(quantile=1.5), "quantile"),
        (lambda: DriftGate(bins=0), r"bins \(--drift-bins\) must be a whole number between 2 and 100, got 0"),
        (lambda: DriftGate(bins=-3), "--drift-bins"),
        (lambda: DriftGate(bins=1), "--drift-bins"),
        (lambda: DriftGate(min_samples=-1), r"min_samples \(--min-predictions\)"),
        (lambda: DriftGate(max_drift=0), "--max-drift"),
        (lambda: DriftGate(max_drift=1.5, method="js"), r"must be in \(0, 1\]"),
        (lambda: DriftGate(max_drift=-0.1, method="psi"), "--max-drift"),
        (lambda: AccuracyGate(min_accuracy=1.5), r"min_accuracy \(--min-accuracy\) must be in \[0, 1\]"),
        (lambda: AccuracyGate(min_accuracy=-0.1), "--min-accuracy"),
        (lambda: AccuracyGate(max_drop=2), "--max-accuracy-drop"),
        (lambda: AccuracyGate(min_labelled=0), "--min-labelled"),
        (lambda: SuccessRateGate(name=""), "name"),
    ],
)
def test_gates_refuse_values_that_make_no_sense(make, message):
    """The CLI, the KFP step and a stored record all build gates here, so all get this refusal."""
    with pytest.raises(ValueError, match=message):
        make()


def test_gates_never_divide_by_zero_on_a_quiet_canary():
    """--min-requests 0 with no canary traffic was a ZeroDivisionError (and min_samples -1 a drift FAIL on
    zero data). The constructors refuse such values now; the gates also hold when they are bypassed."""
    gates = [SuccessRateGate(), LatencyGate(), DriftGate(), AccuracyGate(0.5)]
    for g, field in zip(gates, ("min_requests", "min_requests", "min_samples", "min_labelled"), strict=True):
        object.__setattr__(g, field, 0)  # what a record written before the checks could hold
        r = g.evaluate(Snapshot(), Snapshot(), Snapshot())
        assert r.verdict is Verdict.INCONCLUSIVE and r.value is None, (g, r)
        object.__setattr__(g, field, -5)
        assert g.evaluate(Snapshot(), Snapshot(), Snapshot()).verdict is Verdict.INCONCLUSIVE


@pytest.mark.parametrize(
    "cfg, message",
    [
        ([{"kind": "Bogus"}], r"gates\[0\]: unknown gate kind 'Bogus'"),
        ([{"min_rate": 0.9}], r"gates\[0\]: unknown gate kind None"),
        ([{"kind": "SuccessRateGate", "x": 1}], r"gates\[0\] \(SuccessRateGate\): unknown fields \['x'\]"),
        ([{"kind": "SuccessRateGate"}, {"kind": "DriftGate", "bins": 0}], r"gates\[1\]: drift gate: bins"),
        (["SuccessRateGate"], r"gates\[0\] must be an object"),
        ({"kind": "SuccessRateGate"}, "gates must be a list"),
    ],
)
def test_gates_from_config_names_the_bad_entry(cfg, message):
    with pytest.raises(ValueError, match=message):
        gates_from_config(cfg)


def test_overall_verdict_and_config_round_trip():
    p = GateResult("a", Verdict.PASS, 1, 1, ">=", 1)
    f = GateResult("b", Verdict.FAIL, 0, 1, ">=", 1)
    i = GateResult("c", Verdict.INCONCLUSIVE, None, 1, ">=", 0)
    assert overall_verdict([p, p]) is Verdict.PASS
    assert overall_verdict([p, i]) is Verdict.INCONCLUSIVE
    assert overall_verdict([i, f]) is Verdict.FAIL
    assert overall_verdict([]) is Verdict.INCONCLUSIVE
    gates = [SuccessRateGate(0.9), LatencyGate(300), DriftGate(0.2, "psi"), AccuracyGate(0.8)]
    assert gates_from_config(gates_to_config(gates)) == gates
    with pytest.raises(ValueError, match="unknown gate"):
        gates_from_config([{"kind": "Nope"}])


EXPOSITION = """# HELP mlrollout_requests_total Inference requests
# TYPE mlrollout_requests_total counter
mlrollout_requests_total{model="m",version="2.0.0",protocol="v2",status="200"} 90.0
mlrollout_requests_total{model="m",version="2.0.0",protocol="v1",status="500"} 10.0
mlrollout_requests_total{model="m",version="1.0.0",protocol="v2",status="200"} 999.0
mlrollout_requests_created{model="m",version="2.0.0",protocol="v2",status="200"} 1.7e+09
# TYPE mlrollout_request_duration_seconds histogram
mlrollout_request_duration_seconds_bucket{le="0.01",model="m",protocol="v2",version="2.0.0"} 80.0
mlrollout_request_duration_seconds_bucket{le="+Inf",model="m",protocol="v2",version="2.0.0"} 90.0
mlrollout_request_duration_seconds_bucket{le="0.01",model="m",protocol="v1",version="2.0.0"} 10.0
mlrollout_request_duration_seconds_bucket{le="+Inf",model="m",protocol="v1",version="2.0.0"} 10.0
mlrollout_request_duration_seconds_count{model="m",protocol="v2",version="2.0.0"} 90.0
# TYPE mlrollout_prediction_score histogram
mlrollout_prediction_score_bucket{le="0.5",model="m",version="2.0.0"} 30.0
mlrollout_prediction_score_bucket{le="1.0",model="m",version="2.0.0"} 100.0
mlrollout_prediction_score_bucket{le="+Inf",model="m",version="2.0.0"} 100.0
# TYPE mlrollout_predicted_class_total counter
mlrollout_predicted_class_total{class="1",model="m",version="2.0.0"} 70.0
"""


def test_parse_exposition_selects_one_version_and_sums_protocols():
    s = parse_exposition(EXPOSITION, Target("m", "2.0.0"))
    assert s.requests == {"200": 90.0, "500": 10.0}
    assert s.latency == {0.01: 90.0, INF: 100.0}
    assert s.scores == {0.5: 30.0, 1.0: 100.0, INF: 100.0}
    assert s.classes == {"1": 70.0}
    assert (
        Target("m", "2.0.0", extra={"namespace": 'a"b'}).selector()
        == '{model="m",namespace="a\\"b",version="2.0.0"}'
    )


def test_providers_turn_an_unreachable_backend_into_a_metrics_error():
    import socket

    from serving.rollout.metrics import MetricsError, PrometheusProvider, ScrapeProvider

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prom = PrometheusProvider(f"http://127.0.0.1:{port}", timeout_s=1)
    assert prom.online() is False
    with pytest.raises(MetricsError, match="unreachable"):
        prom.snapshot(Target("m", "1"))
    with pytest.raises(MetricsError, match="cannot scrape"):
        ScrapeProvider(timeout_s=1).snapshot(Target("m", "1", f"http://127.0.0.1:{port}/metrics"))
    with pytest.raises(MetricsError, match="needs a metrics URL"):
        ScrapeProvider().snapshot(Target("m", "1"))


def test_gate_defaults_come_from_the_gates_own_fields():
    from serving.rollout import gates as g
    from serving.rollout.cli import build_parser, gates_from_args

    # the default: the absolute p99 limit beside the comparisons with stable, alpha split over three
    std = g.defaults()
    a = g.DEFAULTS["alpha"] / 3
    assert std == [
        g.LatencyGate(),
        g.ErrorRateVsStable(alpha=a),
        g.LatencyVsStable(alpha=a),
        g.DriftTest(alpha=a),
    ]
    # an accuracy floor asked for stays beside them (it has no default, so dropping it would be silent)
    assert g.defaults(drift=False, min_accuracy=0.8)[-1] == g.AccuracyGate(min_accuracy=0.8)
    assert g.defaults(max_p99_ms=250.0)[0].threshold == 250.0
    absolute = g.defaults(compare=False)
    assert absolute == [g.SuccessRateGate(), g.LatencyGate(), g.DriftGate()]
    assert [x.threshold for x in absolute] == [0.99, 500.0, 0.15]
    assert g.defaults(compare=False, drift=False, min_accuracy=0.8)[-1] == g.AccuracyGate(min_accuracy=0.8)
    with pytest.raises(TypeError, match="unknown gate settings"):
        g.defaults(max_p99=1)
    argv = [
        "start",
        "--router",
        "local_proxy",
        "--model",
        "m",
        "--stable-version",
        "1",
        "--canary-version",
        "2",
    ]
    assert gates_from_args(build_parser().parse_args(argv)) == std
    assert gates_from_args(build_parser().parse_args([*argv, "--compare"])) == std
    assert gates_from_args(build_parser().parse_args([*argv, "--no-compare"])) == absolute


def test_inconclusive_results_carry_their_evidence():
    from serving.rollout.gates import GateResult, Verdict

    r = GateResult.inconclusive("drift_js", 0.15, "<=", 3, 7, why="too few")
    assert r == GateResult("drift_js", Verdict.INCONCLUSIVE, None, 0.15, "<=", 3, 7, detail="too few")
    assert r.summary() == "drift_js=n/a ? 0.15 (n=3 vs 7) INCONCLUSIVE [too few]"
