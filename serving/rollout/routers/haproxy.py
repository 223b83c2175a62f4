"""``local_proxy``: HAProxy in front of two local runtimes.

Weights change through HAProxy's runtime API (``set weight`` on the admin stats socket): no reload, no
dropped connection.

With a cohort (:mod:`serving.rollout.cohorts`) the backend also carries :func:`cohort_rules`: HAProxy hashes
the user key itself (``xxh32,mod(100)``) and reads the canary's share from a map file, which the runtime
API changes in memory (``set map``), again without a reload. The server weights keep the same share for
requests that carry no key.

Mirroring (the shadow step) is the key ``mirror`` of the map file ``mlrollout-mirror.map`` (``on``/``off``,
``set map`` on the same socket), which the HAProxy config reads for every request; the local stack's
config (``serving/demo/localstack``) has the Lua action behind it.
"""

from __future__ import annotations

import argparse
import re
import socket
from typing import Any

from serving.rollout import cohorts
from serving.rollout.routers.base import RouterError, check_weights, require_flags

# HAProxy backend and server names as the runtime API receives them: a newline or `;` would start
# another command on the admin socket (runtime-API command injection from a flag or a stored record).
HAPROXY_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# the map whose key "mirror" turns mirroring to the canary on and off (the config's contract)
MIRROR_MAP = "mlrollout-mirror.map"
MIRROR_KEY = "mirror"
_MAP_LINE = re.compile(r"^(\d+) \((.*?)\) ")


def check_haproxy_name(what: str, name: Any) -> str:
    """``name`` when it is a safe HAProxy name (``^[A-Za-z0-9_.-]+$``, matched in full), else ValueError."""
    if not isinstance(name, str) or not HAPROXY_NAME.fullmatch(name):
        raise ValueError(
            f"HAProxy {what} name {name!r} is not allowed: use only letters, digits, '_', '.' and '-'"
        )
    return name


# the cohort map file's path as the config and the runtime API name it (it goes into both verbatim)
MAP_PATH = re.compile(r"/[A-Za-z0-9_./-]+")
SHARE_KEY = "share"  # the map's one entry: the canary's share in percent


def check_map_path(path: Any) -> str:
    if not isinstance(path, str) or not MAP_PATH.fullmatch(path) or "/../" in path:
        raise ValueError(
            f"HAProxy cohort map {path!r} must be an absolute path of letters, digits and '_./-'"
        )
    return path


def cohort_map_text(share: int) -> str:
    """The map file's content HAProxy starts from (the router's ``set map`` then changes it in memory)."""
    return f"{SHARE_KEY} {int(share)}\n"


def cohort_rules(
    cohort: str, map_path: str, stable_server: str = "stable", canary_server: str = "canary"
) -> str:
    """The ``backend`` lines that route a cohort (:mod:`serving.rollout.cohorts`), for the HAProxy config.

    ``use-server`` picks a server even at weight 0, so the share in the map alone decides keyed requests;
    a request the rules do not place is balanced by the server weights (the random split).
    """
    c = cohorts.parse(cohort)
    check_map_path(map_path)
    check_haproxy_name("stable server", stable_server)
    check_haproxy_name("canary server", canary_server)
    # the whole header line (req.fhdr: a key with a comma stays one key), or the cookie's value
    key = f"req.fhdr({c.name})" if c.source == "header" else f"req.cook({c.name})"
    lines = [
        f"# cohort {c.spec} (serving.rollout.cohorts): the router sets the canary's share in the map",
        f"http-request set-var(txn.mlr_share) str({SHARE_KEY}),map_str_int({map_path},0)",
    ]
    if c.mode == "hash":
        lines += [
            f"http-request set-var(txn.mlr_bucket) {key},xxh32,mod({cohorts.BUCKETS})"
            f" if {{ {key} -m len gt 0 }}",
            "http-request set-var(txn.mlr_d) var(txn.mlr_bucket),sub(txn.mlr_share)"
            " if { var(txn.mlr_bucket) -m found }",
            f"use-server {canary_server} if {{ var(txn.mlr_d) -m int lt 0 }}",
            f"use-server {stable_server} if {{ var(txn.mlr_bucket) -m found }}",
        ]
    else:
        lines += [
            f"use-server {canary_server} if {{ {key} -m str {c.value} }}"
            " { var(txn.mlr_share) -m int gt 0 }",
            f"use-server {stable_server} if {{ var(txn.mlr_share) -m int lt 100 }}",
        ]
    return "\n".join("    " + line for line in lines) + "\n"


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
        cohort: str = "",
        cohort_map: str = "",
    ):
        if not isinstance(socket_path, str) or not socket_path:
            raise ValueError(f"the HAProxy socket path must be a non-empty string, got {socket_path!r}")
        check_haproxy_name("backend", backend)
        check_haproxy_name("stable server", stable_server)
        check_haproxy_name("canary server", canary_server)
        if stable_server == canary_server:
            raise ValueError(f"the stable and canary servers must differ, both are {stable_server!r}")
        self.cohort = cohorts.parse(cohort) if cohort else None
        if self.cohort and not cohort_map:
            raise ValueError("a cohort on local_proxy needs the HAProxy map file (--cohort-map)")
        if cohort_map:
            check_map_path(cohort_map)
        self.cohort_map = cohort_map
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
        r.add_argument(
            "--cohort-map",
            default="",
            help="with a cohort: the map file the HAProxy config's cohort rules read the share from",
        )

    @classmethod
    def config_from_args(cls, ns: argparse.Namespace) -> dict[str, Any]:
        require_flags(cls.name, ns, ("haproxy_socket",), " (the HAProxy admin stats socket)")
        return {
            "router": cls.name,
            "socket_path": ns.haproxy_socket,
            "backend": ns.backend,
            "stable_server": ns.stable_server,
            "canary_server": ns.canary_server,
            **cohorts_config(ns),
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

    def _map_set(self, ref: str, key: str, value: str) -> None:
        out = self.api.command(f"set map {ref} {key} {value}")
        if out:  # HAProxy answers nothing on success
            raise RouterError(f"HAProxy refused 'set map {ref} {key} {value}': {out}")

    def _map_get(self, ref: str, key: str) -> tuple[str | None, str]:
        """(the value of ``key`` in map ``ref``, or None; HAProxy's whole answer)."""
        out = self.api.command(f"show map {ref}")
        for line in out.splitlines():  # "0x55d0c8a0 share 25"
            parts = line.split()
            if len(parts) == 3 and parts[1] == key:
                return parts[2], out
        return None, out

    def _set_share(self, share: int) -> None:
        self._map_set(self.cohort_map, SHARE_KEY, str(int(share)))

    def _get_share(self) -> int:
        value, out = self._map_get(self.cohort_map, SHARE_KEY)
        if value is not None and value.lstrip("-").isdigit():
            return int(value)
        raise RouterError(
            f"HAProxy answered {out!r} to 'show map {self.cohort_map}': no {SHARE_KEY} entry; is it"
            " the map file of the HAProxy config's cohort rules (routers.haproxy.cohort_rules)?"
        )

    def set_weights(self, stable: int, canary: int) -> None:
        check_weights(stable, canary)
        # raise the side that grows first, so no instant has both at 0
        grows = canary > self._get(self.canary_server)
        if self.cohort and not grows:
            self._set_share(canary)  # keyed users leave the canary before its weight drops
        if grows:
            self._set(self.canary_server, canary)
            self._set(self.stable_server, stable)
        else:
            self._set(self.stable_server, stable)
            self._set(self.canary_server, canary)
        if self.cohort and grows:
            self._set_share(canary)

    def get_weights(self) -> tuple[int, int]:
        weights = self._get(self.stable_server), self._get(self.canary_server)
        if self.cohort:
            share = self._get_share()
            if share != weights[1]:
                # the map and the weights disagree (e.g. a step half applied): a pair that no valid
                # weight equals (they add up to 100), so the controller's reconcile sets both again
                return 0, 0
        return weights

    # ----------------------------------------------------------------- mirroring (shadow step)

    def _mirror_map(self) -> str:
        """``#<id>`` of the mirror map, found by its file name in ``show map`` (so no path from a flag or
        a record ever reaches the socket)."""
        out = self.api.command("show map")
        for line in out.splitlines():
            m = _MAP_LINE.match(line)
            if m and m.group(2).rsplit("/", 1)[-1] == MIRROR_MAP:
                return f"#{m.group(1)}"
        raise RouterError(
            f"HAProxy at {self.api.socket_path} has no map {MIRROR_MAP}: its config cannot mirror to the "
            "canary (the shadow step needs the mirror action; see serving/rollout/README.md, Shadow step)"
        )

    def check_mirror(self) -> None:
        self.get_mirror()

    def set_mirror(self, on: bool) -> None:
        self._map_set(self._mirror_map(), MIRROR_KEY, "on" if on else "off")

    def get_mirror(self) -> bool:
        value, out = self._map_get(self._mirror_map(), MIRROR_KEY)
        if value is None:
            raise RouterError(f"HAProxy map {MIRROR_MAP} has no key {MIRROR_KEY!r} (got {out[:200]!r})")
        return value == "on"

    def promote(self) -> None:
        self.set_weights(0, 100)

    def rollback(self) -> None:
        self.set_weights(100, 0)

    # the watch after promotion (machine.verify): promotion here is the weights alone, so the stable
    # server still runs the previous model and restoring it is a rollback; the new version is the canary
    # server's
    promoted_side = "canary"

    def previous_model(self) -> None:
        return None  # nothing to keep: the stable server is never changed

    def restore(self, previous: dict[str, Any] | None) -> None:
        self.rollback()

    def config(self) -> dict[str, Any]:
        return {
            "router": self.name,
            "socket_path": self.api.socket_path,
            "backend": self.backend,
            "stable_server": self.stable_server,
            "canary_server": self.canary_server,
            **({"cohort": self.cohort.spec, "cohort_map": self.cohort_map} if self.cohort else {}),
        }


def cohorts_config(ns: argparse.Namespace) -> dict[str, str]:
    """The cohort fields of the local_proxy config from the flags (none without a cohort)."""
    spec = cohorts.from_args(ns)
    if not spec:
        return {}
    require_flags("local_proxy", ns, ("cohort_map",), " with a cohort (the map file its HAProxy rules read)")
    return {"cohort": spec, "cohort_map": ns.cohort_map}
