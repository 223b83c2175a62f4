"""Sticky cohorts (serving.rollout.cohorts): the spec, the hash, the Gateway API bucket regex, the HAProxy
rules and the router configs that carry a cohort. HAProxy itself routing by them is
tests/integration/test_cohorts_local.py; the HTTPRoute on the real CRD is tests/controlplane."""

from __future__ import annotations

import random
import re

import pytest

from serving.rollout import cohorts
from serving.rollout.cli import main as cli_main
from serving.rollout.routers import validate_config
from serving.rollout.routers.haproxy import cohort_map_text, cohort_rules


@pytest.mark.parametrize(
    "data, want",
    [
        # the reference implementation's values (xxhsum; the python-xxhash docs for the long one)
        (b"", 0x02CC5D05),
        (b"a", 0x550D7456),
        (b"abc", 0x32D153FF),
        (b"Nobody inspects the spammish repetition", 0xE2293B2F),  # 39 bytes: the 16-byte lanes too
    ],
)
def test_xxh32_is_the_reference_algorithm(data, want):
    assert cohorts.xxh32(data) == want


def test_buckets_are_monotone_and_spread_like_the_share():
    keys = [f"k{random.Random(1).getrandbits(64)}-{i}" for i in range(5000)]
    prev: set[str] = set()
    for share in (0, 1, 10, 25, 50, 75, 99, 100):
        now = {k for k in keys if cohorts.on_canary(k, share)}
        assert prev <= now  # raising the share never moves a key back to stable
        p = share / 100
        assert abs(len(now) / len(keys) - p) <= 4 * (p * (1 - p) / len(keys)) ** 0.5 + 1e-9
        prev = now
    assert all(0 <= cohorts.bucket(k) < 100 for k in keys)
    assert cohorts.bucket("ü-ser") == cohorts.xxh32("ü-ser".encode()) % 100  # the key's UTF-8 bytes


def test_bucket_regex_matches_exactly_the_range():
    for lo in range(100):
        for hi in range(lo + 1, 101):
            rx = re.compile(cohorts.bucket_regex(lo, hi))
            got = [b for b in range(100) if rx.fullmatch(f"{b:02d}")]
            assert got == list(range(lo, hi)), (lo, hi, rx.pattern)
            assert not rx.fullmatch(f"{lo}") or lo >= 10  # one digit is not a bucket
    for lo, hi in ((0, 0), (5, 3), (-1, 10), (0, 101)):
        with pytest.raises(ValueError, match="bucket range"):
            cohorts.bucket_regex(lo, hi)


@pytest.mark.parametrize(
    "spec, want",
    [
        ("hash:header:x-user-id", cohorts.Cohort("hash", "header", "x-user-id")),
        ("hash:cookie:uid", cohorts.Cohort("hash", "cookie", "uid")),
        ("match:header:x-canary=always", cohorts.Cohort("match", "header", "x-canary", "always")),
        ("match:cookie:tester=yes.1", cohorts.Cohort("match", "cookie", "tester", "yes.1")),
    ],
)
def test_a_spec_parses_and_round_trips(spec, want):
    assert cohorts.parse(spec) == want and want.spec == spec


@pytest.mark.parametrize(
    "spec, message",
    [
        ("random:header:x", "is not one of hash:header:NAME"),
        ("hash:query:x", "is not one of"),
        ("hash:header", "is not one of"),
        ("hash:header:x user", "header name 'x user' is not allowed"),
        ("hash:header:x;evil", "header name 'x;evil' is not allowed"),
        ("hash:cookie:a=b", "cookie name 'a=b' is not allowed"),
        ("match:header:x-canary", "a match needs NAME=VALUE"),
        ("match:header:x-canary=", "a match needs NAME=VALUE"),
        ("match:header:x-canary=a b", "a match needs NAME=VALUE"),
        ("match:header:x-canary=}", "a match needs NAME=VALUE"),
        (7, "cohort must be a string"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_part(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cohorts.parse(spec)


def test_the_haproxy_rules_hash_the_key_and_read_the_share_from_the_map():
    rules = cohort_rules("hash:header:x-user-id", "/w/cohort.map")
    assert "req.fhdr(x-user-id),xxh32,mod(100) if { req.fhdr(x-user-id) -m len gt 0 }" in rules
    assert "map_str_int(/w/cohort.map,0)" in rules
    assert rules.index("use-server canary") < rules.index("use-server stable")
    assert "req.cook(uid),xxh32" in cohort_rules("hash:cookie:uid", "/w/c.map")
    match = cohort_rules("match:header:x-canary=always", "/w/c.map", "s1", "c1")
    assert "use-server c1 if { req.fhdr(x-canary) -m str always }" in match and "xxh32" not in match
    assert cohort_map_text(25) == "share 25\n"
    with pytest.raises(ValueError, match="absolute path"):
        cohort_rules("hash:header:x", "rel/c.map")
    with pytest.raises(ValueError, match="absolute path"):
        cohort_rules("hash:header:x", "/w/c map")
    with pytest.raises(ValueError, match="stable server name"):
        cohort_rules("hash:header:x", "/w/c.map", "st;x")


def test_the_gateway_matches_take_names_and_values_literally():
    rx = cohorts.header_match(cohorts.parse("match:cookie:a.b=v.1"))["value"]
    assert re.fullmatch(rx, "x=1; a.b=v.1") and re.fullmatch(rx, "a.b=v.1; y=2")
    assert (
        not re.fullmatch(rx, "aXb=v.1")
        and not re.fullmatch(rx, "a.b=vX1")
        and not re.fullmatch(rx, "za.b=v.1")
    )
    hashed = cohorts.header_match(cohorts.parse("hash:cookie:b.k"), 0, 30)
    assert hashed["name"] == "Cookie" and re.fullmatch(hashed["value"], "b.k=29")
    assert not re.fullmatch(hashed["value"], "b.k=30") and not re.fullmatch(hashed["value"], "bxk=05")
    assert cohorts.header_match(cohorts.parse("match:header:x-c=on")) == {
        "type": "Exact", "name": "x-c", "value": "on"
    }  # fmt: skip


LOCAL = {"router": "local_proxy", "socket_path": "/s.sock"}


def test_router_configs_carry_the_cohort_and_refuse_a_bad_one():
    validate_config({**LOCAL, "cohort": "hash:header:x-user-id", "cohort_map": "/w/c.map"})
    gw = {
        "router": "gateway_api",
        "route": "r",
        "namespace": "n",
        "stable_backend": "s",
        "canary_backend": "c",
    }
    validate_config({**gw, "cohort": "match:cookie:t=1"})
    for cfg, message in (
        ({**LOCAL, "cohort": "hash:header:x"}, "needs the HAProxy map file"),
        ({**LOCAL, "cohort": "hash:header:x", "cohort_map": "c.map"}, "absolute path"),
        ({**LOCAL, "cohort": "hash:nope:x", "cohort_map": "/c.map"}, "is not one of"),
        ({**gw, "cohort": "hash:header:x y"}, "header name"),
        ({"router": "kserve_knative", "namespace": "n", "isvc": "i", "cohort": "hash:header:x"}, "unknown"),
    ):
        with pytest.raises(ValueError, match=message):
            validate_config(cfg)


START = ["start", "--model", "m", "--stable-version", "1.0.0", "--canary-version", "2.0.0"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--router", "local_proxy", "--haproxy-socket", "/s", "--cohort-header", "x-user-id"],
            "--router local_proxy needs --cohort-map with a cohort",
        ),
        (
            ["--router", "local_proxy", "--haproxy-socket", "/s", "--cohort-header", "a",
             "--match-cookie", "b=1"],
            "choose one cohort: --cohort-header and --match-cookie",
        ),
        (
            ["--router", "gateway_api", "--route", "r", "--stable-backend", "s", "--canary-backend", "c",
             "--match-header", "x-canary"],
            "a match needs NAME=VALUE",
        ),
        (
            ["--router", "kserve_knative", "--isvc", "i", "--cohort-cookie", "uid"],
            "--router kserve_knative cannot route by cohort",
        ),
    ],
)  # fmt: skip
def test_cli_cohort_errors_are_one_line(capsys, argv, message):
    assert cli_main([*START, *argv, "--state-file", "/nonexistent/s.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


# ----------------------------------------------------------------- the ModelRollout's spec.strategy.cohort


def _cr(cohort: dict, **target) -> dict:
    from tests.unit.test_rollout_operator import cr

    obj = cr(**target)
    obj["spec"]["strategy"]["cohort"] = cohort
    return obj


@pytest.mark.parametrize(
    "cohort, spec",
    [
        ({"header": "x-user-bucket"}, "hash:header:x-user-bucket"),
        ({"cookie": "bucket"}, "hash:cookie:bucket"),
        ({"header": "x-canary", "exact": "always"}, "match:header:x-canary=always"),
        ({"cookie": "tester", "exact": "yes"}, "match:cookie:tester=yes"),
    ],
)
def test_the_operator_puts_the_cohort_into_the_gateway_api_router(cohort, spec):
    from serving.rollout import operator as op

    rec = op.build_record(_cr(cohort), "1.0.0", "http://prom:9090")
    assert rec.router["router"] == "gateway_api" and rec.router["cohort"] == spec
    validate_config(rec.router)


def test_the_operator_refuses_a_cohort_it_cannot_route():
    from serving.rollout import operator as op

    with pytest.raises(op.SpecError, match="cohort needs the gateway_api router, not kserve_knative"):
        op.build_record(
            _cr({"header": "x"}, target={"inferenceService": {"name": "kn"}}), "1.0.0", "http://p"
        )
    for bad, message in (({"header": "a", "cookie": "b"}, "exactly one of header or cookie"),
                         ({}, None), ({"header": "x y"}, "header name")):  # fmt: skip
        if message is None:  # an empty cohort object is no cohort
            assert "cohort" not in op.build_record(_cr(bad), "1.0.0", "http://p").router
            continue
        with pytest.raises(ValueError, match=message):
            op.build_record(_cr(bad), "1.0.0", "http://p")
