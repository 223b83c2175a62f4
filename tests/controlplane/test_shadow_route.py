"""The shadow step on the chart's real HTTPRoute (the pinned Gateway API CRD's schema and CEL rules):
the router's ``RequestMirror`` filter to the canary Service is accepted, read back, kept across weight
changes and removed; the controller with its ConfigMap store rolls a class-swapped canary back in the
shadow step without ever giving it a weight, and the filter is gone afterwards.
"""

from __future__ import annotations

import json

import pytest

from serving.rollout import controller as ctl
from serving.rollout.machine import RolloutSpec
from serving.rollout.store import ConfigMapStore
from tests.controlplane.conftest import NS
from tests.controlplane.test_rollout import (
    CANARY,
    GATES,
    SCRAPE,
    STABLE,
    LiveTraffic,
    install_canary,
    router,
    state_configmap,
)


@pytest.fixture
def release(k, request):
    """A release of the chart's canary strategy, its own per test (as test_rollout's fixture)."""
    name = "shadow-" + request.node.name.removeprefix("test_").replace("_", "-")[:12].rstrip("-")
    full = install_canary(k, name)
    yield full
    k.helm("uninstall", name, "-n", NS, "--wait", "--timeout", "60s", check=False)


def _rule(k, release: str) -> dict:
    (rule,) = k.get("httproute", release)["spec"]["rules"]
    return rule


def test_the_request_mirror_filter_is_accepted_by_the_real_crd_and_removed(k, release):
    r = router(k.api(), release)
    assert r.get_mirror() is False
    r.set_mirror(True)
    rule = _rule(k, release)
    canary_ref = next(b for b in rule["backendRefs"] if b["name"] == f"{release}-canary-predictor")
    (f,) = [f for f in rule["filters"] if f["type"] == "RequestMirror"]
    assert f["requestMirror"]["backendRef"]["name"] == f"{release}-canary-predictor"
    assert f["requestMirror"]["backendRef"]["port"] == canary_ref["port"]
    assert r.get_mirror() is True and r.get_weights() == (100, 0)
    r.set_mirror(True)  # idempotent: still one filter
    assert len([f for f in _rule(k, release)["filters"] if f["type"] == "RequestMirror"]) == 1
    r.set_weights(90, 10)  # a weight change keeps the filter
    assert r.get_mirror() is True and r.get_weights() == (90, 10)
    r.set_mirror(False)
    assert "RequestMirror" not in json.dumps(_rule(k, release)) and r.get_weights() == (90, 10)


class MirroredTraffic(LiveTraffic):
    """LiveTraffic that also follows the route's mirror: with the filter on, the canary's counters get a
    copy of every request stable answers (the gateway mirrors; the weights stay 100/0)."""

    def snapshot(self, target):
        if self.route.get_mirror():
            real = self.route.get_weights
            self.route.get_weights = lambda: (100, 100)  # type: ignore[method-assign]
            try:
                return super().snapshot(target)
            finally:
                self.route.get_weights = real  # type: ignore[method-assign]
        return super().snapshot(target)


def test_a_swapped_canary_is_rolled_back_in_the_shadow_step_on_the_real_route(k, release):
    api = k.api()
    r = router(api, release)
    weights: list[tuple[int, int]] = []
    real_set = r.set_weights

    def record_set(stable, canary):
        weights.append((stable, canary))
        real_set(stable, canary)

    r.set_weights = record_set  # type: ignore[method-assign]
    traffic = MirroredTraffic(router(api, release), scores=(0.59, 0.02, 0.02, 0.02, 0.35))
    rec = ctl.new_record(
        RolloutSpec((20, 50, 100), 1.0, 2, 10, shadow=True), GATES, STABLE, CANARY, r.config(), SCRAPE
    )
    store = ConfigMapStore(state_configmap(release), NS, owner_isvc=f"{release}-stable", api=api)
    rec = ctl.drive(store, rec, router=r, provider=traffic, log=lambda _m: None, poll_s=0.25, max_seconds=90)
    assert rec.state["phase"] == "RolledBack" and "in the shadow step" in rec.state["reason"], rec.state
    assert weights and all(c == 0 for _, c in weights), weights
    assert r.get_mirror() is False and r.get_weights() == (100, 0)
    stored = json.loads(k.get("configmap", state_configmap(release))["data"]["state"])
    assert stored["spec"]["shadow"] is True and stored["state"]["phase"] == "RolledBack"
