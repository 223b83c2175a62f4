"""The ModelRollout custom resource's names: the contract between its CRD and the code that reads it.

The CRD itself is helm/mlrollout-operator/crds/modelrollouts.mlrollout.io.yaml (its only source);
tests/unit/test_modelrollout_crd.py keeps these names, the defaults and the enums equal to it.
:data:`MODELROLLOUT` is the GVR the operator will use with :mod:`serving.rollout.kube`'s helpers (the
other resources' GVRs, ``kube.ISVC`` and ``kube.HTTPROUTE``, are in kube.py; this one stays here, with
the rest of its contract, so that code which never touches ModelRollouts, such as the KFP steps that
embed kube.py, does not carry it).
"""

from __future__ import annotations

import datetime as dt

from serving.rollout.kube import GVR

GROUP = "mlrollout.io"
VERSION = "v1alpha1"
PLURAL = "modelrollouts"
KIND = "ModelRollout"
MODELROLLOUT = GVR(GROUP, VERSION, PLURAL)
API_VERSION = f"{GROUP}/{VERSION}"
CRD_NAME = f"{PLURAL}.{GROUP}"

# status.conditions[].type (metav1.Condition)
CONDITION_TYPES = ("Progressing", "Promoted", "RolledBack", "Paused", "Ready")
# spec.webhooks[].type
WEBHOOK_TYPES = ("pre-rollout", "confirm-promotion", "post-rollout", "rollback")
# status.phase of a first install (gitops.initialize): the desired model made stable with no rollout, as
# Flagger's "Initialized"; every other phase is the state machine's (machine.Phase)
INITIALIZED = "Initialized"
# status.history is bounded on the object (machine.HISTORY_LIMIT bounds the state machine's own)
STATUS_HISTORY_LIMIT = 50


def rfc3339(t: float) -> str:
    """A Unix time as the status' timestamps are written: RFC 3339 in UTC at whole seconds, as metav1.Time
    serializes (conditions, lastCommand, history, the webhook payloads)."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
