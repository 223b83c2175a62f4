"""GitOps like Flagger: a release declares only its desired model, the operator owns what it changes.

A release of ``helm/mlrollout-model`` with ``operator.enabled`` renders a ModelRollout (the desired model)
and none of the fields the operator changes, so a ``helm upgrade`` (Helm 4: server-side apply) or an Argo CD
sync never owns, changes or reverts them:

* the InferenceServices' ``spec.predictor.model.storageUri`` (which model each serves) and, for the single
  Knative InferenceService, ``spec.predictor.canaryTrafficPercent``. KServe's CRD makes ``predictor`` and
  ``model`` plain structs, so server-side apply tracks each field on its own: the chart owns the rest of
  the object, the operator these fields, and neither conflicts with the other;
* the HTTPRoute's ``spec.rules``. Gateway API declares ``rules`` (and ``backendRefs``) an *atomic* list
  (``x-kubernetes-list-type: atomic`` in the v1.5.1 CRD): whoever writes a weight owns every rule. So the
  chart renders no ``rules`` at all and puts the rule into the annotation :data:`RULES_ANNOTATION` (weights
  100/0); the operator writes ``spec.rules`` from it with the live weights. Git still decides the paths and
  timeouts, the operator the weights, and helm applies nothing it does not own.

What to do is decided by pure functions here (:func:`desired_rules`, :func:`needs_initialization`); the
rest are thin calls to the API server. Flagger's *initialization*: on the first install (the stable
InferenceService serves no model yet) the desired model becomes the stable one directly, with no analysis
(:func:`initialize`). The stable version is then recorded in the ModelRollout's ``status.stableVersion``
(the ISVCs carry no version in this mode) with ``phase: Initialized``, written before the models are set
(persist, then act).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from serving.rollout import crd, kube, targets
from serving.rollout.routers import Release, kserve_canary

RULES_ANNOTATION = "mlrollout.io/route-rules"


# --------------------------------------------------------------------------- pure decisions


def rules_template(route: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The chart's rule template on an HTTPRoute in operator mode (None: the chart renders the rules)."""
    raw = ((route.get("metadata") or {}).get("annotations") or {}).get(RULES_ANNOTATION)
    if raw is None:
        return None
    try:
        rules = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"annotation {RULES_ANNOTATION} is not JSON ({e})") from None
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise ValueError(f"annotation {RULES_ANNOTATION} must be a JSON list of HTTPRoute rules")
    return rules


def backend_weights(rules: list[dict[str, Any]], stable: str, canary: str) -> tuple[int, int] | None:
    """(stable, canary) weights of the rule that names both backends, None when no rule does."""
    for rule in rules or []:
        by_name = {r.get("name"): r for r in rule.get("backendRefs") or []}
        if stable in by_name and canary in by_name:
            # Gateway API: a backendRef without a weight has weight 1
            return int(by_name[stable].get("weight", 1)), int(by_name[canary].get("weight", 1))
    return None


def with_weights(rules: list[dict[str, Any]], stable: str, canary: str, weights: tuple[int, int]) -> list:
    """``rules`` with the two backends' weights set to ``weights`` (a copy)."""
    out = copy.deepcopy(rules)
    for rule in out:
        for ref in rule.get("backendRefs") or []:
            if ref.get("name") == stable:
                ref["weight"] = int(weights[0])
            elif ref.get("name") == canary:
                ref["weight"] = int(weights[1])
    return out


def contains(have: Any, want: Any) -> bool:
    """Whether ``have`` holds everything ``want`` says: the API server adds defaults (a path match's type,
    a backendRef's group), so a live rule is compared on the template's own keys only."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and contains(have[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(have) == len(want) and all(map(contains, have, want))
    return have == want


def desired_rules(route: dict[str, Any], stable: str, canary: str) -> list[dict[str, Any]] | None:
    """The ``spec.rules`` the operator should write on ``route``, or None when there is nothing to write:
    the chart renders the rules itself (no template), or the live rules already are the template with the
    live weights. The live weights are kept (they are the rollout's); a route without them (the API
    server's default rule on a first install) gets the template's own, all on stable."""
    template = rules_template(route)
    if template is None:
        return None
    live = (route.get("spec") or {}).get("rules") or []
    weights = backend_weights(live, stable, canary) or backend_weights(template, stable, canary) or (100, 0)
    want = with_weights(template, stable, canary, weights)
    return None if contains(live, want) else want


def model_of(isvc: dict[str, Any] | None) -> str | None:
    return (((isvc or {}).get("spec") or {}).get("predictor") or {}).get("model", {}).get("storageUri")


def needs_initialization(stable_isvc: dict[str, Any] | None) -> bool:
    """Flagger's initialization is due when the stable InferenceService exists but serves no model (the
    chart in operator mode renders none)."""
    return stable_isvc is not None and not model_of(stable_isvc)


def release_isvcs(release: Release) -> list[str]:
    """The InferenceServices of a release, stable first (gateway_api: stable and canary; Knative: one)."""
    cfg = release.config
    names = [release.owner_isvc]
    if cfg.get("canary_isvc"):
        names.append(cfg["canary_isvc"])
    return names


def stable_version_fallback(obj: dict[str, Any], stable_isvc: dict[str, Any] | None) -> str | None:
    """The stable version when no rollout record says it: what :func:`initialize` recorded in the status,
    else the desired version when the stable InferenceService already serves the desired model."""
    version = (obj.get("status") or {}).get("stableVersion")
    if version:
        return version
    model = obj["spec"]["model"]
    if stable_isvc is not None and model_of(stable_isvc) == model["storageUri"]:
        return model["version"]
    return None


# --------------------------------------------------------------------------- acting on the cluster


def ensure_route(api: Any, release: Release) -> bool:
    """Write ``spec.rules`` from the chart's template when they differ (a first install, or a template
    changed by a ``helm upgrade``); True when it wrote. Nothing for a route without a template."""
    cfg = release.config
    if cfg.get("router") != "gateway_api":
        return False
    ns, name = cfg["namespace"], cfg["route"]
    route = kube.get(api, kube.HTTPROUTE, ns, name)
    if route is None:
        return False
    want = desired_rules(route, cfg["stable_backend"], cfg["canary_backend"])
    if want is None:
        return False
    body = {"metadata": {"resourceVersion": route["metadata"]["resourceVersion"]}, "spec": {"rules": want}}
    kube.patch(api, kube.HTTPROUTE, ns, name, body)
    return True


def _set_status(api: Any, obj: dict[str, Any], status: dict[str, Any]) -> None:
    g, v, p = crd.MODELROLLOUT
    meta = obj["metadata"]
    body = {"status": {**status, "observedGeneration": meta.get("generation", 0)}}
    api.patch_namespaced_custom_object_status(
        g, v, meta["namespace"], p, meta["name"], body, field_manager=kube.FIELD_MANAGER
    )


def observe(api: Any, obj: dict[str, Any]) -> bool:
    """Record in ``status.observedGeneration`` that the operator has seen a spec it has nothing to do for
    (Argo CD's health check waits for it); True when it wrote. No write when it is already current, so an
    unchanged ``helm upgrade`` (no new generation) leaves the ModelRollout's resourceVersion alone."""
    if (obj.get("status") or {}).get("observedGeneration") == obj["metadata"].get("generation", 0):
        return False
    _set_status(api, obj, {})
    return True


def set_model(api: Any, namespace: str, isvc: str, storage_uri: str, knative_dark: bool = False) -> None:
    """Point ``isvc`` at ``storage_uri``, touching only the fields the operator owns (``knative_dark``: a
    new Knative revision that takes no traffic yet, ``canaryTrafficPercent: 0``)."""
    predictor: dict[str, Any] = {"model": {"storageUri": storage_uri}}
    if knative_dark:
        predictor["canaryTrafficPercent"] = 0
    kube.patch(api, kube.ISVC, namespace, isvc, {"spec": {"predictor": predictor}})


def initialize(api: Any, obj: dict[str, Any], release: Release) -> str | None:
    """Flagger's initialization: make the desired model the stable one directly (no analysis) when the
    stable InferenceService serves none. Returns what it did (the Event's message), None when not due."""
    ns = release.config["namespace"]
    stable = kube.get(api, kube.ISVC, ns, release.owner_isvc)
    if not needs_initialization(stable):
        return None
    model = obj["spec"]["model"]
    msg = (
        f"{model['version']} ({model['storageUri']}) is the stable model: first install, "
        "no analysis (the operator owns which model each InferenceService serves and the route's rules)"
    )
    # persist, then act: a replica that takes over after a crash here sees no model and does it again
    _set_status(
        api, obj, {"phase": crd.INITIALIZED, "stableVersion": model["version"], "message": msg[:2000]}
    )
    ensure_route(api, release)
    for name in release_isvcs(release):
        if not model_of(kube.get(api, kube.ISVC, ns, name)):
            set_model(api, ns, name, model["storageUri"])
    return msg


def deploy_canary(
    api: Any,
    *,
    namespace: str,
    fullname: str,
    release: Release,
    storage_uri: str,
    version: str,
    ready_timeout_s: float = 600.0,
    poll_s: float = 2.0,
) -> tuple[str, dict]:
    """The canary to the new model, dark, waiting until it serves: only ``storageUri`` (and Knative's
    ``canaryTrafficPercent: 0``; kserve_canary: a ``spec.canary`` entry at 0 %) change, no label or
    annotation the chart owns. A release without a canary InferenceService to patch falls back to
    :func:`targets.deploy_canary` (it creates one from stable)."""
    cfg = release.config
    if cfg.get("router") == "kserve_canary":
        # a spec.canary entry on the one InferenceService; the chart owns the rest of it
        return kserve_canary.deploy_dark(
            api, namespace=namespace, isvc=release.owner_isvc, storage_uri=storage_uri, version=version,
            ready_timeout_s=ready_timeout_s, poll_s=poll_s,
        )  # fmt: skip
    knative = cfg.get("router") == "kserve_knative"
    name = release.owner_isvc if knative else cfg.get("canary_isvc", "")
    if not name or kube.get(api, kube.ISVC, namespace, name) is None:
        return targets.deploy_canary(
            api, namespace=namespace, fullname=fullname, storage_uri=storage_uri, version=version,
            router=cfg["router"], ready_timeout_s=ready_timeout_s, poll_s=poll_s,
        )  # fmt: skip
    set_model(api, namespace, name, storage_uri, knative_dark=knative)
    return name, targets.wait_serving(
        api, namespace, name, storage_uri, timeout_s=ready_timeout_s, poll_s=poll_s
    )
