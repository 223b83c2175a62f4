"""The imperative shell around the pure state machine: read metrics, run gates, persist, route.

One loop, Flagger's ``advanceCanary`` in small: every ``interval`` it reads a snapshot of both
sides from the metrics provider, judges the window since the step began with the gates, folds
the verdict into the state machine, persists the new state *before* touching the data plane
(``pending`` marks an action not yet applied), then applies it through the router. On start it
finishes any pending action and re-applies the persisted weight, so a controller that was killed
resumes at the same step with the same analysis window.

One controller per rollout: :func:`drive` (and :meth:`Controller.run`) take the store's exclusive
ownership (``acquire``/``release``) for the controller's lifetime and renew it from a heartbeat thread;
operator commands (:func:`command`) do not need it. The record is a :class:`RolloutRecord`; every one
read from a store is checked by :func:`validate_record` (in the store, on the JSON) before anything acts
on it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from serving.contract.errors import MlrolloutError
from serving.rollout import cohorts, machine
from serving.rollout.gates import (
    Gate,
    GateResult,
    Verdict,
    evaluate_all,
    gates_to_config,
    live_gates,
    overall_verdict,
    shadow_gates,
)
from serving.rollout.machine import Action, Decision, Phase, RolloutSpec, RolloutState
from serving.rollout.metrics import MetricsError, MetricsProvider, Target, build_provider
from serving.rollout.record import RECORD_KIND, RecordError, RolloutRecord, validate_record  # noqa: F401 (callers use ctl.RecordError, ...)
from serving.rollout.routers import TrafficRouter, build_router
from serving.rollout.stats import Snapshot
from serving.rollout.store import CorruptRecord, OwnershipError, StateStore, StoreError

TIMELINE_LIMIT = 500
Labelled = Callable[[str], tuple[float, float]]  # version -> (correct, total), cumulative


class _Stale(Exception):
    """The persisted state changed under us (an operator command): drop this analysis."""


class Unreachable(MlrolloutError, RuntimeError):
    """The router and/or the metrics backend do not answer (checked before a rollout starts)."""


FORCE_HINT = "move it away, or pass --force to replace it"


def load_record(store: StateStore) -> RolloutRecord | None:
    """The store's record, validated by the store (None when there is none)."""
    return store.load()


def new_record(
    spec: RolloutSpec,
    gates: list[Gate],
    stable: Target,
    canary: Target,
    router_cfg: dict[str, Any],
    metrics_cfg: dict[str, Any],
) -> RolloutRecord:
    """A new rollout record; ValueError (:class:`RecordError`) for a record no controller could drive."""
    return RolloutRecord.from_dict(
        {
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
    )


def _choose(old: RolloutRecord | None, record: RolloutRecord, force: bool) -> tuple[RolloutRecord, bool]:
    """(the record to drive, resumed): keep the live rollout of the same versions, else ``record``."""
    if old is None or force:
        return record, False
    if old.state and not Phase(old.phase).terminal:
        same = old.stable["version"] == record.stable["version"] and (
            old.canary["version"] == record.canary["version"]
        )
        if not same:
            raise StoreError(
                f"a rollout of {old.canary['model']}:{old.canary['version']} is still "
                f"{old.phase}; abort it first (python -m serving.rollout abort) "
                "or pass --force"
            )
        return old, True
    return record, False


def plan(store: StateStore, record: RolloutRecord, force: bool = False) -> tuple[RolloutRecord, bool]:
    """What :func:`begin` would store, without writing: (record, resumed)."""
    try:
        return _choose(store.load(corrupt_ok=force), record, force)
    except CorruptRecord as e:
        raise e.hinted(FORCE_HINT) from None


def begin(store: StateStore, record: RolloutRecord, force: bool = False) -> tuple[RolloutRecord, bool]:
    """Store a new rollout, or keep the live one for the same versions (a restarted controller).

    A stored record that is corrupt is refused (StoreError naming the field) unless ``force``.
    Returns (record, resumed).
    """
    try:
        return store.update_with(lambda old: _choose(old, record, force), corrupt_ok=force)
    except CorruptRecord as e:
        raise e.hinted(FORCE_HINT) from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_reachable(
    record: RolloutRecord,
    *,
    router: TrafficRouter | None = None,
    provider: MetricsProvider | None = None,
    api: Any = None,
) -> tuple[TrafficRouter, MetricsProvider]:
    """Before a rollout starts: the router reads its weights and the metrics backend answers for both
    versions. Raises :class:`Unreachable` naming every part that failed (one line); writes nothing."""
    problems = []
    try:
        router = router or build_router(record.router, api)
        router.get_weights()
        if record.spec.get("shadow"):
            router.check_mirror()  # type: ignore[attr-defined] (the record says it is a MirroringRouter)
    except Exception as e:  # RouterError, OSError, kubernetes ApiException / ConfigException, ...
        problems.append(f"router {record.router.get('router')}: {_one_line(e)}")
    try:
        provider = provider or build_provider(record.metrics)
        for target in (record.stable_target, record.canary_target):
            provider.snapshot(target)
    except Exception as e:  # MetricsError, an unreachable scrape target, ...
        problems.append(f"metrics {record.metrics.get('provider')}: {_one_line(e)}")
    if problems:
        raise Unreachable("cannot start the rollout: " + "; ".join(problems))
    return router, provider


def new_holder() -> str:
    """A holder id unique to this controller: host, PID and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def drive(
    store: StateStore,
    record: RolloutRecord,
    *,
    force: bool = False,
    router: TrafficRouter | None = None,
    provider: MetricsProvider | None = None,
    api: Any = None,
    log: Callable[[str], None] = print,
    max_seconds: float | None = None,
    **controller_kw: Any,
) -> RolloutRecord:
    """Start (or resume) ``record`` and drive it to its end, as the rollout's only controller.

    In order, each step refusing with one clear error and writing nothing: take the store's ownership
    (:class:`OwnershipError` names the holder), check the stored record (a corrupt one needs ``force``),
    check that the router and the metrics backend answer (:class:`Unreachable`). Then store the record
    and run the loop; the ownership is released at the end, whatever happens.
    """
    holder = new_holder()
    store.acquire(holder, interval_s=float(record.spec["interval_s"]))
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


def _where(state: RolloutState, spec: RolloutSpec) -> str:
    return "shadow step" if state.shadow else f"step {state.step_index + 1}/{len(spec.steps)}"


def describe_decision(state: RolloutState, spec: RolloutSpec, d: Decision, now: float, note: str = "") -> str:
    """The decision's line (``note`` at its end, e.g. the cohort), then one line per gate's evidence."""
    head = f"[{_fmt_time(now)}] {_where(state, spec)}"
    if state.phase is Phase.VERIFYING:
        head = f"[{_fmt_time(now)}] watch {state.watch_passes + 1}/{spec.post_promotion_intervals}"
    verdict = d.verdict.value.upper() if d.verdict else ""
    line = machine.decision_line(d.action.value, d.reason)
    lines = [f"{head} {verdict} -> {line}".replace("  ", " ") + note]
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
        pre_start: Callable[[], str | None] | None = None,
        confirm: Callable[[], str | None] | None = None,
    ):
        rec = load_record(store)
        if rec is None:
            raise StoreError(
                f"no rollout in {store.where()}; start one with `python -m serving.rollout start`"
            )
        self.store = store
        self.spec = rec.rollout_spec
        self.gates = rec.gate_objects()
        self.stable, self.canary = rec.stable_target, rec.canary_target
        self.router = router or build_router(rec.router, api)
        self.provider = provider or build_provider(rec.metrics)
        self.labelled = labelled
        self.clock, self.sleep, self.log, self.poll_s = clock, sleep, log, poll_s
        self.holder = holder or new_holder()
        # renew the ownership at least every interval, and well inside its time to live (>= 30 s)
        self.heartbeat_s = heartbeat_s or min(self.spec.interval_s, 10.0)
        # webhooks (the operator's spec.webhooks): None = yes, else why not; called outside the store's
        # update, since they are HTTP calls
        self.pre_start, self.confirm = pre_start, confirm
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

    def _load(self) -> RolloutRecord:
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

    @property
    def watched(self) -> Target:
        """The new stable during the watch after promotion: the canary's version where the router's
        promotion left it answering (the stable side after a promotion by copy, whose /metrics the
        scrape provider then reads; Prometheus selects by version either way)."""
        side = self.stable if getattr(self.router, "promoted_side", "canary") == "stable" else self.canary
        return Target(self.canary.model, self.canary.version, side.metrics_url, dict(self.canary.extra))

    # ----------------------------------------------------------------- data plane
    def _execute(self, action: str | None, weight: int) -> None:
        if self.spec.shadow and action in (Action.SET_WEIGHT, Action.PROMOTE, Action.ROLLBACK):
            # a weight of 0 to set is the shadow step (steps are >= 1): weights first, then mirror; any
            # other action stops the mirror first, so no mirrored copy lands in a live window
            if action == Action.SET_WEIGHT and weight == 0:
                self.router.set_weights(100, 0)
                self.router.set_mirror(True)  # type: ignore[attr-defined]
                return
            self.router.set_mirror(False)  # type: ignore[attr-defined]
        if action == Action.SET_WEIGHT:
            self.router.set_weights(100 - weight, weight)
        elif action == Action.PROMOTE:
            self.router.promote()
        elif action == Action.ROLLBACK:
            self.router.rollback()
        elif action == Action.RESTORE:
            restore_previous(self.router, self._load())

    def _clear_pending(self) -> RolloutRecord:
        def fn(rec: RolloutRecord) -> RolloutRecord:
            rec.pending = None
            return rec

        return self.store.update(fn)

    def _reconcile(self, rec: RolloutRecord) -> None:
        """Finish a pending action and make the data plane match the persisted state."""
        st = rec.rollout_state
        if rec.pending:
            self._execute(rec.pending["action"], rec.pending["weight"])
            self._clear_pending()
        elif st.phase in (Phase.PROGRESSING, Phase.PAUSED):
            want = (100 - st.weight, st.weight)
            if self.spec.shadow and not st.shadow and self.router.get_mirror():  # type: ignore[attr-defined]
                self.router.set_mirror(False)  # type: ignore[attr-defined]
            if self.router.get_weights() != want:
                self.router.set_weights(*want)
            if st.shadow and not self.router.get_mirror():  # type: ignore[attr-defined]
                self.router.set_mirror(True)  # type: ignore[attr-defined]
        else:
            if self.spec.shadow and self.router.get_mirror():  # type: ignore[attr-defined]
                self.router.set_mirror(False)  # type: ignore[attr-defined]
            if st.phase in (Phase.ROLLED_BACK, Phase.ABORTED) and self.router.get_weights() != (100, 0):
                self.router.rollback()

    # ----------------------------------------------------------------- loop
    def _first_tick(self) -> RolloutRecord:
        now = self.clock()
        try:
            snaps = self.snapshots()
        except MetricsError:
            # nothing started: leave no stub record (state null) behind
            self.store.update(lambda rec: None if rec is not None and rec.state is None else rec)
            raise
        # the watch after promotion restores the previous model: record it before anything changes it
        previous = None
        if self.spec.post_promotion_intervals and hasattr(self.router, "previous_model"):
            previous = self.router.previous_model()
        refusal = self.pre_start() if self.pre_start else None
        if refusal is not None:
            state, d = machine.refuse(self.spec, now, refusal)
        else:
            state, d = machine.start(self.spec, now)

        def fn(rec: RolloutRecord) -> RolloutRecord:
            if rec.state is not None:
                raise _Stale
            rec.state = state.to_dict()
            rec.set_baselines(snaps, rollout=True)
            if self.spec.post_promotion_intervals:
                rec.watch = {"previous_model": previous, "baseline": None, "start": None}
            rec.pending = {"action": d.action.value, "weight": d.weight}
            return rec

        self.store.update(fn)
        if refusal is not None:
            what = f"{self.canary.model}:{self.canary.version}"
            self.log(f"[{_fmt_time(now)}] rollout of {what} refused: {refusal}")
            self._execute(d.action, d.weight)
            return self._clear_pending()
        self.log(
            f"[{_fmt_time(now)}] start rollout {self.canary.model}: "
            f"{self.stable.version} -> {self.canary.version}"
            f" steps {'shadow, ' if self.spec.shadow else ''}{list(self.spec.steps)}"
            f" every {self.spec.interval_s:g}s via {self.router.name}"
            f" + {self.provider.name}; canary weight {d.weight}%"
            + (" (mirrored)" if state.shadow else "")
            + cohorts.note(getattr(self.router, "cohort", None), d.weight)
        )
        self._execute(d.action, d.weight)
        return self._clear_pending()

    def _rebaseline(self) -> RolloutRecord:
        try:
            snaps = self.snapshots()
        except MetricsError:
            snaps = {"stable": Snapshot(), "canary": Snapshot()}  # judged as a reset: counts from zero

        def fn(rec: RolloutRecord) -> RolloutRecord:
            if rec.step_baseline is None:
                rec.set_baselines(snaps)
            return rec

        return self.store.update(fn)

    def _analysis(self, rec: RolloutRecord) -> RolloutRecord:
        now = self.clock()
        st = rec.rollout_state
        weight_before = st.weight
        try:
            snaps = self.snapshots()
        except MetricsError as e:
            snaps = None
            results: list[GateResult] = [
                GateResult("metrics", Verdict.INCONCLUSIVE, None, 0.0, ">=", 0, detail=str(e)[:300])
            ]
        if snaps is not None:
            base, ref = rec.step_baseline, rec.rollout_baseline
            win_c, win_s = snaps["canary"] - base["canary"], snaps["stable"] - base["stable"]
            # the shadow step: no label comes back for an answer nobody saw (gates.shadow_gates)
            judges = shadow_gates(self.gates) if st.shadow else live_gates(self.gates)
            results = evaluate_all(
                judges, win_c, win_s, snaps["stable"] - ref["stable"], snaps["canary"] - ref["canary"]
            )
        awaiting = None
        if (
            self.confirm is not None
            and st.step_index == len(self.spec.steps) - 1
            and not st.shadow  # a pass there advances to the first live weight, never promotes
            and overall_verdict(results) is Verdict.PASS
        ):
            awaiting = self.confirm()  # only a pass at the last step would promote: ask only then

        def fn(cur: RolloutRecord) -> tuple[RolloutRecord, Decision]:
            cs = cur.rollout_state
            if (
                cs.phase is not Phase.PROGRESSING
                or cs.analyses != st.analyses
                or cs.step_index != st.step_index
            ):
                raise _Stale
            new, d = machine.analyse(cs, self.spec, results, now, awaiting)
            cur.state = new.to_dict()
            if d.reset_window and snaps is not None:
                cur.set_baselines(snaps)
            if new.phase is Phase.VERIFYING and snaps is not None:
                # the watch's reference: the previous version's counters over the whole rollout (a fixed,
                # bounded snapshot, since that version stops taking traffic now)
                cur.watch = {
                    "previous_model": (cur.watch or {}).get("previous_model"),
                    "baseline": (snaps["stable"] - ref["stable"]).to_dict(),
                    "start": None,  # taken once the promotion is applied (_watch_start)
                }
            if d.action in (Action.SET_WEIGHT, Action.PROMOTE, Action.ROLLBACK):
                cur.pending = {"action": d.action.value, "weight": d.weight}
            requests = None if snaps is None else (win_s.total_requests, win_c.total_requests)
            # the shadow step: the canary's requests are mirrored copies, not a share of the users'
            _add_point(
                cur, now, weight_before, d, results, requests, **({"mirrored": True} if st.shadow else {})
            )
            return cur, d

        rec = self._commit(fn, st, now)
        if rec.rollout_state.phase is Phase.VERIFYING:
            rec = self._watch_start()
        return rec

    def _commit(self, fn: Callable, st: RolloutState, now: float) -> RolloutRecord:
        """Persist one analysis's decision (``fn`` under the store's update), log it, then apply it."""
        try:
            rec, d = self.store.update_with(fn)
        except _Stale:
            return self._load()
        cohort = getattr(self.router, "cohort", None) if d.action is Action.SET_WEIGHT else None
        self.log(describe_decision(st, self.spec, d, now, cohorts.note(cohort, d.weight)))
        if rec.pending:
            self._execute(d.action, d.weight)
            rec = self._clear_pending()
        return rec

    # ----------------------------------------------------------------- the watch after promotion
    def _watch_start(self) -> RolloutRecord:
        """Open the watch's window at the new stable's counters now (after the promotion is applied)."""
        try:
            snap = self._snap(self.watched)
        except MetricsError:
            snap = Snapshot()  # judged as a reset: counts from zero

        def fn(rec: RolloutRecord) -> RolloutRecord:
            if rec.watch is not None and rec.watch.get("start") is None:
                rec.watch = {**rec.watch, "start": snap.to_dict()}
            return rec

        return self.store.update(fn)

    def _verify(self, rec: RolloutRecord) -> RolloutRecord:
        """One interval of the watch: the new stable since promotion against the previous version's
        recorded baseline (the comparisons' "stable"); the absolute limits as in any analysis."""
        now = self.clock()
        st = rec.rollout_state
        watch = rec.watch or {}
        try:
            win = self._snap(self.watched) - Snapshot.from_dict(watch["start"])
            base = Snapshot.from_dict(watch["baseline"])
            results = evaluate_all(self.gates, win, base, base, win)
        except MetricsError as e:
            win = None
            results = [GateResult("metrics", Verdict.INCONCLUSIVE, None, 0.0, ">=", 0, detail=str(e)[:300])]

        def fn(cur: RolloutRecord) -> tuple[RolloutRecord, Decision]:
            cs = cur.rollout_state
            if cs.phase is not Phase.VERIFYING or cs.analyses != st.analyses:
                raise _Stale
            new, d = machine.verify(cs, self.spec, results, now)
            cur.state = new.to_dict()
            if d.action is Action.RESTORE:
                cur.pending = {"action": d.action.value, "weight": d.weight}
            # the new stable answers everything (the observed share is 100 %); the previous version's
            # recorded baseline is kept beside it, as what the interval was compared with
            requests = None if win is None else (0.0, win.total_requests)
            extra = {} if win is None else {"baseline_requests": base.total_requests}
            _add_point(cur, now, 100, d, results, requests, watch=True, **extra)
            return cur, d

        return self._commit(fn, st, now)

    def run(self, max_seconds: float | None = None, stop: Callable[[], bool] | None = None) -> RolloutRecord:
        """Drive the rollout until it is Promoted, RolledBack or Aborted (or ``stop``/``max_seconds``),
        as its only controller (:class:`OwnershipError` when another one holds it)."""
        with self.owning():
            return self._run(max_seconds, stop)

    def _run(self, max_seconds: float | None, stop: Callable[[], bool] | None) -> RolloutRecord:
        t_end = None if max_seconds is None else time.monotonic() + max_seconds
        rec = self._load()
        if rec.state is None:
            rec = self._first_tick()
        else:
            st = rec.rollout_state
            if not st.phase.terminal:
                self.log(
                    f"[{_fmt_time(self.clock())}] resume rollout {self.canary.model}:{self.canary.version} "
                    f"at {_where(st, self.spec)} (canary {st.weight}%, {st.phase.value}, "
                    f"{st.failed_checks} failed checks)"
                )
            self._reconcile(rec)
            rec = self._load()
        paused_logged = False
        while True:
            self._check_owner()
            st = rec.rollout_state
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
            elif st.phase is Phase.VERIFYING:
                paused_logged = False
                if (rec.watch or {}).get("start") is None:
                    rec = self._watch_start()  # a controller stopped between promotion and this
                    continue
                if self.clock() >= st.next_analysis_at:
                    rec = self._verify(rec)
                    continue
            elif rec.step_baseline is None:
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


def _add_point(
    rec: RolloutRecord,
    now: float,
    weight: int,
    d: Decision,
    results: list[GateResult],
    requests: tuple[float, float] | None,
    **extra: Any,
) -> None:
    """One analysis on the record's timeline (the report's and the operator metrics' source)."""
    point = {
        "t": now,
        "weight": weight,
        "verdict": d.verdict.value if d.verdict else None,
        "action": d.action.value,
        "new_weight": d.weight,
        "gates": {g.gate: g.to_dict()["value"] for g in results},
        "verdicts": {g.gate: g.verdict.value for g in results},
        **extra,
    }
    if requests is not None:
        point["requests"] = {"stable": requests[0], "canary": requests[1]}
    rec.timeline = [*rec.timeline, point][-TIMELINE_LIMIT:]


def restore_previous(router: TrafficRouter, rec: RolloutRecord) -> None:
    """The watch after promotion failed (or was aborted): the previous model back, all traffic on it."""
    restore = getattr(router, "restore", None)
    if restore is None:  # a router without the watch's support (record validation refuses such records)
        router.rollback()
        return
    restore((rec.watch or {}).get("previous_model"))


def command(
    store: StateStore,
    verb: str,
    *,
    router: TrafficRouter | None = None,
    api: Any = None,
    reason: str | None = None,
    clock: Callable[[], float] = time.time,
) -> RolloutRecord:
    """An operator command (pause, resume, promote, abort): persisted, then applied to the data plane."""
    now = clock()

    def fn(rec: RolloutRecord | None) -> tuple[RolloutRecord, Decision]:
        if rec is None or rec.state is None:
            raise StoreError(f"no running rollout in {store.where()}")
        st, spec = rec.rollout_state, rec.rollout_spec
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
        rec.state = new.to_dict()
        if d.reset_window and rec.baselines:
            rec.set_baselines(None)  # the running controller re-baselines on its next tick
        if d.action in (Action.PROMOTE, Action.ROLLBACK, Action.RESTORE):
            rec.pending = {"action": d.action.value, "weight": d.weight}
        return rec, d

    rec, d = store.update_with(fn)
    if d.action in (Action.PROMOTE, Action.ROLLBACK, Action.RESTORE):
        r = router or build_router(rec.router, api)
        if rec.rollout_spec.shadow:
            r.set_mirror(False)  # type: ignore[attr-defined] (a shadow step ends with the rollout)
        if d.action is Action.PROMOTE:
            r.promote()
        elif d.action is Action.RESTORE:
            restore_previous(r, rec)
        else:
            r.rollback()

        def clear(cur: RolloutRecord) -> RolloutRecord:
            cur.pending = None
            return cur

        rec = store.update(clear)
    return rec
