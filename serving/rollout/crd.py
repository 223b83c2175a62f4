"""The ModelRollout custom resource's names: the contract between its CRD and the code that reads it.

The CRD itself is helm/mlrollout-operator/crds/modelrollouts.mlrollout.io.yaml (its only source);
tests/unit/test_modelrollout_crd.py keeps these names, the defaults and the enums equal to it. The
group, version and plural are :data:`serving.rollout.kube.MODELROLLOUT`, the GVR the operator uses,
kept with the other resources' GVRs.
"""

from __future__ import annotations

from serving.rollout.kube import MODELROLLOUT

GVR = MODELROLLOUT
GROUP, VERSION, PLURAL = MODELROLLOUT
KIND = "ModelRollout"
API_VERSION = f"{GROUP}/{VERSION}"
CRD_NAME = f"{PLURAL}.{GROUP}"

# status.conditions[].type (metav1.Condition)
CONDITION_TYPES = ("Progressing", "Promoted", "RolledBack", "Paused", "Ready")
# spec.webhooks[].type
WEBHOOK_TYPES = ("pre-rollout", "confirm-promotion", "post-rollout", "rollback")
# status.history is bounded on the object (machine.HISTORY_LIMIT bounds the state machine's own)
STATUS_HISTORY_LIMIT = 50
