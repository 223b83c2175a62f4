"""The rollout state machine: pure, no I/O, no clock (the caller passes ``now``).

Flagger's scheduler split, made explicit: this module only decides. It takes the current
:class:`RolloutState`, the :class:`RolloutSpec` and either an analysis (a list of gate results) or
an operator command, and returns the next state plus a :class:`Decision` that says what the
caller must do to the outside world (set a weight, promote, roll back) and why (the evidence).

Rules (see serving/rollout/README.md for the reasoning):

* steps are canary weights in percent, strictly increasing, each in 1..100; after the analysis
  of the last step passes, the canary is promoted (a last step below 100 promotes from there,
  like Flagger's ``maxWeight``).
* an analysis FAILS when any gate fails; ``failed_checks`` counts failed analyses over the whole
  rollout (a flapping canary does not reset its count by passing once) and reaching
  ``threshold`` rolls back. A FAIL of a *sequential* comparison (``GateResult.sequential``) rolls
  back at once: its false-rollback rate is already held at its ``alpha`` over every look, and
  waiting for a second failed check would only let a bad canary answer one more interval.
* an analysis is INCONCLUSIVE when no gate fails but at least one lacks samples: the weight is
  held and the analysis window keeps growing; ``max_inconclusive`` consecutive inconclusive
  analyses pause the rollout for an operator. Inconclusive is never a pass: it never advances
  a step and never promotes.
* pause/resume/promote/abort are operator commands; terminal phases accept none of them.
* the watch after promotion (``RolloutSpec.post_promotion_intervals`` > 0, Argo Rollouts'
  post-promotion analysis): a pass at the last step promotes into ``Verifying``, a live phase in which
  :func:`verify` folds one analysis per interval of the new stable against the previous version's
  recorded baseline. ``post_promotion_intervals`` passes end it ``Promoted``; a failure, or
  ``max_inconclusive`` inconclusive intervals in a row (an unverified version is not a verified one),
  restore the previous model (``Action.RESTORE``) and end it ``RolledBack``.
* an optional *shadow step* (``RolloutSpec.shadow``) comes before the first weight: the canary weight
  is 0 and the router mirrors every request to the canary, whose answers nobody sees
  (``RolloutState.shadow``). Its analyses fold like any step's, but only a PASS leaves it, for the first
  live weight; a FAIL at the threshold rolls back having never answered a user.
* webhooks decide nothing here, they only say no: a pre-rollout "no" ends the rollout before any
  traffic moves (:func:`refuse`); a confirm-promotion "no" turns the pass at the last step into a
  hold (``analyse(..., awaiting=...)``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from serving.contract.errors import MlrolloutError
from serving.rollout.gates import GateResult, Verdict, overall_verdict

HISTORY_LIMIT = 500
MAX_WATCH_INTERVALS = 1000
AWAITING = "waiting for promotion confirmation"


class Phase(StrEnum):
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    VERIFYING = "Verifying"  # promoted, and the watch after promotion still runs (not terminal)
    PROMOTED = "Promoted"
    ROLLED_BACK = "RolledBack"
    ABORTED = "Aborted"

    @property
    def terminal(self) -> bool:
        return self in (Phase.PROMOTED, Phase.ROLLED_BACK, Phase.ABORTED)


class Action(StrEnum):
    SET_WEIGHT = "set_weight"  # route `weight` percent to the canary
    HOLD = "hold"  # keep the weight, keep analysing (window keeps growing)
    PAUSE = "pause"  # keep the weight, stop analysing until resumed
    PROMOTE = "promote"  # canary takes all traffic and becomes the stable version
    ROLLBACK = "rollback"  # all traffic back to stable
    RESTORE = "restore"  # after a promotion: the previous model back on stable, all traffic to it
    NONE = "none"  # nothing to do (e.g. resume that only restarts analysis)


class InvalidTransition(MlrolloutError, ValueError):
    """An operator command or analysis that does not apply to the rollout's current phase."""


def parse_steps(text: str) -> tuple[int, ...]:
    """``"10,25,50,100"`` -> ``(10, 25, 50, 100)`` (ValueError for a part that is not a whole number;
    :class:`RolloutSpec` checks the weights themselves)."""
    return tuple(int(s) for s in str(text).split(",") if s.strip())


@dataclass(frozen=True)
class RolloutSpec:
    steps: tuple[int, ...] = (10, 25, 50, 100)
    interval_s: float = 30.0
    threshold: int = 2
    max_inconclusive: int = 5
    # intervals the new stable is watched after promotion (0: none, promotion ends the rollout)
    post_promotion_intervals: int = 0
    shadow: bool = False  # a shadow step (mirrored traffic at weight 0) before steps[0]

    def __post_init__(self) -> None:
        if not isinstance(self.shadow, bool):
            raise ValueError(f"shadow must be true or false, got {self.shadow!r}")
        if isinstance(self.steps, str | bytes) or any(
            isinstance(s, bool) or not isinstance(s, int) for s in self.steps
        ):
            raise ValueError(f"steps must be whole-number canary weights, got {self.steps!r}")
        steps = tuple(self.steps)
        object.__setattr__(self, "steps", steps)
        if not steps:
            raise ValueError("steps must name at least one canary weight, e.g. 10,25,50,100")
        if any(s < 1 or s > 100 for s in steps):
            raise ValueError(f"steps must be canary weights between 1 and 100 percent, got {list(steps)}")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"steps must be strictly increasing, got {list(steps)}")
        if (
            isinstance(self.interval_s, bool)
            or not isinstance(self.interval_s, int | float)
            or not (self.interval_s > 0 and math.isfinite(self.interval_s))
        ):
            raise ValueError(f"interval must be a positive number of seconds, got {self.interval_s!r}")
        for name, what in (("threshold", "failed checks before rollback"), ("max_inconclusive", "")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(
                    f"{name}{f' ({what})' if what else ''} must be a whole number >= 1, got {v!r}"
                )
        v = self.post_promotion_intervals
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_WATCH_INTERVALS:
            raise ValueError(
                f"post_promotion_intervals (the watch after promotion) must be a whole number from 0 to "
                f"{MAX_WATCH_INTERVALS}, got {v!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = {**dataclasses.asdict(self), "steps": list(self.steps)}
        if not self.post_promotion_intervals:
            del d["post_promotion_intervals"]  # off: the record stays as it was before the watch existed
        if not self.shadow:
            del d["shadow"]  # a rollout without a shadow step is written as before there was one
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutSpec:
        return cls(
            steps=tuple(d["steps"]),
            interval_s=float(d["interval_s"]),
            threshold=int(d["threshold"]),
            max_inconclusive=int(d["max_inconclusive"]),
            post_promotion_intervals=d.get("post_promotion_intervals", 0),
            shadow=d.get("shadow", False),  # records written before the shadow step have none
        )


@dataclass(frozen=True)
class Decision:
    action: Action
    weight: int  # canary weight after the action
    reason: str
    verdict: Verdict | None = None  # of the analysis, when the decision came from one
    evidence: tuple[GateResult, ...] = ()
    reset_window: bool = False  # the caller starts a new analysis window (new step)

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "weight": self.weight,
            "reason": self.reason,
            "verdict": self.verdict.value if self.verdict else None,
            "evidence": [g.to_dict() for g in self.evidence],
        }


_VERB = re.compile(r"^[a-z_]+: ")


def decision_line(action: str, reason: str) -> str:
    """``action: reason`` said once: the machine's reasons already open with their verb ("hold: ...",
    "advance: ..."), so those are shown as they are; an operator's free text gets the action in front."""
    return reason if _VERB.match(reason) else f"{action}: {reason}"


@dataclass(frozen=True)
class RolloutState:
    phase: Phase = Phase.PROGRESSING
    step_index: int = 0
    weight: int = 0
    failed_checks: int = 0
    inconclusive_checks: int = 0  # consecutive, in the current step
    analyses: int = 0  # analyses run in the whole rollout
    watch_passes: int = 0  # passed intervals of the watch after promotion
    step_started_at: float = 0.0
    next_analysis_at: float = 0.0
    reason: str = ""
    history: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    shadow: bool = False  # in the shadow step: weight 0, the router mirrors to the canary

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["phase"] = self.phase.value
        d["history"] = list(self.history)
        if not self.watch_passes:
            del d["watch_passes"]  # a state outside a watch keeps the shape it had before
        if not self.shadow:
            del d["shadow"]  # as for RolloutSpec: records outside a shadow step are written as before
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RolloutState:
        d = dict(d)
        d["phase"] = Phase(d["phase"])
        d["history"] = tuple(d.get("history", ()))
        return cls(**d)


def _record(state: RolloutState, now: float, event: str, decision: Decision) -> tuple[dict[str, Any], ...]:
    entry = {
        "t": now,
        "event": event,
        "step_index": state.step_index,
        "phase": state.phase.value,
        **decision.to_dict(),
    }
    return (*state.history, entry)[-HISTORY_LIMIT:]


def _apply(state: RolloutState, now: float, event: str, decision: Decision, **changes: Any) -> tuple:
    new = dataclasses.replace(state, **changes)
    new = dataclasses.replace(new, history=_record(new, now, event, decision))
    return new, decision


def start(spec: RolloutSpec, now: float) -> tuple[RolloutState, Decision]:
    """A new rollout at its first step, or in its shadow step (weight 0, mirrored) when it has one."""
    if spec.shadow:
        why = "start: shadow step: canary weight 0%, the canary gets a mirrored copy of every request"
        decision = Decision(Action.SET_WEIGHT, 0, why, reset_window=True)
        state = RolloutState(
            weight=0, shadow=True, step_started_at=now, next_analysis_at=now + spec.interval_s, reason=why
        )
        return _apply(state, now, "start", decision)
    w = spec.steps[0]
    decision = Decision(Action.SET_WEIGHT, w, f"start: canary weight {w}%", reset_window=True)
    state = RolloutState(
        weight=w, step_started_at=now, next_analysis_at=now + spec.interval_s, reason=decision.reason
    )
    return _apply(state, now, "start", decision)


def _failing(results: tuple[GateResult, ...], verdict: Verdict) -> str:
    return ", ".join(g.summary() for g in results if g.verdict is verdict)


def analyse(
    state: RolloutState,
    spec: RolloutSpec,
    results: list[GateResult] | tuple[GateResult, ...],
    now: float,
    awaiting: str | None = None,
) -> tuple[RolloutState, Decision]:
    """Fold one analysis (the gate results of one interval) into the state.

    verdict       counter reaches its limit           else
    FAIL          failed_checks = threshold: rollback  hold (the window keeps growing)
    INCONCLUSIVE  inconclusive = max: pause            hold
    PASS          at the last step: promote            advance to the next step (a new window)

    ``awaiting``: why promotion may not happen yet (a confirm-promotion webhook that has not said yes),
    or None. A PASS at the last step then holds instead of promoting, and counts toward nothing, so
    the canary stays under analysis (a failure still rolls back) until the approval comes, as in
    Flagger. :func:`awaiting_promotion` tells such a hold apart.
    """
    if state.phase is not Phase.PROGRESSING:
        raise InvalidTransition(f"cannot analyse a rollout that is {state.phase.value}")
    results = tuple(results)
    verdict = overall_verdict(results)
    nxt = now + spec.interval_s
    where = "in the shadow step: " if state.shadow else ""
    last = state.step_index == len(spec.steps) - 1 and not state.shadow

    def fold(action: Action, weight: int, reason: str, /, **changes: Any) -> tuple[RolloutState, Decision]:
        d = Decision(action, weight, reason, verdict, results, reset_window=action is Action.SET_WEIGHT)
        return _apply(state, now, "analysis", d, analyses=state.analyses + 1, reason=reason, **changes)

    if verdict is Verdict.FAIL:
        n, bad = state.failed_checks + 1, _failing(results, Verdict.FAIL)
        # a sequential comparison's FAIL already holds its error rate: no second check needed
        decisive = any(g.sequential for g in results if g.verdict is Verdict.FAIL)
        if decisive or n >= spec.threshold:
            why = (
                f"rollback: {where}a sequential comparison failed at its stated error rate: {bad}"
                if decisive
                else f"rollback: {where}failed check {n}/{spec.threshold}: {bad}"
            )
            return fold(
                Action.ROLLBACK,
                0,
                why,
                phase=Phase.ROLLED_BACK,
                weight=0,
                failed_checks=n,
                inconclusive_checks=0,
                shadow=False,
            )
        why = f"hold: {where}failed check {n}/{spec.threshold}: {bad}"
        return fold(
            Action.HOLD, state.weight, why, failed_checks=n, inconclusive_checks=0, next_analysis_at=nxt
        )
    if verdict is Verdict.INCONCLUSIVE:
        n, why = state.inconclusive_checks + 1, _failing(results, Verdict.INCONCLUSIVE)
        if n >= spec.max_inconclusive:
            msg = (
                f"pause: {n} inconclusive analyses in a row ({why}); send traffic or lower min samples, "
                "then resume (or abort)"
            )
            return fold(Action.PAUSE, state.weight, msg, phase=Phase.PAUSED, inconclusive_checks=n)
        msg = f"hold: {where}inconclusive {n}/{spec.max_inconclusive} ({why}); keep collecting"
        return fold(Action.HOLD, state.weight, msg, inconclusive_checks=n, next_analysis_at=nxt)
    if state.shadow:  # the only way out of the shadow step but a rollback: its pass
        w = spec.steps[0]
        why = f"advance: all gates passed in the shadow step (mirrored traffic); canary weight -> {w}%"
        return fold(
            Action.SET_WEIGHT,
            w,
            why,
            shadow=False,
            weight=w,
            inconclusive_checks=0,
            step_started_at=now,
            next_analysis_at=nxt,
        )
    if last and awaiting is not None:
        why = f"hold: all gates passed at the last step ({state.weight}%); {AWAITING}: {awaiting}"
        return fold(Action.HOLD, state.weight, why, inconclusive_checks=0, next_analysis_at=nxt)
    if last and spec.post_promotion_intervals:
        n = spec.post_promotion_intervals
        why = (
            f"promote: all gates passed at the last step ({state.weight}%); watching the new stable for "
            f"{n} interval{'s' if n > 1 else ''} against the previous version's baseline"
        )
        return fold(
            Action.PROMOTE,
            100,
            why,
            phase=Phase.VERIFYING,
            weight=100,
            inconclusive_checks=0,
            watch_passes=0,
            step_started_at=now,
            next_analysis_at=nxt,
        )
    if last:
        why = f"promote: all gates passed at the last step ({state.weight}%)"
        return fold(Action.PROMOTE, 100, why, phase=Phase.PROMOTED, weight=100, inconclusive_checks=0)
    i = state.step_index + 1
    w = spec.steps[i]
    why = f"advance: all gates passed at {state.weight}%; canary weight -> {w}%"
    return fold(
        Action.SET_WEIGHT,
        w,
        why,
        step_index=i,
        weight=w,
        inconclusive_checks=0,
        step_started_at=now,
        next_analysis_at=nxt,
    )


def verify(
    state: RolloutState,
    spec: RolloutSpec,
    results: list[GateResult] | tuple[GateResult, ...],
    now: float,
) -> tuple[RolloutState, Decision]:
    """Fold one interval of the watch after promotion: the new stable judged against the previous
    version's baseline (the caller passes that baseline as the gates' "stable").

    verdict       counter reaches its limit                          else
    FAIL          (at once) restore the previous model: RolledBack  -
    INCONCLUSIVE  max_inconclusive in a row: restore, RolledBack     hold
    PASS          post_promotion_intervals passes: Promoted          hold

    A failure restores at once, without ``threshold``: the new version already serves all traffic and
    its reference is fixed (the previous version's recorded baseline), so a second failed interval
    would only serve users one more interval of a version known to be worse. Inconclusive intervals
    do not count as passes; too many in a row restore too, since promotion is only final once the new
    version was verified (there is no paused watch to resume).
    """
    if state.phase is not Phase.VERIFYING:
        raise InvalidTransition(f"cannot verify a rollout that is {state.phase.value}, not Verifying")
    results = tuple(results)
    verdict = overall_verdict(results)
    n = spec.post_promotion_intervals
    i = state.watch_passes + 1

    def fold(action: Action, weight: int, reason: str, /, **changes: Any) -> tuple[RolloutState, Decision]:
        d = Decision(action, weight, reason, verdict, results)
        return _apply(state, now, "watch", d, analyses=state.analyses + 1, reason=reason, **changes)

    restore = {"phase": Phase.ROLLED_BACK, "weight": 0}
    if verdict is Verdict.FAIL:
        bad = _failing(results, Verdict.FAIL)
        why = (
            f"rollback: after promotion, watch interval {i}/{n} failed against the previous version's "
            f"baseline: {bad}; the previous model is restored"
        )
        return fold(Action.RESTORE, 0, why, failed_checks=state.failed_checks + 1, **restore)
    if verdict is Verdict.INCONCLUSIVE:
        k, why = state.inconclusive_checks + 1, _failing(results, Verdict.INCONCLUSIVE)
        if k < spec.max_inconclusive:
            msg = f"hold: watch inconclusive {k}/{spec.max_inconclusive} ({why}); keep collecting"
            return fold(Action.HOLD, 100, msg, inconclusive_checks=k, next_analysis_at=now + spec.interval_s)
        msg = (
            f"rollback: after promotion, {k} inconclusive watch intervals in a row ({why}); the new version "
            "could not be verified against the previous version's baseline, so the previous model is restored"
        )
        return fold(Action.RESTORE, 0, msg, inconclusive_checks=k, **restore)
    if i >= n:
        why = f"promote: the watch after promotion passed {i}/{n} intervals against the previous version"
        return fold(Action.NONE, 100, why, phase=Phase.PROMOTED, watch_passes=i, inconclusive_checks=0)
    why = f"hold: watch after promotion passed {i}/{n} against the previous version's baseline"
    return fold(
        Action.HOLD,
        100,
        why,
        watch_passes=i,
        inconclusive_checks=0,
        next_analysis_at=now + spec.interval_s,
    )


def awaiting_promotion(state: RolloutState, spec: RolloutSpec) -> bool:
    """Whether the rollout waits for a promotion approval: Progressing at the last step, and its last
    analysis passed but held (only ``analyse(..., awaiting=...)`` holds a pass)."""
    if state.phase is not Phase.PROGRESSING or state.step_index != len(spec.steps) - 1 or state.shadow:
        return False
    last = next((h for h in reversed(state.history) if h.get("event") == "analysis"), None)
    return bool(last and last.get("action") == Action.HOLD and last.get("verdict") == Verdict.PASS)


def refuse(spec: RolloutSpec, now: float, reason: str) -> tuple[RolloutState, Decision]:
    """A rollout that never moves traffic: a pre-rollout check said no. It ends RolledBack at 0 %
    (its history says why), so the desired version is not retried, as after any rollback."""
    d = Decision(Action.ROLLBACK, 0, reason)
    state = RolloutState(
        phase=Phase.ROLLED_BACK, weight=0, step_started_at=now, next_analysis_at=now, reason=reason
    )
    return _apply(state, now, "pre-rollout", d)


def _require_live(state: RolloutState, command: str) -> None:
    if state.phase.terminal:
        raise InvalidTransition(
            f"cannot {command}: the rollout is already {state.phase.value} ({state.reason}); start a new one"
        )


def pause(
    state: RolloutState, now: float, reason: str = "paused by operator"
) -> tuple[RolloutState, Decision]:
    _require_live(state, "pause")
    if state.phase is Phase.VERIFYING:
        raise InvalidTransition(
            "cannot pause during the watch after promotion: promote ends it, abort restores the previous "
            "model"
        )
    if state.phase is Phase.PAUSED:
        raise InvalidTransition("cannot pause: the rollout is already Paused")
    d = Decision(Action.PAUSE, state.weight, reason)
    return _apply(state, now, "pause", d, phase=Phase.PAUSED, reason=reason)


def resume(state: RolloutState, spec: RolloutSpec, now: float) -> tuple[RolloutState, Decision]:
    """Back to Progressing at the same step; the analysis window restarts (fresh evidence)."""
    _require_live(state, "resume")
    if state.phase is not Phase.PAUSED:
        raise InvalidTransition(f"cannot resume: the rollout is {state.phase.value}, not Paused")
    d = Decision(Action.SET_WEIGHT, state.weight, f"resume at {state.weight}%", reset_window=True)
    return _apply(
        state,
        now,
        "resume",
        d,
        phase=Phase.PROGRESSING,
        inconclusive_checks=0,
        step_started_at=now,
        next_analysis_at=now + spec.interval_s,
        reason=d.reason,
    )


def promote(
    state: RolloutState, now: float, reason: str = "promoted by operator"
) -> tuple[RolloutState, Decision]:
    """Manual full promotion (Argo's ``promote --full``): skip the remaining steps, and the watch after
    promotion (an operator's promote is the verification). During the watch the new version already
    serves, so nothing is left to do on the data plane (``Action.NONE``)."""
    _require_live(state, "promote")
    if state.phase is Phase.VERIFYING:
        d = Decision(Action.NONE, 100, f"{reason} (the watch after promotion ended early)")
        return _apply(state, now, "promote", d, phase=Phase.PROMOTED, reason=d.reason)
    d = Decision(Action.PROMOTE, 100, reason)
    return _apply(state, now, "promote", d, phase=Phase.PROMOTED, weight=100, reason=reason, shadow=False)


def abort(
    state: RolloutState, now: float, reason: str = "aborted by operator"
) -> tuple[RolloutState, Decision]:
    _require_live(state, "abort")
    if state.phase is Phase.VERIFYING:  # the new version serves: abort puts the previous model back
        d = Decision(Action.RESTORE, 0, f"{reason}; the previous model is restored")
        return _apply(state, now, "abort", d, phase=Phase.ABORTED, weight=0, reason=d.reason)
    d = Decision(Action.ROLLBACK, 0, reason)
    return _apply(state, now, "abort", d, phase=Phase.ABORTED, weight=0, reason=reason, shadow=False)
