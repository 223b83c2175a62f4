"""Traffic routers: how a weight decision reaches the data path.

Flagger's ``pkg/router`` split (``SetRoutes``/``GetRoutes``): one small interface and one
implementation per data plane. Weights are percentages ``stable + canary == 100``.

* :class:`LocalProxyRouter`: HAProxy in front of two local runtimes; weights change through
  HAProxy's runtime API (``set weight`` on the admin stats socket): no reload, no dropped
  connection.
* :class:`GatewayApiRouter`: the backendRef weights of a Gateway API ``HTTPRoute``
  (gateway.networking.k8s.io/v1) in front of two InferenceServices (stable, canary), as the
  Helm chart renders for ``strategy: canary``. Promotion copies the canary's predictor into the
  stable InferenceService, waits until every stable pod serves the canary's model (not merely
  Ready: see ``targets``), then sends all traffic back to stable (Flagger's primary/canary promotion).
  Weights are written as a JSON merge patch of ``spec.rules``; ``HTTPRoute.spec.rules`` is an atomic
  list, so our field manager then owns all of the rules, not just the weights (a ``helm upgrade`` that
  renders different rules mid-rollout conflicts with us, by design).
* :class:`KServeKnativeRouter`: KServe's classic ``spec.predictor.canaryTrafficPercent`` on one
  InferenceService (Knative mode): promote = remove the field, rollback = 0.
"""

from __future__ import annotations

import inspect
import re
import socket
from typing import Any, Protocol

from serving.rollout import kube, targets


class RouterError(RuntimeError):
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


def _check(stable: int, canary: int) -> None:
    if not (0 <= stable <= 100 and 0 <= canary <= 100 and stable + canary == 100):
        raise ValueError(f"weights must be percentages adding up to 100, got stable={stable} canary={canary}")


# --------------------------------------------------------------------------- local: HAProxy

# HAProxy backend and server names as the runtime API receives them: a newline or `;` would start
# another command on the admin socket (runtime-API command injection from a flag or a stored record).
HAPROXY_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_haproxy_name(what: str, name: Any) -> str:
    """``name`` when it is a safe HAProxy name (``^[A-Za-z0-9_.-]+$``, matched in full), else ValueError."""
    if not isinstance(name, str) or not HAPROXY_NAME.fullmatch(name):
        raise ValueError(
            f"HAProxy {what} name {name!r} is not allowed: use only letters, digits, '_', '.' and '-'"
        )
    return name


class HAProxyRuntimeAPI:
    """HAProxy's runtime API over its admin stats socket (one command per connection)."""

    def __init__(self, socket_path: str, timeout_s: float = 5.0):
        self.socket_path = socket_path
        self.timeout_s = timeout_s

    def command(self, cmd: str) -> str:
        if any(c in cmd for c in "\n\r;") or not cmd.isprintable():
            raise RouterError(f"refusing to send {cmd!r} to HAProxy: one command, printable, no ';'")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout_s)
        try:
            s.connect(self.socket_path)
            s.sendall(cmd.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except OSError as e:
            raise RouterError(f"HAProxy runtime API at {self.socket_path} failed for {cmd!r}: {e}") from e
        finally:
            s.close()
        return b"".join(chunks).decode(errors="replace").strip()


class LocalProxyRouter:
    """HAProxy server weights: ``weight = percent`` (HAProxy accepts 0..256; 0 = no new requests)."""

    name = "local_proxy"

    def __init__(
        self,
        socket_path: str,
        backend: str = "be_model",
        stable_server: str = "stable",
        canary_server: str = "canary",
    ):
        if not isinstance(socket_path, str) or not socket_path:
            raise ValueError(f"the HAProxy socket path must be a non-empty string, got {socket_path!r}")
        check_haproxy_name("backend", backend)
        check_haproxy_name("stable server", stable_server)
        check_haproxy_name("canary server", canary_server)
        if stable_server == canary_server:
            raise ValueError(f"the stable and canary servers must differ, both are {stable_server!r}")
        self.api = HAProxyRuntimeAPI(socket_path)
        self.backend, self.stable_server, self.canary_server = backend, stable_server, canary_server

    def _set(self, server: str, weight: int) -> None:
        out = self.api.command(f"set weight {self.backend}/{server} {int(weight)}")
        if out:  # HAProxy answers nothing on success
            raise RouterError(f"HAProxy refused 'set weight {self.backend}/{server} {weight}': {out}")

    def _get(self, server: str) -> int:
        out = self.api.command(f"get weight {self.backend}/{server}")
        try:
            return int(out.split()[0])  # "10 (initial 0)"
        except (IndexError, ValueError) as e:
            raise RouterError(f"HAProxy answered {out!r} to 'get weight {self.backend}/{server}'") from e

    def set_weights(self, stable: int, canary: int) -> None:
        _check(stable, canary)
        # raise the side that grows first, so no instant has both at 0
        if canary > self._get(self.canary_server):
            self._set(self.canary_server, canary)
            self._set(self.stable_server, stable)
        else:
            self._set(self.stable_server, stable)
            self._set(self.canary_server, canary)

    def get_weights(self) -> tuple[int, int]:
        return self._get(self.stable_server), self._get(self.canary_server)

    def promote(self) -> None:
        self.set_weights(0, 100)

    def rollback(self) -> None:
        self.set_weights(100, 0)

    def config(self) -> dict[str, Any]:
        return {
            "router": self.name,
            "socket_path": self.api.socket_path,
            "backend": self.backend,
            "stable_server": self.stable_server,
            "canary_server": self.canary_server,
        }


# --------------------------------------------------------------------------- Kubernetes


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
        ready_timeout_s: float = 300.0,
        poll_s: float = 2.0,
    ):
        self.route, self.namespace = route, namespace
        self.stable_backend, self.canary_backend = stable_backend, canary_backend
        self.stable_isvc, self.canary_isvc = stable_isvc, canary_isvc
        self.kubeconfig = kubeconfig
        self.ready_timeout_s, self.poll_s = ready_timeout_s, poll_s
        self.api = api or kube.custom_api(kubeconfig)

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

    def set_weights(self, stable: int, canary: int) -> None:
        _check(stable, canary)

        def attempt() -> None:
            route = self._get_route()
            _, s, c = self._refs(route)
            s["weight"], c["weight"] = int(stable), int(canary)
            body = {
                "metadata": {"resourceVersion": route["metadata"]["resourceVersion"]},
                "spec": {"rules": route["spec"]["rules"]},
            }
            kube.patch(self.api, kube.HTTPROUTE, self.namespace, self.route, body)

        try:
            kube.retry_on_conflict(attempt, f"HTTPRoute {self.namespace}/{self.route}", attempts=5)
        except kube.KubeError as e:
            raise RouterError(str(e)) from e

    def get_weights(self) -> tuple[int, int]:
        _, s, c = self._refs(self._get_route())
        # Gateway API: a backendRef without weight has weight 1
        return int(s.get("weight", 1)), int(c.get("weight", 1))

    def promote(self) -> None:
        """Canary takes all traffic, stable gets the canary's predictor, then stable takes it back."""
        self.set_weights(0, 100)
        if not (self.stable_isvc and self.canary_isvc):
            return  # no InferenceServices named: the canary backend simply keeps all traffic
        canary = kube.get(self.api, kube.ISVC, self.namespace, self.canary_isvc)
        if canary is None:
            raise RouterError(
                f"InferenceService {self.namespace}/{self.canary_isvc} is gone; traffic stays on the canary"
            )
        predictor = targets.predictor_for(canary, track="stable")
        kube.patch(self.api, kube.ISVC, self.namespace, self.stable_isvc, {"spec": {"predictor": predictor}})
        try:
            targets.wait_serving(
                self.api,
                self.namespace,
                self.stable_isvc,
                predictor.get("model", {}).get("storageUri"),
                timeout_s=self.ready_timeout_s,
                poll_s=self.poll_s,
            )
        except kube.KubeError as e:
            raise RouterError(f"{e}; traffic stays on the canary") from e
        self.set_weights(100, 0)

    def rollback(self) -> None:
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
        }


class KServeKnativeRouter:
    """``spec.predictor.canaryTrafficPercent`` of one InferenceService (KServe Knative mode)."""

    name = "kserve_knative"

    def __init__(self, isvc: str, namespace: str, api: Any = None, kubeconfig: str | None = None):
        self.isvc, self.namespace, self.kubeconfig = isvc, namespace, kubeconfig
        self.api = api or kube.custom_api(kubeconfig)

    def _patch(self, percent: int | None) -> None:
        kube.patch(
            self.api,
            kube.ISVC,
            self.namespace,
            self.isvc,
            {"spec": {"predictor": {"canaryTrafficPercent": percent}}},
        )

    def set_weights(self, stable: int, canary: int) -> None:
        _check(stable, canary)
        self._patch(int(canary))

    def get_weights(self) -> tuple[int, int]:
        """From ``status.components.predictor.traffic[]`` (what Knative applied), else from the spec."""
        obj = kube.get(self.api, kube.ISVC, self.namespace, self.isvc)
        if obj is None:
            raise RouterError(f"InferenceService {self.namespace}/{self.isvc} does not exist")
        traffic = obj.get("status", {}).get("components", {}).get("predictor", {}).get("traffic") or []
        if traffic:
            latest = sum(int(t.get("percent") or 0) for t in traffic if t.get("latestRevision"))
            return 100 - latest, latest
        pct = obj["spec"]["predictor"].get("canaryTrafficPercent")
        return (0, 100) if pct is None else (100 - int(pct), int(pct))

    def promote(self) -> None:
        self._patch(None)  # merge-patch null removes the field: the latest revision takes 100%

    def rollback(self) -> None:
        self._patch(0)  # 100% pinned to the previous rolled-out revision

    def config(self) -> dict[str, Any]:
        return {
            "router": self.name,
            "isvc": self.isvc,
            "namespace": self.namespace,
            "kubeconfig": self.kubeconfig,
        }


_ROUTERS: dict[str, type] = {
    "local_proxy": LocalProxyRouter,
    "gateway_api": GatewayApiRouter,
    "kserve_knative": KServeKnativeRouter,
}
# what a router config may carry: the constructors' arguments, less the live client and the waits
_NOT_CONFIG = {"self", "api", "ready_timeout_s", "poll_s"}
# Kubernetes object names (RFC 1123 subdomain, the loosest rule any of ours follows)
_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def validate_config(cfg: Any) -> dict[str, Any]:
    """Check a router config (as :meth:`TrafficRouter.config` writes it) without touching the data plane.

    ValueError names what is wrong: an unknown router or field, a missing field, a value that is not
    a string, an HAProxy name outside ``[A-Za-z0-9_.-]+``, a Kubernetes name that is not one.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"must be an object, got {type(cfg).__name__}")
    kind = cfg.get("router")
    if kind not in _ROUTERS:
        raise ValueError(f"unknown router {kind!r}; choose local_proxy, gateway_api or kserve_knative")
    params = {
        n: p for n, p in inspect.signature(_ROUTERS[kind].__init__).parameters.items() if n not in _NOT_CONFIG
    }
    if unknown := sorted(set(cfg) - set(params) - {"router"}):
        raise ValueError(f"unknown {kind} fields {unknown}")
    if missing := sorted(
        n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in cfg
    ):
        raise ValueError(f"{kind} needs {missing}")
    for k, v in cfg.items():
        if not (isinstance(v, str) or (k == "kubeconfig" and v is None)):
            raise ValueError(f"{k} must be a string, got {v!r}")
    if kind == "local_proxy":
        LocalProxyRouter(**{k: v for k, v in cfg.items() if k != "router"})  # checks names, sends nothing
    else:
        for k in (
            "route",
            "namespace",
            "stable_backend",
            "canary_backend",
            "stable_isvc",
            "canary_isvc",
            "isvc",
        ):
            v = cfg.get(k)
            if v and not _K8S_NAME.fullmatch(v):
                raise ValueError(f"{k} {v!r} is not a Kubernetes object name")
    return cfg


def build_router(cfg: dict[str, Any], api: Any = None) -> TrafficRouter:
    validate_config(cfg)
    cfg = dict(cfg)
    kind = cfg.pop("router")
    if kind == "local_proxy":
        return LocalProxyRouter(**cfg)
    return _ROUTERS[kind](**cfg, api=api)
