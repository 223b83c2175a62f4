"""The imperative shell around the pure state machine: read metrics, run gates, persist, route.

One loop, Flagger's ``advanceCanary`` in small: every ``interval`` it reads a snapshot of both
sides from the metrics provider, judges the window since the step began with the gates, folds
the verdict into the state machine, persists the new state *before* touching the data plane
(``pending`` marks an action not yet applied), then applies it through the router. On start it
finishes any pending action and re-applies the persisted weight, so a controller that was killed
resumes at the same step with the same analysis window.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from serving.rollout import machine
from serving.rollout.gates import Gate, GateResult, Verdict, evaluate_all, gates_from_config, gates_to_config
from serving.rollout.machine import Action, Decision, Phase, RolloutSpec, RolloutState
from serving.rollout.metrics import MetricsError, MetricsProvider, PrometheusProvider, ScrapeProvider, Target
from serving.rollout.routers import TrafficRouter, build_router
from serving.rollout.stats import Snapshot
from serving.rollout.store import StateStore, StoreError

RECORD_KIND = "mlrollout.io/v1alpha1 RolloutRecord"
TIMELINE_LIMIT = 500
Labelled = Callable[[str], tuple[float, float]]  # version -> (correct, total), cumulative


class _Stale(Exception):
    """The persisted state changed under us (an operator command): drop this analysis."""


def build_provider(cfg: dict[str, Any]) -> MetricsProvider:
    if cfg["provider"] == "prometheus":
        return PrometheusProvider(cfg["url"])
    if cfg["provider"] == "scrape":
        return ScrapeProvider()
    raise ValueError(f"unknown metrics provider {cfg['provider']!r}; choose prometheus or scrape")


def new_record(
    spec: RolloutSpec,
    gates: list[Gate],
    stable: Target,
    canary: Target,
    router_cfg: dict[str, Any],
    metrics_cfg: dict[str, Any],
) -> dict[str, Any]:
    return {
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


def begin(store: StateStore, record: dict[str, Any], force: bool = False) -> tuple[dict[str, Any], bool]:
    """Store a new rollout, or keep the live one for the same versions (a restarted controller).

    Returns (record, resumed).
    """
    resumed = False

    def fn(old: dict[str, Any] | None) -> dict[str, Any]:
        nonlocal resumed
        if old and old.get("state") and not Phase(old["state"]["phase"]).terminal and not force:
            same = old["stable"]["version"] == record["stable"]["version"] and (
                old["canary"]["version"] == record["canary"]["version"]
            )
            if not same:
                raise StoreError(
                    f"a rollout of {old['canary']['model']}:{old['canary']['version']} is still "
                    f"{old['state']['phase']}; abort it first (python -m serving.rollout abort) "
                    "or pass --force"
                )
            resumed = True
            return old
        return record

    return store.update(fn), resumed


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
    ):
        rec = store.load()
        if rec is None:
            raise StoreError(
                f"no rollout in {store.describe()}; start one with `python -m serving.rollout start`"
            )
        self.store = store
        self.spec = RolloutSpec.from_dict(rec["spec"])
        self.gates = gates_from_config(rec["gates"])
        self.stable, self.canary = Target.from_dict(rec["stable"]), Target.from_dict(rec["canary"])
        self.router = router or build_router(rec["router"], api)
        self.provider = provider or build_provider(rec["metrics"])
        self.labelled = labelled
        self.clock, self.sleep, self.log, self.poll_s = clock, sleep, log, poll_s

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
        snaps = self.snapshots()
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
            return self.store.load()
        d = decision[0]
        self.log(describe_decision(st, self.spec, d, now))
        if rec.get("pending"):
            self._execute(d.action, d.weight)
            rec = self._clear_pending()
        return rec

    def run(self, max_seconds: float | None = None, stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Drive the rollout until it is Promoted, RolledBack or Aborted (or ``stop``/``max_seconds``)."""
        t_end = None if max_seconds is None else time.monotonic() + max_seconds
        rec = self.store.load()
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
            rec = self.store.load()
        paused_logged = False
        while True:
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
            rec = self.store.load()


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
        if rec is None or rec.get("state") is None:
            raise StoreError(f"no running rollout in {store.describe()}")
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
