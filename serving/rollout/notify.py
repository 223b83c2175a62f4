"""Notifications of a rollout's decisions, with their evidence: which decisions notify, and the two
payloads, a generic JSON webhook and a Slack-compatible message (``text`` plus ``blocks``, what Slack's
incoming webhooks and Mattermost, Rocket.Chat or Teams' Slack-compatible endpoints accept). Pure: the
operator's ``--notify-url``/``--notify-slack-url`` senders (``hookhttp.Sender``) post them.

A notification goes out when a rollout starts, pauses, resumes, begins waiting for a promotion approval,
and when its end (promoted, rolled back, aborted) is applied. Steps that advance are Events only, as in
Flagger's alerts, so a channel is not flooded.
"""

from __future__ import annotations

from typing import Any

from serving.rollout import hooks
from serving.rollout.machine import awaiting_promotion
from serving.rollout.record import RolloutRecord

NOTIFICATION_KIND = "ModelRolloutNotification"
WARNING = ("RolledBack", "Aborted", "Paused")
SLACK_FIELDS = 10
ICONS = {
    "Promoted": ":white_check_mark:",
    "RolledBack": ":rotating_light:",
    "Aborted": ":octagonal_sign:",
    "Paused": ":double_vertical_bar:",
    "AwaitingPromotion": ":hourglass:",
}  # Slack allows at most 10 fields in a section block


def _awaiting(rec: RolloutRecord | None) -> bool:
    if rec is None or rec.state is None:
        return False
    return awaiting_promotion(rec.rollout_state, rec.rollout_spec)


def events(old: RolloutRecord | None, new: RolloutRecord, decisions: list[dict[str, Any]]) -> list[str]:
    """The notification events of one write: ``decisions`` are the history entries it added."""
    out = []
    for h in decisions:
        if h.get("event") == "start":
            out.append("Started")
        elif h.get("event") == "resume":
            out.append("Resumed")
        elif h.get("action") == "pause":
            out.append("Paused")
    same = old is not None and old.created_at == new.created_at
    if _awaiting(new) and not (same and _awaiting(old)):
        out.append("AwaitingPromotion")
    if hooks.finished(old, new):
        out.append(new.phase)
    return out


def generic(namespace: str, name: str, rec: RolloutRecord, event: str, now: float) -> dict[str, Any]:
    """The generic JSON notification: the webhook payload (``hooks.payload``) with the event and a
    severity."""
    body = hooks.payload(namespace, name, rec, event, now)
    body.update(kind=NOTIFICATION_KIND, event=event, severity="warning" if event in WARNING else "info")
    body.pop("type")
    return body


def _gate_line(g: dict[str, Any]) -> str:
    value = "n/a" if g.get("value") is None else f"{g['value']:.4g}"
    base = f", stable n={g['baselineN']}" if g.get("baselineN") is not None else ""
    unit = g.get("unit") or ""
    return f"{value}{unit} {g.get('op', '')} {g['threshold']:g}{unit} (n={g['n']}{base}): *{g['verdict']}*"


def slack(note: dict[str, Any]) -> dict[str, Any]:
    """The Slack-compatible message for a :func:`generic` notification."""
    icon = ICONS.get(note["event"], ":rocket:")
    head = (
        f"{icon} ModelRollout {note['namespace']}/{note['name']}: {note['event']} "
        f"({note['model']} {note['stableVersion']} -> {note['canaryVersion']}, step {note['step']}/"
        f"{len(note['steps'])}, canary {note['canaryWeight']}%)"
    )
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{head}*\n{note['reason'][:2900]}"}}
    ]
    fields = [{"type": "mrkdwn", "text": f"*{g['gate']}*\n{_gate_line(g)}"} for g in note["evidence"]]
    for i in range(0, len(fields), SLACK_FIELDS):
        blocks.append({"type": "section", "fields": fields[i : i + SLACK_FIELDS]})
    when = {"type": "mrkdwn", "text": f"{note['phase']} at {note['time']}"}
    blocks.append({"type": "context", "elements": [when]})
    evidence = "; ".join(f"{g['gate']} {_gate_line(g)}".replace("*", "") for g in note["evidence"])
    text = head + (f": {note['reason']}" if note["reason"] else "") + (f" | {evidence}" if evidence else "")
    return {"text": text[:3000], "blocks": blocks}
