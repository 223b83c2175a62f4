"""A ModelRollout's webhooks (``spec.webhooks``), as Flagger's: which to call when, with what, and what
their answers mean. Pure: no I/O (``hookhttp.py`` makes the calls).

* ``pre-rollout``: called once the canary serves and before any traffic moves. Every one must say yes
  (HTTP 2xx); a no (any other status, or no answer after the bounded retries) ends the rollout
  ``RolledBack`` at 0 % with the webhook's answer as the reason (``machine.refuse``).
* ``confirm-promotion``: a manual approval gate, asked after each analysis at the last step that passed.
  Until every one says yes the rollout holds at the last step (still analysed: a failure still rolls
  back), its ``Progressing`` condition has reason ``AwaitingPromotion`` and its message the answer.
* ``post-rollout`` (after every end: promoted, rolled back or aborted) and ``rollback`` (after a
  rollback or an abort): fire and forget, with bounded retries, once the end is applied to the route.
  (Flagger's rollback hooks are polled and *trigger* a rollback; here they only report one: use
  ``kubectl mlrollout abort`` for that.)

Every call is a JSON POST of :func:`payload` (documented in serving/rollout/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serving.rollout import crd
from serving.rollout.crstore import evidence_view
from serving.rollout.machine import Phase
from serving.rollout.record import RolloutRecord

MAX_TIMEOUT_S = 60.0  # the CRD refuses more; the code caps it too, whatever wrote the spec
DEFAULT_TIMEOUT_S = 10.0
GATE_ATTEMPTS = 2  # pre-rollout and confirm-promotion: one retry of a call that got no answer
FIRE_ATTEMPTS = 3  # post-rollout, rollback and notifications
GATES = ("pre-rollout", "confirm-promotion")
PAYLOAD_KIND = "ModelRolloutWebhook"


@dataclass(frozen=True)
class Webhook:
    name: str
    type: str
    url: str
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class Outcome:
    """One call's result: the HTTP status and (the start of) the body, or the transport error."""

    status: int | None = None
    body: str = ""
    error: str | None = None

    @property
    def yes(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def webhooks_of(spec: dict[str, Any]) -> list[Webhook]:
    """``spec.webhooks`` as :class:`Webhook` s (ValueError naming the entry for one no code can call)."""
    from serving.rollout.cli import parse_duration  # one duration parser for the CLI and the CRD

    out = []
    for i, w in enumerate(spec.get("webhooks") or []):
        where = f"spec.webhooks[{i}]"
        if w.get("type") not in crd.WEBHOOK_TYPES:
            raise ValueError(f"{where}.type: {w.get('type')!r} is not one of {', '.join(crd.WEBHOOK_TYPES)}")
        url = str(w.get("url") or "")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{where}.url: must start with http:// or https://, got {url!r}")
        try:
            timeout = min(parse_duration(str(w.get("timeout") or f"{DEFAULT_TIMEOUT_S:g}s")), MAX_TIMEOUT_S)
        except Exception as e:  # argparse.ArgumentTypeError: the message says what is wrong
            raise ValueError(f"{where}.timeout: {e}") from None
        out.append(Webhook(str(w.get("name") or f"webhook-{i}"), w["type"], url, timeout))
    return out


def of_type(hooks: list[Webhook], typ: str) -> list[Webhook]:
    return [h for h in hooks if h.type == typ]


def retryable(o: Outcome) -> bool:
    """No answer, too many requests, or a server error: worth another try. A 4xx is a real no."""
    return o.status is None or o.status == 429 or o.status >= 500


def backoff_s(attempt: int) -> float:
    """Seconds before retry ``attempt`` (1, 2, ...): 0.5, 1, 2, ... at most 5."""
    return min(0.5 * 2 ** (attempt - 1), 5.0)


def answer(hook: Webhook, o: Outcome) -> str | None:
    """None for a yes; else why not, in one line that names the webhook."""
    if o.yes:
        return None
    who = f"{hook.type} webhook {hook.name}"
    if o.status is None:
        return f"{who} did not answer ({o.error or 'no response'})"
    body = " ".join(o.body.split())[:200]
    return f"{who} said no: HTTP {o.status}" + (f": {body}" if body else "")


def first_no(answers: list[str | None]) -> str | None:
    """The gate's verdict over its webhooks: the first no (every one must say yes), else None."""
    return next((a for a in answers if a is not None), None)


def finished(old: RolloutRecord | None, new: RolloutRecord) -> bool:
    """Whether this write is the one that completes the rollout's end: terminal, its last action applied
    (``pending`` cleared: persist, then act), and not already so before (the same rollout)."""
    if new.state is None or not Phase(new.phase).terminal or new.pending is not None:
        return False
    same = old is not None and old.created_at == new.created_at and old.state is not None
    return not (same and Phase(old.phase).terminal and old.pending is None)


def after_end(phase: str) -> tuple[str, ...]:
    """The fire-and-forget webhook types for a rollout that ended in ``phase``."""
    if phase == Phase.PROMOTED.value:
        return ("post-rollout",)
    return ("rollback", "post-rollout")


def evidence(rec: RolloutRecord) -> list[dict[str, Any]]:
    """The last analysis's gates (value, threshold, op, n, baselineN, unit, verdict), as in the status."""
    hist = (rec.state or {}).get("history", [])
    last = next((h for h in reversed(hist) if h.get("evidence")), None)
    return [evidence_view(g) for g in (last or {}).get("evidence") or []]


def payload(namespace: str, name: str, rec: RolloutRecord, typ: str, now: float) -> dict[str, Any]:
    """The JSON body of every webhook call (``typ``: the webhook's type, or a notification's event)."""
    st = rec.state
    return {
        "apiVersion": crd.API_VERSION,
        "kind": PAYLOAD_KIND,
        "type": typ,
        "namespace": namespace,
        "name": name,
        "model": rec.canary["model"],
        "stableVersion": rec.stable["version"],
        "canaryVersion": rec.canary["version"],
        "phase": st["phase"] if st else "Pending",
        "step": (st["step_index"] + 1) if st else 0,
        "steps": list(rec.spec["steps"]),
        "canaryWeight": st["weight"] if st else 0,
        "reason": (st.get("reason") if st else "the canary serves; no traffic moved yet") or "",
        "evidence": evidence(rec),
        "time": crd.rfc3339(now),
    }
