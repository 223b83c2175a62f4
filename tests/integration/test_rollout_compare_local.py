"""Issue 14, part 5: the comparison with stable on the real local stack (two KServe runtimes, HAProxy
with its runtime API, Prometheus), with real HTTP traffic through HAProxy.

A canary that fails 1 % of its requests (the runtime's fault knob ``MLROLLOUT_FAULT_ERROR_RATE``)
against a stable that fails none is rolled back by ``error_rate_vs_stable``; the same traffic with a
good canary (the same model under a new version) is promoted. Both canaries are the stable model
re-packaged, so only the injected errors tell them apart.

Why these settings (the 1 % rate needs thousands of canary requests to be seen):

* traffic: batch 1 (the fault is drawn once per *request*, so one row per request gives the most
  evidence per CPU second), 8 keep-alive clients, no feedback: 460-525 requests/s measured here
  with other work on the 2-core machine (the time bounds below hold down to about 70 requests/s);
* steps 50 -> 100 (50 % first: canary and stable grow equally, which is where a two-proportion
  comparison learns fastest), 2 s intervals (Prometheus scrapes every 1 s);
* ``min_requests`` 3000: a step passes only with 3000 canary requests in its window (and 3000 on
  stable since the rollout began); until then it is inconclusive and the window grows, while the
  sequential test may fail at any look;
* ``ErrorRateVsStable(alpha=0.01, min_effect=0.005)``: a false-rollback rate of 1 % and 0.5 points
  the smallest increase worth catching, set explicitly (whatever the project's defaults become),
  beside the absolute p99 limit (generous: this is about errors).

How sure the outcomes are (computed with ``serving.rollout.stats`` on these numbers):

* the bad canary can only be promoted by passing the look that promotes it, which has at least
  2 x 3000 canary requests and at least 3000 stable ones, stable with 0 errors. At n = 6000 vs 3000
  the mixture ratio reaches 1/alpha from 29 canary errors on (``two_proportion`` + ``mixture_log_lr``),
  and P(Binomial(6000, 0.01) < 29) = 3e-6: P(promoted) <= 3e-6. In 2 x 20000 simulated rollouts of
  these settings (Poisson traffic at 150 and at 400 requests/s, the same gate and looks) all were
  rolled back, 11 of them only at the second step; the median at about 1500-1600 canary requests
  (99th percentile 2600-2800), so the rollback usually comes before the first step's window is full;
* the good canary answers without server errors, as stable does: the difference is 0, which is never
  harmful, so the one-sided test cannot fail it (P(rolled back) = 0 unless a runtime really errs,
  which the test would then show); it needs 9000 requests (about 20-60 s here) to be promoted;
* the effect at a rollback (the canary's observed error share, stable's being 0) lay in
  [0.0045, 0.037] in all 40000 simulated rollbacks (small: a late look with many requests; large: a
  few early errors in a small window): the test accepts [0.004, 0.04].

The runtime draws its faults with an unseeded ``random.random()`` in its own process; the traffic
generator's inputs are seeded (``SEED``). The probabilities above cover the runtime's draws.
"""

from __future__ import annotations

import math
import time

import pytest

from serving.demo.badmodel import with_version
from serving.demo.localstack import TrafficGenerator
from serving.rollout import controller as ctl
from serving.rollout.gates import ErrorRateVsStable, LatencyGate
from serving.rollout.machine import RolloutSpec
from serving.rollout.store import FileStateStore
from tests.integration.test_rollout_local import pytestmark, started_stack  # noqa: F401 (the same skip)
from tests.modelfactory import breast_cancer, build_package

X, _, _, _ = breast_cancer()
SEED = 14
INTERVAL = 2.0
STEPS = (50, 100)
MIN_REQUESTS = 3000
ALPHA = 0.01
MAX_ERROR_INCREASE = 0.005
FAULT_RATE = 0.01


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare-models")
    v1, _ = build_package(root / "v1", "breast-cancer", "1.0.0", "logistic_regression", 0)
    return {
        "v1": v1,
        "good": with_version(v1, root / "good", "1.1.0"),
        "bad": with_version(v1, root / "bad", "1.2.0", "1% injected errors"),
    }


@pytest.fixture(scope="module")
def stack(packages, tmp_path_factory):
    with started_stack(packages["v1"], packages["good"], tmp_path_factory.mktemp("stack")) as s:
        yield s


def compare_rollout(stack, tmp_path):
    """One rollout under the comparison gates, with the same traffic for every canary; returns the
    final record, every answer, the time the rollout ended (wall clock) and the controller's log."""
    tg = TrafficGenerator(
        stack.proxy_url,
        stack.model,
        X,
        None,  # no labels: no feedback requests, all the CPU goes to inference requests
        rps=1000,  # a ceiling: 8 clients on this machine stay below it
        concurrency=8,
        batch=1,
        max_requests=60_000,
        max_seconds=170,
        seed=SEED,
    )
    gates = [
        LatencyGate(2000.0, min_requests=20),
        ErrorRateVsStable(alpha=ALPHA, min_effect=MAX_ERROR_INCREASE, min_n=MIN_REQUESTS),
    ]
    logs: list[str] = []
    with tg:
        store = FileStateStore(tmp_path / "state.json")
        rec = ctl.new_record(
            # inconclusive looks hold the weight while the window grows: up to 75 of them (150 s, so
            # that even ~70 requests/s on a busy machine reach the 9000 a promotion needs)
            RolloutSpec(STEPS, INTERVAL, threshold=2, max_inconclusive=75),
            gates,
            stack.stable_target,
            stack.canary_target,
            stack.router().config(),
            stack.metrics_config(),
        )
        t_begin = time.time()
        ctl.begin(store, rec)
        c = ctl.Controller(store, router=stack.router(), provider=stack.provider(), log=logs.append)
        rec = c.run(max_seconds=150)
        t_end = time.time()
        time.sleep(1.0)  # traffic after the final decision
    return rec, tg.result(), t_begin, t_end, logs


def _evidence(rec, gate: str) -> dict:
    last = rec.state["history"][-1]
    (e,) = [e for e in last["evidence"] if e["gate"] == gate]
    return e


def test_canary_with_one_percent_errors_is_rolled_back_by_the_comparison(stack, packages, tmp_path):
    canary = stack.replace_canary(packages["bad"], {"MLROLLOUT_FAULT_ERROR_RATE": str(FAULT_RATE)})
    rec, traffic, t_begin, t_end, logs = compare_rollout(stack, tmp_path)
    log = "\n".join(logs)
    st = rec.state
    assert st["phase"] == "RolledBack", log
    assert not any(h["action"] == "promote" for h in st["history"]), log
    assert stack.router().get_weights() == (100, 0)

    e = _evidence(rec, "error_rate_vs_stable")
    assert e["verdict"] == "fail", log
    # the evidence: n on each side, the effect (canary error share - stable's 0), statistic vs boundary
    n, m = e["samples"], e["baseline_samples"]
    assert n >= 300 and m >= 300, e  # a 1 % rate is not seen in fewer requests
    assert 0.004 <= e["effect"] <= 0.04, e  # see the module docstring for the bounds
    assert e["statistic"] >= e["boundary"] > 0, e
    assert "vs stable 0.00% of" in e["detail"], e  # stable, without the fault knob, failed nothing

    # what the clients saw: the canary answered (and failed) while it was live, stable never failed,
    # and after the rollback only stable answers
    live = traffic.window(t_begin, t_end)
    canary_failed = len(live.model_failures(canary.version))
    canary_answers = live.by_version().get(canary.version, 0) + canary_failed
    assert canary_answers >= n, (canary_answers, e)  # Prometheus can only lag the clients
    # the fault knob really drew 1 %: a binomial 4.5-sigma bound on what the clients saw
    share = canary_failed / canary_answers
    assert abs(share - FAULT_RATE) <= 4.5 * math.sqrt(FAULT_RATE * (1 - FAULT_RATE) / canary_answers), share
    assert traffic.model_failures("1.0.0") == [] and traffic.proxy_failures() == []
    after = traffic.window(t_end + 0.3, t_end + 10)
    assert after.total > 0 and set(after.by_version()) == {"1.0.0"}, after.by_version()
    assert {a.version for a in after.answers} == {"1.0.0"}


def test_the_same_traffic_with_a_good_canary_is_promoted(stack, packages, tmp_path):
    canary = stack.replace_canary(packages["good"], {})
    rec, traffic, t_begin, t_end, logs = compare_rollout(stack, tmp_path)
    log = "\n".join(logs)
    st = rec.state
    assert st["phase"] == "Promoted", log
    assert [h["weight"] for h in st["history"] if h["action"] == "set_weight"] == list(STEPS), log
    assert stack.router().get_weights() == (0, 100)

    e = _evidence(rec, "error_rate_vs_stable")
    assert e["verdict"] == "pass", log
    # over the whole rollout: both steps' windows on the canary, stable at 50 % before
    assert e["samples"] >= 2 * MIN_REQUESTS and e["baseline_samples"] >= MIN_REQUESTS, e
    assert e["effect"] == 0.0 and e["statistic"] == 0.0, e  # neither side failed a request
    # no error on either side: no information, no boundary yet (or, should a later rule give one, below it)
    assert e["boundary"] is None or e["statistic"] < e["boundary"], e

    live = traffic.window(t_begin, t_end)
    assert live.by_version().get(canary.version, 0) >= 2 * MIN_REQUESTS, live.by_version()
    assert traffic.failures() == [], traffic.failures()[:5]
    # promoted: the canary server now takes every request
    after = traffic.window(t_end + 0.3, t_end + 10)
    assert after.total > 0 and set(after.by_version()) == {canary.version}, after.by_version()
