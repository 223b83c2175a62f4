"""The cluster steps behind the KFP components ``deploy_canary`` and ``progressive_rollout``.

Plain functions over a ``CustomObjectsApi`` (in-cluster config inside a pipeline step), so the
components stay thin and these are tested through the real kubernetes client. Names follow the
Helm chart's contract (helm/mlrollout-model/README.md "For the rollout controller"): for
``gateway_api`` the InferenceServices ``<fullname>-stable``/``<fullname>-canary`` behind the
HTTPRoute ``<fullname>`` with backends ``<isvc>-predictor``; for ``kserve_knative`` the single
InferenceService ``<fullname>``.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from serving.rollout import controller as ctl
from serving.rollout.gates import AccuracyGate, DriftGate, LatencyGate, SuccessRateGate
from serving.rollout.machine import RolloutSpec
from serving.rollout.metrics import Target
from serving.rollout.routers import FIELD_MANAGER, ISVC, GatewayApiRouter, KServeKnativeRouter, RouterError
from serving.rollout.store import IsvcAnnotationStore

TRACK_LABEL = "mlrollout.io/track"


def to_storage_uri(artifact_uri: str) -> str:
    """A KFP artifact URI as KServe's storage-initializer reads it (``minio://`` is S3)."""
    if artifact_uri.startswith("minio://"):
        return "s3://" + artifact_uri[len("minio://") :]
    return artifact_uri


def _get(api, name: str, namespace: str) -> dict | None:
    g, v, p = ISVC
    try:
        return api.get_namespaced_custom_object(g, v, namespace, p, name)
    except Exception as e:
        if getattr(e, "status", None) == 404:
            return None
        raise


def wait_ready(
    api, name: str, namespace: str, generation: int, timeout_s: float, poll_s: float = 5.0
) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        obj = _get(api, name, namespace) or {}
        st = obj.get("status", {})
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions", []))
        if ready and st.get("observedGeneration", 0) >= generation:
            return obj
        if time.monotonic() > deadline:
            conds = {c.get("type"): c.get("status") for c in st.get("conditions", [])}
            raise RouterError(
                f"InferenceService {namespace}/{name} not Ready after {timeout_s:.0f}s: {conds}"
            )
        time.sleep(poll_s)


def deploy_canary(
    api,
    *,
    namespace: str,
    fullname: str,
    storage_uri: str,
    version: str,
    router: str = "gateway_api",
    ready_timeout_s: float = 600.0,
    poll_s: float = 5.0,
) -> dict[str, Any]:
    """Point the canary at the new model (receiving no traffic yet) and wait until it is Ready.

    gateway_api: patch (or create, copied from the stable one) ``<fullname>-canary``'s storageUri.
    kserve_knative: set the single ISVC's storageUri with ``canaryTrafficPercent: 0`` (a new
    revision, dark) so progressive_rollout can raise the percentage.
    """
    g, v, p = ISVC
    if router == "gateway_api":
        name = f"{fullname}-canary"
        obj = _get(api, name, namespace)
        if obj is None:
            stable = _get(api, f"{fullname}-stable", namespace)
            if stable is None:
                raise RouterError(
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
                "spec": copy.deepcopy(stable["spec"]),
            }
            obj["spec"]["predictor"]["model"]["storageUri"] = storage_uri
            obj["metadata"]["labels"]["app.kubernetes.io/version"] = version
            created = api.create_namespaced_custom_object(
                g, v, namespace, p, obj, field_manager=FIELD_MANAGER
            )
            generation = created["metadata"].get("generation", 1)
        else:
            patch = {
                "metadata": {"labels": {"app.kubernetes.io/version": version}},
                "spec": {"predictor": {"model": {"storageUri": storage_uri}}},
            }
            patched = api.patch_namespaced_custom_object(
                g, v, namespace, p, name, patch, field_manager=FIELD_MANAGER
            )
            generation = patched["metadata"].get("generation", 1)
    elif router == "kserve_knative":
        name = fullname
        patch = {
            "metadata": {"labels": {"app.kubernetes.io/version": version}},
            "spec": {"predictor": {"canaryTrafficPercent": 0, "model": {"storageUri": storage_uri}}},
        }
        patched = api.patch_namespaced_custom_object(
            g, v, namespace, p, name, patch, field_manager=FIELD_MANAGER
        )
        generation = patched["metadata"].get("generation", 1)
    else:
        raise ValueError(f"router must be gateway_api or kserve_knative, got {router!r}")
    obj = wait_ready(api, name, namespace, generation, ready_timeout_s, poll_s)
    return {
        "isvc": name,
        "storage_uri": storage_uri,
        "version": version,
        "url": obj.get("status", {}).get("url", ""),
    }


def parse_steps(text: str) -> tuple[int, ...]:
    return tuple(int(s) for s in str(text).split(",") if s.strip())


def progressive_rollout(
    api,
    *,
    namespace: str,
    fullname: str,
    model: str,
    stable_version: str,
    canary_version: str,
    router: str = "gateway_api",
    steps: str = "10,25,50,100",
    interval_s: float = 60.0,
    threshold: int = 2,
    max_inconclusive: int = 10,
    prometheus_url: str = "",
    min_success_rate: float = 0.99,
    max_p99_ms: float = 500.0,
    max_drift: float = 0.15,
    min_predictions: int = 400,
    min_accuracy: float = -1.0,
    max_seconds: float = 3600.0,
    log=print,
) -> dict[str, Any]:
    """Drive a rollout to its end with the controller; state in the stable ISVC's annotation."""
    spec = RolloutSpec(parse_steps(steps), interval_s, threshold, max_inconclusive)
    gates: list = [
        SuccessRateGate(min_success_rate, 20),
        LatencyGate(max_p99_ms, min_requests=20),
        DriftGate(max_drift, "js", min_predictions),
    ]
    if min_accuracy >= 0:
        gates.append(AccuracyGate(min_accuracy=min_accuracy))
    if router == "gateway_api":
        r = GatewayApiRouter(
            fullname,
            namespace,
            f"{fullname}-stable-predictor",
            f"{fullname}-canary-predictor",
            stable_isvc=f"{fullname}-stable",
            canary_isvc=f"{fullname}-canary",
            api=api,
        )
        state_isvc = f"{fullname}-stable"
        urls = (
            f"http://{fullname}-stable-predictor.{namespace}.svc.cluster.local/metrics",
            f"http://{fullname}-canary-predictor.{namespace}.svc.cluster.local/metrics",
        )
    elif router == "kserve_knative":
        r = KServeKnativeRouter(fullname, namespace, api=api)
        state_isvc = fullname
        urls = ("", "")
    else:
        raise ValueError(f"router must be gateway_api or kserve_knative, got {router!r}")
    if prometheus_url:
        metrics = {"provider": "prometheus", "url": prometheus_url}
    elif router == "gateway_api":
        metrics = {"provider": "scrape"}
        log(
            "no prometheus_url: scraping each predictor Service's /metrics (exact only with one replica each)"
        )
    else:
        raise ValueError(
            "kserve_knative needs prometheus_url (revisions share one Service: nothing to scrape)"
        )
    extra = {"namespace": namespace} if prometheus_url else {}
    stable, canary = (
        Target(model, stable_version, urls[0], extra),
        Target(model, canary_version, urls[1], extra),
    )
    store = IsvcAnnotationStore(state_isvc, namespace, api=api)
    record = ctl.new_record(spec, gates, stable, canary, r.config(), metrics)
    _, resumed = ctl.begin(store, record)
    if resumed:
        log("resuming the live rollout of the same versions")
    return ctl.Controller(store, router=r, log=log).run(max_seconds=max_seconds)
