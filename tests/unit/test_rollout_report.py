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


# ------------------------------------------------------------- the comparisons' evidence in the PNG


def _compare_rollout(tmp_path, world, steps=(10, 25, 50, 100)):
    from serving.rollout import gates
    from serving.rollout.store import FileStateStore

    store = FileStateStore(tmp_path / "state.json")
    rec = ctl.new_record(
        RolloutSpec(steps, 10.0, 2, 3), gates.defaults(compare=True), STABLE, CANARY, DEAD_ROUTER, SCRAPE
    )
    ctl.begin(store, rec)
    c = ctl.Controller(store, router=world, provider=world, clock=world.clock, sleep=world.sleep)
    return c.run(max_seconds=600)


def _panel(fig, gate: str):
    (ax,) = [ax for ax in fig.axes if ax.get_title(loc="left").startswith(f"{gate}:")]
    return ax


def test_a_comparison_panel_plots_statistic_against_boundary_with_effect_and_n(tmp_path):
    import matplotlib.pyplot as plt

    from serving.rollout.report import comparison_evidence, effect_label, timeline_figure

    # 1 % errors against none: passes twice (too little evidence), then the boundary is crossed
    rec = _compare_rollout(tmp_path, World(error_rate=0.01, rps=100))
    assert rec.state["phase"] == "RolledBack"
    ev = [
        e for h in rec.state["history"] for e in h.get("evidence", []) if e["gate"] == "error_rate_vs_stable"
    ]
    assert len(ev) == rec.state["analyses"] >= 2 and ev[-1]["verdict"] == "fail"
    t0 = rec.state["history"][0]["t"]
    fig = timeline_figure(rec)
    try:
        ax = _panel(fig, "error_rate_vs_stable")
        (path,) = [ln for ln in ax.get_lines() if ln.get_color() == "0.7"]  # the grey line through them
        (fails,) = [ln for ln in ax.get_lines() if ln.get_marker() == "X"]
        (bound,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        # the statistic of every analysis, the failing one drawn with the fail marker
        assert list(path.get_ydata()) == [e["statistic"] for e in ev]
        assert list(fails.get_ydata()) == [ev[-1]["statistic"]]
        # the boundary at every analysis that has one (the error gate's count test: none while even all
        # of the errors so far on the canary could not fail it), the failing one included
        bounded = [
            (h["t"] - t0, e) for h, e in zip(rec.state["history"][1:], ev, strict=True) if e["boundary"]
        ]
        assert bounded and bounded[-1][1] is ev[-1] and ev[-1]["statistic"] > ev[-1]["boundary"]
        assert list(bound.get_ydata()) == [e["boundary"] for _, e in bounded]
        assert list(bound.get_xdata()) == [t for t, _ in bounded]
        # each point labelled with its effect and n canary vs stable; the FAIL with statistic >= boundary
        texts = [t.get_text() for t in ax.texts]
        assert [effect_label(e) for e in comparison_evidence(rec, "error_rate_vs_stable")] == texts[1:]
        last = texts[-1].splitlines()
        assert last[0] == f"effect {ev[-1]['effect']:+.4f}" and abs(ev[-1]["effect"] - 0.01) < 0.002
        assert last[1] == f"n {ev[-1]['samples']} vs {ev[-1]['baseline_samples']}"
        assert last[2] == f"{ev[-1]['statistic']:.3f} >= {ev[-1]['boundary']:.3f}"
        assert texts[0] == f"boundary {ev[-1]['boundary']:.4g}"
        assert ax.get_ylabel() == "canary errors" and "alpha 0.00333" in ax.get_title(loc="left")
        # a comparison without information (no slower request on either side) has no boundary to draw,
        # and no "threshold 0" line pretends it has
        lat = _panel(fig, "latency_vs_stable")
        assert not [ln for ln in lat.get_lines() if ln.get_linestyle() == "--"]
        assert not [t for t in lat.texts if "threshold" in t.get_text() or "boundary" in t.get_text()]
    finally:
        plt.close(fig)


def test_a_long_rollout_labels_the_first_failing_and_last_points_only(tmp_path):
    import matplotlib.pyplot as plt

    from serving.rollout.report import _MAX_EFFECT_LABELS, timeline_figure

    rec = _compare_rollout(tmp_path, World(), steps=tuple(range(5, 101, 5)))
    assert rec.state["phase"] == "Promoted" and rec.state["analyses"] == 20 > _MAX_EFFECT_LABELS
    fig = timeline_figure(rec)
    try:
        ax = _panel(fig, "drift_chi2")
        labels = [t for t in ax.texts if t.get_text().startswith("effect")]
        xs = [t.xy[0] for t in labels]
        t0 = rec.state["history"][0]["t"]
        assert xs == [rec.timeline[0]["t"] - t0, rec.timeline[-1]["t"] - t0]
        assert all(t.get_text().startswith("effect +0.0000\nn ") for t in labels)  # the same model
    finally:
        plt.close(fig)
