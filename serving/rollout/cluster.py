"""The cluster side of the KFP step ``progressive_rollout``: hand the model to the operator, wait, report.

The step does not move traffic. It creates or patches the release's ModelRollout (named like the
release, ``<fullname>``) with the trained model and the strategy (:func:`handoff.spec`), then watches
that one object until the operator (operator.py) shows a terminal phase for this version
(:func:`handoff.outcome`), and writes the evidence from its status as the step's Markdown report and
KFP Metrics. So KFP's ``pipeline-runner`` needs get/create/patch/list/watch on modelrollouts and
nothing on InferenceServices or HTTPRoutes (helm/mlrollout-model/templates/rbac.yaml); the operator
deploys the canary, moves the weights, promotes or rolls back, and owns those objects.

Plain functions over a ``CustomObjectsApi`` (in-cluster config inside a pipeline step), so the
component stays thin and this is tested through the real kubernetes client against a real API server
and a real operator process (tests/controlplane/test_kfp_identity.py).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

from serving.rollout import crd, handoff, kube

# the step's writes are recorded under their own field manager, so managedFields tell the pipeline's
# spec.model apart from a chart's or a person's
FIELD_MANAGER = "mlrollout-kfp"
# one watch request lasts at most this long (the API server ends it; the loop re-reads and re-watches)
WATCH_S = 60


def to_storage_uri(artifact_uri: str) -> str:
    """A KFP artifact URI as KServe's storage-initializer reads it (``minio://`` is S3)."""
    if artifact_uri.startswith("minio://"):
        return "s3://" + artifact_uri[len("minio://") :]
    return artifact_uri


def package_version(package_dir: str) -> str:
    """The version in the model package's one ``model-card.json`` (package_model's output)."""
    cards = [
        os.path.join(root, f)
        for root, _, files in os.walk(package_dir)
        for f in files
        if f == "model-card.json"
    ]
    if len(cards) != 1:
        raise ValueError(f"expected one model-card.json under the model artifact, found {len(cards)}")
    with open(cards[0]) as f:
        return json.load(f)["version"]


def _refusal(e: Exception, what: str) -> kube.KubeError:
    """An API refusal as one line: the API server's own message (a CEL rule's, RBAC's) and what to do."""
    status = kube.status_of(e)
    try:
        msg = json.loads(getattr(e, "body", "") or "{}").get("message") or str(e)
    except ValueError:
        msg = str(e)
    msg = " ".join(msg.split())
    hint = {
        403: " (the pipeline's ServiceAccount needs get/create/patch/list/watch on modelrollouts in this "
        "namespace: install the release with rbac.create=true and it in rbac.subjects)",
        404: " (is the ModelRollout CRD installed? helm/mlrollout-operator)",
    }.get(status or 0, "")
    return kube.KubeError(f"{what} refused ({status}): {msg}{hint}")


def apply(api: Any, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Create ModelRollout ``namespace/name`` with ``spec``, or merge-patch its spec with it (the fields
    the step sets; webhooks and anything else on the object stay as they are)."""
    g, v, p = crd.MODELROLLOUT
    try:
        if kube.get(api, crd.MODELROLLOUT, namespace, name) is None:
            try:
                return api.create_namespaced_custom_object(
                    g, v, namespace, p, handoff.manifest(name, namespace, spec), field_manager=FIELD_MANAGER
                )
            except Exception as e:
                if kube.status_of(e) != 409:  # created in between: patch it like any other
                    raise
        return api.patch_namespaced_custom_object(
            g, v, namespace, p, name, {"spec": spec}, field_manager=FIELD_MANAGER
        )
    except kube.KubeError:
        raise
    except Exception as e:
        if kube.status_of(e) is None:
            raise
        raise _refusal(e, f"ModelRollout {namespace}/{name}") from None


class WaitTimeout(TimeoutError):
    """The rollout did not end in time; ``obj`` is the ModelRollout as last seen."""

    def __init__(self, message: str, obj: dict[str, Any]):
        super().__init__(message)
        self.obj = obj


def wait(
    api: Any,
    namespace: str,
    name: str,
    version: str,
    timeout_s: float,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The ModelRollout once ``version``'s rollout has ended (:func:`handoff.outcome`), watching the one
    object (a ``metadata.name`` field selector, so RBAC may limit list/watch to that name).
    :class:`WaitTimeout` after ``timeout_s``: the rollout goes on, the operator owns it."""
    from kubernetes import watch
    from kubernetes.client.rest import ApiException
    from urllib3.exceptions import HTTPError

    g, v, p = crd.MODELROLLOUT
    where = f"ModelRollout {namespace}/{name}"
    gone = f"{where} was deleted while the step waited for {version}"
    deadline = time.monotonic() + timeout_s
    shown: list[tuple] = [()]

    def seen(obj: dict[str, Any]) -> bool:
        if shown[0] != handoff.progress(obj):
            shown[0] = handoff.progress(obj)
            log(handoff.progress_line(obj))
        return handoff.outcome(obj, version) is not None

    while True:
        obj = kube.get(api, crd.MODELROLLOUT, namespace, name)
        if obj is None:
            raise kube.KubeError(gone)
        if seen(obj):
            return obj
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout(handoff.timeout_line(obj, version, timeout_s, f"{namespace}/{name}"), obj)
        w = watch.Watch()
        try:
            for ev in w.stream(
                api.list_namespaced_custom_object,
                g,
                v,
                namespace,
                p,
                field_selector=f"metadata.name={name}",
                resource_version=obj["metadata"]["resourceVersion"],
                timeout_seconds=max(1, min(WATCH_S, math.ceil(left))),
            ):
                if ev["type"] == "DELETED":
                    raise kube.KubeError(gone)
                if ev["type"] in ("ADDED", "MODIFIED") and seen(ev["object"]):
                    return ev["object"]
                if time.monotonic() >= deadline:
                    break
        except (ApiException, HTTPError, OSError) as e:  # 410 Gone or a dropped stream: read, watch again
            if kube.status_of(e) == 403:
                raise _refusal(e, f"watching {where}") from None
            if kube.status_of(e) != 410:  # not a busy loop when the stream keeps breaking
                log(f"watching {where}: {' '.join(str(e).split())[:200]}; reading it again")
                time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
        finally:
            w.stop()


def write_report(obj: dict[str, Any], report_path: str, log_metric: Callable[[str, float], None]) -> None:
    """The step's outputs: the Markdown report and the KFP Metrics, both from the object's status."""
    with open(report_path, "w") as f:
        f.write(handoff.markdown(obj))
    for key, value in handoff.kfp_metrics(obj).items():
        log_metric(key, value)


def progressive_rollout(
    api: Any,
    *,
    package_dir: str,
    package_uri: str,
    namespace: str,
    fullname: str,
    model_name: str,
    router: str = "gateway_api",
    steps: str = "10,25,50,100",
    interval_s: float = 60.0,
    threshold: int = 2,
    post_promotion_intervals: int = 0,
    prometheus_url: str = "",
    min_success_rate: float | None = None,
    max_p99_ms: float | None = None,
    max_drift: float | None = None,
    timeout_s: float = 3600.0,
    fail_on_rollback: bool = True,
    report_path: str,
    log_metric: Callable[[str, float], None],
    log: Callable[[str], None] = print,
    metrics: dict[str, Any] | None = None,
    **comparison: Any,
) -> str:
    """What the KFP step does, end to end; returns the final phase.

    Declares the package (``package_uri`` as KServe reads it, the version from its model card) on
    ModelRollout ``namespace/<fullname>``, waits until the operator ends its rollout, writes the report
    and the metrics, and raises RuntimeError with one line on RolledBack/Aborted/Failed when
    ``fail_on_rollback``. ``metrics``: ``spec.metrics`` instead of what ``prometheus_url`` says (tests
    point the operator at scripted runtimes). ``comparison``: the comparisons' settings as
    :func:`handoff.spec` names them (``compare_with_stable``, ``alpha``, ``max_error_increase``,
    ``latency_min_effect``, ``drift_min_effect``, ``accuracy_min_effect``), checked there."""
    version = package_version(package_dir)
    spec = handoff.spec(
        fullname=fullname,
        model_name=model_name,
        storage_uri=to_storage_uri(package_uri),
        version=version,
        router=router,
        steps=steps,
        interval_s=interval_s,
        threshold=threshold,
        post_promotion_intervals=post_promotion_intervals,
        min_success_rate=min_success_rate,
        max_p99_ms=max_p99_ms,
        max_drift=max_drift,
        metrics=metrics if metrics is not None else handoff.prometheus(prometheus_url),
        **comparison,
    )  # every value checked (ValueError) before the first API call
    obj = apply(api, namespace, fullname, spec)
    log(
        f"ModelRollout {namespace}/{fullname} (generation {obj['metadata'].get('generation')}) declares "
        f"{model_name} {version} from {spec['model']['storageUri']}"
    )
    try:
        obj = wait(api, namespace, fullname, version, timeout_s, log)
    except WaitTimeout as e:
        write_report(e.obj, report_path, log_metric)  # where it stands, for the run's page
        raise
    write_report(obj, report_path, log_metric)
    phase = handoff.outcome(obj, version) or ""
    if phase != handoff.PROMOTED and fail_on_rollback:
        raise RuntimeError(handoff.failure_line(obj, version))
    return phase
