"""``kserve_canary``: KServe's Standard-mode ``spec.canary`` on one InferenceService (KServe >= 0.20).

What the pinned KServe 0.20.0 does with it (pkg/apis/serving/v1beta1/inference_service.go ``CanarySpec``,
inference_service_validation.go ``validateCanarySpecs``, controller components/predictor.go
``reconcileCanaryDeployments``):

* ``spec.canary`` is an atomic list of ``{predictor: <PredictorSpec, name required>, trafficPercent:
  0..100}``. Each entry gets its own Deployment and Service ``<isvc>-<name>-predictor``, built from the
  stable predictor with the entry's fields laid over it.
* ``trafficPercent`` sizes the canary: ``ceil(stable minReplicas x percent / 100)`` replicas (or the
  entry's own ``minReplicas``), and the stable Deployment gives up as many. KServe 0.20.0 splits
  *replicas*, not requests: the ingress it writes and the stable Service reach the stable pods only (the
  weighted HTTPRoute split came after the 0.20.0 tag). So at 0 % the canary runs no pod at all.
* The status reports ``status.canaryStatuses[] {name, ready, trafficPercent}`` and the condition
  ``CanaryPredictorReady``; ``get_weights`` reads the entry's status when KServe has reconciled it.
* Promotion, KServe's way: ``spec.predictor.name`` takes the canary's name, the stable predictor takes
  the entry's fields, and the entry goes; the canary's Deployment becomes the stable one without a
  restart and KServe deletes the old one. Rollback: the entry goes (its Deployment and Service with it).
* The webhook refuses ``spec.canary`` outside Standard mode, a missing or duplicated ``predictor.name``,
  one equal to the stable predictor's, percentages outside 0..100 or summing above 100, and canary
  autoscaling fields. The CRD schema alone checks only the 0..100 range.

With ``route`` (an HTTPRoute whose rule points at the InferenceService's predictor Service, as the
chart's ``rolling`` strategy renders) the router also splits requests: that rule's backendRefs become the
stable and the canary Service with the step's weights, moved only onto pods that serve.

Writes carry the read's ``resourceVersion`` (the lists are atomic: we write them whole) under our field
manager, retried on a 409.
"""

from __future__ import annotations

import argparse
import copy
import re
import time
from typing import Any

from serving.rollout import kube, targets
from serving.rollout.routers.base import Release, RouterError, check_k8s_names, check_weights, require_flags

# a canary entry's name becomes part of two object names: a DNS label, kept short
CANARY_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?")
PROMOTIONS = ("rename", "copy")


def canary_name_for(version: str) -> str:
    """The entry name for a model version (``1.1.0`` -> ``v1-1-0``): one per version, so the next rollout's
    canary never clashes with the name the stable predictor took at the last promotion."""
    name = "v" + re.sub(r"[^a-z0-9]+", "-", version.lower()).strip("-")
    return name[:40].rstrip("-")


def find_entry(obj: dict[str, Any], canary: str) -> int | None:
    """Index of the ``spec.canary`` entry named ``canary`` ("": the only entry), None when there is none.
    RouterError when "" is ambiguous (several entries)."""
    entries = obj.get("spec", {}).get("canary") or []
    if not canary:
        if len(entries) > 1:
            names = [e.get("predictor", {}).get("name") for e in entries]
            raise RouterError(f"spec.canary has {len(entries)} entries {names}; name one with --canary-name")
        return 0 if entries else None
    for i, e in enumerate(entries):
        if e.get("predictor", {}).get("name") == canary:
            return i
    return None


def weight_body(obj: dict[str, Any], index: int, percent: int) -> dict[str, Any]:
    """The merge patch that sets entry ``index``'s ``trafficPercent`` (the whole atomic list, with the
    read's resourceVersion)."""
    entries = copy.deepcopy(obj["spec"]["canary"])
    entries[index]["trafficPercent"] = int(percent)
    return {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}, "spec": {"canary": entries}}


def promote_body(obj: dict[str, Any], index: int, promotion: str = "rename") -> dict[str, Any]:
    """The merge patch of a promotion: the entry's predictor laid over the stable one (a merge patch
    merges maps key by key, as KServe's ``mergo.WithOverride`` does) and the entry leaves the list (null
    when it was the last).

    ``rename`` (KServe's way, no restart): the stable predictor also takes the entry's name, so the
    canary's Deployment and Service become the stable ones and the old ``<isvc>[-<name>]-predictor`` go.
    ``copy``: the stable predictor keeps its name (its Deployment rolls to the canary's model, its
    Service stays), for whatever addresses that Service by name (the chart's HTTPRoute). The chart's PDB
    and NetworkPolicy select pod labels, which the canary's pods share (KServe lays the entry over the
    stable predictor, labels included), so either promotion keeps them."""
    if promotion not in PROMOTIONS:
        raise ValueError(f"promotion must be one of {PROMOTIONS}, got {promotion!r}")
    entries = copy.deepcopy(obj["spec"]["canary"])
    predictor = entries.pop(index)["predictor"]
    # minReplicas on an entry is the canary's fixed size, not the stable predictor's
    predictor.pop("minReplicas", None)
    if promotion == "copy":
        predictor.pop("name", None)
    return {
        "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
        "spec": {"predictor": predictor, "canary": entries or None},
    }


def remove_body(obj: dict[str, Any], index: int) -> dict[str, Any]:
    """The merge patch of a rollback: the entry leaves the list; KServe deletes its Deployment and
    Service and gives the stable Deployment its replicas back."""
    entries = copy.deepcopy(obj["spec"]["canary"])
    entries.pop(index)
    return {
        "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
        "spec": {"canary": entries or None},
    }


def dark_entry_body(obj: dict[str, Any], name: str, storage_uri: str) -> dict[str, Any]:
    """The merge patch that puts ``name`` at 0 % serving ``storage_uri`` (added, or its model replaced):
    only the model's storageUri is the entry's own, everything else KServe takes from stable."""
    entries = copy.deepcopy(obj.get("spec", {}).get("canary") or [])
    stable_model = obj["spec"]["predictor"].get("model") or {}
    model = {"modelFormat": stable_model.get("modelFormat"), "storageUri": storage_uri}
    entry = {"predictor": {"name": name, "model": model}, "trafficPercent": 0}
    at = find_entry(obj, name)
    if at is None:
        entries.append(entry)
    else:
        entries[at]["predictor"].setdefault("model", {}).update(storageUri=storage_uri)
        entries[at]["trafficPercent"] = 0
    return {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}, "spec": {"canary": entries}}


def entry_storage_uri(obj: dict[str, Any], index: int) -> str | None:
    return obj["spec"]["canary"][index]["predictor"].get("model", {}).get("storageUri")


def services_of(obj: dict[str, Any], index: int | None) -> tuple[str, str | None]:
    """(stable, canary) predictor Service names KServe gives them; canary None without an entry."""
    name = obj["metadata"]["name"]
    stable = targets.predictor_deployment(name, obj["spec"]["predictor"].get("name") or "")
    if index is None:
        return stable, None
    return stable, targets.predictor_deployment(name, obj["spec"]["canary"][index]["predictor"]["name"])


def route_rule(route: dict[str, Any], names: tuple[str | None, ...]) -> int:
    """Index of the HTTPRoute rule with a backendRef to one of ``names``; RouterError when none has."""
    for i, rule in enumerate(route.get("spec", {}).get("rules", [])):
        if any(r.get("name") in names for r in rule.get("backendRefs", [])):
            return i
    meta = route.get("metadata", {})
    raise RouterError(
        f"HTTPRoute {meta.get('namespace')}/{meta.get('name')} has no rule with a backendRef to "
        f"{' or '.join(n for n in names if n)}; point one at the InferenceService's predictor Service"
    )


def route_weights(route: dict[str, Any], stable_svc: str, canary_svc: str | None) -> tuple[int, int]:
    """(stable, canary) weights of our rule; a ref that is not there weighs 0 (Gateway API: a ref without
    ``weight`` has 1). Normalised to percentages when they do not add up to 100."""
    refs = route["spec"]["rules"][route_rule(route, (stable_svc, canary_svc))]["backendRefs"]
    w = {r.get("name"): int(r.get("weight", 1)) for r in refs}
    s, c = w.get(stable_svc, 0), w.get(canary_svc, 0) if canary_svc else 0
    total = s + c
    if total in (0, 100):
        return (100, 0) if total == 0 else (s, c)
    return round(100 * s / total), 100 - round(100 * s / total)


def route_body(
    route: dict[str, Any], stable_svc: str, canary_svc: str | None, stable: int, canary: int
) -> dict[str, Any]:
    """The merge patch of ``spec.rules`` (an atomic list: all of it, with the read's resourceVersion)
    whose rule for this InferenceService sends ``stable``/``canary`` percent to the two Services. Our
    rule's backendRefs become exactly ours (the canary's only while it has a Service); each copies the
    port and kind of the ref that was there."""
    rules = copy.deepcopy(route["spec"]["rules"])
    i = route_rule(route, (stable_svc, canary_svc))
    old = {r.get("name"): r for r in rules[i]["backendRefs"]}
    template = old.get(stable_svc) or old.get(canary_svc) or rules[i]["backendRefs"][0]
    refs = [{**template, "name": stable_svc, "weight": int(stable)}]
    if canary_svc:
        refs.append({**template, "name": canary_svc, "weight": int(canary)})
    rules[i]["backendRefs"] = refs
    return {"metadata": {"resourceVersion": route["metadata"]["resourceVersion"]}, "spec": {"rules": rules}}


class KServeCanaryRouter:
    """One ``spec.canary`` entry's ``trafficPercent`` on a Standard-mode InferenceService (KServe >= 0.20),
    and, with ``route``, the same split of requests on an HTTPRoute in front of both predictor Services."""

    name = "kserve_canary"
    # why a release's metrics cannot be scraped per side through one URL each (the pods of both share
    # nothing, but the canary's Service only exists while an entry does): the KFP step needs Prometheus
    no_scrape = "the canary's Service exists only while its spec.canary entry does: nothing fixed to scrape"

    def __init__(
        self,
        isvc: str,
        namespace: str,
        canary: str = "",
        promotion: str = "rename",
        route: str = "",
        api: Any = None,
        kubeconfig: str | None = None,
        ready_timeout_s: float = 300.0,
        poll_s: float = 2.0,
    ):
        self.isvc, self.namespace, self.canary, self.kubeconfig = isvc, namespace, canary, kubeconfig
        self.promotion, self.route = promotion, route
        self.ready_timeout_s, self.poll_s = ready_timeout_s, poll_s
        self.api = api or kube.custom_api(kubeconfig)

    # ----------------------------------------------------------------- configuration

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        k = parser.add_argument_group("router: kserve_canary (KServe Standard-mode spec.canary)")
        k.add_argument(
            "--canary-name",
            default="",
            help="the spec.canary entry's predictor.name (kserve_canary; default: the only entry)",
        )
        k.add_argument(
            "--promotion",
            choices=PROMOTIONS,
            default="rename",
            help="kserve_canary promotion: rename (KServe's, no restart: the stable predictor takes the "
            "canary's name and Deployment) or copy (the stable Deployment rolls to the canary's model and "
            "keeps its name, for routes that address <isvc>-predictor)",
        )
        # --route (gateway_api's flag) names the HTTPRoute that splits requests for kserve_canary too

    @classmethod
    def config_from_args(cls, ns: argparse.Namespace) -> dict[str, Any]:
        require_flags(cls.name, ns, ("isvc",), " (the Standard-mode InferenceService with spec.canary)")
        return {
            "router": cls.name,
            "isvc": ns.isvc,
            "namespace": ns.namespace,
            "canary": ns.canary_name,
            "promotion": ns.promotion,
            "route": ns.route or "",
            "kubeconfig": ns.kubeconfig,
        }

    @staticmethod
    def state_location(cfg: dict[str, Any]) -> tuple[str, str]:
        return f"{cfg['isvc']}-rollout", cfg["isvc"]

    @staticmethod
    def check_config(cfg: dict[str, Any]) -> None:
        check_k8s_names(cfg, ("namespace", "isvc", "route"))
        if cfg.get("canary") and not CANARY_NAME.fullmatch(cfg["canary"]):
            raise ValueError(
                f"canary {cfg['canary']!r} is not a spec.canary name (lower-case letters, digits and '-', "
                "at most 40)"
            )
        if cfg.get("promotion", "rename") not in PROMOTIONS:
            raise ValueError(f"promotion {cfg['promotion']!r} is not one of {', '.join(PROMOTIONS)}")

    @classmethod
    def from_config(cls, cfg: dict[str, Any], api: Any = None) -> KServeCanaryRouter:
        return cls(**{k: v for k, v in cfg.items() if k != "router"}, api=api)

    @classmethod
    def for_release(cls, fullname: str, namespace: str) -> Release:
        """One InferenceService ``<fullname>``; the canary entry is the only one (the operator adds it).
        Promotion by copy: the chart's HTTPRoute addresses ``<fullname>-predictor``, which a renaming
        promotion would delete. No route: whether the release renders one is the
        chart's choice, so the operator moves replicas only (README, Limits)."""
        cfg = {
            "router": cls.name,
            "isvc": fullname,
            "namespace": namespace,
            "canary": "",
            "promotion": "copy",
            "route": "",
            "kubeconfig": None,
        }
        return Release(cfg, fullname, ("", ""))

    # ----------------------------------------------------------------- the objects

    def _get(self) -> dict[str, Any]:
        obj = kube.get(self.api, kube.ISVC, self.namespace, self.isvc)
        if obj is None:
            raise RouterError(f"InferenceService {self.namespace}/{self.isvc} does not exist; check --isvc")
        return obj

    def _what(self) -> str:
        return f"InferenceService {self.namespace}/{self.isvc}"

    def _write(self, body_of) -> Any:
        """Read, build the body (or None: nothing to do), write; again on a 409."""

        def attempt() -> Any:
            obj = self._get()
            body = body_of(obj)
            if body is not None:
                kube.patch(self.api, kube.ISVC, self.namespace, self.isvc, body)
            return obj

        try:
            return kube.retry_on_conflict(attempt, self._what(), attempts=5)
        except kube.KubeError as e:
            raise RouterError(str(e)) from e

    def _get_route(self) -> dict[str, Any]:
        route = kube.get(self.api, kube.HTTPROUTE, self.namespace, self.route)
        if route is None:
            raise RouterError(f"HTTPRoute {self.namespace}/{self.route} does not exist; check --route")
        return route

    def _set_route(self, stable: int, canary: int) -> None:
        """Our rule's split, for the Services of the InferenceService as it is now (no entry: stable's
        only). Nothing without a route."""
        if not self.route:
            return

        def attempt() -> None:
            obj, route = self._get(), self._get_route()
            stable_svc, canary_svc = services_of(obj, find_entry(obj, self.canary))
            body = route_body(route, stable_svc, canary_svc, stable, canary)
            kube.patch(self.api, kube.HTTPROUTE, self.namespace, self.route, body)

        try:
            kube.retry_on_conflict(attempt, f"HTTPRoute {self.namespace}/{self.route}", attempts=5)
        except kube.KubeError as e:
            raise RouterError(str(e)) from e

    def _missing(self) -> RouterError:
        which = f"named {self.canary!r}" if self.canary else "at all"
        return RouterError(
            f"{self._what()} has no spec.canary entry {which}; add it at trafficPercent 0 first"
        )

    # ----------------------------------------------------------------- routing

    def set_weights(self, stable: int, canary: int) -> None:
        """The entry's trafficPercent (KServe sizes both Deployments by it) and, with a route, the request
        split. Requests move only to pods that serve: a growing canary gets its pods first (the route
        waits until the canary's Deployment has rolled out with at least one pod), a shrinking one loses
        its requests first."""
        check_weights(stable, canary)
        growing = not self.route or canary > self.get_weights()[1]
        if not growing:
            self._set_route(stable, canary)
        seen: dict[str, Any] = {}

        def body(obj: dict[str, Any]) -> dict[str, Any] | None:
            at = find_entry(obj, self.canary)
            if at is None:
                if canary == 0:
                    return None  # no canary entry is no canary traffic (after a rollback, say)
                raise self._missing()
            seen["dep"], seen["uri"] = self.canary_deployment(obj, at), entry_storage_uri(obj, at)
            return weight_body(obj, at, canary)

        self._write(body)
        if growing and self.route:
            if canary > 0:
                self._wait_pods(seen["dep"], seen["uri"], time.monotonic() + self.ready_timeout_s)
            self._set_route(stable, canary)

    def get_weights(self) -> tuple[int, int]:
        """With a route: its split of requests. Else the entry's ``trafficPercent`` as KServe last applied it
        (``status.canaryStatuses``), or as the spec asks before KServe has reconciled it. No entry is
        (100, 0). KServe's ``status.observedGeneration`` is the Deployment's, not the InferenceService's
        (see ``targets``), so it cannot date the status: a status behind the spec reads as what it is,
        and the controller re-applies the weight."""
        obj = self._get()
        at = find_entry(obj, self.canary)
        if self.route:
            return route_weights(self._get_route(), *services_of(obj, at))
        if at is None:
            return 100, 0
        name = obj["spec"]["canary"][at]["predictor"].get("name")
        for s in (obj.get("status") or {}).get("canaryStatuses") or []:
            if s.get("name") == name:
                pct = int(s.get("trafficPercent") or 0)
                return 100 - pct, pct
        pct = int(obj["spec"]["canary"][at].get("trafficPercent") or 0)
        return 100 - pct, pct

    def canary_deployment(self, obj: dict[str, Any], index: int) -> str:
        return targets.predictor_deployment(self.isvc, obj["spec"]["canary"][index]["predictor"]["name"])

    def promote(self) -> None:
        """The promotion (see :func:`promote_body`), then wait until every stable pod serves the canary's
        model. Again after a crash: what is left of it.

        A renaming promotion changes no pod template: the canary's Deployment already "serves" the model
        at its canary size before KServe has scaled it. KServe deletes the old stable Deployment in the
        same reconcile that scales the new one, so the wait is for that Deployment to be gone first.

        With a route, requests go to the canary's Service first. ``rename``: that Service becomes the
        stable one, then the rule keeps only it. ``copy``: the canary keeps its entry (and pods) until
        the stable Deployment serves the new model and has the requests back; then the entry goes."""
        deadline = time.monotonic() + self.ready_timeout_s
        if self.route and find_entry(self._get(), self.canary) is not None:
            # a promotion from below 100 % (an operator's promote) sizes the canary for all requests first
            self.set_weights(0, 100)
        seen: dict[str, Any] = {}
        keep_entry = bool(self.route) and self.promotion == "copy"

        def body(obj: dict[str, Any]) -> dict[str, Any] | None:
            at = find_entry(obj, self.canary)
            if at is None:
                return None  # promoted already (a pending promotion finished after a restart)
            seen["uri"] = entry_storage_uri(obj, at)
            seen["old"] = targets.predictor_deployment(self.isvc, obj["spec"]["predictor"].get("name") or "")
            out = promote_body(obj, at, self.promotion)
            if keep_entry:
                del out["spec"]["canary"]
            return out

        self._write(body)
        try:
            if self.promotion == "rename" and "old" in seen:
                self._wait_gone(seen["old"], deadline)
            targets.wait_serving(
                self.api,
                self.namespace,
                self.isvc,
                seen.get("uri"),
                timeout_s=max(deadline - time.monotonic(), 0.0),
                poll_s=self.poll_s,
            )
        except kube.KubeError as e:
            raise RouterError(f"{e}; traffic stays on the canary" if self.route else str(e)) from e
        if keep_entry:
            self._set_route(100, 0)
            self.rollback()  # the entry goes, its pods with it; stable serves the canary's model
        else:
            self._set_route(100, 0)

    def _wait_pods(self, deployment: str, uri: str | None, deadline: float) -> None:
        """Until ``deployment`` runs at least one pod of ``uri`` and has rolled out (KServe sizes it
        after our write, so a Deployment still at 0 replicas is not "rolled out" here)."""
        apps = kube.apps_api(self.api)
        why = "not created yet"
        while time.monotonic() <= deadline:
            try:
                dep = apps.read_namespaced_deployment(deployment, self.namespace)
            except Exception as e:
                if not kube.is_not_found(e):
                    raise
            else:
                served = (dep.spec.template.metadata.annotations or {}).get(targets.SOURCE_URI_ANNOTATION)
                done, why = targets.rollout_complete(dep)
                if (dep.spec.replicas or 0) < 1:
                    why = "KServe has not given it a replica yet"
                elif uri and served != uri:
                    why = f"its pod template serves {served!r}, not {uri!r}"
                elif done:
                    return
            time.sleep(self.poll_s)
        raise RouterError(
            f"{self._what()}: the canary Deployment {deployment} does not serve after "
            f"{self.ready_timeout_s:.0f}s ({why}); no requests were moved to it"
        )

    def _wait_gone(self, deployment: str, deadline: float) -> None:
        apps = kube.apps_api(self.api)
        while True:
            try:
                apps.read_namespaced_deployment(deployment, self.namespace)
            except Exception as e:
                if kube.is_not_found(e):
                    return
                raise
            if time.monotonic() > deadline:
                raise kube.KubeError(
                    f"{self._what()}: KServe has not retired the old stable Deployment {deployment} after "
                    f"{self.ready_timeout_s:.0f}s"
                )
            time.sleep(self.poll_s)

    def rollback(self) -> None:
        """Requests back to stable first (the rule keeps only stable's Service), then the entry goes."""
        if self.route:
            self._set_route(100, 0)

        def body(obj: dict[str, Any]) -> dict[str, Any] | None:
            at = find_entry(obj, self.canary)
            return None if at is None else remove_body(obj, at)

        self._write(body)
        self._set_route(100, 0)

    def config(self) -> dict[str, Any]:
        return {
            "router": self.name,
            "isvc": self.isvc,
            "namespace": self.namespace,
            "canary": self.canary,
            "promotion": self.promotion,
            "route": self.route,
            "kubeconfig": self.kubeconfig,
        }


def deploy_dark(
    api: Any,
    *,
    namespace: str,
    isvc: str,
    storage_uri: str,
    version: str,
    ready_timeout_s: float = 600.0,
    poll_s: float = 2.0,
) -> tuple[str, dict]:
    """The canary entry ``canary_name_for(version)`` at 0 % serving ``storage_uri`` (what the operator does
    before a rollout), waiting until KServe has built its Deployment with that model. At 0 % KServe 0.20.0
    runs no canary pod: the pods start at the first step. Returns the InferenceService's name and object."""
    name = canary_name_for(version)

    def attempt() -> None:
        obj = kube.get(api, kube.ISVC, namespace, isvc)
        if obj is None:
            raise kube.KubeError(f"InferenceService {namespace}/{isvc} does not exist")
        if obj["spec"]["predictor"].get("name") == name:
            raise kube.KubeError(f"{namespace}/{isvc}'s stable predictor is already named {name!r}")
        kube.patch(api, kube.ISVC, namespace, isvc, dark_entry_body(obj, name, storage_uri))

    kube.retry_on_conflict(attempt, f"InferenceService {namespace}/{isvc}", attempts=5)
    dep = targets.predictor_deployment(isvc, name)
    return isvc, targets.wait_serving(
        api, namespace, isvc, storage_uri, timeout_s=ready_timeout_s, poll_s=poll_s, deployment=dep
    )
