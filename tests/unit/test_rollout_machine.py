"""The pure rollout state machine, driven to exhaustion with synthetic gate results."""

from __future__ import annotations

import random

import pytest

from serving.rollout import machine as m
from serving.rollout.gates import GateResult, Verdict
from serving.rollout.machine import Action, InvalidTransition, Phase, RolloutSpec


def g(verdict: Verdict, name: str = "success_rate") -> GateResult:
    value = None if verdict is Verdict.INCONCLUSIVE else (1.0 if verdict is Verdict.PASS else 0.5)
    return GateResult(name, verdict, value, 0.99, ">=", 100)


PASS, FAIL, INC = [g(Verdict.PASS)], [g(Verdict.FAIL)], [g(Verdict.INCONCLUSIVE)]
SPEC = RolloutSpec(steps=(10, 25, 50, 100), interval_s=30, threshold=2, max_inconclusive=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": ()}, "at least one"),
        ({"steps": (10, 10)}, "strictly increasing"),
        ({"steps": (50, 20)}, "strictly increasing"),
        ({"steps": (0, 50)}, "between 1 and 100"),
        ({"steps": (10, 101)}, "between 1 and 100"),
        ({"interval_s": 0}, "interval"),
        ({"threshold": 0}, "threshold"),
        ({"max_inconclusive": 0}, "max_inconclusive"),
        ({"interval_s": float("inf")}, "interval"),
        ({"interval_s": float("nan")}, "interval"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": True}, "threshold"),
        ({"steps": (10.5, 50)}, "whole-number"),
        ({"steps": "10,50"}, "whole-number"),
    ],
)
def test_spec_rejects_bad_values_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RolloutSpec(**kwargs)


def test_passing_analyses_walk_every_step_then_promote():
    st, d = m.start(SPEC, now=0)
    assert (d.action, d.weight, st.weight, st.next_analysis_at) == (Action.SET_WEIGHT, 10, 10, 30)
    weights = []
    for i in range(3):
        st, d = m.analyse(st, SPEC, PASS, now=30 * (i + 1))
        assert d.action is Action.SET_WEIGHT and d.reset_window
        weights.append(d.weight)
    assert weights == [25, 50, 100]
    st, d = m.analyse(st, SPEC, PASS, now=120)
    assert (st.phase, d.action, st.weight, st.analyses) == (Phase.PROMOTED, Action.PROMOTE, 100, 4)
    assert [h["event"] for h in st.history] == ["start"] + ["analysis"] * 4


def test_last_step_below_100_promotes_from_there():
    spec = RolloutSpec(steps=(20, 50), interval_s=1)
    st, _ = m.start(spec, 0)
    st, _ = m.analyse(st, spec, PASS, 1)
    st, d = m.analyse(st, spec, PASS, 2)
    assert st.phase is Phase.PROMOTED and d.action is Action.PROMOTE


def test_failed_checks_reaching_threshold_roll_back_with_evidence():
    st, _ = m.start(SPEC, 0)
    st, d = m.analyse(st, SPEC, FAIL, 30)
    assert (d.action, st.phase, st.weight, st.failed_checks) == (Action.HOLD, Phase.PROGRESSING, 10, 1)
    st, d = m.analyse(st, SPEC, [g(Verdict.PASS, "latency_p99"), g(Verdict.FAIL, "drift_js")], 60)
    assert (d.action, st.phase, st.weight, d.weight) == (Action.ROLLBACK, Phase.ROLLED_BACK, 0, 0)
    assert "drift_js" in d.reason and "latency_p99" not in d.reason
    assert [e.gate for e in d.evidence] == ["latency_p99", "drift_js"]


def test_failed_checks_count_over_the_whole_rollout_not_per_step():
    st, _ = m.start(SPEC, 0)
    st, _ = m.analyse(st, SPEC, FAIL, 30)
    st, d = m.analyse(st, SPEC, PASS, 60)
    assert d.weight == 25 and st.failed_checks == 1
    st, d = m.analyse(st, SPEC, FAIL, 90)
    assert st.phase is Phase.ROLLED_BACK


def test_inconclusive_holds_then_pauses_and_never_advances():
    st, _ = m.start(SPEC, 0)
    for i in range(2):
        st, d = m.analyse(st, SPEC, INC, 30 * (i + 1))
        assert (d.action, st.step_index, st.weight, st.phase) == (Action.HOLD, 0, 10, Phase.PROGRESSING)
        assert not d.reset_window  # the window keeps growing until it holds enough samples
    st, d = m.analyse(st, SPEC, INC, 90)
    assert (d.action, st.phase, st.weight) == (Action.PAUSE, Phase.PAUSED, 10)
    with pytest.raises(InvalidTransition):
        m.analyse(st, SPEC, PASS, 100)
    st, d = m.resume(st, SPEC, 200)
    assert (st.phase, st.inconclusive_checks, st.next_analysis_at, d.weight) == (
        Phase.PROGRESSING,
        0,
        230,
        10,
    )


def test_a_fail_beats_inconclusive_and_no_gates_is_inconclusive():
    st, _ = m.start(SPEC, 0)
    _, d = m.analyse(st, SPEC, [g(Verdict.INCONCLUSIVE), g(Verdict.FAIL, "x")], 30)
    assert d.verdict is Verdict.FAIL
    _, d = m.analyse(st, SPEC, [], 30)
    assert d.verdict is Verdict.INCONCLUSIVE


def test_operator_commands_and_terminal_phases():
    st, _ = m.start(SPEC, 0)
    st, d = m.pause(st, 1)
    assert st.phase is Phase.PAUSED and d.action is Action.PAUSE
    with pytest.raises(InvalidTransition, match="already Paused"):
        m.pause(st, 2)
    st, d = m.promote(st, 3)
    assert (st.phase, st.weight, d.action) == (Phase.PROMOTED, 100, Action.PROMOTE)
    for cmd in (lambda s: m.pause(s, 4), lambda s: m.resume(s, SPEC, 4), lambda s: m.abort(s, 4),
                lambda s: m.promote(s, 4), lambda s: m.analyse(s, SPEC, PASS, 4)):  # fmt: skip
        with pytest.raises(InvalidTransition):
            cmd(st)
    st2, _ = m.start(SPEC, 0)
    with pytest.raises(InvalidTransition, match="not Paused"):
        m.resume(st2, SPEC, 1)
    st2, d = m.abort(st2, 1)
    assert (st2.phase, st2.weight, d.action) == (Phase.ABORTED, 0, Action.ROLLBACK)


def test_state_round_trips_through_json_dicts():
    import json

    st, _ = m.start(SPEC, 0)
    st, _ = m.analyse(st, SPEC, FAIL, 30)
    again = m.RolloutState.from_dict(json.loads(json.dumps(st.to_dict())))
    assert again == st
    assert RolloutSpec.from_dict(json.loads(json.dumps(SPEC.to_dict()))) == SPEC


def test_random_event_sequences_keep_the_invariants():
    """A property test without extra dependencies: 3000 random runs of analyses and commands."""
    rng = random.Random(7)
    verdicts = [PASS, FAIL, INC, [g(Verdict.PASS), g(Verdict.INCONCLUSIVE, "drift_js")]]
    for _ in range(3000):
        steps = tuple(sorted(rng.sample(range(1, 101), rng.randint(1, 5))))
        spec = RolloutSpec(
            steps=steps, interval_s=1, threshold=rng.randint(1, 3), max_inconclusive=rng.randint(1, 3)
        )
        st, _ = m.start(spec, 0)
        for t in range(1, 40):
            prev = st
            event = rng.random()
            try:
                if event < 0.8:
                    res = rng.choice(verdicts)
                    st, d = m.analyse(st, spec, res, t)
                    verdict = d.verdict
                    if st.phase is Phase.PROMOTED:  # promotion only from a PASS at the last step
                        assert verdict is Verdict.PASS and prev.step_index == len(steps) - 1
                    if verdict is not Verdict.PASS:  # fail/inconclusive never advance
                        assert st.step_index == prev.step_index
                    if st.phase is Phase.ROLLED_BACK:
                        assert st.failed_checks >= spec.threshold and st.weight == 0
                    else:
                        assert st.failed_checks < spec.threshold
                elif event < 0.87:
                    st, _ = m.pause(st, t)
                elif event < 0.95:
                    st, _ = m.resume(st, spec, t)
                elif event < 0.98:
                    st, _ = m.abort(st, t)
                else:
                    st, _ = m.promote(st, t)
            except InvalidTransition:
                assert st == prev  # a refused command changes nothing
                assert prev.phase.terminal or prev.phase is not Phase.PROGRESSING or event >= 0.87
                continue
            assert st.step_index >= prev.step_index
            assert st.weight in (0, 100, *steps)
            assert st.weight == (steps[st.step_index] if not st.phase.terminal else st.weight)
            if prev.phase.terminal:
                pytest.fail("a terminal rollout accepted an event")
