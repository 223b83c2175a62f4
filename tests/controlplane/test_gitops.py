"""GitOps like Flagger on the real control plane: real helm (v4, server-side apply), the real chart in
operator mode (`operator.enabled`), a real operator process, the real KServe controller.

One release (strategy canary) goes through its whole life: `helm install` with v1 (the operator makes
v1 the stable model directly: Flagger's initialization, no analysis), `helm upgrade` to v2 (a gated
rollout to Promoted, the metrics scripted by the test's runtimes that follow the live HTTPRoute weights,
as in test_operator.py; the same upgrade once more mid-rollout, as an Argo CD auto-sync would, neither
conflicts nor resets the split), then the very same `helm upgrade` again: no conflict, and every object
of the release keeps its resourceVersion (InferenceServices, HTTPRoute, ModelRollout and the rest),
while the stable InferenceService serves the promoted v2. The managed fields show why: helm owns no
`storageUri` and no `spec.rules`; the operator's field manager does.

Beside it, a `knativeCanary` release in operator mode (target: its one InferenceService, router
kserve_knative) is initialized the same way, and its `helm upgrade` makes the operator add the new model
as a dark revision (`canaryTrafficPercent: 0`). That is as far as this control plane goes: it has no
Knative controller, so no revision ever becomes ready and the rollout waits there.
"""

from __future__ import annotations

import json
import time

import yaml

from serving.rollout import crd, gitops, kube, targets
from serving.rollout.routers import GatewayApiRouter
from tests.controlplane import test_operator
from tests.controlplane.conftest import CHART, NS, Kube
from tests.controlplane.test_operator import (
    INTERVAL_S,
    OperatorProc,
    Runtimes,
    events,
    finished,
    lease_holder,
    route_weights,
    status,
)
from tests.controlplane.test_rollout import V1_URI, V2_URI, served_uris
from tests.unit.test_rollout_controller import CANARY, STABLE

kc = test_operator.kc  # the fixture: the ModelRollout CRD applied
RELEASE, KN, LEASE = "gitops", "gitopskn", "op-gitops"
FULL, KN_FULL = f"{RELEASE}-mlrollout-model", f"{KN}-mlrollout-model"


def values(runtimes: Runtimes) -> dict:
    return {
        "model": {"name": STABLE.model},
        "storage": {"existingSecret": "kfp-s3-credentials"},
        "strategy": {"type": "canary"},
        "operator": {
            "enabled": True,
            "strategy": {"steps": [50, 100], "interval": f"{INTERVAL_S:g}s", "threshold": 1},
            "metrics": {
                "provider": "scrape",
                "stableMetricsUrl": f"{runtimes.url}/stable/metrics",
                "canaryMetricsUrl": f"{runtimes.url}/canary/metrics",
            },
        },
    }


KN_VALUES = {
    "model": {"name": STABLE.model},
    "storage": {"existingSecret": "kfp-s3-credentials"},
    "strategy": {"type": "knativeCanary"},
    # nothing is ever analysed here (no revision becomes ready), but a record needs a metrics backend
    "operator": {"enabled": True, "metrics": {"url": "http://127.0.0.1:9"}},
}


def helm_model(k: Kube, verb: str, values_file, uri: str, version: str, release: str = RELEASE):
    return k.helm(verb, release, str(CHART), "-n", NS, "-f", str(values_file),
                  "--set", f"model.storageUri={uri}", "--set", f"model.version={version}")  # fmt: skip


def release_objects(k: Kube) -> dict[str, str]:
    """resourceVersion of every object in the release's manifest, by kind/name."""
    manifest = k.helm("get", "manifest", RELEASE, "-n", NS).stdout
    got = k.run("get", "-n", NS, "-f", "-", "-o", "json", input=manifest).stdout
    items = json.loads(got).get("items") or [json.loads(got)]
    return {f"{o['kind']}/{o['metadata']['name']}": o["metadata"]["resourceVersion"] for o in items}


def managers_of(k: Kube, kind: str, name: str, path: list[str]) -> set[str]:
    """The field managers that own ``path`` (fieldsV1 keys, e.g. ["f:spec", "f:rules"])."""
    obj = k.json("-n", NS, "get", kind, name, "--show-managed-fields")
    out = set()
    for mf in obj["metadata"].get("managedFields", []):
        node = mf.get("fieldsV1") or {}
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            out.add(mf["manager"])
    return out


def test_helm_declares_the_model_the_operator_rolls_it_out_and_the_same_upgrade_changes_nothing(kc, tmp_path):
    api = kc.api()
    runtimes = Runtimes(
        GatewayApiRouter(FULL, NS, f"{FULL}-stable-predictor", f"{FULL}-canary-predictor", api=api)
    )
    vals, kn_vals = tmp_path / "values.yaml", tmp_path / "kn-values.yaml"
    vals.write_text(yaml.safe_dump(values(runtimes)))
    kn_vals.write_text(yaml.safe_dump(KN_VALUES))
    op = OperatorProc(kc, "op-gitops-a", LEASE, tmp_path)
    try:
        # first install: no stable yet, so v1 becomes stable directly, no analysis (once the operator leads)
        helm_model(kc, "install", vals, V1_URI, STABLE.version)
        helm_model(kc, "install", kn_vals, V1_URI, STABLE.version, release=KN)
        kc.wait("initialized", lambda: status(kc, FULL).get("stableVersion") == STABLE.version, 60)
        assert lease_holder(kc, LEASE) == "op-gitops-a"
        for track in ("stable", "canary"):
            targets.wait_serving(api, NS, f"{FULL}-{track}", V1_URI, timeout_s=60, poll_s=0.5)
        assert kc.wait("the route's rules", lambda: route_weights(kc, FULL) == [100, 0], 15)
        route = kc.get("httproute", FULL)
        assert gitops.desired_rules(route, f"{FULL}-stable-predictor", f"{FULL}-canary-predictor") is None
        assert [e["reason"] for e in events(kc, FULL)] == ["Initialized"]
        st = status(kc, FULL)
        assert st["phase"] == "Initialized" and "record" not in st, "no rollout, no record"
        row = kc.run("-n", NS, "get", crd.PLURAL, FULL, "--no-headers").stdout.split()
        assert row[1] == "Initialized" and STABLE.version in row
        # Knative: the one InferenceService gets the model, all traffic on its one revision
        kc.wait("Knative initialized", lambda: status(kc, KN_FULL).get("stableVersion") == STABLE.version, 30)
        pred = kc.get("inferenceservice", KN_FULL)["spec"]["predictor"]
        assert pred["model"]["storageUri"] == V1_URI and "canaryTrafficPercent" not in pred
        helm_model(kc, "upgrade", kn_vals, V2_URI, CANARY.version, release=KN)

        # a new desired model in git: a gated rollout, promoted
        helm_model(kc, "upgrade", vals, V2_URI, CANARY.version)
        # Knative: the new model as a dark revision, recorded first (then it waits for it to be ready)
        dark = kc.wait(
            "the Knative canary revision",
            lambda: (
                (p := kc.get("inferenceservice", KN_FULL)["spec"]["predictor"])["model"]["storageUri"]
                == V2_URI
                and p
            ),
            30,
        )
        assert dark.get("canaryTrafficPercent") == 0
        kst = status(kc, KN_FULL)
        assert (kst["phase"], kst["stableVersion"], kst["canaryVersion"]) == ("Progressing", "1.0.0", "2.0.0")
        assert json.loads(kst["record"])["router"] == {"router": "kserve_knative", "isvc": KN_FULL,
                                                       "namespace": NS, "kubeconfig": None}  # fmt: skip
        for path in (["f:storageUri"], ["f:canaryTrafficPercent"]):
            full = ["f:spec", "f:predictor", *(["f:model"] if path == ["f:storageUri"] else []), *path]
            assert managers_of(kc, "inferenceservice", KN_FULL, full) == {kube.FIELD_MANAGER}
        # Argo CD re-applies git all the time: mid-rollout, the same upgrade conflicts with nothing
        # and leaves the operator's split alone
        kc.wait("a live step", lambda: status(kc, FULL).get("canaryWeight", 0) >= 50, 90, every_s=0.2)
        generation = kc.get(crd.PLURAL, FULL)["metadata"]["generation"]
        helm_model(kc, "upgrade", vals, V2_URI, CANARY.version)  # raises on a conflict
        assert managers_of(kc, "httproute", FULL, ["f:spec", "f:rules"]) == {kube.FIELD_MANAGER}
        assert kc.get(crd.PLURAL, FULL)["metadata"]["generation"] == generation, "the same spec: no restart"
        st = finished(kc, FULL)
        assert st["phase"] == "Promoted", st.get("message")
        assert (st["stableVersion"], st["canaryVersion"]) == (STABLE.version, CANARY.version)
        assert served_uris(kc, f"{FULL}-stable") == {V2_URI} and route_weights(kc, FULL) == [100, 0]
        reasons = [e["reason"] for e in events(kc, FULL)]
        assert {"Initialized", "Started", "StepAdvanced", "Promoted"} <= set(reasons)

        # who owns what: helm none of the operator's fields, the operator exactly those
        model = ["f:spec", "f:predictor", "f:model", "f:storageUri"]
        for track in ("stable", "canary"):
            assert managers_of(kc, "inferenceservice", f"{FULL}-{track}", model) == {kube.FIELD_MANAGER}
        assert managers_of(kc, "httproute", FULL, ["f:spec", "f:rules"]) == {kube.FIELD_MANAGER}
        assert "helm" in managers_of(kc, "httproute", FULL, ["f:spec", "f:hostnames"])

        # the same helm upgrade again: no conflict, nothing changed or reverted
        time.sleep(1.0)  # the last status write settles
        before = release_objects(kc)
        deployment = kc.get("deployment", f"{FULL}-stable-predictor")["metadata"]["generation"]
        assert {f"InferenceService/{FULL}-stable", f"HTTPRoute/{FULL}", f"{crd.KIND}/{FULL}"} <= set(before)
        helm_model(kc, "upgrade", vals, V2_URI, CANARY.version)
        time.sleep(3.5)  # one of the operator's resyncs (--resync 3s): it writes nothing either
        assert release_objects(kc) == before
        assert kc.get("deployment", f"{FULL}-stable-predictor")["metadata"]["generation"] == deployment
        assert served_uris(kc, f"{FULL}-stable") == {V2_URI}, "the promoted model keeps serving"
        assert status(kc, FULL)["phase"] == "Promoted"
    finally:
        op.kill()  # its Knative worker waits for a revision that never becomes ready; the Lease goes below
        op.stop()
        print(f"--- operator log tail ---\n{op.text()[-3000:]}")
        runtimes.close()
        for release in (RELEASE, KN):  # no --wait: the names are this test's own, KServe finishes alone
            kc.helm("uninstall", release, "-n", NS, check=False)
        kc.run("-n", NS, "delete", "lease", LEASE, "--ignore-not-found", check=False)
