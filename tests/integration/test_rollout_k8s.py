"""The cluster-side routers and state store, through the real ``kubernetes`` client.

A stand-in for the Kubernetes API (allowed for cluster-client code only) runs on 127.0.0.1: it
speaks the REST paths of the two custom resources (GET, PATCH with merge-patch or json-patch,
``metadata.resourceVersion`` preconditions answered with 409, ``fieldManager`` recorded), holds
objects shaped like the real ones (the chart's HTTPRoute, KServe v1beta1 InferenceServices with
KServe's status), and plays the part of the KServe/Knative controllers by updating ``status``
after each spec change.
"""

from __future__ import annotations

import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client

from serving.rollout import cluster
from serving.rollout import controller as ctl
from serving.rollout.gates import SuccessRateGate
from serving.rollout.machine import RolloutSpec
from serving.rollout.routers import (
    FIELD_MANAGER,
    GatewayApiRouter,
    KServeKnativeRouter,
    RouterError,
    build_router,
)
from serving.rollout.store import STATE_ANNOTATION, IsvcAnnotationStore
from tests.unit.test_rollout_controller import CANARY, STABLE, World

pytestmark = pytest.mark.integration

NS, FULL = "models", "demo-mlrollout-model"


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def json_patch(doc, ops):
    """RFC 6902 (the ops the kubectl/clients use: test, replace, add, remove)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent[p]
        last = int(parts[-1]) if isinstance(parent, list) else parts[-1]
        if op["op"] == "test":
            if parent[last] != op["value"]:
                raise ValueError("test failed")
        elif op["op"] in ("replace", "add"):
            parent[last] = op["value"]
        elif op["op"] == "remove":
            del parent[last]
    return doc


class FakeKube:
    """Objects by (group, version, plural, namespace, name); a KServe/Knative 'controller' on patch."""

    def __init__(self, ready_delay_patches: int = 0):
        self.objects: dict[tuple, dict] = {}
        self.rv = 100
        self.lock = threading.Lock()
        self.patches: list[dict] = []
        self.ready_delay = ready_delay_patches  # GETs before a changed ISVC turns Ready again
        self._pending_ready: dict[tuple, int] = {}

    def put(self, group, version, plural, obj):
        self.rv += 1
        obj["metadata"].update(resourceVersion=str(self.rv), generation=obj["metadata"].get("generation", 1))
        self.objects[(group, version, plural, obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj

    def reconcile_isvc(self, key, obj):
        st = obj.setdefault("status", {})
        ready = self._pending_ready.get(key, 0) <= 0
        st["observedGeneration"] = obj["metadata"]["generation"] if ready else st.get("observedGeneration", 1)
        st["conditions"] = [
            {"type": t, "status": "True" if ready else "False", "lastTransitionTime": "2026-11-22T14:00:00Z"}
            for t in ("IngressReady", "PredictorReady", "Ready")
        ]
        pred = obj["spec"]["predictor"]
        comp = st.setdefault("components", {}).setdefault("predictor", {})
        name = obj["metadata"]["name"]
        if "canaryTrafficPercent" in pred:  # Knative mode: latest revision gets the canary percent
            pct = int(pred["canaryTrafficPercent"])
            comp["traffic"] = [
                {
                    "revisionName": f"{name}-predictor-00002",
                    "percent": pct,
                    "latestRevision": True,
                    "tag": "latest",
                    "url": f"http://latest-{name}-predictor.{NS}.example.com",
                },
                {
                    "revisionName": f"{name}-predictor-00001",
                    "percent": 100 - pct,
                    "latestRevision": False,
                    "tag": "prev",
                    "url": f"http://prev-{name}-predictor.{NS}.example.com",
                },
            ]
            comp.update(
                latestRolledoutRevision=f"{name}-predictor-00001",
                latestReadyRevision=f"{name}-predictor-00002",
            )
        elif "traffic" in comp:  # promoted: the latest revision takes everything
            comp["traffic"] = [
                {"revisionName": f"{name}-predictor-00002", "percent": 100, "latestRevision": True}
            ]
            comp.update(
                latestRolledoutRevision=f"{name}-predictor-00002",
                previousRolledoutRevision=f"{name}-predictor-00001",
            )

    def handler(self):
        kube = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _key(self):
                u = urlparse(self.path)
                p = u.path.strip("/").split("/")
                # apis/{group}/{version}/namespaces/{ns}/{plural}/{name}
                if len(p) != 7 or p[0] != "apis" or p[3] != "namespaces":
                    return None, parse_qs(u.query)
                return (p[1], p[2], p[5], p[4], p[6]), parse_qs(u.query)

            def _send(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code, reason, message):
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "message": message,
                        "reason": reason,
                        "code": code,
                    },
                )

            def do_GET(self):
                key, _ = self._key()
                with kube.lock:
                    obj = kube.objects.get(key)
                    if (
                        obj is not None
                        and key[2] == "inferenceservices"
                        and kube._pending_ready.get(key, 0) > 0
                    ):
                        kube._pending_ready[key] -= 1
                        kube.reconcile_isvc(key, obj)
                if obj is None:
                    return self._status(404, "NotFound", f"{self.path} not found")
                self._send(200, obj)

            def do_POST(self):
                u = urlparse(self.path)
                p = u.path.strip("/").split("/")  # apis/{group}/{version}/namespaces/{ns}/{plural}
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = (p[1], p[2], p[5], p[4], body["metadata"]["name"])
                with kube.lock:
                    if key in kube.objects:
                        return self._status(409, "AlreadyExists", f"{key[4]} already exists")
                    kube.rv += 1
                    body["metadata"].update(resourceVersion=str(kube.rv), generation=1)
                    kube.patches.append(
                        {
                            "key": key,
                            "type": "create",
                            "body": body,
                            "fieldManager": parse_qs(u.query).get("fieldManager", [None])[0],
                        }
                    )
                    kube._pending_ready[key] = kube.ready_delay
                    kube.reconcile_isvc(key, body)
                    kube.objects[key] = body
                self._send(201, body)

            def do_PATCH(self):
                key, query = self._key()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ctype = self.headers.get("Content-Type", "")
                with kube.lock:
                    obj = kube.objects.get(key)
                    if obj is None:
                        return self._status(404, "NotFound", f"{self.path} not found")
                    if ctype == "application/merge-patch+json":
                        want_rv = (body.get("metadata") or {}).get("resourceVersion")
                        if want_rv is not None and want_rv != obj["metadata"]["resourceVersion"]:
                            return self._status(
                                409,
                                "Conflict",
                                "the object has been modified; please apply "
                                "your changes to the latest version and try again",
                            )
                        new = merge_patch(obj, body)
                    elif ctype == "application/json-patch+json":
                        try:
                            new = json_patch(obj, body)
                        except (ValueError, KeyError, IndexError):
                            return self._status(422, "Invalid", "json patch failed")
                    else:
                        return self._status(415, "UnsupportedMediaType", f"unsupported patch type {ctype}")
                    kube.patches.append(
                        {
                            "key": key,
                            "type": ctype,
                            "body": body,
                            "fieldManager": query.get("fieldManager", [None])[0],
                        }
                    )
                    kube.rv += 1
                    new["metadata"]["resourceVersion"] = str(kube.rv)
                    if new.get("spec") != obj.get("spec"):
                        new["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
                        if key[2] == "inferenceservices":
                            kube._pending_ready[key] = kube.ready_delay
                    if key[2] == "inferenceservices":
                        kube.reconcile_isvc(key, new)
                    kube.objects[key] = new
                self._send(200, new)

        return H


def isvc(name, storage_uri, track, knative_pct=None):
    pred = {
        "minReplicas": 1,
        "model": {
            "modelFormat": {"name": "onnx"},
            "runtime": "mlrollout-onnx",
            "storageUri": storage_uri,
            "protocolVersion": "v2",
        },
    }
    if knative_pct is not None:
        pred["canaryTrafficPercent"] = knative_pct
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"mlrollout.io/track": track},
            "annotations": {"serving.kserve.io/deploymentMode": "Standard"},
        },
        "spec": {"predictor": pred},
        "status": {
            "observedGeneration": 1,
            "url": f"http://{name}.{NS}.example.com",
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-22T14:00:00Z"}],
            "components": {"predictor": {}},
        },
    }


def httproute():
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": FULL, "namespace": NS, "labels": {"mlrollout.io/strategy": "canary"}},
        "spec": {
            "parentRefs": [
                {
                    "group": "gateway.networking.k8s.io",
                    "kind": "Gateway",
                    "name": "kserve-ingress-gateway",
                    "namespace": "kserve",
                }
            ],
            "hostnames": [f"{FULL}-{NS}.example.com"],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [
                        {
                            "group": "",
                            "kind": "Service",
                            "name": f"{FULL}-stable-predictor",
                            "port": 80,
                            "weight": 100,
                        },
                        {
                            "group": "",
                            "kind": "Service",
                            "name": f"{FULL}-canary-predictor",
                            "port": 80,
                            "weight": 0,
                        },
                    ],
                    "timeouts": {"request": "30s"},
                }
            ],
        },
    }


@pytest.fixture
def kube(tmp_path):
    k = FakeKube(ready_delay_patches=2)
    k.put("gateway.networking.k8s.io", "v1", "httproutes", httproute())
    k.put("serving.kserve.io", "v1beta1", "inferenceservices", isvc(f"{FULL}-stable", "s3://m/v1", "stable"))
    k.put("serving.kserve.io", "v1beta1", "inferenceservices", isvc(f"{FULL}-canary", "s3://m/v2", "canary"))
    k.put(
        "serving.kserve.io", "v1beta1", "inferenceservices", isvc("kn", "s3://m/v2", "stable", knative_pct=10)
    )
    srv = ThreadingHTTPServer(("127.0.0.1", 0), k.handler())
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    k.url = f"http://127.0.0.1:{srv.server_address[1]}"
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": k.url}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u", "namespace": NS}}],
                "users": [{"name": "u", "user": {"token": "not-a-secret"}}],
            }
        )
    )
    k.kubeconfig = str(kubeconfig)
    try:
        yield k
    finally:
        srv.shutdown()
        srv.server_close()


def api_for(kube):
    cfg = client.Configuration()
    cfg.host = kube.url
    return client.CustomObjectsApi(client.ApiClient(cfg))


def gw_router(kube, **kw):
    return GatewayApiRouter(
        FULL,
        NS,
        f"{FULL}-stable-predictor",
        f"{FULL}-canary-predictor",
        stable_isvc=f"{FULL}-stable",
        canary_isvc=f"{FULL}-canary",
        poll_s=0.01,
        **kw,
    )


def route_weights(kube):
    r = kube.objects[("gateway.networking.k8s.io", "v1", "httproutes", NS, FULL)]
    return [b["weight"] for b in r["spec"]["rules"][0]["backendRefs"]]


def test_gateway_api_router_patches_backend_weights_via_kubeconfig(kube):
    r = gw_router(kube, kubeconfig=kube.kubeconfig)  # real client, config loaded from the kubeconfig
    assert r.get_weights() == (100, 0)
    r.set_weights(75, 25)
    assert route_weights(kube) == [75, 25] and r.get_weights() == (75, 25)
    last = kube.patches[-1]
    assert last["type"] == "application/merge-patch+json" and last["fieldManager"] == FIELD_MANAGER
    # everything else in the rule is kept (a merge patch replaces lists whole)
    rule = kube.objects[("gateway.networking.k8s.io", "v1", "httproutes", NS, FULL)]["spec"]["rules"][0]
    assert rule["timeouts"] == {"request": "30s"} and rule["matches"][0]["path"]["value"] == "/"
    with pytest.raises(ValueError, match="adding up to 100"):
        r.set_weights(50, 60)


def test_gateway_api_router_retries_on_conflict(kube):
    r = gw_router(kube, api=api_for(kube))
    original = r._get_route
    calls = {"n": 0}

    def racing_get():
        obj = original()
        calls["n"] += 1
        if calls["n"] == 1:  # someone else writes between our read and our patch
            with kube.lock:
                key = ("gateway.networking.k8s.io", "v1", "httproutes", NS, FULL)
                kube.rv += 1
                kube.objects[key]["metadata"]["resourceVersion"] = str(kube.rv)
        return obj

    r._get_route = racing_get
    r.set_weights(90, 10)
    assert calls["n"] == 2 and route_weights(kube) == [90, 10]


def test_gateway_api_router_names_missing_backends(kube):
    r = GatewayApiRouter(FULL, NS, "nope-stable", "nope-canary", api=api_for(kube))
    with pytest.raises(RouterError, match="no rule with backendRefs named 'nope-stable'"):
        r.set_weights(90, 10)


def test_gateway_api_promotion_copies_the_canary_and_waits_for_ready(kube):
    r = gw_router(kube, api=api_for(kube))
    r.set_weights(50, 50)
    r.promote()
    stable = kube.objects[("serving.kserve.io", "v1beta1", "inferenceservices", NS, f"{FULL}-stable")]
    assert stable["spec"]["predictor"]["model"]["storageUri"] == "s3://m/v2"
    assert stable["metadata"]["generation"] == 2 and stable["status"]["observedGeneration"] == 2
    assert route_weights(kube) == [100, 0]  # back on stable, which now runs the canary's model
    kinds = [p["key"][2] for p in kube.patches]
    assert kinds == [
        "httproutes",
        "httproutes",
        "inferenceservices",
        "httproutes",
    ]  # canary first, then stable


def test_gateway_api_promotion_keeps_traffic_on_the_canary_when_stable_never_gets_ready(kube):
    kube.ready_delay = 10_000
    r = gw_router(kube, api=api_for(kube), ready_timeout_s=0.3)
    with pytest.raises(RouterError, match="not Ready"):
        r.promote()
    assert route_weights(kube) == [0, 100]


def test_kserve_knative_router_uses_canary_traffic_percent(kube):
    r = KServeKnativeRouter("kn", NS, api=api_for(kube))
    assert r.get_weights() == (90, 10)  # no status.components.predictor.traffic yet: read from the spec
    r.set_weights(75, 25)
    obj = kube.objects[("serving.kserve.io", "v1beta1", "inferenceservices", NS, "kn")]
    assert obj["spec"]["predictor"]["canaryTrafficPercent"] == 25
    assert r.get_weights() == (75, 25)
    assert (
        obj["status"]["components"]["predictor"]["traffic"][1]["tag"] == "prev"
    )  # read from Knative's split
    r.rollback()
    assert (
        kube.objects[("serving.kserve.io", "v1beta1", "inferenceservices", NS, "kn")]["spec"]["predictor"][
            "canaryTrafficPercent"
        ]
        == 0
    )
    assert r.get_weights() == (100, 0)
    r.promote()  # the field is removed: the latest revision takes all traffic
    promoted = kube.objects[("serving.kserve.io", "v1beta1", "inferenceservices", NS, "kn")]
    assert "canaryTrafficPercent" not in promoted["spec"]["predictor"]
    assert r.get_weights() == (0, 100)
    assert promoted["status"]["components"]["predictor"]["latestRolledoutRevision"] == "kn-predictor-00002"


class Follow:
    """The real router; the simulated world's traffic follows the weights it reads back from the route."""

    def __init__(self, router, world):
        self.r, self.w, self.name = router, world, router.name

    def _sync(self):
        self.w.weights = self.r.get_weights()

    def set_weights(self, s, c):
        self.r.set_weights(s, c)
        self._sync()

    def get_weights(self):
        return self.r.get_weights()

    def promote(self):
        self.r.promote()
        self._sync()

    def rollback(self):
        self.r.rollback()
        self._sync()

    def config(self):
        return self.r.config()


def test_state_annotation_store_and_a_full_rollout_on_the_fake_cluster(kube):
    """The controller drives the HTTPRoute and persists its state on the stable ISVC; a second
    controller (a restarted pod) resumes from that annotation."""
    api = api_for(kube)
    store = IsvcAnnotationStore(f"{FULL}-stable", NS, api=api)
    router = gw_router(kube, api=api)
    rec = ctl.new_record(
        RolloutSpec((10, 50, 100), 10.0, 2, 3),
        [SuccessRateGate(0.99, 20)],
        STABLE,
        CANARY,
        router.config(),
        {"provider": "scrape"},
    )
    ctl.begin(store, rec)
    w = World()  # simulated traffic and metrics follow what the real router set on the route
    router = Follow(router, w)
    c = ctl.Controller(store, router=router, provider=w, clock=w.clock, sleep=w.sleep, log=lambda s: None)
    c.run(stop=lambda: store.load()["state"]["step_index"] == 1, max_seconds=20)
    ann = kube.objects[("serving.kserve.io", "v1beta1", "inferenceservices", NS, f"{FULL}-stable")][
        "metadata"
    ]["annotations"][STATE_ANNOTATION]
    assert json.loads(ann)["state"]["weight"] == 50 and route_weights(kube) == [50, 50]
    # restart: a new controller built from the annotation alone (router rebuilt from the stored config)
    c2 = ctl.Controller(store, router=router, provider=w, clock=w.clock, sleep=w.sleep, log=lambda s: None)
    final = c2.run(max_seconds=20)
    assert final["state"]["phase"] == "Promoted"
    assert route_weights(kube) == [100, 0]  # promoted: stable now serves the canary's model
    stable = kube.objects[("serving.kserve.io", "v1beta1", "inferenceservices", NS, f"{FULL}-stable")]
    assert stable["spec"]["predictor"]["model"]["storageUri"] == "s3://m/v2"
    assert json.loads(stable["metadata"]["annotations"][STATE_ANNOTATION])["state"]["phase"] == "Promoted"
    assert all(p["fieldManager"] == FIELD_MANAGER for p in kube.patches)
    # the stored router config rebuilds an equivalent router
    again = build_router(json.loads(stable["metadata"]["annotations"][STATE_ANNOTATION])["router"], api=api)
    assert again.get_weights() == (100, 0)


ISVC_KEY = ("serving.kserve.io", "v1beta1", "inferenceservices", NS)


def test_deploy_canary_points_the_canary_at_the_new_model_and_waits_until_ready(kube):
    out = cluster.deploy_canary(
        api_for(kube),
        namespace=NS,
        fullname=FULL,
        version="2.1.0",
        poll_s=0.01,
        storage_uri=cluster.to_storage_uri("minio://mlpipeline/v2/runs/x/package"),
    )
    canary = kube.objects[(*ISVC_KEY, f"{FULL}-canary")]
    assert canary["spec"]["predictor"]["model"]["storageUri"] == "s3://mlpipeline/v2/runs/x/package"
    assert canary["metadata"]["labels"]["app.kubernetes.io/version"] == "2.1.0"
    assert canary["status"]["observedGeneration"] == canary["metadata"]["generation"] == 2
    assert out["isvc"] == f"{FULL}-canary" and route_weights(kube) == [100, 0]  # no traffic yet


def test_deploy_canary_creates_the_canary_from_the_stable_one_when_missing(kube):
    del kube.objects[(*ISVC_KEY, f"{FULL}-canary")]
    kube.objects[(*ISVC_KEY, f"{FULL}-stable")]["metadata"]["annotations"][STATE_ANNOTATION] = "{}"
    cluster.deploy_canary(
        api_for(kube), namespace=NS, fullname=FULL, version="2.1.0", storage_uri="s3://m/v3", poll_s=0.01
    )
    canary = kube.objects[(*ISVC_KEY, f"{FULL}-canary")]
    assert canary["metadata"]["labels"]["mlrollout.io/track"] == "canary"
    assert STATE_ANNOTATION not in canary["metadata"]["annotations"]
    assert canary["spec"]["predictor"]["model"]["runtime"] == "mlrollout-onnx"
    assert kube.patches[-1]["type"] == "create" and kube.patches[-1]["fieldManager"] == FIELD_MANAGER


def test_deploy_canary_knative_starts_a_dark_revision(kube):
    cluster.deploy_canary(
        api_for(kube),
        namespace=NS,
        fullname="kn",
        version="2.1.0",
        storage_uri="s3://m/v3",
        router="kserve_knative",
        poll_s=0.01,
    )
    pred = kube.objects[(*ISVC_KEY, "kn")]["spec"]["predictor"]
    assert pred["canaryTrafficPercent"] == 0 and pred["model"]["storageUri"] == "s3://m/v3"


def test_deploy_canary_reports_a_canary_that_never_gets_ready(kube):
    kube.ready_delay = 10_000
    with pytest.raises(RouterError, match="not Ready after"):
        cluster.deploy_canary(
            api_for(kube),
            namespace=NS,
            fullname=FULL,
            version="2.1.0",
            storage_uri="s3://x",
            ready_timeout_s=0.2,
            poll_s=0.01,
        )


def test_progressive_rollout_step_refuses_knative_without_prometheus(kube):
    with pytest.raises(ValueError, match="prometheus_url"):
        cluster.progressive_rollout(
            api_for(kube),
            namespace=NS,
            fullname="kn",
            model="m",
            stable_version="1.0.0",
            canary_version="2.0.0",
            router="kserve_knative",
        )
