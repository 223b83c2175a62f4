"""Sticky A/B cohorts on the real local stack: two KServe runtimes behind HAProxy 2.6, which hashes the
user key itself (``xxh32,mod(100)``) and reads the canary's share from a map the runtime API changes.

Who answered is read from every answer's ``x-model-version`` header.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serving.demo.badmodel import build_swapped_package
from serving.demo.localstack import LocalStack, TrafficGenerator
from serving.demo.localstack.procs import REGISTRY
from serving.demo.localstack.stack import HAPROXY, _wait, haproxy_config
from serving.rollout import cohorts
from serving.rollout import controller as ctl
from serving.rollout.gates import DriftGate, SuccessRateGate
from serving.rollout.machine import RolloutSpec
from serving.rollout.routers import HAProxyRuntimeAPI, LocalProxyRouter
from serving.rollout.routers.haproxy import cohort_map_text, cohort_rules
from serving.rollout.store import FileStateStore
from serving.runtime.client import free_port
from tests.modelfactory import breast_cancer, build_package

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not os.path.exists("/usr/sbin/haproxy"), reason="needs the Debian haproxy package"),
]

X, Y, _, _ = breast_cancer()
STABLE, CANARY = "1.0.0", "2.0.0"
COHORT = "hash:header:x-user-id"
KEYS = [f"user-{i}" for i in range(200)]


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort-models")
    v1, _ = build_package(root / "v1", "breast-cancer", STABLE, "logistic_regression", 0)
    v2, _ = build_package(root / "v2", "breast-cancer", CANARY, "random_forest", 0)
    return {"v1": v1, "v2": v2, "swapped": build_swapped_package(v2, root / "swapped", "2.3.0")}


@pytest.fixture(scope="module")
def stack(packages, tmp_path_factory):
    # scrape metrics (one replica per side: exact), no Prometheus: the module needs no scrape delay
    s = LocalStack(
        packages["v1"],
        packages["v2"],
        tmp_path_factory.mktemp("stack"),
        prometheus=False,
        cohort=COHORT,
        log=lambda m: None,
    )
    s.start()
    try:
        yield s
    finally:
        s.stop()


BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": X[0].tolist()}]}


def send(url: str, model: str, headers: list[dict], workers: int = 4) -> list[str]:
    """POST one inference per headers dict, ``workers`` at a time; the answering version of each."""

    def one(client: httpx.Client, h: dict) -> str:
        r = client.post(f"{url}/v2/models/{model}/infer", json=BODY, headers=h)
        assert r.status_code == 200, r.text
        return r.headers["x-model-version"]

    with httpx.Client(timeout=10) as client, ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda h: one(client, h), headers))


def versions_by_key(stack, keys: list[str], header: str = "x-user-id") -> dict[str, set[str]]:
    got = send(stack.proxy_url, stack.model, [{header: k} for k in keys])
    seen: dict[str, set[str]] = defaultdict(set)
    for k, v in zip(keys, got, strict=True):
        seen[k].add(v)
    return seen


def tolerance(p: float, n: int, sigmas: float = 4.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


def test_a_key_stays_on_one_version_and_the_share_of_keys_is_the_weight(stack):
    router = stack.router()
    rng = random.Random(15)
    on_canary: dict[int, set[str]] = {}
    for share in (25, 60):
        router.set_weights(100 - share, share)
        assert router.get_weights() == (100 - share, share)
        keys = KEYS * 5  # 1,000 requests over 200 keys, in random order
        rng.shuffle(keys)
        seen = versions_by_key(stack, keys)
        assert set(seen) == set(KEYS)
        split = {k: v for k, v in seen.items() if len(v) != 1}
        assert not split, f"keys answered by both versions at {share}%: {dict(list(split.items())[:5])}"
        on_canary[share] = {k for k, v in seen.items() if v == {CANARY}}
        # HAProxy puts each key where cohorts.bucket (Python's xxh32) says
        assert on_canary[share] == {k for k in KEYS if cohorts.bucket(k) < share}
        # the hash spreads the keys like independent draws: the canary's share of keys within 4 sigma
        frac, p = len(on_canary[share]) / len(KEYS), share / 100
        assert abs(frac - p) <= tolerance(p, len(KEYS)), (frac, p, tolerance(p, len(KEYS)))
    # monotone buckets: raising the share keeps every key that was on the canary there
    assert on_canary[25] <= on_canary[60] and len(on_canary[60]) > len(on_canary[25])
    # requests without the key fall back to the weighted random split at the same share
    keyless = send(stack.proxy_url, stack.model, [{}] * 200)
    frac = keyless.count(CANARY) / len(keyless)
    assert abs(frac - 0.6) <= tolerance(0.6, len(keyless)) + 0.01, frac
    # promotion and rollback move every key
    router.promote()
    assert versions_by_key(stack, KEYS[:50]).keys() == set(KEYS[:50])
    assert set().union(*versions_by_key(stack, KEYS[:50]).values()) == {CANARY}
    router.rollback()
    assert set().union(*versions_by_key(stack, KEYS[:50]).values()) == {STABLE}


@pytest.fixture
def second_proxy(stack, tmp_path):
    """Another HAProxy in front of the same two runtimes, with its own cohort rules: (url, router) for a
    cohort (a HAProxy starts in well under a second, runtimes do not)."""
    pids: list[int] = []

    def start(cohort: str) -> tuple[str, LocalProxyRouter]:
        sock, cmap = tmp_path / f"h{len(pids)}.sock", tmp_path / f"c{len(pids)}.map"
        cmap.write_text(cohort_map_text(0))
        port, stats = free_port(), free_port()
        cfg = tmp_path / f"h{len(pids)}.cfg"
        cfg.write_text(
            haproxy_config(
                sock,
                port,
                stats,
                stack.stable.http_port,
                stack.canary.http_port,
                cohort_rules(cohort, str(cmap)),
            )
        )
        proc = REGISTRY.spawn("haproxy-cohort", [HAPROXY, "-db", "-f", str(cfg)], tmp_path / "h.log")
        pids.append(proc.pid)
        api = HAProxyRuntimeAPI(str(sock), timeout_s=1.0)
        _wait("haproxy", lambda: "Name:" in api.command("show info"), 20, proc, tmp_path / "h.log")
        url = f"http://127.0.0.1:{port}"
        _wait("haproxy frontend", lambda: httpx.get(f"http://127.0.0.1:{stats}/metrics").is_success, 20)
        return url, LocalProxyRouter(str(sock), cohort=cohort, cohort_map=str(cmap))

    yield start
    for pid in pids:
        REGISTRY.stop(pid)


@pytest.mark.parametrize(
    "cohort, hit, miss",
    [
        ("match:header:x-canary=always", {"x-canary": "always"}, {"x-canary": "always2"}),
        ("match:cookie:canary=always", {"cookie": "a=1; canary=always"}, {"cookie": "canary=never"}),
    ],
)
def test_a_match_routes_only_the_matching_requests_to_the_canary(second_proxy, stack, cohort, hit, miss):
    url, router = second_proxy(cohort)
    router.set_weights(90, 10)
    assert router.get_weights() == (90, 10)
    got = send(url, stack.model, [hit, miss, {}] * 40)
    hits, misses, plain = got[0::3], got[1::3], got[2::3]
    assert set(hits) == {CANARY}, "a matching request reached stable"
    # the rest stays on stable: the step's weight is not a random split of everyone else
    assert set(misses) == {STABLE} and set(plain) == {STABLE}
    router.rollback()  # weight 0: the tester cohort is back on stable
    assert set(send(url, stack.model, [hit] * 10)) == {STABLE}
    router.promote()  # promotion: everyone
    assert set(send(url, stack.model, [hit, miss, {}] * 5)) == {CANARY}


def test_a_cookie_key_is_hashed_like_a_header_key(second_proxy, stack):
    url, router = second_proxy("hash:cookie:uid")
    router.set_weights(50, 50)
    keys = KEYS[:100]
    got = send(url, stack.model, [{"cookie": f"theme=dark; uid={k}"} for k in keys])
    assert {k for k, v in zip(keys, got, strict=True) if v == CANARY} == {
        k for k in keys if cohorts.bucket(k) < 50
    }


def test_a_rollout_by_cohort_keeps_a_bad_canary_inside_its_cohort(stack, packages, tmp_path):
    """The controller drives the hash cohort; the gates compare the cohort's answers (canary) with
    everyone else's (stable). The class-swapped canary is rolled back, and no user outside the first
    step's cohort ever got an answer from it."""
    canary = stack.replace_canary(packages["swapped"])
    tg = TrafficGenerator(
        stack.proxy_url, stack.model, X, Y, rps=100, concurrency=8, batch=16, max_seconds=60, user_keys=KEYS
    )
    logs: list[str] = []
    with tg:
        time.sleep(2.0)  # stable-only traffic: the drift gate's stable reference
        store = FileStateStore(tmp_path / "state.json")
        rec = ctl.new_record(
            RolloutSpec((30, 60, 100), 3.0, threshold=2, max_inconclusive=6),
            [SuccessRateGate(0.99, 20), DriftGate(0.15, "js", 200)],
            stack.stable_target,
            stack.canary_target,
            stack.router().config(),
            stack.metrics_config(),
        )
        assert rec.router["cohort"] == COHORT
        ctl.begin(store, rec)
        c = ctl.Controller(store, router=stack.router(), provider=stack.provider(), log=logs.append)
        rec = c.run(max_seconds=45)
    st = rec.state
    assert st["phase"] == "RolledBack", "\n".join(logs)
    assert [h["weight"] for h in st["history"] if h["action"] == "set_weight"] == [30]
    assert "cohort: keys with xxh32(header x-user-id) mod 100 < 30 (30% of keys)" in logs[0], logs[0]
    answers = tg.result().answers
    bad = {a.key for a in answers if a.version == canary.version}
    assert bad, "the canary answered nobody: the rollout judged nothing"
    outside = {k for k in bad if cohorts.bucket(k) >= 30}
    assert not outside, f"users outside the 30% cohort got the bad canary: {sorted(outside)[:5]}"
    assert stack.router().get_weights() == (100, 0)
