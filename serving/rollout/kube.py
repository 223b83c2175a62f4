"""Kubernetes plumbing shared by the cluster routers, the state store and the KServe targets.

One place for the resources the rollout controller touches, its field manager, and how it talks to the
API server: the ``kubernetes`` client (in-cluster config inside a pod, else a kubeconfig), merge patches
with ``metadata.resourceVersion`` for optimistic concurrency (a 409 means re-read and re-apply), and
404 as "absent".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from serving.contract.errors import MlrolloutError


class GVR(NamedTuple):
    group: str
    version: str
    plural: str


ISVC = GVR("serving.kserve.io", "v1beta1", "inferenceservices")
HTTPROUTE = GVR("gateway.networking.k8s.io", "v1", "httproutes")
# Our writes are recorded under this field manager (metadata.managedFields), so who changed a weight, a
# predictor or the rollout state is visible on the object, and a Helm 4 server-side apply that would
# reset what we own stops with a conflict naming us instead of silently undoing the rollout.
FIELD_MANAGER = "mlrollout-rollout"


class KubeError(MlrolloutError, RuntimeError):
    """The API server refused or never reached the state we asked for."""


def custom_api(kubeconfig: str | None = None, context: str | None = None):
    """CustomObjectsApi: in-cluster config when running in a pod, else kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig, context=context)
    return client.CustomObjectsApi()


def apps_api(api: Any):
    """AppsV1Api on the same connection (credentials, server) as the CustomObjectsApi ``api``."""
    from kubernetes import client

    return client.AppsV1Api(api.api_client)


def core_api(api: Any):
    from kubernetes import client

    return client.CoreV1Api(api.api_client)


def status_of(e: Exception) -> int | None:
    return getattr(e, "status", None)


def is_conflict(e: Exception) -> bool:
    return status_of(e) == 409


def is_not_found(e: Exception) -> bool:
    return status_of(e) == 404


def get(api: Any, gvr: GVR, namespace: str, name: str) -> dict | None:
    """The custom object, or None when it does not exist."""
    try:
        return api.get_namespaced_custom_object(gvr.group, gvr.version, namespace, gvr.plural, name)
    except Exception as e:
        if is_not_found(e):
            return None
        raise


def patch(api: Any, gvr: GVR, namespace: str, name: str, body: dict) -> dict:
    """A JSON merge patch (what ``patch_namespaced_custom_object`` sends) under our field manager."""
    return api.patch_namespaced_custom_object(
        gvr.group, gvr.version, namespace, gvr.plural, name, body, field_manager=FIELD_MANAGER
    )


def retry_on_conflict(fn: Callable[[], Any], what: str, attempts: int = 10) -> Any:
    """Run ``fn`` (read, modify, write with resourceVersion) until no one else wrote in between."""
    for _ in range(attempts):
        try:
            return fn()
        except Exception as e:
            if not is_conflict(e):
                raise
    raise KubeError(f"{what} kept changing under us ({attempts} write conflicts)")
