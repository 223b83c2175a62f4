"""Operator commands on a ModelRollout from a terminal: the ``kubectl mlrollout`` plugin
(``kubectl-mlrollout`` on PATH, installed with the package) and ``python -m serving.rollout
status|pause|resume|promote|abort --name NAME``.

Both only read the object and set the command annotations (``commands.request``); the operator applies a
command through the state machine and acknowledges it in ``status.lastCommand``, which the command waits
for (``--timeout``, default 30s; ``--no-wait`` returns once the annotation is set). A command that cannot
apply in the rollout's phase is refused here first, in the state machine's words (``commands.refusal``).
Every error is one line on stderr, exit code 2: no cluster, no such ModelRollout, the wrong phase, a
rejection by the operator, no acknowledgement in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import uuid
from typing import Any

from serving.contract.errors import MlrolloutError
from serving.rollout import commands, crd, kube

REQUEST_TIMEOUT_S = 15  # one API call; the client's default is none at all


class CommandError(MlrolloutError, RuntimeError):
    """A command that did not happen (the message says why and what to do)."""


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def connect(kubeconfig: str | None = None, context: str | None = None) -> Any:
    try:
        return kube.custom_api(kubeconfig, context)
    except Exception as e:  # ConfigException: no in-cluster config and no kubeconfig
        raise CommandError(f"no cluster: cannot load a kubeconfig ({_one_line(e)})") from None


def default_namespace(kubeconfig: str | None = None, context: str | None = None) -> str:
    """The current context's namespace, as kubectl picks it (else ``default``)."""
    from kubernetes import config

    try:
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
    except Exception:  # in a pod, or no kubeconfig: connect() says what is wrong
        return "default"
    ctx = next((c for c in contexts if c["name"] == context), None) if context else active
    return ((ctx or {}).get("context") or {}).get("namespace") or "default"


def _api_error(e: Exception, what: str) -> CommandError:
    code = kube.status_of(e)
    if code is None:  # urllib3 MaxRetryError, a refused connection, a TLS failure
        return CommandError(f"cannot reach the API server to {what}: {_one_line(e)}")
    reason = getattr(e, "reason", "") or ""
    with contextlib.suppress(ValueError, AttributeError):  # the Status object's message, if any
        reason = json.loads(getattr(e, "body", "") or "{}").get("message") or reason
    return CommandError(f"cannot {what}: HTTP {code}: {' '.join(str(reason).split())[:300]}")


def read(api: Any, namespace: str, name: str) -> dict[str, Any]:
    g, v, p = crd.MODELROLLOUT
    try:
        return api.get_namespaced_custom_object(g, v, namespace, p, name, _request_timeout=REQUEST_TIMEOUT_S)
    except Exception as e:
        if kube.is_not_found(e):
            raise CommandError(
                f"ModelRollout {namespace}/{name} not found (kubectl get modelrollouts -n {namespace})"
            ) from None
        raise _api_error(e, f"read ModelRollout {namespace}/{name}") from None


def send(
    api: Any,
    namespace: str,
    name: str,
    verb: str,
    *,
    reason: str | None = None,
    wait_s: float = 30.0,
    poll_s: float = 0.5,
    nonce: str | None = None,
) -> dict[str, Any] | None:
    """Set the command annotations and wait for the operator's acknowledgement (None with ``wait_s`` 0).
    Raises :class:`CommandError` when the phase refuses it, the operator rejects it, or no ack comes."""
    obj = read(api, namespace, name)
    why = commands.refusal(verb, obj.get("status") or {})
    if why is not None:
        raise CommandError(f"ModelRollout {namespace}/{name}: {why}")
    nonce = nonce or uuid.uuid4().hex
    g, v, p = crd.MODELROLLOUT
    try:
        api.patch_namespaced_custom_object(
            g, v, namespace, p, name, commands.request(verb, nonce, reason),
            field_manager="kubectl-mlrollout", _request_timeout=REQUEST_TIMEOUT_S,
        )  # fmt: skip
    except Exception as e:
        raise _api_error(e, f"annotate ModelRollout {namespace}/{name}") from None
    if wait_s <= 0:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        got = commands.last(read(api, namespace, name)) or {}
        if got.get("id") == nonce:
            if got.get("result") != commands.APPLIED:
                raise CommandError(f"ModelRollout {namespace}/{name}: the operator rejected {verb}: "
                                   f"{got.get('message', '')}")  # fmt: skip
            return got
        if time.monotonic() >= deadline:
            raise CommandError(
                f"no operator acknowledged {verb} on ModelRollout {namespace}/{name} within {wait_s:g}s "
                f"(is it running and leading?); the command stays pending (id {nonce[:12]}) until one does"
            )
        time.sleep(poll_s)


# --------------------------------------------------------------------------- status (pure)


def _num(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def format_status(obj: dict[str, Any]) -> str:
    """What ``status`` prints: phase, step, weight, versions, the last analysis (each gate's value,
    threshold, n and verdict), the conditions and the last command."""
    meta, spec, st = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    steps = (spec.get("strategy") or {}).get("steps") or []
    model = spec.get("model") or {}
    lines = [
        f"ModelRollout {meta.get('namespace')}/{meta['name']}: {model.get('name') or meta['name']} "
        f"{st.get('stableVersion', '?')} -> {st.get('canaryVersion', model.get('version'))}",
        f"phase {st.get('phase', 'Pending')}, step {st.get('step', 0)}/{len(steps)} {steps}, "
        f"canary weight {st.get('canaryWeight', 0)}%",
    ]
    if st.get("message"):
        lines.append(f"message: {st['message']}")
    gates = st.get("lastAnalysis") or []
    if gates:
        lines.append(f"last analysis ({st.get('lastAnalysisTime', '?')}):")
        rows = [("gate", "value", "threshold", "n", "verdict")]
        for g in gates:
            unit = g.get("unit") or ""
            n = f"{g.get('n', 0)}" + (f" vs {g['baselineN']}" if g.get("baselineN") is not None else "")
            value = _num(g.get("value")) + (unit if g.get("value") is not None else "")
            threshold = f"{g.get('op', '')} {_num(g['threshold'])}{unit}"
            rows.append((g["gate"], value, threshold, n, g["verdict"]))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    conds = st.get("conditions") or []
    if conds:
        lines.append("conditions:")
        for c in conds:
            msg = f"  {c.get('message')}" if c.get("message") else ""
            lines.append(f"  {c['type']:<12} {c['status']:<6} {c.get('reason', '')}{msg}")
    cmd = st.get("lastCommand")
    if cmd:
        lines.append(f"last command: {cmd['command']} {cmd['result']} at {cmd.get('time', '?')}: "
                     f"{cmd.get('message', '')}")  # fmt: skip
    pend = commands.pending(obj)
    if pend:
        lines.append(f"pending command: {pend.verb} (id {pend.id[:12]}), not acknowledged yet")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry points


def run(
    verb: str,
    namespace: str,
    name: str,
    *,
    kubeconfig: str | None = None,
    context: str | None = None,
    reason: str | None = None,
    wait_s: float = 30.0,
    as_json: bool = False,
) -> int:
    api = connect(kubeconfig, context)
    if verb == "status":
        obj = read(api, namespace, name)
        print(json.dumps(obj.get("status") or {}, indent=1) if as_json else format_status(obj))
        return 0
    got = send(api, namespace, name, verb, reason=reason, wait_s=wait_s)
    if got is None:
        print(f"{verb} sent to ModelRollout {namespace}/{name} (not waiting for the operator)")
    else:
        obj = read(api, namespace, name)
        st = obj.get("status") or {}
        print(f"{verb}: {got['result']}; phase {st.get('phase')}, canary weight {st.get('canaryWeight')}% "
              f"({got.get('message', '')})")  # fmt: skip
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def plugin_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="kubectl mlrollout",
        description="Show and steer ModelRollouts (the mlrollout operator applies the commands).",
    )
    ap.add_argument("verb", choices=["status", *commands.VERBS])
    ap.add_argument("name", help="the ModelRollout")
    ap.add_argument("-n", "--namespace", help="default: the current context's namespace")
    ap.add_argument("--kubeconfig", help="default: $KUBECONFIG, else ~/.kube/config (or in-cluster)")
    ap.add_argument("--context", help="kubeconfig context (default: the current one)")
    ap.add_argument("--reason", help="recorded with pause, promote and abort")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the operator (30)")
    ap.add_argument("--no-wait", action="store_true", help="return once the command is set")
    ap.add_argument("-o", "--output", choices=["text", "json"], default="text", help="status format")
    return ap


def plugin_main(argv: list[str] | None = None) -> int:
    """``kubectl-mlrollout``: ``kubectl mlrollout status|pause|resume|promote|abort NAME [-n NS]``."""
    a = plugin_parser().parse_args(argv)
    try:
        ns = a.namespace or default_namespace(a.kubeconfig, a.context)
        return run(a.verb, ns, a.name, kubeconfig=a.kubeconfig, context=a.context, reason=a.reason,
                   wait_s=0 if a.no_wait else a.timeout, as_json=a.output == "json")  # fmt: skip
    except (MlrolloutError, ValueError, OSError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(plugin_main())
