"""A rollout's state in its ModelRollout's status subresource: the operator's :class:`StateStore`.

The full record (:class:`~serving.rollout.record.RolloutRecord`, the same JSON the file and ConfigMap
stores hold, checked by ``validate_record`` on every read) is the string ``status.record``; the other
status fields (``phase``, ``step``, ``canaryWeight``, the versions, ``conditions``, ``lastAnalysis``,
``history``, ``observedGeneration``) are views of it, rewritten with it in the same write, so
``kubectl get modelrollouts`` and the record never disagree. Not an annotation: the status subresource is
the operator's alone (users and GitOps tools write ``spec``; a status write bumps no ``generation``).

Every write is a merge patch of ``status`` that carries ``metadata.resourceVersion``: a 409 means
someone wrote the object in between, so it is re-read and ``fn`` applied again
(:func:`kube.retry_on_conflict`), exactly as :class:`~serving.rollout.store.ConfigMapStore` does.

Ownership: the operator's Lease (leader election) is what makes one controller per rollout, so
``acquire``/``heartbeat``/``release`` only check ``is_leader``: a replica that lost the Lease gets
:class:`OwnershipError` on its next heartbeat *and* on its next write (a fence, so a stale leader cannot
persist a decision after a standby took over).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from serving.rollout import crd, kube
from serving.rollout.machine import Phase, awaiting_promotion
from serving.rollout.record import RolloutRecord
from serving.rollout.store import (
    STATE_BUDGET,
    OwnershipError,
    R,
    Record,
    StoreError,
    UpdateViaUpdateWith,
    _encode,
    _trim,
    decode,
)

RECORD_FIELD = "record"


def evidence_view(g: dict[str, Any]) -> dict[str, Any]:
    """A GateResult's dict (gates.GateResult.to_dict) in the CRD's status.lastAnalysis shape."""
    out = {
        "gate": g["gate"],
        "value": g.get("value"),
        "threshold": g["threshold"],
        "op": g.get("op"),
        "n": int(g.get("samples") or 0),
        "unit": g.get("unit", ""),
        "verdict": g["verdict"],
        "detail": (g.get("detail") or "")[:1000],
    }
    if g.get("baseline_samples") is not None:
        out["baselineN"] = int(g["baseline_samples"])
    for k in ("effect", "statistic", "boundary"):  # a comparison's evidence (absent for a limit)
        if g.get(k) is not None:
            out[k] = g[k]
    return {k: v for k, v in out.items() if v is not None or k == "value"}


CONDITION_OF = {
    "Progressing": (Phase.PROGRESSING, Phase.VERIFYING),  # Verifying: the watch after promotion runs
    "Promoted": (Phase.PROMOTED,),
    "RolledBack": (Phase.ROLLED_BACK, Phase.ABORTED),
    "Paused": (Phase.PAUSED,),
}


def conditions(rec: RolloutRecord, old: list[dict[str, Any]], generation: int, now: float) -> list[dict]:
    """metav1 Conditions for the record's phase; a condition keeps its lastTransitionTime while its
    status does not change."""
    before = {c.get("type"): c for c in old or []}
    phase = Phase(rec.phase) if rec.state else None
    out = []
    for typ in crd.CONDITION_TYPES:
        # Ready: nothing in flight (the desired model is promoted, or the rollout has ended)
        true = (phase is not None and phase.terminal) if typ == "Ready" else phase in CONDITION_OF[typ]
        status = "True" if true else "False"
        reason = (phase.value if phase else "Pending") if true else f"Not{typ}"
        if typ == "Progressing" and true and awaiting_promotion(rec.rollout_state, rec.rollout_spec):
            reason = "AwaitingPromotion"  # a confirm-promotion webhook has not said yes (message: its answer)
        prev = before.get(typ)
        ltt = prev["lastTransitionTime"] if prev and prev.get("status") == status else crd.rfc3339(now)
        msg = (rec.rollout_state.reason if rec.state else "waiting for the canary to serve")[:1000]
        out.append(
            {
                "type": typ,
                "status": status,
                "reason": reason,
                "message": msg if true else "",
                "lastTransitionTime": ltt,
                "observedGeneration": generation,
            }
        )
    return out


def status_view(
    rec: RolloutRecord, old_status: dict[str, Any], generation: int, now: float
) -> dict[str, Any]:
    """The printable status fields of ``rec`` (None removes a field in the merge patch)."""
    st = rec.state
    view: dict[str, Any] = {
        "observedGeneration": generation,
        "stableVersion": rec.stable["version"],
        "canaryVersion": rec.canary["version"],
        "conditions": conditions(rec, old_status.get("conditions") or [], generation, now),
    }
    if st is None:
        view.update(phase="Progressing", step=0, canaryWeight=0, message="deploying the canary")
        view.update(lastAnalysis=None, lastAnalysisTime=None, history=None)
        return view
    view.update(
        phase=st["phase"],
        step=st["step_index"] + 1,
        canaryWeight=st["weight"],
        message=(st.get("reason") or "")[:2000],
    )
    hist = st.get("history", [])
    last = next((h for h in reversed(hist) if h.get("evidence")), None)
    if last:
        view["lastAnalysisTime"] = crd.rfc3339(last["t"])
        view["lastAnalysis"] = [evidence_view(g) for g in last["evidence"]][:16]
    view["history"] = [
        {
            k: v
            for k, v in {
                "time": crd.rfc3339(h["t"]),
                "event": h["event"],
                "phase": h.get("phase"),
                "step": (h["step_index"] + 1) if isinstance(h.get("step_index"), int) else None,
                "weight": h.get("weight"),
                "action": h["action"],
                "verdict": h.get("verdict"),
                "reason": (h.get("reason") or "")[:500],
            }.items()
            if v is not None
        }
        for h in hist[-crd.STATUS_HISTORY_LIMIT :]
    ]
    return view


class ModelRolloutStatusStore(UpdateViaUpdateWith):
    """The rollout record of ModelRollout ``namespace/name``, in its status subresource.

    ``is_leader``: whether this replica may act (the operator's Lease); ``on_write(old, new, obj)``: called
    after each successful write with the records before and after (the operator's Events and metrics).
    """

    held = False

    def __init__(
        self,
        name: str,
        namespace: str,
        api: Any,
        *,
        is_leader: Callable[[], bool] = lambda: True,
        on_write: Callable[[Record | None, Record, dict[str, Any]], None] | None = None,
        clock: Callable[[], float] | None = None,
    ):
        import time

        self.name, self.namespace, self.api = name, namespace, api
        self.is_leader, self.on_write = is_leader, on_write
        self.clock = clock or time.time
        # more status fields for every write while set (an operator command's acknowledgement, so that
        # it lands in the same write as the decision it caused: applied once, even across a crash)
        self.status_extra: dict[str, Any] = {}

    def describe(self) -> dict[str, Any]:
        return {"store": "modelrollout", "name": self.name, "namespace": self.namespace}

    def where(self) -> str:
        return f"ModelRollout {self.namespace}/{self.name} status.{RECORD_FIELD}"

    def get(self) -> dict[str, Any] | None:
        return kube.get(self.api, crd.MODELROLLOUT, self.namespace, self.name)

    def _parse(self, obj: dict[str, Any] | None, corrupt_ok: bool = False) -> Record | None:
        raw = ((obj or {}).get("status") or {}).get(RECORD_FIELD)
        if not raw:
            return None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise StoreError(f"{self.where()} is not JSON ({e})") from e
        return decode(data, self.where(), corrupt_ok)

    def load(self, *, corrupt_ok: bool = False) -> Record | None:
        return self._parse(self.get(), corrupt_ok)

    def update_with(
        self, fn: Callable[[Record | None], tuple[Record | None, R]], *, corrupt_ok: bool = False
    ) -> tuple[Record | None, R]:
        def attempt() -> tuple[Record | None, R, Record | None, dict]:
            if not self.is_leader():
                raise OwnershipError(f"this operator is not the leader: it may not write {self.where()}")
            obj = self.get()
            if obj is None:
                raise StoreError(f"ModelRollout {self.namespace}/{self.name} is gone")
            old = self._parse(obj, corrupt_ok)
            # fn may change the record it is given in place (the controller's do): keep what was stored
            before = self._parse(obj, corrupt_ok) if self.on_write is not None else None
            new, result = fn(old)
            status = obj.get("status") or {}
            if new is None:
                body_status: dict[str, Any] = {RECORD_FIELD: None}
            else:
                body_status = {
                    RECORD_FIELD: _trim(_encode(new), STATE_BUDGET),
                    **status_view(new, status, obj["metadata"].get("generation", 0), self.clock()),
                }
            body = {
                "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
                "status": {**body_status, **self.status_extra},
            }
            g, v, p = crd.MODELROLLOUT
            written = self.api.patch_namespaced_custom_object_status(
                g, v, self.namespace, p, self.name, body, field_manager=kube.FIELD_MANAGER
            )
            return new, result, before, written

        try:
            new, result, old, written = kube.retry_on_conflict(attempt, self.where())
        except kube.KubeError as e:
            raise StoreError(str(e)) from e
        if self.on_write is not None and new is not None:
            try:
                self.on_write(old, new, written)
            except Exception:  # Events and metrics never stop a rollout; the log says what broke
                logging.getLogger("mlrollout.operator").exception("after writing %s", self.where())
        return new, result

    # ------------------------------------------------------------------ ownership (the Lease's)
    def acquire(self, holder: str, interval_s: float = 30.0) -> None:
        if not self.is_leader():
            raise OwnershipError(f"this operator is not the leader, so it does not drive {self.where()}")
        self.held = True

    def heartbeat(self) -> None:
        if not self.is_leader():
            raise OwnershipError("this operator lost its Lease (another replica leads now)")

    def release(self) -> None:
        self.held = False

    def owner(self) -> dict[str, Any] | None:
        return None
