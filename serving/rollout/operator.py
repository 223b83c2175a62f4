"""The in-cluster rollout operator: ModelRollouts in, the existing controller driving each of them.

``python -m serving.rollout operator`` lists and watches ModelRollouts (the kubernetes client's
``watch.Watch`` on CustomObjectsApi; a 410 Gone or any broken stream relists, and the list is redone
every ``resync_s`` anyway) and, while this replica holds the Lease, runs one worker thread per rollout
(at most ``max_workers``), each doing what the CLI's ``start`` and the KFP steps do:

1. **What to roll out** (the only thing decided here, and it is reconciliation, not gating): nothing when
   the stored record's rollout of ``spec.model.version`` has ended, or when that version is already the
   stable one; else a new record (:func:`controller.new_record`) from the spec. The stable version is
   the one the last rollout ended with (the canary's after a promotion, the stable's after a rollback),
   or, before any, the chart's ``mlrollout.io/model-version`` annotation on ``<fullname>-stable``.
2. **Persist, then act**: the record goes into ``status.record`` (:class:`ModelRolloutStatusStore`)
   *before* the canary is deployed (:func:`gitops.deploy_canary`, as the KFP ``deploy_canary`` step;
   a record without a state means "deploy not known to be done", so a replica that takes over deploys
   again, which is idempotent).
3. **Drive** with :class:`controller.Controller`, unchanged: every decision is the state machine's, every
   write happens before the router call. The worker runs ``Controller.run`` for one analysis interval at a
   time; each run starts by reconciling the data plane with the persisted state
   (``Controller._reconcile``: the router's weights are read and set again when they differ), which is
   how a hand edit of the route is re-asserted within one interval without new decision logic here.

One replica acts: a ``coordination.k8s.io/v1`` Lease (:class:`LeaseElector`; the pinned kubernetes
client 30.1 has only a ConfigMap lock). A standby takes over once the leader's ``renewTime`` is older
than the lease duration and resumes from ``status.record`` at the same step. The status store also
refuses writes from a replica that is not leading (a fence for a leader that lost the Lease mid-write).

Every decision (start, step advanced, paused, promoted, rolled back, aborted) becomes a Kubernetes Event
on the ModelRollout with the gate evidence in its message, and the operator exports Prometheus metrics
(:class:`OperatorMetrics`) on ``--metrics-port``. Both are derived from what the store writes (the
record before and after), never from a second copy of the decision logic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from serving.contract.errors import MlrolloutError
from serving.rollout import cohorts, commands, crd, gitops, health, hooks, kube, notify
from serving.rollout import controller as ctl
from serving.rollout.crstore import ModelRolloutStatusStore
from serving.rollout.gates import DEFAULTS as GATE_DEFAULTS
from serving.rollout.gates import GateResult
from serving.rollout.gates import defaults as default_gates
from serving.rollout.hookhttp import HookClient, Sender
from serving.rollout.machine import InvalidTransition, Phase, RolloutSpec
from serving.rollout.metrics import MetricsProvider, Target, build_provider
from serving.rollout.routers import ROUTERS, TrafficRouter
from serving.rollout.store import OwnershipError

log = logging.getLogger("mlrollout.operator")

COMPONENT = "mlrollout-operator"
VERSION_ANNOTATION = "mlrollout.io/model-version"
# spec.strategy.gates (camelCase, the CRD) -> gates.defaults() names; driftGate is defaults(drift=...),
# compareWithStable is defaults(compare=...) (true unless the spec says false, as the CRD defaults it)
GATE_FIELDS = {
    "minSuccessRate": "min_success_rate",
    "maxP99Ms": "max_p99_ms",
    "minRequests": "min_requests",
    "maxDrift": "max_drift",
    "driftMethod": "drift_method",
    "driftBins": "drift_bins",
    "minPredictions": "min_predictions",
    "minAccuracy": "min_accuracy",
    "maxAccuracyDrop": "max_accuracy_drop",
    "minLabelled": "min_labelled",
    "alpha": "alpha",
    "maxErrorIncrease": "max_error_increase",
    "latencyMinEffect": "latency_min_effect",
    "driftMinEffect": "drift_min_effect",
    "accuracyMinEffect": "accuracy_min_effect",
}
assert set(GATE_FIELDS.values()) == set(GATE_DEFAULTS)
# history actions that are decisions (an Event each); "hold" is an analysis that changed nothing
EVENT_REASON = {
    "set_weight": "StepAdvanced",
    "pause": "Paused",
    "promote": "Promoted",
    "rollback": "RolledBack",
    "restore": "RolledBack",  # after promotion: the previous model restored
}


def parse_duration(text: str) -> float:
    from serving.rollout.cli import parse_duration as parse  # one parser for the CLI and the CRD's strings

    return parse(text)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --------------------------------------------------------------------------- the spec -> a record


class SpecError(MlrolloutError, ValueError):
    """A ModelRollout the operator cannot act on (the message says what to change)."""


def gates_from_spec(g: dict[str, Any]) -> list:
    over = {GATE_FIELDS[k]: v for k, v in (g or {}).items() if k in GATE_FIELDS}
    g = g or {}
    return default_gates(
        drift=bool(g.get("driftGate", True)), compare=bool(g.get("compareWithStable", True)), **over
    )


def rollout_spec(strategy: dict[str, Any]) -> RolloutSpec:
    d = RolloutSpec()
    return RolloutSpec(
        steps=tuple(strategy.get("steps") or d.steps),
        interval_s=parse_duration(strategy.get("interval") or "30s"),
        threshold=int(strategy.get("threshold", d.threshold)),
        max_inconclusive=int(strategy.get("maxInconclusive", d.max_inconclusive)),
        post_promotion_intervals=int(strategy.get("postPromotionIntervals", d.post_promotion_intervals)),
        shadow=bool((strategy.get("shadow") or {}).get("enabled", False)),
    )


def release_router(obj: dict[str, Any]) -> tuple[Any, str]:
    """(the router class, the release fullname) for the target: a release (gateway_api by default), or
    one InferenceService (kserve_knative by default, or kserve_canary; their ``for_release`` takes the
    InferenceService's name)."""
    spec = obj["spec"]
    target = spec.get("target") or {}
    isvc = (target.get("inferenceService") or {}).get("name")
    fullname = (target.get("release") or {}).get("fullname") or isvc
    if not fullname:
        raise SpecError("spec.target names neither a release nor an inferenceService")
    name = (spec.get("strategy") or {}).get("router") or ("kserve_knative" if isvc else "gateway_api")
    cls = ROUTERS.get(name)
    if cls is None or not hasattr(cls, "for_release"):
        raise SpecError(f"router {name!r} cannot drive a release")
    return cls, fullname


def metrics_config(obj: dict[str, Any], prometheus_url: str) -> tuple[dict[str, Any], tuple[str, str]]:
    """The record's metrics config and the (stable, canary) /metrics URLs (scrape) from spec.metrics."""
    m = obj["spec"].get("metrics") or {}
    if m.get("provider") == "scrape":
        return {"provider": "scrape"}, (m["stableMetricsUrl"], m["canaryMetricsUrl"])
    url = m.get("url") or prometheus_url
    if not url:
        raise SpecError("no Prometheus: set spec.metrics.url or start the operator with --prometheus-url")
    return {"provider": "prometheus", "url": url}, ("", "")


def build_record(
    obj: dict[str, Any], stable_version: str, prometheus_url: str, interval_floor_s: float = 0.0
) -> ctl.RolloutRecord:
    """The record the CLI's ``start`` would build for this ModelRollout (RecordError/ValueError if bad)."""
    spec = obj["spec"]
    ns = obj["metadata"]["namespace"]
    cls, fullname = release_router(obj)
    rs = rollout_spec(spec.get("strategy") or {})
    if rs.interval_s < interval_floor_s:
        rs = dataclasses.replace(rs, interval_s=interval_floor_s)
    gates = gates_from_spec((spec.get("strategy") or {}).get("gates") or {})
    model = spec["model"].get("name") or obj["metadata"]["name"]
    metrics, urls = metrics_config(obj, prometheus_url)
    extra = {"namespace": ns} if metrics["provider"] == "prometheus" else {}
    stable = Target(model, stable_version, urls[0], extra)
    canary = Target(model, spec["model"]["version"], urls[1], extra)
    release = cls.for_release(fullname, ns)
    return ctl.new_record(rs, gates, stable, canary, with_cohort(release.config, spec), metrics)


def with_cohort(router_cfg: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The router config with ``spec.strategy.cohort`` (cohorts.py), for the gateway_api router only."""
    try:
        cohort = cohorts.from_crd((spec.get("strategy") or {}).get("cohort"))
    except ValueError as e:
        raise SpecError(str(e)) from None
    if not cohort:
        return router_cfg
    if router_cfg.get("router") != "gateway_api":
        raise SpecError(f"spec.strategy.cohort needs the gateway_api router, not {router_cfg.get('router')}")
    return {**router_cfg, "cohort": cohort}


def stable_version_of(api: Any, obj: dict[str, Any], rec: ctl.RolloutRecord | None) -> str:
    """The version serving as stable: what the last rollout left there, else the chart's annotation."""
    if rec is not None and rec.state is not None:
        return rec.canary["version"] if rec.phase == Phase.PROMOTED.value else rec.stable["version"]
    cls, fullname = release_router(obj)
    ns = obj["metadata"]["namespace"]
    name = cls.for_release(fullname, ns).owner_isvc
    isvc = kube.get(api, kube.ISVC, ns, name)
    if isvc is None:
        raise SpecError(f"InferenceService {ns}/{name} does not exist (install the release)")
    # the chart's annotation, else (operator mode: the ISVCs carry no version) what initialization recorded
    version = (isvc["metadata"].get("annotations") or {}).get(VERSION_ANNOTATION)
    version = version or gitops.stable_version_fallback(obj, isvc)
    if not version:
        raise SpecError(f"{name} has no {VERSION_ANNOTATION} annotation (set model.version)")
    return version


def wanted(obj: dict[str, Any], rec: ctl.RolloutRecord | None, stable: str) -> bool:
    """Whether spec.model asks for a rollout that is not live or done: a version that is neither the
    stable one nor the subject of the stored rollout (a rolled-back version is not retried)."""
    desired = obj["spec"]["model"]["version"]
    if desired == stable:
        return False
    return rec is None or rec.canary["version"] != desired


# --------------------------------------------------------------------------- leader election


class LeaseElector:
    """A ``coordination.k8s.io/v1`` Lease: acquire when free or expired, renew every ``retry_s``.

    Every write is a replace carrying the read's resourceVersion (a 409 means another replica wrote
    first: not ours this round). ``leading`` is set while our last successful renew is younger than
    ``renew_deadline_s`` (2/3 of the lease), so a leader cut off from the API server stops acting before
    a standby may take over.
    """

    def __init__(self, api: Any, name: str, namespace: str, identity: str, lease_s: float = 15.0):
        from kubernetes import client

        self.coord = client.CoordinationV1Api(api.api_client)
        self.name, self.namespace, self.identity = name, namespace, identity
        self.lease_s = float(lease_s)
        self.retry_s = max(self.lease_s / 4, 0.2)
        self.renew_deadline_s = self.lease_s * 2 / 3
        self.leading = threading.Event()
        self._last_ok = 0.0

    def _body(self, lease: Any | None, transitions: int, acquired: dt.datetime) -> Any:
        from kubernetes import client

        spec = client.V1LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=max(1, round(self.lease_s)),
            acquire_time=acquired,
            renew_time=_now(),
            lease_transitions=transitions,
        )
        meta = client.V1ObjectMeta(name=self.name, namespace=self.namespace)
        if lease is not None:
            meta.resource_version = lease.metadata.resource_version
        return client.V1Lease(metadata=meta, spec=spec)

    def try_acquire_or_renew(self) -> bool:
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace)
        except Exception as e:
            if not kube.is_not_found(e):
                raise
            try:
                self.coord.create_namespaced_lease(self.namespace, self._body(None, 0, _now()))
            except Exception as e2:
                if kube.status_of(e2) == 409:
                    return False
                raise
            return True
        s = lease.spec
        if s.holder_identity == self.identity:
            body = self._body(lease, s.lease_transitions or 0, s.acquire_time or _now())
        else:
            renewed = s.renew_time or s.acquire_time
            duration = s.lease_duration_seconds or self.lease_s
            if s.holder_identity and renewed and (_now() - renewed).total_seconds() < duration:
                return False  # held and fresh
            body = self._body(lease, (s.lease_transitions or 0) + 1, _now())
        try:
            self.coord.replace_namespaced_lease(self.name, self.namespace, body)
        except Exception as e:
            if kube.is_conflict(e):
                return False
            raise
        return True

    def holder(self) -> str | None:
        try:
            return self.coord.read_namespaced_lease(self.name, self.namespace).spec.holder_identity
        except Exception:
            return None

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                ok = self.try_acquire_or_renew()
            except Exception as e:  # the API server is unreachable: count it as a failed renew
                log.warning("lease %s/%s: %s", self.namespace, self.name, e)
                ok = False
            if ok:
                self._last_ok = time.monotonic()
                if not self.leading.is_set():
                    log.info("%s leads (lease %s/%s)", self.identity, self.namespace, self.name)
                self.leading.set()
            elif self.leading.is_set() and time.monotonic() - self._last_ok > self.renew_deadline_s:
                log.warning("%s lost the lease %s/%s", self.identity, self.namespace, self.name)
                self.leading.clear()
            elif self.leading.is_set() and not ok and self.holder() not in (None, self.identity):
                self.leading.clear()
            stop.wait(self.retry_s)
        self.release()

    def release(self) -> None:
        """Give the Lease up on a clean exit (so a standby need not wait for it to expire)."""
        was = self.leading.is_set()
        self.leading.clear()
        if not was:
            return
        with contextlib.suppress(Exception):
            lease = self.coord.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                self.coord.replace_namespaced_lease(self.name, self.namespace, lease)


# --------------------------------------------------------------------------- Events and metrics


class OperatorMetrics:
    """The operator's own Prometheus metrics, in a registry of their own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.phase = Gauge(
            "mlrollout_operator_rollout_phase",
            "1 for the rollout's current phase, 0 for the others",
            ["namespace", "name", "phase"],
            registry=self.registry,
        )
        self.weight = Gauge(
            "mlrollout_operator_canary_weight",
            "percent of traffic on the canary (the persisted state)",
            ["namespace", "name"],
            registry=self.registry,
        )
        self.gate = Gauge(
            "mlrollout_operator_gate_value",
            "the last analysis's value of each gate",
            ["namespace", "name", "gate"],
            registry=self.registry,
        )
        self.analyses = Counter(
            "mlrollout_operator_analyses",
            "analyses by verdict",
            ["namespace", "name", "verdict"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "mlrollout_operator_rollout_duration_seconds",
            "from the rollout's record to its end (Promoted, RolledBack, Aborted)",
            ["namespace", "phase"],
            buckets=(10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400),
            registry=self.registry,
        )

    def observe(self, ns: str, name: str, old: ctl.RolloutRecord | None, new: ctl.RolloutRecord) -> None:
        if new.state is None:
            return
        st = new.rollout_state
        for p in Phase:
            self.phase.labels(ns, name, p.value).set(1 if p is st.phase else 0)
        self.weight.labels(ns, name).set(st.weight)
        old_t = old.timeline[-1]["t"] if old is not None and old.timeline else None
        fresh = [p for p in new.timeline if old_t is None or p["t"] > old_t]
        if old is not None and old.created_at != new.created_at:
            fresh = list(new.timeline)
        for point in fresh:
            if point.get("verdict"):
                self.analyses.labels(ns, name, point["verdict"]).inc()
            for gate, value in (point.get("gates") or {}).items():
                if value is not None:
                    self.gate.labels(ns, name, gate).set(value)
        was_terminal = old is not None and old.state is not None and Phase(old.phase).terminal
        if st.phase.terminal and not (was_terminal and old.created_at == new.created_at):
            self.duration.labels(ns, st.phase.value).observe(max(time.time() - new.created_at, 0.0))


def new_decisions(old: ctl.RolloutRecord | None, new: ctl.RolloutRecord) -> list[dict[str, Any]]:
    """The history entries ``new`` has that ``old`` (the same rollout) had not."""
    hist = (new.state or {}).get("history", [])
    if old is None or old.state is None or old.created_at != new.created_at:
        return list(hist)
    old_hist = old.state.get("history", [])
    last = old_hist[-1]["t"] if old_hist else None
    return [h for h in hist if last is None or h["t"] > last]


def event_for(h: dict[str, Any], rec: ctl.RolloutRecord) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Event for history entry ``h``, or None for a hold."""
    if h["event"] == "start":
        reason = "Started"
    elif h["event"] == "resume":
        reason = "Resumed"
    elif h["action"] in ("rollback", "restore") and h.get("phase") == Phase.ABORTED.value:
        reason = "Aborted"
    elif h["action"] == "promote" and h.get("phase") == Phase.VERIFYING.value:
        reason = "Verifying"  # promoted, the watch after promotion begins
    elif h["event"] in ("watch", "promote") and h.get("phase") == Phase.PROMOTED.value:
        reason = "Promoted"  # the watch after promotion passed (or an operator ended it)
    else:
        reason = EVENT_REASON.get(h["action"])
    if reason is None:
        return None
    steps = rec.spec["steps"]
    head = (
        f"{rec.canary['model']} {rec.stable['version']} -> {rec.canary['version']}: "
        f"step {h['step_index'] + 1}/{len(steps)}, canary {h['weight']}%: {h['reason']}"
    )
    evidence = "; ".join(GateResult.from_dict(g).summary() for g in h.get("evidence") or [])
    msg = head + (f" | evidence: {evidence}" if evidence else "")
    typ = "Warning" if reason in ("RolledBack", "Paused", "Aborted") else "Normal"
    return typ, reason, msg[:1024]


# --------------------------------------------------------------------------- the operator


@dataclass
class Settings:
    namespace: str | None = None  # None: every namespace
    prometheus_url: str = ""
    interval_floor_s: float = 0.0
    lease_name: str = COMPONENT
    lease_namespace: str = "default"
    identity: str = field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}")
    lease_s: float = 15.0
    metrics_port: int | None = None
    max_workers: int = 32
    resync_s: float = 30.0
    watch_timeout_s: int = 30
    deploy_timeout_s: float = 600.0
    poll_s: float = 0.25
    notify_urls: tuple[str, ...] = ()  # generic JSON notifications (notify.generic)
    notify_slack_urls: tuple[str, ...] = ()  # Slack-compatible ones (notify.slack)
    notify_timeout_s: float = 10.0


class Operator:
    """List/watch ModelRollouts; while leading, one worker thread per rollout drives the controller."""

    def __init__(self, api: Any, settings: Settings, provider: MetricsProvider | None = None):
        self.api, self.s = api, settings
        self.core = kube.core_api(api)
        self.provider = provider  # tests may inject one (scripted metrics); else from each record
        self.elector = LeaseElector(api, settings.lease_name, settings.lease_namespace, settings.identity,
                                    settings.lease_s)  # fmt: skip
        self.metrics = OperatorMetrics()
        self.stop = threading.Event()
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.workers: dict[tuple[str, str], threading.Thread] = {}
        self.cancel: dict[tuple[str, str], threading.Event] = {}
        self._lock = threading.Lock()
        self._kick = threading.Event()
        # webhooks and notifications (hooks.py, notify.py); acked: the command id each rollout's worker
        # acknowledged last, which the watch cache may not show yet
        self.hook_client = HookClient()
        self.sender = Sender(self.hook_client)
        self.acked: dict[tuple[str, str], str] = {}

    # ------------------------------------------------------------------ running
    def run(self) -> None:
        threads = [
            threading.Thread(target=self.elector.run, args=(self.stop,), name="lease", daemon=True),
            threading.Thread(target=self._watch_loop, name="watch", daemon=True),
        ]
        if self.s.metrics_port is not None:
            health.serve(self.s.metrics_port, self.metrics.registry, lambda: self.problem(threads))
        for t in threads:
            t.start()
        was_leading = False
        last_sync = 0.0
        try:
            while not self.stop.is_set():
                leading = self.elector.leading.is_set()
                if leading and (not was_leading or self._kick.is_set() or
                                time.monotonic() - last_sync > self.s.resync_s):  # fmt: skip
                    self._kick.clear()
                    last_sync = time.monotonic()
                    for key in list(self.objects):
                        self._dispatch(key)
                was_leading = leading
                self._kick.wait(0.5)
        finally:
            self.stop.set()
            for ev in list(self.cancel.values()):
                ev.set()
            for t in list(self.workers.values()):
                t.join(timeout=10)
            threads[0].join(timeout=5)
            self.sender.close()

    def problem(self, threads: list[threading.Thread]) -> str | None:
        """What /healthz reports: None while the lease and watch threads run (leading or not)."""
        dead = [t.name for t in threads if t.ident is not None and not t.is_alive()]
        return f"thread(s) {', '.join(dead)} stopped" if dead else None

    def shutdown(self) -> None:
        self.stop.set()
        self._kick.set()

    # ------------------------------------------------------------------ list/watch
    def _list(self, **kw):
        g, v, p = crd.MODELROLLOUT
        custom = self.api
        if self.s.namespace:
            return custom.list_namespaced_custom_object(g, v, self.s.namespace, p, **kw)
        return custom.list_cluster_custom_object(g, v, p, **kw)

    def _list_fn(self):
        g, v, p = crd.MODELROLLOUT
        if self.s.namespace:
            return self.api.list_namespaced_custom_object, (g, v, self.s.namespace, p)
        return self.api.list_cluster_custom_object, (g, v, p)

    def _seen(self, typ: str, obj: dict[str, Any]) -> None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        with self._lock:
            if typ == "DELETED":
                self.objects.pop(key, None)
                ev = self.cancel.get(key)
                if ev:
                    ev.set()
                return
            old = self.objects.get(key)
            self.objects[key] = obj
        # our own status writes come back as MODIFIED events: only a spec change (generation) or a new
        # command (annotations) wakes a worker; the resync covers the rest
        if (
            old is None
            or old["metadata"].get("generation") != obj["metadata"].get("generation")
            or commands.requested(old) != commands.requested(obj)
        ):
            self._kick.set()

    def _watch_loop(self) -> None:
        from kubernetes import watch

        while not self.stop.is_set():
            try:
                lst = self._list()
                with self._lock:
                    fresh = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in lst["items"]}
                    for key in set(self.objects) - set(fresh):
                        if key in self.cancel:
                            self.cancel[key].set()
                    self.objects = fresh
                self._kick.set()
                rv = lst["metadata"]["resourceVersion"]
                fn, args = self._list_fn()
                while not self.stop.is_set():
                    w = watch.Watch()
                    for ev in w.stream(
                        fn, *args, resource_version=rv, timeout_seconds=self.s.watch_timeout_s
                    ):
                        obj = ev["object"]
                        if ev["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            rv = obj["metadata"]["resourceVersion"]
                            self._seen(ev["type"], obj)
                        if self.stop.is_set():
                            w.stop()
                            break
            except Exception as e:  # 410 Gone (too old a resourceVersion), a dropped stream: relist
                if kube.status_of(e) != 410:
                    log.warning("watch of ModelRollouts: %s; relisting", " ".join(str(e).split())[:300])
                    self.stop.wait(1.0)

    # ------------------------------------------------------------------ workers
    def _leading(self, key: tuple[str, str]) -> bool:
        ev = self.cancel.get(key)
        return self.elector.leading.is_set() and not self.stop.is_set() and not (ev and ev.is_set())

    def _dispatch(self, key: tuple[str, str]) -> None:
        with self._lock:
            t = self.workers.get(key)
            if t is not None and t.is_alive():
                return
            if sum(1 for w in self.workers.values() if w.is_alive()) >= self.s.max_workers:
                return  # bounded: the next resync starts it
            self.cancel[key] = threading.Event()
            t = threading.Thread(
                target=self._work, args=(key,), name=f"rollout-{key[0]}/{key[1]}", daemon=True
            )
            self.workers[key] = t
            t.start()

    def _on_write(self, key: tuple[str, str]):
        def fn(old, new, obj) -> None:
            self.metrics.observe(key[0], key[1], old, new)
            decisions = new_decisions(old, new)
            for h in decisions:
                ev = event_for(h, new)
                if ev:
                    self.event(obj, *ev)
            self._announce(key, old, new, obj, decisions)

        return fn

    def _announce(self, key, old, new, obj, decisions) -> None:
        """Fire and forget: the post-rollout/rollback webhooks once an end is applied, and the
        notifications (notify.events) of this write."""
        ns, name = key
        now = time.time()
        if hooks.finished(old, new):
            spec_hooks = hooks.webhooks_of(obj["spec"])
            for typ in hooks.after_end(new.phase):
                for h in hooks.of_type(spec_hooks, typ):
                    body = hooks.payload(ns, name, new, typ, now)
                    self.sender.submit(f"{typ} webhook {h.name}", h.url, body, h.timeout_s)
        for event in notify.events(old, new, decisions):
            note = notify.generic(ns, name, new, event, now)
            for url in self.s.notify_urls:
                self.sender.submit(f"notification {event}", url, note, self.s.notify_timeout_s)
            for url in self.s.notify_slack_urls:
                msg = notify.slack(note)
                self.sender.submit(f"Slack notification {event}", url, msg, self.s.notify_timeout_s)

    def _command(self, key: tuple[str, str], store: ModelRolloutStatusStore) -> None:
        """Apply the ModelRollout's pending operator command (commands.py) once, through the state
        machine (controller.command), and acknowledge it in status.lastCommand in the same write."""
        obj = store.get()
        cmd = commands.pending(obj, self.acked.get(key))
        if cmd is None or not self._leading(key):
            return
        now = time.time()
        rec = store.load()
        why = commands.refusal(cmd.verb, {}) if cmd.verb not in commands.VERBS else None
        if why is None and (rec is None or rec.state is None):
            why = f"cannot {cmd.verb}: the rollout has not started yet"
        if why is None:
            reason = commands.machine_reason(cmd)
            store.status_extra = commands.ack(cmd, commands.APPLIED, reason, now)
            try:
                ctl.command(store, cmd.verb, api=self.api, reason=reason)
            except InvalidTransition as e:
                why = str(e)
            finally:
                store.status_extra = {}
        if why is not None:
            self._status_patch(obj, commands.ack(cmd, commands.REJECTED, why, now))
            self.event(obj, "Warning", "CommandRejected", f"{cmd.verb} (command {cmd.id[:12]}): {why}")
        self.acked[key] = cmd.id

    def event(self, obj: dict[str, Any], typ: str, reason: str, message: str) -> None:
        """A core/v1 Event on the ModelRollout (best effort: an Event never stops a rollout)."""
        meta = obj["metadata"]
        now = _now()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": crd.API_VERSION,
                "kind": crd.KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message,
            "type": typ,
            "source": {"component": COMPONENT, "host": socket.gethostname()},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.s.identity,
            "firstTimestamp": now.isoformat(),
            "lastTimestamp": now.isoformat(),
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], body)
        except Exception as e:
            log.warning("event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], e)
        log.info("%s/%s %s: %s", meta["namespace"], meta["name"], reason, message)

    def _work(self, key: tuple[str, str]) -> None:
        ns, name = key
        try:
            self._drive(key)
        except OwnershipError as e:
            log.info("%s/%s: stopped (%s)", ns, name, e)
        except Exception as e:  # one rollout's failure never stops the others; the resync retries it
            log.warning("%s/%s: %s", ns, name, " ".join(str(e).split())[:500])
            obj = self.objects.get(key)
            if obj is not None and self._leading(key):
                self.event(obj, "Warning", "ReconcileError", " ".join(str(e).split())[:1000])

    def _drive(self, key: tuple[str, str]) -> None:
        ns, name = key
        obj = self.objects.get(key)
        if obj is None or not self._leading(key):
            return
        store = ModelRolloutStatusStore(
            name, ns, self.api, is_leader=lambda: self._leading(key), on_write=self._on_write(key)
        )
        self._command(key, store)
        rec = store.load()
        try:
            release_router(obj)
        except SpecError as e:
            if (obj.get("status") or {}).get("message") != str(e):
                self._status_message(obj, str(e))
            return
        cls, fullname = release_router(obj)
        release = cls.for_release(fullname, ns)
        # GitOps (gitops.py): a first install gets the desired model as stable directly; the route's
        # rules follow the chart's template (operator mode), with the live weights
        if rec is None or rec.state is None or Phase(rec.phase).terminal:
            if msg := gitops.initialize(self.api, obj, release):
                self.event(obj, "Normal", "Initialized", msg)
                return
            gitops.ensure_route(self.api, release)
        stable = stable_version_of(self.api, obj, rec)
        if rec is None or rec.state is None or Phase(rec.phase).terminal:
            if not wanted(obj, rec, stable) and not (rec is not None and rec.state is None):
                gitops.observe(self.api, obj)  # seen, nothing to do (Argo CD's health check reads it)
                return
            if rec is None or rec.state is not None:
                record = build_record(obj, stable, self.s.prometheus_url, self.s.interval_floor_s)
                # persist first: a record without a state means "the canary deploy may not be done"
                rec = store.update(lambda _old: record)
                log.info("%s/%s: new rollout %s -> %s", ns, name, record.stable["version"],
                         record.canary["version"])  # fmt: skip
        router: TrafficRouter = cls.from_config(rec.router, api=self.api)
        if rec.state is None:
            if not self._leading(key):
                return
            gitops.deploy_canary(
                self.api, namespace=ns, fullname=fullname, release=release,
                storage_uri=obj["spec"]["model"]["storageUri"], version=rec.canary["version"],
                ready_timeout_s=self.s.deploy_timeout_s, poll_s=1.0,
            )  # fmt: skip
        provider = self.provider or build_provider(rec.metrics)
        interval = float(rec.spec["interval_s"])
        holder = f"{self.s.identity}:{uuid.uuid4().hex[:6]}"
        while self._leading(key):
            c = ctl.Controller(
                store, router=router, provider=provider, log=self._log(key), holder=holder,
                poll_s=min(self.s.poll_s, interval / 4), heartbeat_s=max(min(interval, 5.0), 0.5),
                **self._gates(key, store),
            )  # fmt: skip
            # one interval at a time: each run() first reconciles the route with the persisted state;
            # a new operator command ends the run at once, to be applied between runs
            until = time.monotonic() + interval
            rec = c.run(stop=lambda until=until: self._stop_run(key, until))
            if self._new_command(key):
                self._command(key, store)
                rec = store.load() or rec
            if Phase(rec.phase).terminal:
                return

    def _new_command(self, key: tuple[str, str]) -> bool:
        return commands.pending(self.objects.get(key), self.acked.get(key)) is not None

    def _stop_run(self, key: tuple[str, str], until: float) -> bool:
        return not self._leading(key) or time.monotonic() >= until or self._new_command(key)

    def _gates(self, key: tuple[str, str], store: ModelRolloutStatusStore) -> dict[str, Any]:
        """The Controller's pre_start/confirm callbacks for the spec's pre-rollout and confirm-promotion
        webhooks (read again every interval: removing a webhook from the spec takes effect)."""
        obj = self.objects.get(key)
        spec_hooks = hooks.webhooks_of(obj["spec"]) if obj is not None else []
        out: dict[str, Any] = {}
        for typ, arg in (("pre-rollout", "pre_start"), ("confirm-promotion", "confirm")):
            gate = hooks.of_type(spec_hooks, typ)
            if gate:
                out[arg] = lambda gate=gate, typ=typ: self.hook_client.ask(
                    gate, hooks.payload(key[0], key[1], store.load(), typ, time.time())
                )
        return out

    def _status_patch(self, obj: dict[str, Any], status: dict[str, Any]) -> None:
        g, v, p = crd.MODELROLLOUT
        meta = obj["metadata"]
        self.api.patch_namespaced_custom_object_status(
            g, v, meta["namespace"], p, meta["name"], {"status": status}, field_manager=kube.FIELD_MANAGER
        )

    def _status_message(self, obj: dict[str, Any], message: str) -> None:
        g, v, p = crd.MODELROLLOUT
        meta = obj["metadata"]
        with contextlib.suppress(Exception):
            self.api.patch_namespaced_custom_object_status(
                g, v, meta["namespace"], p, meta["name"],
                {"status": {"message": message, "observedGeneration": meta.get("generation", 0)}},
                field_manager=kube.FIELD_MANAGER,
            )  # fmt: skip

    def _log(self, key: tuple[str, str]):
        def fn(msg: str) -> None:
            # Controller.run logs "resume ..." on each re-entry (every interval here): keep it quiet
            level = logging.DEBUG if "] resume rollout" in msg else logging.INFO
            log.log(level, "%s/%s %s", key[0], key[1], msg)

        return fn


def main(args: Any) -> int:
    """``python -m serving.rollout operator`` (cli.py builds ``args``)."""
    import signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        api = kube.custom_api(args.kubeconfig)
    except Exception as e:  # kubernetes ConfigException: no in-cluster config and no kubeconfig
        raise kube.KubeError(f"cannot reach the API server: {' '.join(str(e).split())}") from None
    s = Settings(
        namespace=args.namespace,
        prometheus_url=args.prometheus_url or "",
        interval_floor_s=args.interval_floor or 0.0,
        lease_name=args.lease_name,
        lease_namespace=args.lease_namespace,
        identity=args.identity or Settings().identity,
        lease_s=args.lease_duration,
        metrics_port=args.metrics_port,
        max_workers=args.max_workers,
        resync_s=args.resync,
        notify_urls=tuple(args.notify_url or ()),
        notify_slack_urls=tuple(args.notify_slack_url or ()),
    )
    op = Operator(api, s)
    signal.signal(signal.SIGTERM, lambda *_: op.shutdown())
    try:
        op.run()
    except KeyboardInterrupt:
        op.shutdown()
    return 0
