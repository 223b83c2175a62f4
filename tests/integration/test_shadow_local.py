"""The shadow step on the real local stack: two KServe runtimes, HAProxy with its Lua mirror, Prometheus.

The canary answers a mirrored copy of every inference request at weight 0; nobody sees those answers.
Every answer the traffic got is counted by its ``x-model-version`` header: a canary caught in the shadow
step has answered no user, while its own metrics (read from Prometheus) show the copies it answered.
"""

from __future__ import annotations

import os
import time

import pytest

from serving.demo.badmodel import build_swapped_package, with_version
from serving.demo.localstack import LocalStack, TrafficGenerator
from serving.rollout.gates import AgreementGate
from tests.integration.test_rollout_local import run_rollout
from tests.modelfactory import breast_cancer, build_package

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (os.path.exists("/usr/sbin/haproxy") and os.path.exists("/usr/bin/prometheus")),
        reason="needs the Debian haproxy and prometheus packages (make sysdeps)",
    ),
]

X, Y, _, _ = breast_cancer()
INTERVAL = 3.0  # Prometheus scrapes every 1 s: a window may start up to 1 s before the mirror does


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("shadow-models")
    v1, _ = build_package(root / "v1", "breast-cancer", "1.0.0", "logistic_regression", 0)
    v2, _ = build_package(root / "v2", "breast-cancer", "2.0.0", "random_forest", 0)
    return {"v1": v1, "swapped": build_swapped_package(v2, root / "swapped", "2.3.0"), "good": v2}


@pytest.fixture(scope="module")
def stack(packages, tmp_path_factory):
    s = LocalStack(packages["v1"], packages["swapped"], tmp_path_factory.mktemp("stack"), log=lambda m: None)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def shadow_rollout(stack, tmp_path):
    """test_rollout_local's rollout (the same traffic and gates) with a shadow step before 50 %, 100 %,
    and the shadow step's label agreement gate (at least 90 % of the mirrored rows)."""
    return run_rollout(
        stack,
        tmp_path,
        (50, 100),
        min_predictions=200,
        interval=INTERVAL,
        shadow=True,
        extra_gates=[AgreementGate(0.9, 200)],
    )


def _evidence(history_entry) -> dict:
    return {e["gate"]: e for e in history_entry["evidence"]}


def _canary_requests(stack) -> float:
    return stack.provider().snapshot(stack.canary_target).total_requests


def test_the_swapped_canary_is_caught_in_the_shadow_step_having_answered_no_user(stack, tmp_path):
    canary = stack.canary.version
    before = _canary_requests(stack)
    rec, traffic, _, logs = shadow_rollout(stack, tmp_path)
    st = rec.state
    assert st["phase"] == "RolledBack", "\n".join(logs)
    assert "in the shadow step" in st["reason"] and "drift_js" in st["reason"], st["reason"]
    assert all(h["weight"] == 0 for h in st["history"]), "the canary was given a live weight"
    # paired per request, the swapped canary agrees with stable on almost no row
    agreement = _evidence(st["history"][-1])["label_agreement"]
    assert agreement["verdict"] == "fail" and agreement["value"] < 0.2 and agreement["samples"] >= 200, (
        agreement
    )
    # every answer the traffic got: none from the canary, all from stable, none failed
    versions = traffic.by_version()
    assert traffic.total > 200 and versions[canary] == 0 and versions["1.0.0"] == traffic.total, versions
    assert traffic.failures() == [], traffic.failures()[:5]
    # ... while the canary answered the mirrored copies (its own counters, through Prometheus)
    time.sleep(1.5)  # one more scrape
    mirrored = _canary_requests(stack) - before
    counts = stack.mirror_counts()
    assert mirrored >= 100 and counts["ok"] >= mirrored, (mirrored, counts)
    assert mirrored <= traffic.total, "the canary answered more than the users sent"
    assert stack.router().get_weights() == (100, 0) and stack.router().get_mirror() is False


def test_a_good_canary_passes_the_shadow_step_and_is_promoted(stack, packages, tmp_path):
    good = stack.replace_canary(with_version(packages["good"], tmp_path / "good", "2.7.0"), {})
    rec, traffic, _, logs = shadow_rollout(stack, tmp_path)
    st = rec.state
    assert st["phase"] == "Promoted", "\n".join(logs)
    moves = [h for h in st["history"] if h["action"] in ("set_weight", "promote")]
    assert [h["weight"] for h in moves] == [0, 50, 100, 100], "\n".join(logs)
    assert "passed in the shadow step" in moves[1]["reason"]
    agreement = _evidence(moves[1])["label_agreement"]
    assert agreement["verdict"] == "pass" and agreement["value"] >= 0.9, agreement
    # ... and the live steps do without it: no request is mirrored there
    assert all("label_agreement" not in _evidence(h) for h in moves[2:]), moves[2:]
    # no user saw the canary before the shadow step passed; afterwards it answered its share
    t_pass = moves[1]["t"]
    shadow = traffic.window(0, t_pass)
    assert shadow.total > 50 and shadow.by_version()[good.version] == 0, shadow.by_version()
    assert traffic.window(t_pass + 0.5, time.time()).by_version()[good.version] > 0
    assert traffic.failures() == [], traffic.failures()[:5]
    assert stack.router().get_weights() == (0, 100) and stack.router().get_mirror() is False


def test_a_slow_canary_in_the_mirror_neither_delays_nor_fails_a_user(stack, packages, tmp_path):
    """The mirror's bound: a canary that takes 3 s per answer fills the 64 copies in flight, the rest are
    dropped and counted, and the users' answers (all from stable) neither wait for it nor fail."""
    stack.replace_canary(
        with_version(packages["good"], tmp_path / "slow", "2.8.0"), {"MLROLLOUT_FAULT_LATENCY_MS": "3000"}
    )
    router = stack.router()
    before = stack.mirror_counts()
    router.set_mirror(True)
    try:
        tg = TrafficGenerator(
            stack.proxy_url, stack.model, X, Y, rps=60, concurrency=8, batch=16, max_seconds=5
        )
        with tg:
            time.sleep(5)
        traffic = tg.result()
    finally:
        router.set_mirror(False)
    after = stack.mirror_counts()
    dropped = after["dropped"] - before.get("dropped", 0)
    assert traffic.total > 100 and traffic.failures() == [], traffic.failures()[:5]
    assert set(traffic.by_version()) == {"1.0.0"}
    assert dropped > 0, (before, after)  # more copies than 64 in flight at 3 s each: dropped, not queued
    # had a user waited for the canary, each answer would take >= 3 s; allow a loaded machine's stragglers
    slow = [a for a in traffic.answers if a.latency_s >= 3.0]
    assert len(slow) <= traffic.total // 100, f"{len(slow)} of {traffic.total} answers took >= 3 s"
