"""``local_proxy``: HAProxy in front of two local runtimes.

Weights change through HAProxy's runtime API (``set weight`` on the admin stats socket): no reload, no
dropped connection.
"""

from __future__ import annotations

import argparse
import re
import socket
from typing import Any

from serving.rollout.routers.base import RouterError, check_weights, require_flags

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

    # ----------------------------------------------------------------- configuration

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        r = parser.add_argument_group("router: local_proxy (HAProxy runtime API)")
        r.add_argument("--haproxy-socket", help="HAProxy admin stats socket")
        r.add_argument("--backend", default="be_model")
        r.add_argument("--stable-server", default="stable")
        r.add_argument("--canary-server", default="canary")

    @classmethod
    def config_from_args(cls, ns: argparse.Namespace) -> dict[str, Any]:
        require_flags(cls.name, ns, ("haproxy_socket",), " (the HAProxy admin stats socket)")
        return {
            "router": cls.name,
            "socket_path": ns.haproxy_socket,
            "backend": ns.backend,
            "stable_server": ns.stable_server,
            "canary_server": ns.canary_server,
        }

    @staticmethod
    def state_location(cfg: dict[str, Any]) -> tuple[str, str]:
        return "", ""  # local: no ConfigMap (the state goes to --state-file)

    @classmethod
    def check_config(cls, cfg: dict[str, Any]) -> None:
        cls.from_config(cfg)  # checks the names, sends nothing

    @classmethod
    def from_config(cls, cfg: dict[str, Any], api: Any = None) -> LocalProxyRouter:
        return cls(**{k: v for k, v in cfg.items() if k != "router"})

    # ----------------------------------------------------------------- routing

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
        check_weights(stable, canary)
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
