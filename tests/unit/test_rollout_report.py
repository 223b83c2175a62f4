"""The rollout report: the verdict strip's story, one PNG panel per gate, decision lines said once."""

from __future__ import annotations

from serving.rollout import controller as ctl
from serving.rollout.gates import AccuracyGate
from serving.rollout.machine import RolloutSpec, decision_line
from serving.rollout.report import (
    analyses,
    client_shares,
    describe_failures,
    panel_names,
    short_reason,
    text_report,
)
from tests.unit.test_rollout_controller import CANARY, DEAD_ROUTER, GATES, GOOD, SCRAPE, STABLE, World, make


def test_every_analysis_is_in_the_strip_with_its_verdict_and_reason(tmp_path):
    rec = make(tmp_path, World(error_rate=0.2))[1].run(max_seconds=30)
    items = analyses(rec)
    assert len(items) == len(rec.timeline) == 2
    assert [a["reason"] for a in items] == ["fail: success_rate", "fail: success_rate"]
    assert describe_failures(rec) == "success_rate at 10.0 s"


def test_gates_failing_in_the_same_analysis_are_named_together(tmp_path):
    rec = make(tmp_path, World(error_rate=0.2, scores=tuple(reversed(GOOD))))[1].run(max_seconds=30)
    assert describe_failures(rec) == "drift_js and success_rate at 10.0 s"


def test_inconclusive_analyses_say_which_gates_and_why(tmp_path):
    store, c, _ = make(tmp_path, World(rps=0.0), max_inconclusive=2)
    c.run(stop=lambda: store.load().state["phase"] == "Paused", max_seconds=30)
    (first, *_) = analyses(store.load())
    assert first["verdict"] == "inconclusive"
    assert first["reason"].startswith("inconclusive: 3 gates (fewer th")
    assert len(first["reason"]) <= 34 and all(g[0] is None for g in first["gates"].values())
    assert describe_failures(store.load()) == "no gate failed"


def test_short_reason_names_the_failing_gates_only():
    a = {"verdict": "fail", "gates": {"x": (1.0, "pass", "", 1), "acc": (0.1, "fail", "", 0.9)}}
    assert short_reason(a) == "fail: acc"
    assert short_reason({"verdict": "pass", "gates": {}}) == "pass"


def test_a_panel_per_gate_that_ran_accuracy_included():
    rec = ctl.new_record(
        RolloutSpec((10, 100), 10.0, 2, 3),
        [*GATES, AccuracyGate()],
        STABLE,
        CANARY,
        DEAD_ROUTER,
        SCRAPE,
    )
    assert panel_names(rec) == [
        "analyses",
        "canary weight",
        "success_rate",
        "latency_p99",
        "drift_js",
        "accuracy",
    ]


def test_decision_lines_say_their_verb_once(tmp_path):
    rec = make(tmp_path, World(error_rate=0.2))[1].run(max_seconds=30)
    text = text_report(rec)
    assert "rollback: failed check 2/2" in text
    assert not any(f"{v}: {v}:" in text for v in ("hold", "rollback", "promote"))
    assert decision_line("pause", "paused by operator") == "pause: paused by operator"
    assert decision_line("hold", "hold: inconclusive 1/3") == "hold: inconclusive 1/3"


def test_client_share_counts_every_model_answer_errors_included(tmp_path):
    from types import SimpleNamespace

    rec = make(tmp_path, World())[1].run(max_seconds=30)
    start, nxt = rec.state["history"][0]["t"], rec.state["history"][1]["t"]
    t = (start + nxt) / 2
    answers = [SimpleNamespace(t=t, status=500, version=CANARY.version)]  # the canary answered, with an error
    answers += [SimpleNamespace(t=t, status=200, version=STABLE.version)] * 9
    answers += [
        SimpleNamespace(t=t, status=503, version="")
    ] * 5  # the proxy's own failures: no model reached
    first, *_ = client_shares(rec, SimpleNamespace(answers=answers, total=len(answers)))
    assert first[1:] == (10, 10.0, 10, "set_weight")
