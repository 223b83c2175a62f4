"""The imperative shell around the pure state machine: read metrics, run gates, persist, route.

One loop, Flagger's ``advanceCanary`` in small: every ``interval`` it reads a snapshot of both
sides from the metrics provider, judges the window since the step began with the gates, folds
the verdict into the state machine, persists the new state *before* touching the data plane
(``pending`` marks an action not yet applied), then applies it through the router. On start it
finishes any pending action and re-applies the persisted weight, so a controller that was killed
resumes at the same step with the same analysis window.

One controller per rollout: :func:`drive` (and :meth:`Controller.run`) take the store's exclusive
ownership (``acquire``/``release``) for the controller's lifetime and renew it from a heartbeat thread;
operator commands (:func:`command`) do not need it. Every record read from a store is checked by
:func:`validate_record` before anything acts on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from serving.contract.errors import MlrolloutError
from serving.rollout import machine
from serving.rollout.gates import Gate, GateResult, Verdict, evaluate_all, gates_from_config, gates_to_config
from serving.rollout.machine import Action, Decision, Phase, RolloutSpec, RolloutState
from serving.rollout.metrics import MetricsError, MetricsProvider, Target, build_provider
from serving.rollout.metrics import check_config as check_metrics_config
from serving.rollout.routers import TrafficRouter, build_router, validate_config
from serving.rollout.stats import Snapshot
from serving.rollout.store import OwnershipError, StateStore, StoreError

RECORD_KIND = "mlrollout.io/v1alpha1 RolloutRecord"
TIMELINE_LIMIT = 500
Labelled = Callable[[str], tuple[float, float]]  # version -> (correct, total), cumulative


class _Stale(Exception):
    """The persisted state changed under us (an operator command): drop this analysis."""


class RecordError(MlrolloutError, ValueError):
    """A rollout record the controller cannot drive; the message starts with the field at fault."""


class Unreachable(MlrolloutError, RuntimeError):
    """The router and/or the metrics backend do not answer (checked before a rollout starts)."""


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
    want = {Phase.PROMOTED: 100, Phase.ROLLED_BACK: 0, Phase.ABORTED: 0}.get(
        phase, spec.steps[st["step_index"]]
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


def validate_record(rec: Any) -> dict[str, Any]:
    """Check a rollout record's shape before anything acts on it; return it unchanged.

    Raises :class:`RecordError` (a ValueError) whose message starts with the field at fault, e.g.
    ``state.step_index: 99 is out of range for 4 steps``. Used for new records (:func:`new_record`)
    and for every record read back from a store (then re-raised as :class:`StoreError` with the place).
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
        gates_from_config(_need(rec, "gates", list))
    except RecordError:
        raise
    except (TypeError, ValueError) as e:
        raise RecordError(str(e)) from None
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
    metrics = _need(rec, "metrics", dict)
    try:
        check_metrics_config(metrics)
    except ValueError as e:
        raise RecordError(f"metrics.{e}") from None
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
        ):
            got = pending.get("action") if isinstance(pending, dict) else pending
            raise RecordError(f"pending.action: {got!r} is not set_weight, promote or rollback")
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


def checked(rec: Any, store: StateStore, hint: str = "move it away or fix it") -> dict[str, Any] | None:
    """``rec`` (as read from ``store``) when it is None or a valid record, else StoreError with the place."""
    if rec is None:
        return None
    try:
        return validate_record(rec)
    except RecordError as e:
        raise StoreError(f"corrupt rollout record in {store.where()}: {e}; {hint}") from None


def load_record(store: StateStore) -> dict[str, Any] | None:
    """The store's record, validated (None when there is none)."""
    return checked(store.load(), store)


def new_record(
    spec: RolloutSpec,
    gates: list[Gate],
    stable: Target,
    canary: Target,
    router_cfg: dict[str, Any],
    metrics_cfg: dict[str, Any],
) -> dict[str, Any]:
    """A new rollout record; ValueError (:class:`RecordError`) for a record no controller could drive."""
    record = {
        "kind": RECORD_KIND,
        "spec": spec.to_dict(),
        "gates": gates_to_config(gates),
        "stable": stable.to_dict(),
        "canary": canary.to_dict(),
        "router": router_cfg,
        "metrics": metrics_cfg,
        "state": None,  # set by the controller's first tick
        "pending": None,
        "baselines": {},
        "timeline": [],
        "created_at": time.time(),
    }
    return validate_record(record)


def _choose(store: StateStore, old: Any, record: dict[str, Any], force: bool) -> tuple[dict[str, Any], bool]:
    """(the record to drive, resumed): keep the live rollout of the same versions, else ``record``."""
    if old is None:
        return record, False
    if force:
        return record, False
    old = checked(old, store, "move it away, or pass --force to replace it")
    if old.get("state") and not Phase(old["state"]["phase"]).terminal:
        same = old["stable"]["version"] == record["stable"]["version"] and (
            old["canary"]["version"] == record["canary"]["version"]
        )
        if not same:
            raise StoreError(
                f"a rollout of {old['canary']['model']}:{old['canary']['version']} is still "
                f"{old['state']['phase']}; abort it first (python -m serving.rollout abort) "
                "or pass --force"
            )
        return old, True
    return record, False


def plan(store: StateStore, record: dict[str, Any], force: bool = False) -> tuple[dict[str, Any], bool]:
    """What :func:`begin` would store, without writing: (record, resumed)."""
    return _choose(store, store.load(), record, force)


def begin(store: StateStore, record: dict[str, Any], force: bool = False) -> tuple[dict[str, Any], bool]:
    """Store a new rollout, or keep the live one for the same versions (a restarted controller).

    A stored record that is corrupt is refused (StoreError naming the field) unless ``force``.
    Returns (record, resumed).
    """
    resumed = False

    def fn(old: dict[str, Any] | None) -> dict[str, Any]:
        nonlocal resumed
        rec, resumed = _choose(store, old, record, force)
        return rec

    return store.update(fn), resumed


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_reachable(
    record: dict[str, Any],
    *,
    router: TrafficRouter | None = None,
    provider: MetricsProvider | None = None,
    api: Any = None,
) -> tuple[TrafficRouter, MetricsProvider]:
    """Before a rollout starts: the router reads its weights and the metrics backend answers for both
    versions. Raises :class:`Unreachable` naming every part that failed (one line); writes nothing."""
    problems = []
    try:
        router = router or build_router(record["router"], api)
        router.get_weights()
    except Exception as e:  # RouterError, OSError, kubernetes ApiException / ConfigException, ...
        problems.append(f"router {record['router'].get('router')}: {_one_line(e)}")
    try:
        provider = provider or build_provider(record["metrics"])
        for side in ("stable", "canary"):
            provider.snapshot(Target.from_dict(record[side]))
    except Exception as e:  # MetricsError, an unreachable scrape target, ...
        problems.append(f"metrics {record['metrics'].get('provider')}: {_one_line(e)}")
    if problems:
        raise Unreachable("cannot start the rollout: " + "; ".join(problems))
    return router, provider


def new_holder() -> str:
    """A holder id unique to this controller: host, PID and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def drive(
    store: StateStore,
    record: dict[str, Any],
    *,
    force: bool = False,
    router: TrafficRouter | None = None,
    provider: MetricsProvider | None = None,
    api: Any = None,
    log: Callable[[str], None] = print,
    max_seconds: float | None = None,
    **controller_kw: Any,
) -> dict[str, Any]:
    """Start (or resume) ``record`` and drive it to its end, as the rollout's only controller.

    In order, each step refusing with one clear error and writing nothing: take the store's ownership
    (:class:`OwnershipError` names the holder), check the stored record (a corrupt one needs ``force``),
    check that the router and the metrics backend answer (:class:`Unreachable`). Then store the record
    and run the loop; the ownership is released at the end, whatever happens.
    """
    holder = new_holder()
    store.acquire(holder, interval_s=float(record["spec"]["interval_s"]))
    try:
        chosen, _ = plan(store, record, force)
        router, provider = check_reachable(chosen, router=router, provider=provider, api=api)
        _, resumed = begin(store, record, force)
        if resumed:
            log("a live rollout of the same versions exists: resuming it")
        c = Controller(
            store, router=router, provider=provider, api=api, log=log, holder=holder, **controller_kw
        )
        return c.run(max_seconds=max_seconds)
    finally:
        store.release()


def _fmt_time(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%H:%M:%S")


def describe_decision(state: RolloutState, spec: RolloutSpec, d: Decision, now: float) -> str:
    head = f"[{_fmt_time(now)}] step {state.step_index + 1}/{len(spec.steps)}"
    lines = [
        f"{head} {d.verdict.value.upper() if d.verdict else ''} -> {d.action.value}: {d.reason}".replace(
            "  ", " "
        )
    ]
    for g in d.evidence:
        lines.append(f"      {g.summary()}")
    return "\n".join(lines)


class Controller:
    def __init__(
        self,
        store: StateStore,
        *,
        router: TrafficRouter | None = None,
        provider: MetricsProvider | None = None,
        labelled: Labelled | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        log: Callable[[str], None] = print,
        poll_s: float = 0.25,
        api: Any = None,
        holder: str | None = None,
        heartbeat_s: float | None = None,
    ):
        rec = load_record(store)
        if rec is None:
            raise StoreError(
                f"no rollout in {store.where()}; start one with `python -m serving.rollout start`"
            )
        self.store = store
        self.spec = RolloutSpec.from_dict(rec["spec"])
        self.gates = gates_from_config(rec["gates"])
        self.stable, self.canary = Target.from_dict(rec["stable"]), Target.from_dict(rec["canary"])
        self.router = router or build_router(rec["router"], api)
        self.provider = provider or build_provider(rec["metrics"])
        self.labelled = labelled
        self.clock, self.sleep, self.log, self.poll_s = clock, sleep, log, poll_s
        self.holder = holder or new_holder()
        # renew the ownership at least every interval, and well inside its time to live (>= 30 s)
        self.heartbeat_s = heartbeat_s or min(self.spec.interval_s, 10.0)
        self._lost: OwnershipError | None = None

    # ----------------------------------------------------------------- ownership
    @contextlib.contextmanager
    def owning(self):
        """Hold the store's ownership for the block (taken here unless the caller already holds it),
        renewed from a heartbeat thread, so long router calls (a promotion waits for pods) keep it."""
        taken = not self.store.held
        if taken:
            self.store.acquire(self.holder, interval_s=self.spec.interval_s)
        stop = threading.Event()
        self._lost = None

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                try:
                    self.store.heartbeat()
                except OwnershipError as e:
                    self._lost = e
                    return
                except Exception:  # a transient API error: try again next beat (the lease is 3 beats)
                    continue

        t = threading.Thread(target=beat, name="rollout-heartbeat", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join(timeout=5)
            if taken:
                self.store.release()

    def _check_owner(self) -> None:
        if self._lost is not None:
            raise OwnershipError(f"this controller lost the rollout: {self._lost}")

    def _load(self) -> dict[str, Any]:
        rec = load_record(self.store)
        if rec is None:
            raise StoreError(f"the rollout record in {self.store.where()} disappeared")
        return rec

    # ----------------------------------------------------------------- evidence
    def _snap(self, target: Target) -> Snapshot:
        s = self.provider.snapshot(target)
        if self.labelled is not None and s.labelled_total == 0:
            s.labelled_correct, s.labelled_total = self.labelled(target.version)
        return s

    def snapshots(self) -> dict[str, Snapshot]:
        return {"stable": self._snap(self.stable), "canary": self._snap(self.canary)}

    # ----------------------------------------------------------------- data plane
    def _execute(self, action: str | None, weight: int) -> None:
        if action == Action.SET_WEIGHT:
            self.router.set_weights(100 - weight, weight)
        elif action == Action.PROMOTE:
            self.router.promote()
        elif action == Action.ROLLBACK:
            self.router.rollback()

    def _clear_pending(self) -> dict[str, Any]:
        def fn(rec):
            rec["pending"] = None
            return rec

        return self.store.update(fn)

    def _reconcile(self, rec: dict[str, Any]) -> None:
        """Finish a pending action and make the data plane match the persisted state."""
        st = RolloutState.from_dict(rec["state"])
        if rec.get("pending"):
            self._execute(rec["pending"]["action"], rec["pending"]["weight"])
            self._clear_pending()
        elif st.phase in (Phase.PROGRESSING, Phase.PAUSED):
            want = (100 - st.weight, st.weight)
            if self.router.get_weights() != want:
                self.router.set_weights(*want)
        elif st.phase in (Phase.ROLLED_BACK, Phase.ABORTED) and self.router.get_weights() != (100, 0):
            self.router.rollback()

    # ----------------------------------------------------------------- loop
    def _first_tick(self) -> dict[str, Any]:
        now = self.clock()
        try:
            snaps = self.snapshots()
        except MetricsError:
            # nothing started: leave no stub record (state null) behind
            self.store.update(lambda rec: None if rec is not None and rec.get("state") is None else rec)
            raise
        state, d = machine.start(self.spec, now)

        def fn(rec):
            if rec.get("state") is not None:
                raise _Stale
            rec["state"] = state.to_dict()
            rec["baselines"] = {
                "rollout": {k: v.to_dict() for k, v in snaps.items()},
                "step": {k: v.to_dict() for k, v in snaps.items()},
            }
            rec["pending"] = {"action": d.action.value, "weight": d.weight}
            return rec

        self.store.update(fn)
        self.log(
            f"[{_fmt_time(now)}] start rollout {self.canary.model}: "
            f"{self.stable.version} -> {self.canary.version}"
            f" steps {list(self.spec.steps)} every {self.spec.interval_s:g}s via {self.router.name}"
            f" + {self.provider.name}; canary weight {d.weight}%"
        )
        self._execute(d.action, d.weight)
        return self._clear_pending()

    def _rebaseline(self) -> dict[str, Any]:
        try:
            snaps = self.snapshots()
        except MetricsError:
            snaps = {"stable": Snapshot(), "canary": Snapshot()}  # judged as a reset: counts from zero

        def fn(rec):
            if not rec["baselines"].get("step"):
                rec["baselines"]["step"] = {k: v.to_dict() for k, v in snaps.items()}
            return rec

        return self.store.update(fn)

    def _analysis(self, rec: dict[str, Any]) -> dict[str, Any]:
        now = self.clock()
        st = RolloutState.from_dict(rec["state"])
        weight_before = st.weight
        try:
            snaps = self.snapshots()
        except MetricsError as e:
            snaps = None
            results: list[GateResult] = [
                GateResult("metrics", Verdict.INCONCLUSIVE, None, 0.0, ">=", 0, detail=str(e)[:300])
            ]
        if snaps is not None:
            base = {k: Snapshot.from_dict(v) for k, v in rec["baselines"]["step"].items()}
            ref = {k: Snapshot.from_dict(v) for k, v in rec["baselines"]["rollout"].items()}
            win_c, win_s = snaps["canary"] - base["canary"], snaps["stable"] - base["stable"]
            results = evaluate_all(self.gates, win_c, win_s, snaps["stable"] - ref["stable"])
        decision: list[Decision] = []

        def fn(cur):
            cs = RolloutState.from_dict(cur["state"])
            if (
                cs.phase is not Phase.PROGRESSING
                or cs.analyses != st.analyses
                or cs.step_index != st.step_index
            ):
                raise _Stale
            new, d = machine.analyse(cs, self.spec, results, now)
            decision.append(d)
            cur["state"] = new.to_dict()
            if d.reset_window and snaps is not None:
                cur["baselines"]["step"] = {k: v.to_dict() for k, v in snaps.items()}
            if d.action in (Action.SET_WEIGHT, Action.PROMOTE, Action.ROLLBACK):
                cur["pending"] = {"action": d.action.value, "weight": d.weight}
            point = {
                "t": now,
                "weight": weight_before,
                "verdict": d.verdict.value if d.verdict else None,
                "action": d.action.value,
                "new_weight": d.weight,
                "gates": {g.gate: g.to_dict()["value"] for g in results},
                "verdicts": {g.gate: g.verdict.value for g in results},
            }
            if snaps is not None:
                point["requests"] = {"stable": win_s.total_requests, "canary": win_c.total_requests}
            cur["timeline"] = [*cur.get("timeline", []), point][-TIMELINE_LIMIT:]
            return cur

        try:
            rec = self.store.update(fn)
        except _Stale:
            return self._load()
        d = decision[0]
        self.log(describe_decision(st, self.spec, d, now))
        if rec.get("pending"):
            self._execute(d.action, d.weight)
            rec = self._clear_pending()
        return rec

    def run(self, max_seconds: float | None = None, stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Drive the rollout until it is Promoted, RolledBack or Aborted (or ``stop``/``max_seconds``),
        as its only controller (:class:`OwnershipError` when another one holds it)."""
        with self.owning():
            return self._run(max_seconds, stop)

    def _run(self, max_seconds: float | None, stop: Callable[[], bool] | None) -> dict[str, Any]:
        t_end = None if max_seconds is None else time.monotonic() + max_seconds
        rec = self._load()
        if rec.get("state") is None:
            rec = self._first_tick()
        else:
            st = RolloutState.from_dict(rec["state"])
            if not st.phase.terminal:
                self.log(
                    f"[{_fmt_time(self.clock())}] resume rollout {self.canary.model}:{self.canary.version} "
                    f"at step "
                    f"{st.step_index + 1}/{len(self.spec.steps)} (canary {st.weight}%, {st.phase.value}, "
                    f"{st.failed_checks} failed checks)"
                )
            self._reconcile(rec)
            rec = self._load()
        paused_logged = False
        while True:
            self._check_owner()
            st = RolloutState.from_dict(rec["state"])
            if st.phase.terminal:
                self._reconcile(rec)
                self.log(f"[{_fmt_time(self.clock())}] rollout {st.phase.value}: {st.reason}")
                return rec
            if (stop and stop()) or (t_end is not None and time.monotonic() > t_end):
                return rec
            if st.phase is Phase.PAUSED:
                if not paused_logged:
                    self.log(f"[{_fmt_time(self.clock())}] paused at canary {st.weight}%: {st.reason}")
                    paused_logged = True
            elif not rec.get("baselines", {}).get("step"):
                rec = self._rebaseline()  # resumed by an operator: the analysis window starts now
                continue
            elif self.clock() >= st.next_analysis_at:
                paused_logged = False
                rec = self._analysis(rec)
                continue
            else:
                paused_logged = False
            wait = self.poll_s if st.phase is Phase.PAUSED else max(st.next_analysis_at - self.clock(), 0.01)
            self.sleep(min(self.poll_s, wait))
            rec = self._load()


def command(
    store: StateStore,
    verb: str,
    *,
    router: TrafficRouter | None = None,
    api: Any = None,
    reason: str | None = None,
    clock: Callable[[], float] = time.time,
) -> dict[str, Any]:
    """An operator command (pause, resume, promote, abort): persisted, then applied to the data plane."""
    now = clock()
    decision: list[Decision] = []

    def fn(rec):
        rec = checked(rec, store)
        if rec is None or rec.get("state") is None:
            raise StoreError(f"no running rollout in {store.where()}")
        st = RolloutState.from_dict(rec["state"])
        spec = RolloutSpec.from_dict(rec["spec"])
        kw = {"reason": reason} if reason else {}
        if verb == "pause":
            new, d = machine.pause(st, now, **kw)
        elif verb == "resume":
            new, d = machine.resume(st, spec, now)
        elif verb == "promote":
            new, d = machine.promote(st, now, **kw)
        elif verb == "abort":
            new, d = machine.abort(st, now, **kw)
        else:
            raise ValueError(f"unknown command {verb!r}")
        decision.append(d)
        rec["state"] = new.to_dict()
        if d.reset_window and rec.get("baselines"):
            rec["baselines"]["step"] = None  # the running controller re-baselines on its next tick
        if d.action in (Action.PROMOTE, Action.ROLLBACK):
            rec["pending"] = {"action": d.action.value, "weight": d.weight}
        return rec

    rec = store.update(fn)
    d = decision[0]
    if d.action in (Action.PROMOTE, Action.ROLLBACK):
        r = router or build_router(rec["router"], api)
        if d.action is Action.PROMOTE:
            r.promote()
        else:
            r.rollback()

        def clear(cur):
            cur["pending"] = None
            return cur

        rec = store.update(clear)
    return rec
