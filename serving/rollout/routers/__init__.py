"""Traffic routers: how a weight decision reaches the data path, one file per data plane.

* ``local_proxy`` (:mod:`.haproxy`): HAProxy in front of two local runtimes, through its runtime API.
* ``gateway_api`` (:mod:`.gateway_api`): the backendRef weights of an HTTPRoute in front of two
  InferenceServices; promotion copies the canary's predictor into stable.
* ``kserve_knative`` (:mod:`.knative`): ``canaryTrafficPercent`` on one InferenceService.
* ``kserve_canary`` (:mod:`.kserve_canary`): a ``spec.canary`` entry's ``trafficPercent`` on one
  Standard-mode InferenceService (KServe >= 0.20).

Adding a router: one file with a class like those (see :mod:`.base`), and one line in :data:`ROUTERS`.
"""

from __future__ import annotations

import inspect
from typing import Any

from serving.rollout.routers.base import (
    MirroringRouter,
    Release,
    RouterError,
    TrafficRouter,
    check_weights,
)
from serving.rollout.routers.gateway_api import GatewayApiRouter
from serving.rollout.routers.haproxy import (
    HAPROXY_NAME,
    HAProxyRuntimeAPI,
    LocalProxyRouter,
    check_haproxy_name,
)
from serving.rollout.routers.knative import KServeKnativeRouter
from serving.rollout.routers.kserve_canary import KServeCanaryRouter

ROUTERS = {
    cls.name: cls for cls in (LocalProxyRouter, GatewayApiRouter, KServeKnativeRouter, KServeCanaryRouter)
}

__all__ = [
    "HAPROXY_NAME",
    "ROUTERS",
    "GatewayApiRouter",
    "HAProxyRuntimeAPI",
    "KServeCanaryRouter",
    "KServeKnativeRouter",
    "LocalProxyRouter",
    "MirroringRouter",
    "Release",
    "RouterError",
    "TrafficRouter",
    "build_router",
    "check_haproxy_name",
    "check_weights",
    "choices",
    "mirrors",
    "validate_config",
]

# what a router config may carry: the constructors' arguments, less the live client and the waits
_NOT_CONFIG = {"self", "api", "ready_timeout_s", "poll_s"}


def choices(names: Any = None) -> str:
    """``a, b or c`` over ``names`` (default: every registered router), for error messages."""
    names = list(ROUTERS if names is None else names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def mirrors(name: str) -> bool:
    """Whether router ``name`` can mirror traffic to the canary (:class:`MirroringRouter`)."""
    cls = ROUTERS.get(name)
    return cls is not None and callable(getattr(cls, "set_mirror", None))


def validate_config(cfg: Any) -> dict[str, Any]:
    """Check a router config (as :meth:`TrafficRouter.config` writes it) without touching the data plane.

    ValueError names what is wrong: an unknown router or field, a missing field, a value that is not
    a string, an HAProxy name outside ``[A-Za-z0-9_.-]+``, a Kubernetes name that is not one.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"must be an object, got {type(cfg).__name__}")
    kind = cfg.get("router")
    if kind not in ROUTERS:
        raise ValueError(f"unknown router {kind!r}; choose {choices()}")
    cls = ROUTERS[kind]
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n not in _NOT_CONFIG}
    if unknown := sorted(set(cfg) - set(params) - {"router"}):
        raise ValueError(f"unknown {kind} fields {unknown}")
    if missing := sorted(
        n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in cfg
    ):
        raise ValueError(f"{kind} needs {missing}")
    for k, v in cfg.items():
        if not (isinstance(v, str) or (k == "kubeconfig" and v is None)):
            raise ValueError(f"{k} must be a string, got {v!r}")
    cls.check_config(cfg)
    return cfg


def build_router(cfg: dict[str, Any], api: Any = None) -> TrafficRouter:
    validate_config(cfg)
    return ROUTERS[cfg["router"]].from_config(cfg, api=api)
