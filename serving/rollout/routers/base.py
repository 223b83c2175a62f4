"""What every traffic router shares: the interface, its error, and the config plumbing.

Flagger's ``pkg/router`` split (``SetRoutes``/``GetRoutes``): one small interface and one
implementation per data plane, one file each in this package. Weights are percentages
``stable + canary == 100``.

A router class also says how it is configured:

* ``add_arguments(parser)``: its ``start`` flags;
* ``config_from_args(ns)``: the config it persists with the rollout (:meth:`TrafficRouter.config`),
  from those flags (ValueError naming the missing flag);
* ``state_location(cfg)``: the default state ConfigMap and the InferenceService that owns it;
* ``check_config(cfg)``: its own checks of a stored config, on top of :func:`routers.validate_config`;
* ``from_config(cfg, api)``: the router itself.

Routers that drive a Helm release of the chart (the KFP step) also have ``for_release(fullname,
namespace)``: a :class:`Release`.

Routers that can mirror (the shadow step: the canary answers a copy of every request at weight 0 and
nobody sees its answers) also implement :class:`MirroringRouter`; :func:`routers.mirrors` says which.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, NamedTuple, Protocol

from serving.contract.errors import MlrolloutError


class RouterError(MlrolloutError, RuntimeError):
    """The data plane refused or did not apply a routing change."""


class TrafficRouter(Protocol):
    name: str

    def set_weights(self, stable: int, canary: int) -> None: ...

    def get_weights(self) -> tuple[int, int]: ...

    def promote(self) -> None:
        """The canary version takes all traffic for good."""
        ...

    def rollback(self) -> None:
        """All traffic back to the stable version."""
        ...

    def config(self) -> dict[str, Any]:
        """What :func:`build_router` needs to rebuild this router (persisted with the state)."""
        ...


class MirroringRouter(TrafficRouter, Protocol):
    """A router that can send a copy of every request to the canary and discard its answer."""

    def set_mirror(self, on: bool) -> None:
        """Mirror to the canary (``on``) or stop; idempotent, and independent of the weights."""
        ...

    def get_mirror(self) -> bool: ...

    def check_mirror(self) -> None:
        """RouterError naming what is missing when the data plane cannot mirror (checked at start)."""
        ...


class Release(NamedTuple):
    """How a router reaches a Helm release of the chart (helm/mlrollout-model/README.md)."""

    config: dict[str, Any]  # the router's config (:meth:`TrafficRouter.config`)
    owner_isvc: str  # the InferenceService that owns the state ConfigMap
    metrics_urls: tuple[str, str]  # stable, canary /metrics to scrape ("" when there is none)


def check_weights(stable: int, canary: int) -> None:
    if not (0 <= stable <= 100 and 0 <= canary <= 100 and stable + canary == 100):
        raise ValueError(f"weights must be percentages adding up to 100, got stable={stable} canary={canary}")


# Kubernetes object names (RFC 1123 subdomain, the loosest rule any of ours follows)
K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def check_k8s_names(cfg: dict[str, Any], fields: tuple[str, ...]) -> None:
    for k in fields:
        v = cfg.get(k)
        if v and not K8S_NAME.fullmatch(v):
            raise ValueError(f"{k} {v!r} is not a Kubernetes object name")


def require_flags(router: str, ns: argparse.Namespace, fields: tuple[str, ...], what: str = "") -> None:
    """ValueError ``--router X needs --a, --b`` for the flags in ``fields`` that ``ns`` leaves empty."""
    if missing := [f for f in fields if not getattr(ns, f)]:
        raise ValueError(
            f"--router {router} needs " + ", ".join("--" + m.replace("_", "-") for m in missing) + what
        )
