"""KServe specifics of a rollout: deploy the canary, when a new model really serves, promotion by copy.

"Ready" is not "serving the new model". During a Standard-mode rolling update KServe keeps the
InferenceService ``Ready=True`` (its status follows the Deployment's Available condition), and the
``status.observedGeneration`` it reports is copied from the *Deployment*, not its own generation
(kserve pkg/apis/serving/v1beta1/inference_service_status.go). So a wait on Ready + observedGeneration
returns while only the old pods answer. The truth is in the workload:

* Standard mode: the predictor Deployment ``<isvc>-predictor`` carries the model's storageUri in its pod
  template (annotation ``internal.serving.kserve.io/storage-initializer-sourceuri``, which KServe writes
  and its pod mutator turns into the storage-initializer), and is fully rolled out: observed its latest
  generation, every replica updated and available, no old pod left.
* Knative mode: the latest created revision is the latest ready one.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

from serving.rollout import kube

SOURCE_URI_ANNOTATION = "internal.serving.kserve.io/storage-initializer-sourceuri"
TRACK_LABEL = "mlrollout.io/track"


def predictor_deployment(isvc: str, predictor_name: str = "") -> str:
    """KServe's ``PredictorServiceName``: ``<isvc>-predictor``, or ``<isvc>-<name>-predictor`` when the
    predictor (or a ``spec.canary`` entry) has a ``name`` (the Deployment and the Service share it)."""
    return f"{isvc}-{predictor_name}-predictor" if predictor_name else f"{isvc}-predictor"


def rollout_complete(dep: Any) -> tuple[bool, str]:
    """``kubectl rollout status`` for a Deployment object (kubernetes client model): done, and why not."""
    spec_replicas = dep.spec.replicas if dep.spec.replicas is not None else 1
    st = dep.status
    if (st.observed_generation or 0) < (dep.metadata.generation or 0):
        return False, "the Deployment controller has not seen its latest spec"
    updated, total, available = st.updated_replicas or 0, st.replicas or 0, st.available_replicas or 0
    if updated < spec_replicas:
        return False, f"{updated} of {spec_replicas} replicas updated"
    if total > updated:
        return False, f"{total - updated} old replicas still running"
    if available < updated:
        return False, f"{available} of {updated} updated replicas available"
    return True, "rolled out"


def serving_state(
    api: Any, namespace: str, isvc: str, storage_uri: str | None, deployment: str = ""
) -> tuple[bool, str]:
    """Whether ``isvc`` serves ``storage_uri`` (None: whatever its spec says) on all of its pods.

    ``deployment``: check that Deployment instead of the stable predictor's (a ``spec.canary`` entry's,
    see :func:`predictor_deployment`)."""
    obj = kube.get(api, kube.ISVC, namespace, isvc)
    if obj is None:
        return False, f"InferenceService {namespace}/{isvc} does not exist"
    conds = {c.get("type"): c.get("status") for c in obj.get("status", {}).get("conditions", [])}
    want = storage_uri or obj["spec"]["predictor"].get("model", {}).get("storageUri")
    annotations = obj["metadata"].get("annotations") or {}
    if annotations.get("serving.kserve.io/deploymentMode") == "Knative":
        pred = obj.get("status", {}).get("components", {}).get("predictor", {})
        created, ready = pred.get("latestCreatedRevision"), pred.get("latestReadyRevision")
        if conds.get("Ready") == "True" and created and created == ready:
            return True, f"revision {ready} ready"
        return False, f"latest revision {created!r}, latest ready {ready!r}, Ready={conds.get('Ready')}"
    # after a spec.canary promotion the stable predictor carries the canary's name, and so its Deployment
    dep_name = deployment or predictor_deployment(isvc, obj["spec"]["predictor"].get("name") or "")
    try:
        dep = kube.apps_api(api).read_namespaced_deployment(dep_name, namespace)
    except Exception as e:
        if kube.is_not_found(e):
            return False, f"Deployment {dep_name} not created yet"
        raise
    served = (dep.spec.template.metadata.annotations or {}).get(SOURCE_URI_ANNOTATION)
    if want and served != want:
        return False, f"its pod template still serves {served!r}, not {want!r} (KServe has not reconciled)"
    done, why = rollout_complete(dep)
    if not done:
        return False, why
    if conds.get("Ready") != "True":
        return False, f"InferenceService not Ready ({conds})"
    return True, f"{dep.status.ready_replicas or 0} replicas serve {served}"


def wait_serving(
    api: Any,
    namespace: str,
    isvc: str,
    storage_uri: str | None = None,
    timeout_s: float = 600.0,
    poll_s: float = 2.0,
    sleep: Callable[[float], None] = time.sleep,
    deployment: str = "",
) -> dict:
    """Block until every pod of ``isvc`` (or of ``deployment``) serves ``storage_uri``; returns the
    InferenceService."""
    deadline = time.monotonic() + timeout_s
    while True:
        ok, why = serving_state(api, namespace, isvc, storage_uri, deployment)
        if ok:
            obj = kube.get(api, kube.ISVC, namespace, isvc)
            assert obj is not None
            return obj
        if time.monotonic() > deadline:
            raise kube.KubeError(
                f"InferenceService {namespace}/{isvc} does not serve the new model after "
                f"{timeout_s:.0f}s: {why}"
            )
        sleep(poll_s)


def predictor_for(source: dict, track: str) -> dict:
    """``source``'s predictor to copy onto the ``track`` InferenceService, keeping that track's pod labels.

    A JSON merge patch of ``spec.predictor`` merges ``labels`` key by key, so the source's
    ``mlrollout.io/track`` would relabel the target's pods (and empty its PodDisruptionBudget).
    """
    predictor = copy.deepcopy(source["spec"]["predictor"])
    if TRACK_LABEL in (predictor.get("labels") or {}):
        predictor["labels"][TRACK_LABEL] = track
    return predictor


def promote_by_copy(
    api: Any, namespace: str, source: str, target: str, timeout_s: float = 300.0, poll_s: float = 2.0
) -> None:
    """Copy ``source``'s predictor onto ``target`` (keeping its track label) and wait until every pod of
    ``target`` serves it (Flagger's ``Promote``). KubeError when ``source`` is gone or the wait runs out."""
    obj = kube.get(api, kube.ISVC, namespace, source)
    if obj is None:
        raise kube.KubeError(f"InferenceService {namespace}/{source} is gone")
    predictor = predictor_for(obj, track="stable")
    _put_predictor(api, namespace, target, predictor, predictor, timeout_s, poll_s)


def _put_predictor(
    api: Any, namespace: str, target: str, patch: dict, predictor: dict, timeout_s: float, poll_s: float
) -> None:
    """Merge-patch ``target``'s predictor and wait until every pod serves ``predictor``'s model."""
    kube.patch(api, kube.ISVC, namespace, target, {"spec": {"predictor": patch}})
    uri = predictor.get("model", {}).get("storageUri")
    wait_serving(api, namespace, target, uri, timeout_s=timeout_s, poll_s=poll_s)


def restore_predictor(
    api: Any, namespace: str, target: str, predictor: dict, timeout_s: float = 300.0, poll_s: float = 2.0
) -> None:
    """Put a recorded ``predictor`` back on ``target`` and wait until every pod serves it: promotion by
    copy in reverse (the watch after promotion's rollback). The predictor is replaced as a whole
    (``spec.predictor: null`` first would drop it; a JSON merge patch of the recorded object restores each
    field it has), and fields the promotion added that the recorded one lacks are set to null."""
    obj = kube.get(api, kube.ISVC, namespace, target)
    if obj is None:
        raise kube.KubeError(f"InferenceService {namespace}/{target} is gone")
    patch = _merge_replace(obj["spec"].get("predictor") or {}, predictor)
    _put_predictor(api, namespace, target, patch, predictor, timeout_s, poll_s)


def _merge_replace(current: dict, wanted: dict) -> dict:
    """A JSON merge patch that turns ``current`` into ``wanted`` (keys only in ``current`` become null)."""
    out: dict = {k: None for k in current if k not in wanted}
    for k, v in wanted.items():
        cur = current.get(k)
        out[k] = _merge_replace(cur, v) if isinstance(v, dict) and isinstance(cur, dict) else copy.deepcopy(v)
    return out


def deploy_canary(
    api: Any,
    *,
    namespace: str,
    fullname: str,
    storage_uri: str,
    version: str,
    router: str = "gateway_api",
    ready_timeout_s: float = 600.0,
    poll_s: float = 2.0,
) -> tuple[str, dict]:
    """Point the canary at the new model (receiving no traffic yet) and wait until it serves it.

    gateway_api: patch (or create, copied from the stable one) ``<fullname>-canary``'s storageUri.
    kserve_knative: set the single ISVC's storageUri with ``canaryTrafficPercent: 0`` (a new
    revision, dark) so the rollout can raise the percentage. Returns the InferenceService's name and
    object; KubeError when there is nothing to copy from or the wait runs out.
    """
    g, v, p = kube.ISVC
    if router == "gateway_api":
        name = f"{fullname}-canary"
        obj = kube.get(api, kube.ISVC, namespace, name)
        if obj is None:
            stable = kube.get(api, kube.ISVC, namespace, f"{fullname}-stable")
            if stable is None:
                raise kube.KubeError(
                    f"neither {name} nor {fullname}-stable exists in {namespace}: install the chart "
                    "with strategy.type=canary first"
                )
            meta = stable["metadata"]
            obj = {
                "apiVersion": "serving.kserve.io/v1beta1",
                "kind": "InferenceService",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "labels": {**meta.get("labels", {}), TRACK_LABEL: "canary"},
                    "annotations": {
                        k: val
                        for k, val in meta.get("annotations", {}).items()
                        if not k.startswith("rollout.mlrollout.io/")
                    },
                },
                "spec": {
                    **copy.deepcopy(stable["spec"]),
                    "predictor": predictor_for(stable, "canary"),
                },
            }
            obj["spec"]["predictor"]["model"]["storageUri"] = storage_uri
            obj["metadata"]["labels"]["app.kubernetes.io/version"] = version
            api.create_namespaced_custom_object(g, v, namespace, p, obj, field_manager=kube.FIELD_MANAGER)
        else:
            patch = {
                "metadata": {"labels": {"app.kubernetes.io/version": version}},
                "spec": {"predictor": {"model": {"storageUri": storage_uri}}},
            }
            kube.patch(api, kube.ISVC, namespace, name, patch)
    elif router == "kserve_knative":
        name = fullname
        patch = {
            "metadata": {"labels": {"app.kubernetes.io/version": version}},
            "spec": {"predictor": {"canaryTrafficPercent": 0, "model": {"storageUri": storage_uri}}},
        }
        kube.patch(api, kube.ISVC, namespace, name, patch)
    else:
        raise ValueError(f"router must be gateway_api or kserve_knative, got {router!r}")
    return name, wait_serving(api, namespace, name, storage_uri, timeout_s=ready_timeout_s, poll_s=poll_s)
