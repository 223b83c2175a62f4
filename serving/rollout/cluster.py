"""The cluster steps behind the KFP components ``deploy_canary`` and ``progressive_rollout``.

Plain functions over a ``CustomObjectsApi`` (in-cluster config inside a pipeline step), so the
components stay thin and these are tested through the real kubernetes client. Names follow the
Helm chart's contract (helm/mlrollout-model/README.md "For the rollout controller"): for
``gateway_api`` the InferenceServices ``<fullname>-stable``/``<fullname>-canary`` behind the
HTTPRoute ``<fullname>`` with backends ``<isvc>-predictor``; for ``kserve_knative`` the single
InferenceService ``<fullname>``. The rollout state lives in the ConfigMap ``<fullname>-rollout``.
"""

from __future__ import annotations

import copy
from typing import Any

from serving.rollout import controller as ctl
from serving.rollout import kube, targets
from serving.rollout.gates import DEFAULTS as GATE_DEFAULTS
from serving.rollout.gates import defaults as default_gates
from serving.rollout.machine import RolloutSpec, parse_steps
from serving.rollout.metrics import Target
from serving.rollout.routers import ROUTERS, RouterError, choices
from serving.rollout.store import ConfigMapStore

TRACK_LABEL = targets.TRACK_LABEL
# the KFP steps poll the API server this often: often enough for a 10 s interval, gentle for an hour
POLL_S = 2.0


def state_configmap(fullname: str) -> str:
    return f"{fullname}-rollout"


def deployer(fullname: str) -> str:
    """The release's deploy identity (helm/mlrollout-model/templates/rbac.yaml)."""
    return f"{fullname}-deployer"


def as_deployer(api: Any, namespace: str, fullname: str, lifetime_s: float = 3600.0) -> Any:
    """A CustomObjectsApi acting as ``<fullname>-deployer``, from a short-lived token the caller requests
    (TokenRequest). The KFP pipeline's own account (pipeline-runner) may do only that in the model namespace,
    so every change the steps make is the deployer's, bounded by its Role."""
    from kubernetes import client

    sa = deployer(fullname)
    body = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=int(max(600, lifetime_s)))
    )
    try:
        token = kube.core_api(api).create_namespaced_service_account_token(sa, namespace, body).status.token
    except Exception as e:
        if kube.status_of(e) in (403, 404):
            raise RouterError(
                f"cannot act as {namespace}/{sa} ({kube.status_of(e)}): install the release with "
                "rbac.create=true and the pipeline's ServiceAccount in rbac.subjects"
            ) from None
        raise
    cfg = copy.copy(api.api_client.configuration)
    cfg.api_key = {"authorization": token}
    cfg.api_key_prefix = {"authorization": "Bearer"}
    cfg.refresh_api_key_hook = None  # the in-cluster hook would put the pod's own token back
    cfg.cert_file = cfg.key_file = None  # a client certificate would authenticate as its owner instead
    return client.CustomObjectsApi(client.ApiClient(cfg))


def to_storage_uri(artifact_uri: str) -> str:
    """A KFP artifact URI as KServe's storage-initializer reads it (``minio://`` is S3)."""
    if artifact_uri.startswith("minio://"):
        return "s3://" + artifact_uri[len("minio://") :]
    return artifact_uri


def deploy_canary(
    api,
    *,
    namespace: str,
    fullname: str,
    storage_uri: str,
    version: str,
    router: str = "gateway_api",
    ready_timeout_s: float = 600.0,
    poll_s: float = POLL_S,
) -> dict[str, Any]:
    """:func:`targets.deploy_canary` as ``<fullname>-deployer``; also where the release answers."""
    api = as_deployer(api, namespace, fullname, ready_timeout_s + 600)
    try:
        name, obj = targets.deploy_canary(
            api,
            namespace=namespace,
            fullname=fullname,
            storage_uri=storage_uri,
            version=version,
            router=router,
            ready_timeout_s=ready_timeout_s,
            poll_s=poll_s,
        )
    except kube.KubeError as e:
        raise RouterError(str(e)) from e
    return {
        "isvc": name,
        "storage_uri": storage_uri,
        "version": version,
        "url": endpoint(api, namespace, fullname, obj),
    }


def endpoint(api, namespace: str, fullname: str, isvc: dict) -> str:
    """Where the release answers: the chart's HTTPRoute host (KServe's ``status.url`` names a host no
    route serves when its own ingress is disabled), else the in-cluster address."""
    route = kube.get(api, kube.HTTPROUTE, namespace, fullname)
    hosts = (route or {}).get("spec", {}).get("hostnames") or []
    if hosts:
        return f"http://{hosts[0]}"
    return isvc.get("status", {}).get("address", {}).get("url", "")


def _release_router(router: str) -> Any:
    """The router class that drives a release of the chart (it has ``for_release``)."""
    fit = [n for n, cls in ROUTERS.items() if hasattr(cls, "for_release")]
    if router not in fit:
        raise ValueError(f"router must be {choices(fit)}, got {router!r}")
    return ROUTERS[router]


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
    threshold: int = RolloutSpec.threshold,
    max_inconclusive: int = 10,  # the KFP step waits longer than RolloutSpec (5) before pausing
    prometheus_url: str = "",
    min_success_rate: float = GATE_DEFAULTS["min_success_rate"],
    max_p99_ms: float = GATE_DEFAULTS["max_p99_ms"],
    max_drift: float = GATE_DEFAULTS["max_drift"],
    min_predictions: int = GATE_DEFAULTS["min_predictions"],
    min_accuracy: float = -1.0,
    max_seconds: float = 3600.0,
    log=print,
    provider: Any = None,
) -> ctl.RolloutRecord:
    """Drive a rollout to its end with the controller; state in the ConfigMap ``<fullname>-rollout``.
    Acts as ``<fullname>-deployer`` (a token for the whole run, ``max_seconds`` and the promotion wait)."""
    cls = _release_router(router)
    release = cls.for_release(fullname, namespace)
    if not (prometheus_url or all(release.metrics_urls)):
        why = getattr(cls, "no_scrape", "no per-side /metrics to scrape")
        raise ValueError(f"{router} needs prometheus_url ({why})")
    # the spec, the gates and the versions refuse nonsense values (ValueError) before any API call
    spec = RolloutSpec(parse_steps(steps), interval_s, threshold, max_inconclusive)
    gates = default_gates(
        min_success_rate=min_success_rate,
        max_p99_ms=max_p99_ms,
        max_drift=max_drift,
        min_predictions=min_predictions,
        min_accuracy=min_accuracy if min_accuracy >= 0 else None,  # < 0: no accuracy gate
    )
    if stable_version == canary_version:
        raise ValueError(f"canary_version {canary_version!r} is also the stable version; a rollout needs two")
    api = as_deployer(api, namespace, fullname, max_seconds + 900)
    r = cls.from_config(release.config, api=api)
    owner, urls = release.owner_isvc, release.metrics_urls
    if prometheus_url:
        metrics = {"provider": "prometheus", "url": prometheus_url}
    else:
        metrics = {"provider": "scrape"}
        log(
            "no prometheus_url: scraping each predictor Service's /metrics (exact only with one replica each)"
        )
    extra = {"namespace": namespace} if prometheus_url else {}
    stable, canary = (
        Target(model, stable_version, urls[0], extra),
        Target(model, canary_version, urls[1], extra),
    )
    record = ctl.new_record(spec, gates, stable, canary, r.config(), metrics)
    store = ConfigMapStore(state_configmap(fullname), namespace, owner_isvc=owner, api=api)
    # one controller per rollout (a retried step refuses while the first one's heartbeat is fresh), the
    # stored record checked, router and metrics reachable; then the loop
    # provider: a MetricsProvider to use instead of the one `metrics` describes (tests script the traffic)
    return ctl.drive(
        store, record, router=r, provider=provider, log=log, poll_s=POLL_S, max_seconds=max_seconds
    )
