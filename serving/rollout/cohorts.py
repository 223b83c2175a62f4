"""Sticky A/B cohorts: which requests the canary gets, by a header or a cookie instead of random weights.

Pure (no I/O). Two kinds, as Flagger's ``match`` and Argo's ``setHeaderRoute`` offer them:

* **hash** (``hash:header:x-user-id``, ``hash:cookie:uid``): the request's user key (the header's whole
  value, or the cookie's) is hashed into a *bucket* ``xxh32(key) mod 100``, 0..99; the key's requests go
  to the canary while ``bucket < share``, where the share is the state machine's canary weight. So a user
  stays on one version for a step, the share of *keys* on the canary is the step's weight, and raising the
  share never moves a key back to stable (buckets are monotone). xxh32 with seed 0 is HAProxy's ``xxh32``
  converter: :func:`bucket` here is the bucket HAProxy computes (the local tests compare them).
  A request without the key falls back to the weighted random split at the same share.
* **match** (``match:header:x-canary=always``, ``match:cookie:canary=always``): a tester cohort; requests
  whose header (cookie) equals the value go to the canary while the rollout is live (0 < weight), every
  other request stays on stable until promotion (weight 100).

Either way the gates compare what the canary answered (the cohort's requests) with what stable answered
(everyone else), so the analysis compares the two cohorts.

The spec is one string, so it persists in a router config as every other field does (``routers``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

BUCKETS = 100  # one bucket per percent of the canary weight

# header names as HAProxy and Gateway API both take them (Gateway API's HTTPHeaderName is an RFC 7230
# token; we keep to letters, digits and '-', so a name can never reach an HAProxy config line or a regex
# with a character that means something there); cookie names and match values likewise
HEADER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,127}")
COOKIE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
MATCH_VALUE = re.compile(r"[A-Za-z0-9_.~-]{1,128}")
SOURCES = ("header", "cookie")
MODES = ("hash", "match")
SPEC_HELP = "hash:header:NAME, hash:cookie:NAME, match:header:NAME=VALUE or match:cookie:NAME=VALUE"


@dataclass(frozen=True)
class Cohort:
    mode: str  # "hash" or "match"
    source: str  # "header" or "cookie"
    name: str  # the header's or the cookie's name
    value: str = ""  # match: the exact value that puts a request in the tester cohort

    @property
    def spec(self) -> str:
        tail = f"{self.name}={self.value}" if self.mode == "match" else self.name
        return f"{self.mode}:{self.source}:{tail}"

    def describe(self, share: int) -> str:
        """What the canary gets at ``share`` percent, in words (the controller's log, ``status``)."""
        what = f"{self.source} {self.name}"
        if share >= 100:
            return f"cohort by {what}: every request"
        if share <= 0:
            return f"cohort by {what}: none, every request on stable"
        if self.mode == "hash":
            return f"cohort: keys with xxh32({what}) mod 100 < {share} ({share}% of keys), others stable"
        return f"cohort: requests with {what}={self.value}, others stable"


def parse(text: Any) -> Cohort:
    """A :class:`Cohort` from its spec string; ValueError naming the part that is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"cohort must be a string ({SPEC_HELP}), got {text!r}")
    parts = text.split(":", 2)
    if len(parts) != 3 or parts[0] not in MODES or parts[1] not in SOURCES:
        raise ValueError(f"cohort {text!r} is not one of {SPEC_HELP}")
    mode, source, tail = parts
    name, value = tail, ""
    if mode == "match":
        name, sep, value = tail.partition("=")
        if not sep or not MATCH_VALUE.fullmatch(value):
            raise ValueError(
                f"cohort {text!r}: a match needs NAME=VALUE, the value 1-128 of letters, digits, '_.~-'"
            )
    pattern = HEADER_NAME if source == "header" else COOKIE_NAME
    if not pattern.fullmatch(name):
        allowed = "letters, digits and '-'" if source == "header" else "letters, digits and '_.-'"
        raise ValueError(f"cohort {text!r}: {source} name {name!r} is not allowed (1-128 of {allowed})")
    return Cohort(mode, source, name, value)


def from_flags(
    header: str | None = None,
    cookie: str | None = None,
    match_header: str | None = None,
    match_cookie: str | None = None,
) -> str:
    """The spec string from the CLI's cohort flags ("" for none); ValueError when more than one is set."""
    given = [
        (flag, spec)
        for flag, v, spec in (
            ("--cohort-header", header, f"hash:header:{header}"),
            ("--cohort-cookie", cookie, f"hash:cookie:{cookie}"),
            ("--match-header", match_header, f"match:header:{match_header}"),
            ("--match-cookie", match_cookie, f"match:cookie:{match_cookie}"),
        )
        if v
    ]
    if len(given) > 1:
        raise ValueError(f"choose one cohort: {' and '.join(f for f, _ in given)} were both given")
    if not given:
        return ""
    return parse(given[0][1]).spec


# ----------------------------------------------------------------- the hash (HAProxy's xxh32)

_P1, _P2, _P3, _P4, _P5 = 2654435761, 2246822519, 3266489917, 668265263, 374761393
_M = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M


def xxh32(data: bytes, seed: int = 0) -> int:
    """XXH32 (the reference algorithm, github.com/Cyan4973/xxHash), as HAProxy's ``xxh32`` converter.

    Pure Python because the venv has no xxhash and the keys are short; the unit tests check the
    reference vectors and the local-stack test that HAProxy puts each key where :func:`bucket` says.
    """
    n, i = len(data), 0
    if n >= 16:
        v = [(seed + _P1 + _P2) & _M, (seed + _P2) & _M, seed & _M, (seed - _P1) & _M]
        while i <= n - 16:
            for j in range(4):
                lane = int.from_bytes(data[i : i + 4], "little")
                v[j] = _rotl((v[j] + lane * _P2) & _M, 13) * _P1 & _M
                i += 4
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M
    else:
        h = (seed + _P5) & _M
    h = (h + n) & _M
    while i + 4 <= n:
        h = _rotl((h + int.from_bytes(data[i : i + 4], "little") * _P3) & _M, 17) * _P4 & _M
        i += 4
    while i < n:
        h = _rotl((h + data[i] * _P5) & _M, 11) * _P1 & _M
        i += 1
    h ^= h >> 15
    h = h * _P2 & _M
    h ^= h >> 13
    h = h * _P3 & _M
    return h ^ (h >> 16)


def bucket(key: str) -> int:
    """The user key's bucket, 0..99: ``xxh32(utf-8 key) mod 100`` (HAProxy: ``xxh32,mod(100)``)."""
    return xxh32(key.encode()) % BUCKETS


def on_canary(key: str, share: int) -> bool:
    """Whether a hash cohort sends ``key`` to the canary at ``share`` percent (monotone in ``share``)."""
    return bucket(key) < share


def bucket_regex(lo: int, hi: int) -> str:
    """A regular expression matching the two-digit buckets ``lo <= b < hi`` ("07", "24"), for Gateway API.

    Only character classes and alternation (RE2, ECMAScript and PCRE read it alike).
    """
    if not 0 <= lo < hi <= BUCKETS:
        raise ValueError(f"bucket range [{lo}, {hi}) is empty or outside [0, {BUCKETS})")
    alts, full = [], []
    for tens in range(lo // 10, (hi - 1) // 10 + 1):
        a, b = max(lo, tens * 10) % 10, min(hi - 1, tens * 10 + 9) % 10
        if (a, b) == (0, 9):
            full.append(tens)
            continue
        alts.append(f"{tens}{a}" if a == b else f"{tens}[{a}-{b}]")
    if full:  # the whole decades are contiguous: one class for all of them
        alts.append(f"{full[0]}[0-9]" if len(full) == 1 else f"[{full[0]}-{full[-1]}][0-9]")
    return "^(" + "|".join(alts) + ")$"


# ----------------------------------------------------------------- CLI flags (shared by the routers)


def add_arguments(parser: Any) -> None:
    g = parser.add_argument_group(
        "cohort (sticky A/B instead of random weights; routers local_proxy and gateway_api)"
    )
    g.add_argument(
        "--cohort-header",
        metavar="NAME",
        help="hash this header's value (the user key): a key stays on one version, the step's weight is "
        "the share of keys on the canary (gateway_api: the header carries the key's bucket, see README)",
    )
    g.add_argument("--cohort-cookie", metavar="NAME", help="as --cohort-header, from this cookie")
    g.add_argument(
        "--match-header",
        metavar="NAME=VALUE",
        help="a tester cohort: requests with this header value go to the canary, the rest to stable",
    )
    g.add_argument("--match-cookie", metavar="NAME=VALUE", help="as --match-header, for a cookie")


def from_args(ns: Any) -> str:
    """The cohort spec the flags of :func:`add_arguments` give ("" when none is set)."""
    return from_flags(
        getattr(ns, "cohort_header", None),
        getattr(ns, "cohort_cookie", None),
        getattr(ns, "match_header", None),
        getattr(ns, "match_cookie", None),
    )


def note(cohort: Cohort | str | None, share: int) -> str:
    """`` (cohort: ...)`` for a log or status line about the canary's weight; "" without a cohort."""
    if not cohort:
        return ""
    c = parse(cohort) if isinstance(cohort, str) else cohort
    return f" ({c.describe(share)})"


# ----------------------------------------------------------------- Gateway API (HTTPRoute matches)
#
# Gateway API has no hash split, so the gateway cannot compute a bucket. The hash cohort there routes on
# a header that already carries the key's bucket, two digits as :func:`bucket` computes it ("07"),
# set by the caller or an edge in front of the gateway: a RegularExpression match picks the buckets
# below the share. A cookie cohort matches the ``Cookie`` header with a RegularExpression.


def _literal(text: str) -> str:
    """``text`` as a regex literal: of the characters names and values may hold only '.' means something
    outside a character class ('-' and '~' do not), and an escaped '.' reads alike in RE2 and ECMAScript."""
    return text.replace(".", r"\.")


def _cookie_regex(name: str, value_regex: str) -> str:
    return rf"^(.*;\s*)?{_literal(name)}=({value_regex})(;.*)?$"


def header_match(c: Cohort, lo: int = 0, hi: int = BUCKETS) -> dict[str, str]:
    """The HTTPRoute ``HTTPHeaderMatch`` for the cohort's requests (hash: buckets ``lo <= b < hi``)."""
    if c.mode == "match":
        if c.source == "header":
            return {"type": "Exact", "name": c.name, "value": c.value}
        return {
            "type": "RegularExpression",
            "name": "Cookie",
            "value": _cookie_regex(c.name, re.escape(c.value)),
        }
    rx = bucket_regex(lo, hi)
    if c.source == "header":
        return {"type": "RegularExpression", "name": c.name, "value": rx}
    return {"type": "RegularExpression", "name": "Cookie", "value": _cookie_regex(c.name, rx[2:-2])}


def _match_name(c: Cohort) -> str:
    return (c.name if c.source == "header" else "Cookie").lower()


def is_cohort_rule(rule: dict[str, Any], c: Cohort, stable: str, canary: str) -> bool:
    """Whether ``rule`` is one :func:`httproute_rules` made: one of our backends, the cohort's header in
    every match."""
    refs, matches = rule.get("backendRefs") or [], rule.get("matches") or []
    return (
        len(refs) == 1
        and refs[0].get("name") in (stable, canary)
        and bool(matches)
        and all(
            any(h.get("name", "").lower() == _match_name(c) for h in m.get("headers") or []) for m in matches
        )
    )


def httproute_rules(
    base: dict[str, Any], c: Cohort, share: int, stable: str, canary: str
) -> list[dict[str, Any]]:
    """The rules that route cohort ``c`` at ``share`` percent, in front of ``base`` (the weighted rule
    with both backends, returned last with its weights set). Pure; the rules are disjoint, so Gateway
    API's precedence between them does not matter:

    * hash: buckets below the share -> canary, the other buckets -> stable, no bucket header -> ``base``
      at the same share (the random split); at 0 and 100 only ``base`` (all on one side);
    * match: while 0 < share < 100 the matching requests -> canary and ``base`` all stable; at 0 no
      cohort rule and ``base`` all stable; at 100 (promotion) ``base`` all canary.
    """
    out: list[dict[str, Any]] = []

    def rule(backend: str, hm: dict[str, str]) -> dict[str, Any]:
        r = {k: v for k, v in base.items() if k not in ("matches", "backendRefs")}
        # each of base's matches (path, method, ...) with the cohort's header added; none: every path
        matches = base.get("matches") or [{"path": {"type": "PathPrefix", "value": "/"}}]
        r["matches"] = [{**m, "headers": [*(m.get("headers") or []), hm]} for m in matches]
        ref = next(x for x in base["backendRefs"] if x.get("name") == backend)
        r["backendRefs"] = [{**ref, "weight": 1}]
        return r

    if c.mode == "hash":
        if 0 < share < 100:  # at 0 and 100 the weighted rule alone sends every key to one side
            out.append(rule(canary, header_match(c, 0, share)))
            out.append(rule(stable, header_match(c, share, BUCKETS)))
        weights = {stable: 100 - share, canary: share}
    else:
        if 0 < share < 100:
            out.append(rule(canary, header_match(c)))
        weights = {stable: 0, canary: 100} if share >= 100 else {stable: 100, canary: 0}
    refs = [
        {**x, "weight": weights[x["name"]]} if x.get("name") in weights else x for x in base["backendRefs"]
    ]
    return [*out, {**base, "backendRefs": refs}]


def from_crd(cohort: dict[str, Any] | None) -> str:
    """The spec string from a ModelRollout's ``spec.strategy.cohort`` ("" for none); ValueError if bad
    (the CRD's schema refuses the same on the API server)."""
    if not cohort:
        return ""
    if not isinstance(cohort, dict) or ("header" in cohort) == ("cookie" in cohort):
        raise ValueError(f"spec.strategy.cohort must name exactly one of header or cookie, got {cohort!r}")
    source = "header" if "header" in cohort else "cookie"
    name = cohort[source]
    spec = f"match:{source}:{name}={cohort['exact']}" if "exact" in cohort else f"hash:{source}:{name}"
    return parse(spec).spec
