"""Operator commands on a ModelRollout: the protocol between ``kubectl mlrollout`` and the operator.

A command is three annotations on the object, set in one merge patch (anyone with ``patch`` on
modelrollouts can send one, ``kubectl annotate`` included)::

    mlrollout.io/command: pause | resume | promote | abort
    mlrollout.io/command-id: <a nonce, new for every command>
    mlrollout.io/command-reason: <optional, recorded in the decision>

The operator applies a command whose id differs from ``status.lastCommand.id`` through the state machine
(``controller.command``: the same code the CLI's file/ConfigMap commands run) and acknowledges it in
``status.lastCommand`` (id, command, result ``Applied``/``Rejected``, message, time) *in the same status
write* as the decision, so a restarted operator never applies one twice. Annotations, not spec fields:
they bump no ``generation`` and a Helm upgrade or an Argo CD sync of the ModelRollout (which never
renders them) leaves them alone, so a command is never undone or replayed by GitOps.

Pure: no I/O, no clock (the caller passes ``now`` and the nonce).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serving.rollout import crd, machine
from serving.rollout.machine import InvalidTransition, Phase, RolloutSpec, RolloutState

COMMAND = "mlrollout.io/command"
COMMAND_ID = "mlrollout.io/command-id"
COMMAND_REASON = "mlrollout.io/command-reason"
VERBS = ("pause", "resume", "promote", "abort")
APPLIED, REJECTED = "Applied", "Rejected"
REASON_LIMIT = 500


@dataclass(frozen=True)
class Command:
    verb: str
    id: str
    reason: str | None = None


def request(verb: str, nonce: str, reason: str | None = None) -> dict[str, Any]:
    """The merge patch that sends ``verb`` (a reason of None removes an earlier command's reason)."""
    if verb not in VERBS:
        raise ValueError(f"unknown command {verb!r}: use one of {', '.join(VERBS)}")
    reason = " ".join((reason or "").split())[:REASON_LIMIT] or None
    return {"metadata": {"annotations": {COMMAND: verb, COMMAND_ID: nonce, COMMAND_REASON: reason}}}


def requested(obj: dict[str, Any]) -> Command | None:
    """The command the object's annotations carry (None when there is none or it has no id)."""
    ann = (obj.get("metadata") or {}).get("annotations") or {}
    verb, cid = ann.get(COMMAND), ann.get(COMMAND_ID)
    if not verb or not cid:
        return None
    return Command(verb.strip(), cid, ann.get(COMMAND_REASON) or None)


def last(obj: dict[str, Any]) -> dict[str, Any] | None:
    """``status.lastCommand``: the operator's acknowledgement of the last command it saw."""
    return ((obj.get("status") or {}).get("lastCommand")) or None


def pending(obj: dict[str, Any] | None, acked: str | None = None) -> Command | None:
    """The command not acknowledged yet: neither in ``status.lastCommand`` nor ``acked`` (the id this
    operator acknowledged a moment ago, which its watch cache may not show yet)."""
    if obj is None:
        return None
    cmd = requested(obj)
    if cmd is None or cmd.id == acked or cmd.id == (last(obj) or {}).get("id"):
        return None
    return cmd


def refusal(verb: str, status: dict[str, Any]) -> str | None:
    """Why ``verb`` cannot apply to a rollout with this ``status`` (None: it can), in the state machine's
    own words: the check runs the machine's transition on the status's phase."""
    if verb not in VERBS:
        return f"unknown command {verb!r}: use one of {', '.join(VERBS)}"
    phase, message = status.get("phase"), status.get("message") or "no status"
    if phase not in {p.value for p in Phase}:  # no status yet, or a status-only phase (Initialized)
        return f"cannot {verb}: no rollout is live (phase {phase or 'none'}: {message})"
    if not status.get("step"):
        return f"cannot {verb}: the rollout has not started yet ({message})"
    st = RolloutState(phase=Phase(phase), reason=status.get("message") or "")
    try:
        if verb == "pause":
            machine.pause(st, 0.0)
        elif verb == "resume":
            machine.resume(st, RolloutSpec(), 0.0)
        elif verb == "promote":
            machine.promote(st, 0.0)
        else:
            machine.abort(st, 0.0)
    except InvalidTransition as e:
        return str(e)
    return None


def machine_reason(cmd: Command, who: str = "kubectl mlrollout") -> str:
    """The decision's reason for a command (what the history, the Event and the notification say)."""
    done = {"pause": "paused", "resume": "resumed", "promote": "promoted", "abort": "aborted"}[cmd.verb]
    return f"{done} by operator command {cmd.id[:12]}" + (f": {cmd.reason}" if cmd.reason else f" ({who})")


def ack(cmd: Command, result: str, message: str, now: float) -> dict[str, Any]:
    """The ``status`` fragment that acknowledges ``cmd``."""
    return {
        "lastCommand": {
            "id": cmd.id,
            "command": cmd.verb,
            "result": result,
            "message": " ".join(message.split())[:1000],
            "time": crd.rfc3339(now),
        }
    }
