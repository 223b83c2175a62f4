"""Sticky cohorts on Gateway API: the HTTPRoute rules with header ``matches`` that ``gateway_api`` writes for
a cohort, accepted by the real Gateway API CRD schema on the chart's route, read back, and replaced step by
step; the controller drives a cohort rollout to promotion with its ConfigMap store; the operator does the
same for a ModelRollout's ``spec.strategy.cohort``.

Gateway API has no hash split: the hash cohort matches a header that carries the key's two-digit bucket
(serving.rollout.cohorts). Which request a real gateway sends where is the data plane's part; the local
stack's HAProxy test shows that routing.
"""

from __future__ import annotations

import json
import re

import pytest

from serving.rollout import cohorts
from serving.rollout import controller as ctl
from serving.rollout.machine import RolloutSpec
from serving.rollout.routers import GatewayApiRouter
from serving.rollout.routers.gateway_api import SHARE_ANNOTATION
from serving.rollout.store import ConfigMapStore
from tests.controlplane import test_operator
from tests.controlplane.conftest import CHART, NS, Kube
from tests.controlplane.test_operator import finished, status
from tests.controlplane.test_rollout import LiveTraffic, deploy_v2, install_canary, served_uris
from tests.unit.test_rollout_controller import CANARY, GATES, SCRAPE, STABLE


@pytest.fixture
def release(k: Kube, request):
    name = "coh-" + request.node.name.split("[")[0].removeprefix("test_").replace("_", "-")[:14].rstrip("-")
    full = install_canary(k, name)
    yield full
    k.helm("uninstall", name, "-n", NS, "--wait", "--timeout", "60s", check=False)


def cohort_router(api, full: str, cohort: str) -> GatewayApiRouter:
    return GatewayApiRouter(
        full, NS, f"{full}-stable-predictor", f"{full}-canary-predictor",
        stable_isvc=f"{full}-stable", canary_isvc=f"{full}-canary", api=api, cohort=cohort,
        ready_timeout_s=90, poll_s=0.5,
    )  # fmt: skip


def summary(route: dict) -> list[tuple]:
    """Each rule as (the backends' names and weights, its header matches, its paths)."""
    out = []
    for r in route["spec"]["rules"]:
        refs = tuple((b["name"].rsplit("-", 2)[-2], b.get("weight")) for b in r["backendRefs"])
        heads = tuple((h["name"], h["type"], h["value"]) for m in r["matches"] for h in m.get("headers", []))
        paths = tuple(m["path"]["value"] for m in r["matches"])
        out.append((refs, heads, paths))
    return out


def test_a_hash_cohort_is_header_matches_the_real_crd_accepts(k, release):
    api = k.api()
    r = cohort_router(api, release, "hash:header:x-user-bucket")
    paths = summary(k.get("httproute", release))[0][2]
    r.set_weights(70, 30)
    route = k.get("httproute", release)
    assert route["metadata"]["annotations"][SHARE_ANNOTATION] == "30"
    below, above = cohorts.bucket_regex(0, 30), cohorts.bucket_regex(30, 100)
    assert summary(route) == [
        ((("canary", 1),), (("x-user-bucket", "RegularExpression", below),) * len(paths), paths),
        ((("stable", 1),), (("x-user-bucket", "RegularExpression", above),) * len(paths), paths),
        ((("stable", 70), ("canary", 30)), (), paths),  # no bucket header: the random split
    ]
    assert r.get_weights() == (70, 30)
    # the buckets the two rules match are exactly the canary's share and the rest
    assert [b for b in range(100) if re.fullmatch(below, f"{b:02d}")] == list(range(30))
    # the next step replaces the cohort's rules, never adds to them
    r.set_weights(40, 60)
    assert [s[0] for s in summary(k.get("httproute", release))] == [
        (("canary", 1),), (("stable", 1),), (("stable", 40), ("canary", 60)),
    ]  # fmt: skip
    assert r.get_weights() == (40, 60)
    # someone else resets the rules (a helm upgrade --force-conflicts): the router says it is not in effect
    k.helm("upgrade", release.removesuffix("-mlrollout-model"), str(CHART), "-n", NS, "--reuse-values",
           "--force-conflicts")  # fmt: skip
    assert r.get_weights() == (0, 0)
    r.rollback()
    # at 0 (and 100) the weighted rule alone puts every key on one side: the cohort's rules are gone
    assert summary(k.get("httproute", release)) == [((("stable", 100), ("canary", 0)), (), paths)]
    assert r.get_weights() == (100, 0)


def test_a_match_cohort_on_a_cookie_sends_only_testers_to_the_canary(k, release):
    api = k.api()
    r = cohort_router(api, release, "match:cookie:canary=always")
    r.set_weights(90, 10)
    got = summary(k.get("httproute", release))
    assert [g[0] for g in got] == [(("canary", 1),), (("stable", 100), ("canary", 0))]
    (name, kind, rx) = got[0][1][0]
    assert (name, kind) == ("Cookie", "RegularExpression")
    assert re.fullmatch(rx, "a=1; canary=always; b=2") and re.fullmatch(rx, "canary=always")
    assert not re.fullmatch(rx, "canary=always2") and not re.fullmatch(rx, "xcanary=always")
    assert r.get_weights() == (90, 10)  # the step, from the annotation: the weighted rule is all stable
    r.set_weights(0, 100)
    assert [g[0] for g in summary(k.get("httproute", release))] == [(("stable", 0), ("canary", 100))]
    assert r.get_weights() == (0, 100)


def test_a_bad_cohort_header_is_refused_by_the_real_schema(k, release):
    """Our own check refuses it first; the real CRD would too (its HTTPHeaderName pattern)."""
    route = k.get("httproute", release)
    rule = route["spec"]["rules"][0]
    bad = {**rule, "matches": [{"headers": [{"name": "x user", "value": "1"}]}]}
    proc = k.run("-n", NS, "patch", "httproute", release, "--type", "merge", "-p",
                 json.dumps({"spec": {"rules": [bad]}}), check=False)  # fmt: skip
    assert proc.returncode != 0 and "name" in proc.stderr, proc.stderr
    with pytest.raises(ValueError, match="header name 'x user' is not allowed"):
        cohort_router(k.api(), release, "hash:header:x user")


def test_the_controller_promotes_a_cohort_rollout_with_its_configmap_store(k, release):
    api = k.api()
    deploy_v2(api, release)
    r = cohort_router(api, release, "hash:header:x-user-bucket")
    rec = ctl.new_record(RolloutSpec((20, 50, 100), 1.0, 2, 10), GATES, STABLE, CANARY, r.config(), SCRAPE)
    assert rec.router["cohort"] == "hash:header:x-user-bucket"
    store = ConfigMapStore(f"{release}-rollout", NS, owner_isvc=f"{release}-stable", api=api)
    logs: list[str] = []
    traffic = LiveTraffic(r)  # scripted counters that follow the live route's weights
    rec = ctl.drive(store, rec, router=r, provider=traffic, log=logs.append, poll_s=0.25, max_seconds=120)
    assert rec.phase == "Promoted", "\n".join(logs)
    assert any("(cohort: keys with xxh32(header x-user-bucket) mod 100 < 50 (50% of keys)" in m for m in logs)
    # promoted: the stable InferenceService serves v2 and every bucket is back on stable
    assert r.get_weights() == (100, 0)
    assert served_uris(k, f"{release}-stable") == {"s3://mlpipeline/models/breast-cancer/2.0.0"}
    stored = store.load()
    assert stored is not None and stored.router["cohort"] == "hash:header:x-user-bucket"


# --------------------------------------------------------------------------- the operator

# test_operator's fixtures: the CRD applied, releases with scripted /metrics, operator processes by PID
kc, world = test_operator.kc, test_operator.world


def test_the_operator_drives_spec_strategy_cohort_to_promotion(world, kc):
    """A ModelRollout with ``spec.strategy.cohort``: the operator process writes the cohort's header-match
    rules at each live step, and after the promotion leaves only the chart's weighted rule."""
    full, runtimes = world.release("opcoh")
    world.operator("op-coh-a", "op-coh")
    world.rollout("opcoh", full, runtimes, steps=[50, 100], cohort={"header": "x-user-bucket"})
    seen: dict[int, list] = {}

    def live_step():
        st = status(kc, "opcoh")
        w = st.get("canaryWeight", 0)
        if st.get("phase") == "Progressing" and 0 < w < 100:
            route = kc.get("httproute", full)
            if len(route["spec"]["rules"]) == 3:
                seen[w] = summary(route)
        return seen if len(seen) >= 1 else None

    kc.wait("a live cohort step", live_step, 120)
    st = finished(kc, "opcoh")
    assert st["phase"] == "Promoted", st.get("message")
    ((w, rules),) = list(seen.items())[:1]
    paths = rules[2][2]
    assert [r[0] for r in rules] == [(("canary", 1),), (("stable", 1),), (("stable", 100 - w), ("canary", w))]
    assert rules[0][1] == (("x-user-bucket", "RegularExpression", cohorts.bucket_regex(0, w)),) * len(paths)
    assert json.loads(st["record"])["router"]["cohort"] == "hash:header:x-user-bucket"
    assert summary(kc.get("httproute", full)) == [((("stable", 100), ("canary", 0)), (), paths)]
    assert served_uris(kc, f"{full}-stable") == {"s3://mlpipeline/models/breast-cancer/2.0.0"}
