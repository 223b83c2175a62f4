"""``gateway_api``: the backendRef weights of a Gateway API ``HTTPRoute`` (gateway.networking.k8s.io/v1).

The route sits in front of two InferenceServices (stable, canary), as the Helm chart renders for
``strategy: canary``. Promotion copies the canary's predictor into the stable InferenceService, waits
until every stable pod serves the canary's model (not merely Ready: see ``targets``), then sends all
traffic back to stable (Flagger's primary/canary promotion). Weights are written as a JSON merge patch
of ``spec.rules``; ``HTTPRoute.spec.rules`` is an atomic list, so our field manager then owns all of the
rules, not just the weights (a ``helm upgrade`` that renders different rules mid-rollout conflicts with
us, by design).

With a cohort (:mod:`serving.rollout.cohorts`) the router writes rules with header ``matches`` in front of
the weighted rule (:func:`cohorts.httproute_rules`) and records the canary's share in the annotation
:data:`SHARE_ANNOTATION` (a match cohort's weighted rule stays all-stable, so the weights alone do not
say the step).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from serving.rollout import cohorts, kube, targets
from serving.rollout.routers.base import Release, RouterError, check_k8s_names, check_weights, require_flags

SHARE_ANNOTATION = "mlrollout.io/cohort-share"


class GatewayApiRouter:
    """Weighted ``backendRefs`` of an HTTPRoute in front of a stable and a canary InferenceService."""

    name = "gateway_api"

    def __init__(
        self,
        route: str,
        namespace: str,
        stable_backend: str,
        canary_backend: str,
        stable_isvc: str = "",
        canary_isvc: str = "",
        api: Any = None,
        kubeconfig: str | None = None,
        cohort: str = "",
        ready_timeout_s: float = 300.0,
        poll_s: float = 2.0,
    ):
        self.route, self.namespace = route, namespace
        self.stable_backend, self.canary_backend = stable_backend, canary_backend
        self.stable_isvc, self.canary_isvc = stable_isvc, canary_isvc
        self.kubeconfig = kubeconfig
        self.cohort = cohorts.parse(cohort) if cohort else None
        self.ready_timeout_s, self.poll_s = ready_timeout_s, poll_s
        self.api = api or kube.custom_api(kubeconfig)

    # ----------------------------------------------------------------- configuration

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        k = parser.add_argument_group("router: gateway_api (HTTPRoute weights)")
        k.add_argument(
            "--route", help="HTTPRoute name (gateway_api; kserve_canary: the route that splits requests)"
        )
        k.add_argument("--stable-backend", help="backendRef name of the stable Service (gateway_api)")
        k.add_argument("--canary-backend", help="backendRef name of the canary Service (gateway_api)")
        k.add_argument(
            "--stable-isvc", default="", help="stable InferenceService (gateway_api promotion, state)"
        )
        k.add_argument("--canary-isvc", default="", help="canary InferenceService (gateway_api promotion)")

    @classmethod
    def config_from_args(cls, ns: argparse.Namespace) -> dict[str, Any]:
        require_flags(cls.name, ns, ("route", "stable_backend", "canary_backend"))
        return {
            "router": cls.name,
            "route": ns.route,
            "namespace": ns.namespace,
            "stable_backend": ns.stable_backend,
            "canary_backend": ns.canary_backend,
            "stable_isvc": ns.stable_isvc,
            "canary_isvc": ns.canary_isvc,
            "kubeconfig": ns.kubeconfig,
            **({"cohort": spec} if (spec := cohorts.from_args(ns)) else {}),
        }

    @staticmethod
    def state_location(cfg: dict[str, Any]) -> tuple[str, str]:
        return f"{cfg['route']}-rollout", cfg.get("stable_isvc", "")

    @staticmethod
    def check_config(cfg: dict[str, Any]) -> None:
        check_k8s_names(
            cfg, ("route", "namespace", "stable_backend", "canary_backend", "stable_isvc", "canary_isvc")
        )
        if cfg.get("cohort"):
            cohorts.parse(cfg["cohort"])

    @classmethod
    def from_config(cls, cfg: dict[str, Any], api: Any = None) -> GatewayApiRouter:
        return cls(**{k: v for k, v in cfg.items() if k != "router"}, api=api)

    @classmethod
    def for_release(cls, fullname: str, namespace: str) -> Release:
        """The chart's ``strategy: canary``: ``<fullname>-stable``/``-canary`` behind ``<fullname>``."""
        stable, canary = f"{fullname}-stable", f"{fullname}-canary"
        cfg = {
            "router": cls.name,
            "route": fullname,
            "namespace": namespace,
            "stable_backend": f"{stable}-predictor",
            "canary_backend": f"{canary}-predictor",
            "stable_isvc": stable,
            "canary_isvc": canary,
            "kubeconfig": None,
        }
        urls = tuple(f"http://{i}-predictor.{namespace}.svc.cluster.local/metrics" for i in (stable, canary))
        return Release(cfg, stable, urls)  # type: ignore[arg-type]

    # ----------------------------------------------------------------- routing

    def _get_route(self) -> dict:
        route = kube.get(self.api, kube.HTTPROUTE, self.namespace, self.route)
        if route is None:
            raise RouterError(f"HTTPRoute {self.namespace}/{self.route} does not exist; check --route")
        return route

    def _refs(self, route: dict) -> tuple[list[dict], dict, dict]:
        for rule in route.get("spec", {}).get("rules", []):
            refs = rule.get("backendRefs", [])
            by_name = {r.get("name"): r for r in refs}
            if self.stable_backend in by_name and self.canary_backend in by_name:
                return refs, by_name[self.stable_backend], by_name[self.canary_backend]
        raise RouterError(
            f"HTTPRoute {self.namespace}/{self.route} has no rule with backendRefs named "
            f"{self.stable_backend!r} and {self.canary_backend!r}; check --stable-backend/--canary-backend"
        )

    def _base(self, route: dict) -> dict:
        """The weighted rule (both backends) of ``route``."""
        refs, _, _ = self._refs(route)
        return next(r for r in route["spec"]["rules"] if r.get("backendRefs") is refs)

    def _cohort_rules(self, route: dict, share: int) -> list[dict]:
        """``route``'s rules with the cohort's at ``share``: ours replaced, anyone else's kept."""
        base = self._base(route)
        rules = []
        for r in route["spec"]["rules"]:
            if r is base:
                rules += cohorts.httproute_rules(
                    base, self.cohort, share, self.stable_backend, self.canary_backend
                )
            elif not cohorts.is_cohort_rule(r, self.cohort, self.stable_backend, self.canary_backend):
                rules.append(r)
        return rules

    def _write(self, change: Callable[[dict, dict], None]) -> None:
        """``change(route, body)`` on a fresh read (it edits the route's rules in place, or sets the body's
        own), then one merge patch of ``spec.rules`` with the read's resourceVersion (a 409 is re-read and
        retried)."""

        def attempt() -> None:
            route = self._get_route()
            body: dict[str, Any] = {"metadata": {"resourceVersion": route["metadata"]["resourceVersion"]}}
            body["spec"] = {"rules": route["spec"]["rules"]}
            change(route, body)
            kube.patch(self.api, kube.HTTPROUTE, self.namespace, self.route, body)

        try:
            kube.retry_on_conflict(attempt, f"HTTPRoute {self.namespace}/{self.route}", attempts=5)
        except kube.KubeError as e:
            raise RouterError(str(e)) from e

    def set_weights(self, stable: int, canary: int) -> None:
        check_weights(stable, canary)

        def change(route: dict, body: dict) -> None:
            _, s, c = self._refs(route)
            s["weight"], c["weight"] = int(stable), int(canary)
            if self.cohort:
                body["spec"]["rules"] = self._cohort_rules(route, int(canary))
                body["metadata"]["annotations"] = {SHARE_ANNOTATION: str(int(canary))}

        self._write(change)

    # ----------------------------------------------------------------- mirroring (shadow step)

    def _is_our_mirror(self, f: dict) -> bool:
        return f.get("type") == "RequestMirror" and (
            f.get("requestMirror", {}).get("backendRef", {}).get("name") == self.canary_backend
        )

    def set_mirror(self, on: bool) -> None:
        """A ``RequestMirror`` filter to the canary Service on the weighted rule (the gateway sends a copy
        of every request there and discards its answer), or none; other filters are kept as they are."""

        def change(route: dict, body: dict) -> None:
            rule = self._base(route)
            _, _, c = self._refs(route)
            filters = [f for f in rule.get("filters", []) if not self._is_our_mirror(f)]
            if on:
                ref = {k: c[k] for k in ("group", "kind", "name", "namespace", "port") if k in c}
                filters.append({"type": "RequestMirror", "requestMirror": {"backendRef": ref}})
            if filters:
                rule["filters"] = filters
            else:
                rule.pop("filters", None)

        self._write(change)

    def get_mirror(self) -> bool:
        return any(self._is_our_mirror(f) for f in self._base(self._get_route()).get("filters", []))

    def check_mirror(self) -> None:
        self.get_mirror()  # the route and its weighted rule exist

    def get_weights(self) -> tuple[int, int]:
        route = self._get_route()
        _, s, c = self._refs(route)
        # Gateway API: a backendRef without weight has weight 1
        weights = int(s.get("weight", 1)), int(c.get("weight", 1))
        if not self.cohort:
            return weights
        from serving.rollout.gitops import contains  # gitops imports this package: not at module level

        raw = (route["metadata"].get("annotations") or {}).get(SHARE_ANNOTATION, "")
        share = int(raw) if raw.isdigit() and int(raw) <= 100 else weights[1]
        if contains(route["spec"]["rules"], self._cohort_rules(route, share)):
            return 100 - share, share
        # the cohort's rules are not (all) in place, e.g. another writer reset the rules: a pair that
        # no valid weight equals (they add up to 100), so the controller's reconcile writes them again
        return 0, 0

    def promote(self) -> None:
        """Canary takes all traffic, stable gets the canary's predictor, then stable takes it back."""
        self.set_weights(0, 100)
        if not (self.stable_isvc and self.canary_isvc):
            return  # no InferenceServices named: the canary backend simply keeps all traffic
        try:
            targets.promote_by_copy(
                self.api,
                self.namespace,
                self.canary_isvc,
                self.stable_isvc,
                timeout_s=self.ready_timeout_s,
                poll_s=self.poll_s,
            )
        except kube.KubeError as e:
            raise RouterError(f"{e}; traffic stays on the canary") from e
        self.set_weights(100, 0)

    def rollback(self) -> None:
        self.set_weights(100, 0)

    # the watch after promotion (machine.verify). Promotion copies the canary's predictor onto the stable
    # InferenceService, so afterwards the new version answers from the stable side, and restoring the
    # previous model is the same copy in reverse, from the predictor recorded before the promotion.
    @property
    def promoted_side(self) -> str:
        return "stable" if self.stable_isvc and self.canary_isvc else "canary"

    def previous_model(self) -> dict[str, Any] | None:
        """The stable InferenceService's predictor now (recorded before a promotion overwrites it)."""
        if not (self.stable_isvc and self.canary_isvc):
            return None  # promotion only moves weights: the stable side keeps its model
        obj = kube.get(self.api, kube.ISVC, self.namespace, self.stable_isvc)
        if obj is None:
            raise RouterError(f"InferenceService {self.namespace}/{self.stable_isvc} does not exist")
        return targets.predictor_for(obj, track="stable")

    def restore(self, previous: dict[str, Any] | None) -> None:
        """The previous model back on the stable InferenceService (every pod serving it), all traffic on
        stable."""
        if not (self.stable_isvc and self.canary_isvc):
            self.rollback()
            return
        if not previous:
            raise RouterError(
                f"no previous model recorded for {self.namespace}/{self.stable_isvc}: cannot restore it"
            )
        try:
            targets.restore_predictor(
                self.api,
                self.namespace,
                self.stable_isvc,
                previous,
                timeout_s=self.ready_timeout_s,
                poll_s=self.poll_s,
            )
        except kube.KubeError as e:
            raise RouterError(f"{e}; the previous model is not restored yet") from e
        self.set_weights(100, 0)

    def config(self) -> dict[str, Any]:
        return {
            "router": self.name,
            "route": self.route,
            "namespace": self.namespace,
            "stable_backend": self.stable_backend,
            "canary_backend": self.canary_backend,
            "stable_isvc": self.stable_isvc,
            "canary_isvc": self.canary_isvc,
            "kubeconfig": self.kubeconfig,
            **({"cohort": self.cohort.spec} if self.cohort else {}),
        }
