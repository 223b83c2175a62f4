"""The rollout record: what the controller persists, as a dataclass (:class:`RolloutRecord`).

A store (:mod:`serving.rollout.store`) is the only place a record becomes JSON or comes back from it:
it runs :func:`validate_record` on the decoded JSON, then builds the dataclass with
:meth:`RolloutRecord.from_dict`, and writes :meth:`RolloutRecord.to_dict`. Everything else reads and
sets attributes.

The fields keep their JSON shapes (``spec`` a dict, ``state`` a dict or None, ...), so a record read
and written again is the same JSON, key for key and value for value (an ``interval_s`` of ``30``
stays ``30``, a state without ``history`` gains none, unknown keys are kept in ``extra``). Typed views
(:attr:`RolloutRecord.rollout_spec`, :attr:`RolloutRecord.rollout_state`, the targets, the gates and
the baselines as snapshots) parse them on demand.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from serving.contract.errors import MlrolloutError
from serving.rollout.gates import Gate, GateResult, gates_from_config, live_gates, shadow_gates
from serving.rollout.machine import Action, Phase, RolloutSpec, RolloutState
from serving.rollout.metrics import Target
from serving.rollout.metrics import check_config as check_metrics_config
from serving.rollout.routers import ROUTERS, choices, mirrors, validate_config
from serving.rollout.stats import Snapshot

RECORD_KIND = "mlrollout.io/v1alpha1 RolloutRecord"


class RecordError(MlrolloutError, ValueError):
    """A rollout record the controller cannot drive; the message starts with the field at fault."""


# --------------------------------------------------------------------------- record validation


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(v), f"a {type(v).__name__}"
    )


def _why(e: Exception) -> str:
    return f"missing {e.args[0]!r}" if isinstance(e, KeyError) else str(e)


def _need(rec: dict[str, Any], key: str, typ: type, where: str = "") -> Any:
    v = rec.get(key)
    if not isinstance(v, typ):
        what = "an object" if typ is dict else "a list"
        raise RecordError(f"{where}{key}: must be {what}, got {_kind(v) if key in rec else 'nothing'}")
    return v


def _check_target(side: str, d: dict[str, Any]) -> Target:
    for k in ("model", "version"):
        if not isinstance(d.get(k), str) or not d[k]:
            raise RecordError(f"{side}.{k}: must be a non-empty string, got {d.get(k)!r}")
    if not isinstance(d.get("metrics_url", ""), str):
        raise RecordError(f"{side}.metrics_url: must be a string")
    extra = d.get("extra", {})
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise RecordError(f"{side}.extra: must be an object of string label values")
    return Target.from_dict(d)


def _check_gate_result(where: str, g: Any) -> None:
    if not isinstance(g, dict):
        raise RecordError(f"{where}: must be an object, got {_kind(g)}")
    try:
        r = GateResult.from_dict(g)
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(f"{where}: {_why(e)}") from None
    if not (
        isinstance(r.gate, str)
        and (r.value is None or _num(r.value))
        and _num(r.threshold)
        and r.op in ("<=", ">=")
        and _int(r.samples)
        and (r.baseline_samples is None or _int(r.baseline_samples))
        and isinstance(r.unit, str)
        and isinstance(r.detail, str)
        and all(x is None or _num(x) for x in (r.effect, r.statistic, r.boundary))
        and isinstance(r.sequential, bool)
    ):
        raise RecordError(f"{where}: not a gate result ({g!r:.120})")


_LIVE_WEIGHT = "the current step's weight"


def _check_state(st: Any, spec: RolloutSpec) -> None:
    if not isinstance(st, dict):
        raise RecordError(f"state: must be an object or null, got {_kind(st)}")
    fields = {f.name for f in dataclasses.fields(RolloutState)}
    if unknown := sorted(set(st) - fields):
        raise RecordError(f"state: unknown fields {unknown}")
    try:
        phase = Phase(st.get("phase"))
    except ValueError:
        raise RecordError(
            f"state.phase: {st.get('phase')!r} is not one of {[p.value for p in Phase]}"
        ) from None
    if not _int(st.get("watch_passes", 0)) or st.get("watch_passes", 0) < 0:
        raise RecordError(f"state.watch_passes: must be a whole number >= 0, got {st['watch_passes']!r}")
    for k in ("step_index", "weight", "failed_checks", "inconclusive_checks", "analyses"):
        if k not in st or not _int(st[k]) or st[k] < 0:
            raise RecordError(f"state.{k}: must be a whole number >= 0, got {st.get(k)!r}")
    for k in ("step_started_at", "next_analysis_at"):
        if k not in st or not _num(st[k]):
            raise RecordError(f"state.{k}: must be a finite number, got {st.get(k)!r}")
    if not isinstance(st.get("reason", ""), str):
        raise RecordError("state.reason: must be a string")
    n = len(spec.steps)
    if st["step_index"] >= n:
        raise RecordError(
            f"state.step_index: {st['step_index']} is out of range for {n} steps {list(spec.steps)}"
        )
    shadow = st.get("shadow", False)
    if not isinstance(shadow, bool):
        raise RecordError(f"state.shadow: must be true or false, got {shadow!r}")
    if shadow and not spec.shadow:
        raise RecordError("state.shadow: the rollout is in a shadow step but its spec has none")
    if shadow and (phase not in (Phase.PROGRESSING, Phase.PAUSED) or st["step_index"] != 0):
        raise RecordError(
            f"state.shadow: only a live rollout before its first step is in the shadow step, not a "
            f"{phase.value} one at step {st['step_index'] + 1}"
        )
    want = {Phase.PROMOTED: 100, Phase.VERIFYING: 100, Phase.ROLLED_BACK: 0, Phase.ABORTED: 0}.get(
        phase, 0 if shadow else spec.steps[st["step_index"]]
    )
    if st["weight"] != want:
        raise RecordError(
            f"state.weight: {st['weight']}% is impossible for a {phase.value} rollout at step "
            f"{st['step_index'] + 1}/{n} (it must be {want}%)"
        )
    hist = st.get("history", [])
    if not isinstance(hist, list):
        raise RecordError(f"state.history: must be a list, got {_kind(hist)}")
    for i, h in enumerate(hist):
        where = f"state.history[{i}]"
        if not isinstance(h, dict):
            raise RecordError(f"{where}: must be an object, got {_kind(h)}")
        if not (_num(h.get("t")) and _int(h.get("weight"))):
            raise RecordError(f"{where}: needs a time t and a whole-number weight")
        for k in ("event", "action", "reason"):
            if not isinstance(h.get(k), str):
                raise RecordError(f"{where}.{k}: must be a string, got {h.get(k)!r}")
        ev = h.get("evidence", [])
        if not isinstance(ev, list):
            raise RecordError(f"{where}.evidence: must be a list, got {_kind(ev)}")
        for j, g in enumerate(ev):
            _check_gate_result(f"{where}.evidence[{j}]", g)


def _check_snapshots(where: str, b: Any) -> None:
    if not isinstance(b, dict) or set(b) != {"stable", "canary"}:
        raise RecordError(f"{where}: must be an object with snapshots 'stable' and 'canary'")
    for side, snap in b.items():
        try:
            if not isinstance(snap, dict):
                raise TypeError(f"must be an object, got {_kind(snap)}")
            Snapshot.from_dict(snap)
        except (AttributeError, TypeError, ValueError) as e:
            raise RecordError(f"{where}.{side}: {e}") from None


def _check_watch(rec: dict[str, Any], spec: RolloutSpec, st: dict[str, Any] | None) -> None:
    """``watch``: what the watch after promotion needs, bounded (a predictor spec and two snapshots):
    ``previous_model`` (the stable InferenceService's predictor before the promotion, for the routers that
    promote by copy), ``baseline`` (the previous version's counters over the rollout, the watch's
    reference) and ``start`` (the new stable's counters when the watch began)."""
    router = rec["router"].get("router")
    if spec.post_promotion_intervals and not hasattr(ROUTERS.get(router), "restore"):
        raise RecordError(
            f"spec.post_promotion_intervals: router {router} cannot restore the previous model after a "
            f"promotion; the watch after promotion needs one of "
            f"{sorted(n for n, c in ROUTERS.items() if hasattr(c, 'restore'))}"
        )
    w = rec.get("watch")
    if w is None:
        if st is not None and st.get("phase") == Phase.VERIFYING:
            raise RecordError("watch: a Verifying rollout needs the watch's baseline, got nothing")
        return
    if not isinstance(w, dict) or set(w) - {"previous_model", "baseline", "start"}:
        raise RecordError("watch: must be an object with previous_model, baseline and start")
    if w.get("previous_model") is not None and not isinstance(w["previous_model"], dict):
        raise RecordError(
            f"watch.previous_model: must be an object or null, got {_kind(w['previous_model'])}"
        )
    for k in ("baseline", "start"):
        if w.get(k) is not None:
            try:
                if not isinstance(w[k], dict):
                    raise TypeError(f"must be an object, got {_kind(w[k])}")
                Snapshot.from_dict(w[k])
            except (AttributeError, TypeError, ValueError) as e:
                raise RecordError(f"watch.{k}: {e}") from None
    if st is not None and st.get("phase") == Phase.VERIFYING and w.get("baseline") is None:
        raise RecordError("watch.baseline: a Verifying rollout needs the previous version's baseline")


def validate_record(rec: Any) -> dict[str, Any]:
    """Check a rollout record's shape before anything acts on it; return it unchanged.

    Raises :class:`RecordError` (a ValueError) whose message starts with the field at fault, e.g.
    ``state.step_index: 99 is out of range for 4 steps``. Run by :meth:`RolloutRecord.from_dict`, so for
    new records (``controller.new_record``) and for every record a store reads back (which re-raises it
    as ``store.CorruptRecord``, a ``StoreError`` naming the place).
    """
    if not isinstance(rec, dict):
        raise RecordError(f"the record must be a JSON object, got {_kind(rec)}")
    if rec.get("kind") != RECORD_KIND:
        got = repr(rec["kind"]) if "kind" in rec else "missing"
        raise RecordError(f"kind: {got}, not {RECORD_KIND!r} (this is not a rollout record)")
    try:
        spec = RolloutSpec.from_dict(_need(rec, "spec", dict))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, RecordError):
            raise
        raise RecordError(f"spec: {_why(e)}") from None
    try:
        gate_objs = gates_from_config(_need(rec, "gates", list))
    except RecordError:
        raise
    except (TypeError, ValueError) as e:
        raise RecordError(str(e)) from None
    if not spec.shadow and len(live_gates(gate_objs)) < len(gate_objs):
        raise RecordError(
            "gates: the label agreement gate judges only mirrored requests; it needs a shadow step (--shadow)"
        )
    if spec.shadow and not shadow_gates(gate_objs):
        raise RecordError(
            "spec.shadow: the shadow step needs a gate that judges mirrored traffic (success rate, "
            "latency, drift or a comparison); the accuracy gates need labels for answers users saw"
        )
    stable = _check_target("stable", _need(rec, "stable", dict))
    canary = _check_target("canary", _need(rec, "canary", dict))
    if stable.version == canary.version:
        raise RecordError(
            f"canary.version: {canary.version!r} is also the stable version; a rollout needs two versions"
        )
    try:
        validate_config(_need(rec, "router", dict))
    except RecordError:
        raise
    except (TypeError, ValueError) as e:
        raise RecordError(f"router: {e}") from None
    if spec.shadow and rec["router"].get("cohort"):
        raise RecordError(
            "spec.shadow: a shadow step and a cohort do not combine yet (a cohort's match rules would "
            "carry users past the mirrored rule); choose one"
        )
    if spec.shadow and not mirrors(rec["router"]["router"]):
        raise RecordError(
            f"spec.shadow: router {rec['router']['router']} cannot mirror traffic; the shadow step needs "
            f"{choices(n for n in ROUTERS if mirrors(n))}"
        )
    metrics = _need(rec, "metrics", dict)
    try:
        check_metrics_config(metrics)
    except ValueError as e:
        raise RecordError(f"metrics.{e}") from None
    if metrics.get("provider") != "prometheus" and len(live_gates(gate_objs)) < len(gate_objs):
        raise RecordError(
            "gates: the label agreement gate reads the mirror's counters from Prometheus "
            "(--metrics prometheus); scrape reads only the runtimes"
        )
    st = rec.get("state")
    if st is not None:
        _check_state(st, spec)
    pending = rec.get("pending")
    if pending is not None:
        if st is None:
            raise RecordError("pending: an action is pending but the rollout has no state")
        if not isinstance(pending, dict) or pending.get("action") not in (
            Action.SET_WEIGHT,
            Action.PROMOTE,
            Action.ROLLBACK,
            Action.RESTORE,
        ):
            got = pending.get("action") if isinstance(pending, dict) else pending
            raise RecordError(f"pending.action: {got!r} is not set_weight, promote, rollback or restore")
        w = pending.get("weight")
        if not _int(w) or not 0 <= w <= 100:
            raise RecordError(f"pending.weight: must be a percentage 0..100, got {w!r}")
    baselines = rec.get("baselines", {})
    if not isinstance(baselines, dict):
        raise RecordError(f"baselines: must be an object, got {_kind(baselines)}")
    if st is not None:
        _check_snapshots("baselines.rollout", baselines.get("rollout"))
    if baselines.get("step") is not None:
        _check_snapshots("baselines.step", baselines["step"])
    _check_watch(rec, spec, st)
    tl = rec.get("timeline", [])
    if not isinstance(tl, list):
        raise RecordError(f"timeline: must be a list, got {_kind(tl)}")
    for i, point in enumerate(tl):
        if not (
            isinstance(point, dict)
            and _num(point.get("t"))
            and _int(point.get("weight"))
            and isinstance(point.get("action"), str)
            and isinstance(point.get("gates", {}), dict)
            and all(v is None or _num(v) for v in point.get("gates", {}).values())
        ):
            raise RecordError(f"timeline[{i}]: not an analysis point")
    return rec


# --------------------------------------------------------------------------- the record

# the keys a valid record may lack, and the value the code reads in their place
_OPTIONAL: dict[str, Any] = {
    "state": None,
    "pending": None,
    "baselines": {},
    "timeline": [],
    "created_at": 0,
    "watch": None,
}
_FIELDS = ("kind", "spec", "gates", "stable", "canary", "router", "metrics", *_OPTIONAL)


@dataclass
class RolloutRecord:
    """One rollout, as the controller persists it (see :func:`validate_record` for each field's shape).

    ``spec``: :meth:`RolloutSpec.to_dict`; ``gates``: the gates' config list; ``stable``/``canary``:
    :meth:`Target.to_dict`; ``router``/``metrics``: their config; ``state``: :meth:`RolloutState.to_dict`,
    None until the first tick; ``pending``: ``{"action", "weight"}`` of an action stored but not yet
    applied; ``baselines``: ``{"rollout": {side: snapshot}, "step": {side: snapshot} | None}``;
    ``timeline``: one point per analysis; ``created_at``: wall-clock seconds; ``watch``: the watch
    after promotion's previous model and snapshots (:func:`_check_watch`), None without one; ``extra``:
    keys this code does not know, kept as they were.
    """

    spec: dict[str, Any]
    gates: list[dict[str, Any]]
    stable: dict[str, Any]
    canary: dict[str, Any]
    router: dict[str, Any]
    metrics: dict[str, Any]
    state: dict[str, Any] | None = None
    pending: dict[str, Any] | None = None
    baselines: dict[str, Any] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = 0
    watch: dict[str, Any] | None = None
    kind: str = RECORD_KIND
    extra: dict[str, Any] = field(default_factory=dict)
    # optional keys the JSON did not have: written back only once they hold something else
    _absent: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    # ------------------------------------------------------------------ JSON shape (for the stores)
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, owned: bool = False) -> RolloutRecord:
        """The record of a decoded JSON object; :class:`RecordError` (via :func:`validate_record`)
        when it is not a valid one. The record works on a copy of ``d`` unless ``owned`` (a store's
        freshly decoded JSON, which nothing else holds)."""
        validate_record(d)
        if not owned:
            d = copy.deepcopy(d)
        known = {k: d[k] for k in _FIELDS if k in d}
        absent = frozenset(k for k in _OPTIONAL if k not in d)
        extra = {k: v for k, v in d.items() if k not in _FIELDS}
        opt = {k: copy.deepcopy(v) for k, v in _OPTIONAL.items() if k in absent}
        return cls(**known, **opt, extra=extra, _absent=absent)

    def to_dict(self, *, copied: bool = True) -> dict[str, Any]:
        """The JSON object: the keys and values :meth:`from_dict` read, in the stores' sorted order;
        a deep copy unless not ``copied`` (a store that only serialises it)."""
        out: dict[str, Any] = dict(self.extra)
        for k in _FIELDS:
            v = getattr(self, k)
            if k in self._absent and v == _OPTIONAL[k]:
                continue
            out[k] = v
        out = dict(sorted(out.items()))
        return copy.deepcopy(out) if copied else out

    # ------------------------------------------------------------------ typed views
    @property
    def rollout_spec(self) -> RolloutSpec:
        return RolloutSpec.from_dict(self.spec)

    @property
    def rollout_state(self) -> RolloutState | None:
        return None if self.state is None else RolloutState.from_dict(self.state)

    @property
    def phase(self) -> str | None:
        """The state's phase (``"Progressing"``, ``"Promoted"``, ...), None before the first tick."""
        return None if self.state is None else self.state["phase"]

    @property
    def stable_target(self) -> Target:
        return Target.from_dict(self.stable)

    @property
    def canary_target(self) -> Target:
        return Target.from_dict(self.canary)

    def gate_objects(self) -> list[Gate]:
        return gates_from_config(self.gates)

    @property
    def rollout_baseline(self) -> dict[str, Snapshot] | None:
        """The snapshots taken when the rollout started (both sides), or None before it."""
        b = self.baselines.get("rollout")
        return None if b is None else {k: Snapshot.from_dict(v) for k, v in b.items()}

    @property
    def step_baseline(self) -> dict[str, Snapshot] | None:
        """The snapshots that open the current analysis window, or None (re-baseline on the next tick)."""
        b = self.baselines.get("step")
        return None if not b else {k: Snapshot.from_dict(v) for k, v in b.items()}

    def set_baselines(self, snaps: dict[str, Snapshot] | None, *, rollout: bool = False) -> None:
        """Open a new analysis window at ``snaps`` (None: the controller re-baselines on its next tick);
        ``rollout``: also make them the rollout's baseline."""
        d = None if snaps is None else {k: v.to_dict() for k, v in snaps.items()}
        if rollout:
            self.baselines = {"rollout": d, "step": copy.deepcopy(d)}
        else:
            self.baselines["step"] = d
