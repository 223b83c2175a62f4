"""The shadow step through the operator: a ModelRollout with ``spec.strategy.shadow.enabled``, a real
operator process, the chart's real HTTPRoute. The scripted runtimes (test_operator's) follow the route: while
it carries the RequestMirror filter, the canary's counters also get a copy of every request stable
answers. A class-swapped canary is rolled back in the shadow step without ever having a weight on the
route; a good one passes it and walks the steps; the filter is gone at the end either way.
"""

from __future__ import annotations

import json

import pytest

from serving.rollout.routers import GatewayApiRouter
from tests.controlplane import test_operator as top
from tests.controlplane.conftest import NS
from tests.controlplane.test_rollout import V1_URI, V2_URI, install_canary, served_uris

# test_operator's fixtures, used here by name (the scripted runtimes, operator processes, cleanup)
kc, world = top.kc, top.world


class MirroredRoute:
    """What the traffic does on the route: with the RequestMirror filter on, the canary answers a copy of
    every request (weight 100 for the scripted counters) while the users' split stays the route's."""

    def __init__(self, route: GatewayApiRouter):
        self.route = route

    def get_weights(self) -> tuple[int, int]:
        stable, canary = self.route.get_weights()
        return (stable, 100) if self.route.get_mirror() else (stable, canary)


SWAPPED = (0.59, 0.02, 0.02, 0.02, 0.35)  # the scripted score distribution with the classes swapped


@pytest.mark.parametrize("good", [True, False], ids=["promoted", "rolled-back"])
def test_the_operator_runs_the_shadow_step_on_the_real_route(world, kc, good):
    name = "opshgood" if good else "opshbad"
    full = install_canary(kc, name)
    world.made["releases"].append(name)
    route = GatewayApiRouter(full, NS, f"{full}-stable-predictor", f"{full}-canary-predictor", api=kc.api())
    runtimes = top.Runtimes(MirroredRoute(route), **({} if good else {"scores": SWAPPED}))
    world.made["runtimes"].append(runtimes)
    world.operator(f"{name}-a", name)
    world.rollout(name, full, runtimes, shadow={"enabled": True}, threshold=2)
    # while the shadow step runs, the route mirrors to the canary and gives it no weight
    kc.wait("the mirror on the route", route.get_mirror, 60)
    assert top.route_weights(kc, full) == [100, 0]
    st = top.finished(kc, name)
    record = json.loads(st["record"])
    moves = [h for h in record["state"]["history"] if h["action"] in ("set_weight", "promote", "rollback")]
    if good:
        assert st["phase"] == "Promoted", st.get("message")
        assert [h["weight"] for h in moves] == [0, 20, 50, 100, 100]
        assert "passed in the shadow step" in moves[1]["reason"]
        assert served_uris(kc, f"{full}-stable") == {V2_URI}
    else:
        assert st["phase"] == "RolledBack", st.get("message")
        assert "in the shadow step" in st["message"] and "drift_chi2" in st["message"], st["message"]
        assert all(h["weight"] == 0 for h in record["state"]["history"]), "the canary got a live weight"
        assert served_uris(kc, f"{full}-stable") == {V1_URI}
    assert route.get_mirror() is False and top.route_weights(kc, full) == [100, 0]
