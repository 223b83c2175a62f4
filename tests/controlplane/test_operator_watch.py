"""The watch after promotion, driven by a real operator process on the real control plane.

As tests/controlplane/test_operator.py: a release of the model chart (strategy canary), the ModelRollout
CRD, `python -m serving.rollout operator` as a process (stopped by PID), and the two runtimes' `/metrics`
played by scripted counters in this test process that follow the real HTTPRoute's weights. Here they
also follow the real stable InferenceService's model: the stable side's `/metrics` counts for the
version its pods serve (1.0.0 from V1_URI, 2.0.0 from V2_URI, as a runtime labels its metrics with its
model's version), so the promotion by copy moves the new version's traffic onto the stable side, and the
restore moves it back. Once the test has seen the promotion applied, the new version starts failing
half of its requests (it broke under full load): the watch fails and the operator restores the previous
model onto the stable InferenceService, phase RolledBack, with a Warning Event that says so.
"""

from __future__ import annotations

import contextlib
import json
import time

from serving.rollout import kube
from serving.rollout.routers import GatewayApiRouter
from tests.controlplane.conftest import NS, Kube
from tests.controlplane.test_operator import (  # noqa: F401 (kc, world: fixtures)
    Runtimes,
    events,
    exposition,
    finished,
    kc,
    lease_holder,
    route_weights,
    status,
    world,
)
from tests.controlplane.test_rollout import V1_URI, V2_URI, served_uris
from tests.unit.test_rollout_controller import CANARY, STABLE, World

VERSION_OF = {V1_URI: STABLE.version, V2_URI: CANARY.version}


class ServedRuntimes(Runtimes):
    """``/stable/metrics`` and ``/canary/metrics`` on 127.0.0.1: one simulated world per side (its
    ``weights`` say which version that side's traffic counts for), fed by the live route's weights and
    the stable InferenceService's storageUri, read from the API server every 0.2 s."""

    def __init__(self, k: Kube, full: str):
        api = k.api()
        self.api, self.stable_isvc = api, f"{full}-stable"
        # the World's error rate applies to the 2.0.0 side of its counts only: set by break_new_version
        self.sides = {"stable": World(rps=400.0), "canary": World(rps=400.0)}
        self.serves = {"stable": STABLE.version, "canary": CANARY.version}
        super().__init__(
            GatewayApiRouter(full, NS, f"{full}-stable-predictor", f"{full}-canary-predictor", api=api)
        )

    def body(self, path: str) -> bytes | None:
        side = {"/stable/metrics": "stable", "/canary/metrics": "canary"}.get(path)
        if side is None:
            return None
        with self.lock:
            target = STABLE if self.serves[side] == STABLE.version else CANARY
            return exposition(self.sides[side], target).encode()

    def break_new_version(self, error_rate: float) -> None:
        with self.lock:
            for w in self.sides.values():
                w.error_rate = error_rate

    def _tick(self) -> None:
        last = time.monotonic()
        while not self.stop.wait(0.2):
            with contextlib.suppress(Exception):  # a failed read keeps the last weights and models
                ws, wc = self.route.get_weights()
                uri = kube.get(self.api, kube.ISVC, NS, self.stable_isvc)["spec"]["predictor"]["model"]
                with self.lock:
                    self.serves["stable"] = VERSION_OF.get(uri["storageUri"], STABLE.version)
                    for side, share in (("stable", ws), ("canary", wc)):
                        new = self.serves[side] == CANARY.version
                        self.sides[side].weights = (0, share) if new else (share, 0)
            now = time.monotonic()
            with self.lock:
                for w in self.sides.values():
                    w.sleep(now - last)
            last = now


def test_a_version_that_breaks_after_promotion_gets_the_previous_model_back(world, kc):  # noqa: F811
    full, default_rt = world.release("opwatch")
    default_rt.close()  # this test's runtimes follow the stable InferenceService's model too
    rt = ServedRuntimes(kc, full)
    world.made["runtimes"].append(rt)
    world.operator("op-watch-a", "op-watch")
    kc.wait("the operator leading", lambda: lease_holder(kc, "op-watch") == "op-watch-a", 30)
    world.rollout("opwatch", full, rt, steps=[50, 100], postPromotionIntervals=30)

    def promoted_and_watching():
        s = status(kc, "opwatch")
        return s.get("phase") == "Verifying" and json.loads(s["record"]).get("pending") is None and s

    st = kc.wait("the promotion applied, the watch running", promoted_and_watching, 180, every_s=0.2)
    # promoted for real: the stable InferenceService serves the new model, all traffic on it
    assert served_uris(kc, f"{full}-stable") == {V2_URI}
    assert route_weights(kc, full) == [100, 0] and st["canaryWeight"] == 100
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Progressing"]["reason"] == "Verifying" and conds["Ready"]["status"] == "False"
    prev = json.loads(st["record"])["watch"]["previous_model"]
    assert prev["model"]["storageUri"] == V1_URI, "the previous model, recorded before the promotion"

    rt.break_new_version(0.5)
    st = finished(kc, "opwatch")
    assert st["phase"] == "RolledBack", st.get("message")
    assert st["message"].startswith("rollback: after promotion, watch interval"), st["message"]
    # the CRD's default gates: the error comparison against the previous version's baseline fails
    assert "error_rate_vs_stable: effect" in st["message"] and "previous model is restored" in st["message"]
    assert [g["gate"] for g in st["lastAnalysis"] if g["verdict"] == "fail"] == ["error_rate_vs_stable"]
    hist = json.loads(st["record"])["state"]["history"]
    assert [(h["event"], h["action"]) for h in hist][-1] == ("watch", "restore")
    # the previous model is back on the stable InferenceService (spec and every ready pod), all traffic on it
    isvc = kube.get(kc.api(), kube.ISVC, NS, f"{full}-stable")
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == V1_URI
    assert isvc["spec"]["predictor"]["labels"]["mlrollout.io/track"] == "stable"
    assert served_uris(kc, f"{full}-stable") == {V1_URI}
    assert route_weights(kc, full) == [100, 0]
    assert st["stableVersion"] == "1.0.0" and st["canaryVersion"] == "2.0.0"
    evs = kc.wait(
        "the RolledBack event",
        lambda: (e := events(kc, "opwatch")) and any(x["reason"] == "RolledBack" for x in e) and e,
        15,
    )
    by = {e["reason"]: e for e in evs}
    assert by["Verifying"]["type"] == "Normal" and "watching the new stable" in by["Verifying"]["message"]
    assert by["RolledBack"]["type"] == "Warning" and "after promotion" in by["RolledBack"]["message"]
    assert "error_rate_vs_stable: effect" in by["RolledBack"]["message"] and "Promoted" not in by
    # a rolled-back version is not retried: the operator leaves the restored stable alone
    time.sleep(4)
    again = status(kc, "opwatch")
    assert again["phase"] == "RolledBack" and served_uris(kc, f"{full}-stable") == {V1_URI}
