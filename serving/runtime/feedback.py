"""Feedback: ground-truth labels for earlier answers, counted per model version. Pure logic, no I/O.

The design (the README's "Feedback" contract):

* **Stateless answers.** Every answer carries a request id and a *feedback token*: an HMAC-SHA256
  over (id, model version, the predicted labels, the time of the answer) with a key every replica
  shares (``MLROLLOUT_FEEDBACK_KEY``, a Secret on a cluster). No replica keeps the answers, so feedback
  can reach *any* replica behind the Service, late (within ``ttl_s``), or after the answering
  replica has gone; the token says which version answered and what it predicted, and nobody can
  forge or alter it without the key. The counter is labelled with the *token's* version, so a version's
  accuracy is the sum over every replica's ``/metrics`` (which is what Prometheus queries).
* **Never counted twice by one replica.** Each replica remembers the (version, id) pairs it counted
  (:class:`Ledger`, bounded); a repeat is a ``duplicate``, reported and not counted. When the ledger
  is full it forgets the oldest answers and from then on refuses tokens that old as ``expired``, so
  a forgotten id can never be counted again. Across replicas the ledgers are not shared: the
  guarantee there is the caller's single delivery (the README says so).
* **Strict and atomic.** A malformed request (unknown fields, wrong types, too many items, a label
  that is not one of the model's classes, a label count that is not the answer's row count) is
  refused whole with a message naming the item and field; nothing of it is counted. A token that does
  not verify (another key, altered, not a token) is an ``unknown`` id, counted as such.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from serving.runtime.core import InputError

KEY_ENV = "MLROLLOUT_FEEDBACK_KEY"
MIN_KEY_BYTES = 16
MAX_ITEMS = 1000  # feedback items per request
MAX_ID_CHARS = 128
DEFAULT_TTL_S = 7 * 24 * 3600.0  # how late feedback may arrive
DEFAULT_LEDGER_SIZE = 200_000  # (version, id) pairs one replica remembers (~40 MB at the limit)
TOKEN_PREFIX = "v1"
ITEM_FIELDS = {"id", "token", "label", "labels"}

# outcomes (the first two are the accuracy gate's ``outcome`` label values, signals.CORRECT/INCORRECT)
DUPLICATE, UNKNOWN, EXPIRED = "duplicate", "unknown_id", "expired"


def resolve_key(env: dict[str, str]) -> tuple[bytes, bool]:
    """(the key, whether it was generated). A short key is refused: it would make tokens forgeable."""
    raw = env.get(KEY_ENV, "")
    if not raw:
        return secrets.token_hex(32).encode(), True
    if len(raw.encode()) < MIN_KEY_BYTES:
        raise ValueError(f"{KEY_ENV} must be at least {MIN_KEY_BYTES} bytes (got {len(raw.encode())})")
    return raw.encode(), False


def check_request_id(value: str, where: str) -> str:
    if not 0 < len(value) <= MAX_ID_CHARS or not all("!" <= c <= "~" for c in value):
        raise InputError(
            f"{where} must be 1-{MAX_ID_CHARS} visible ASCII characters (no spaces), got {value[:40]!r}"
        )
    return value


def request_id(header: bytes | None, body_id: str | None = None) -> str:
    """The answer's id: the caller's ``x-request-id``, else the V2 body's ``id``, else a fresh one."""
    hid = None
    if header is not None:
        hid = check_request_id(header.decode("latin-1"), "header x-request-id")
    if body_id is not None:
        check_request_id(body_id, "V2 'id'")
        if hid is not None and hid != body_id:
            raise InputError(
                f"header x-request-id {hid[:40]!r} and the V2 body's 'id' {body_id[:40]!r} differ: "
                "send one, or the same in both"
            )
        return body_id
    return (
        hid if hid is not None else os.urandom(16).hex()
    )  # uuid4().hex's 128 bits, at a quarter of its cost


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


@dataclass(frozen=True)
class Answer:
    """What a verified token says about one earlier answer."""

    id: str
    version: str
    issued_ms: int
    labels: tuple[int, ...]  # indices into the model's classes, one per row


class Signer:
    def __init__(self, key: bytes, classes: Sequence[Any]):
        self._base = hmac.new(key, digestmod=hashlib.sha256)  # keyed once; copied per token
        self.classes = tuple(classes)
        self._index = {_class_key(c): i for i, c in enumerate(self.classes)}

    def _mac(self, payload: bytes) -> bytes:
        h = self._base.copy()
        h.update(payload)
        return h.digest()[:16]

    def issue(self, rid: str, version: str, predicted: Sequence[Any], now_ms: int) -> str:
        """The token for one answer (``predicted``: its labels, one per row)."""
        idx = [self._index.get(_class_key(p), -1) for p in predicted]
        payload = orjson.dumps([rid, version, now_ms, idx])
        return f"{TOKEN_PREFIX}.{_b64(payload)}.{_b64(self._mac(payload))}"

    def verify(self, token: str) -> Answer | None:
        """The answer a token describes, or None when it is not a token signed with this key."""
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            return None
        try:
            payload, mac = _unb64(parts[1]), _unb64(parts[2])
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        rid, version, issued_ms, idx = orjson.loads(payload)  # we signed it: the shape is ours
        return Answer(rid, version, issued_ms, tuple(idx))

    def class_index(self, label: Any) -> int | None:
        return self._index.get(_class_key(label))


def _class_key(label: Any) -> tuple[str, Any]:
    # 1 and 1.0 are one class, True is not a class label, "1" is not 1
    if isinstance(label, bool):
        return ("bool", label)
    if isinstance(label, float) and label.is_integer():
        return ("num", int(label))
    if isinstance(label, (int, float)):
        return ("num", label)
    return (type(label).__name__, label)


@dataclass
class Ledger:
    """The (version, id) pairs this replica counted, bounded; ``floor_ms``: answers at or before it
    are refused, because the ledger may have forgotten whether they were counted."""

    max_entries: int = DEFAULT_LEDGER_SIZE
    ttl_ms: int = int(DEFAULT_TTL_S * 1000)
    floor_ms: int = -1
    _seen: set = field(default_factory=set)
    _heap: list = field(default_factory=list)  # (issued_ms, version, id): the oldest is forgotten first

    def __len__(self) -> int:
        return len(self._seen)

    def status(self, a: Answer, now_ms: int) -> str | None:
        """None when ``a`` may be counted now; else why not (EXPIRED or DUPLICATE)."""
        if a.issued_ms <= self.floor_ms or a.issued_ms < now_ms - self.ttl_ms:
            return EXPIRED
        return DUPLICATE if (a.version, a.id) in self._seen else None

    def add(self, a: Answer, now_ms: int) -> None:
        key = (a.version, a.id)
        self._seen.add(key)
        heapq.heappush(self._heap, (a.issued_ms, *key))
        horizon = now_ms - self.ttl_ms
        while self._heap and self._heap[0][0] < horizon:  # past the TTL: refused anyway
            _, v, i = heapq.heappop(self._heap)
            self._seen.discard((v, i))
        while len(self._seen) > self.max_entries:
            issued, v, i = heapq.heappop(self._heap)
            self._seen.discard((v, i))
            self.floor_ms = max(self.floor_ms, issued)


@dataclass(frozen=True)
class Item:
    id: str
    answer: Answer | None  # None: the token did not verify
    labels: tuple[int, ...]  # class indices, one per row of the answer


@dataclass
class Tally:
    """One feedback request's result: what the runtime counted and the ids it did not count."""

    correct: dict[str, int] = field(default_factory=dict)  # version -> rows
    incorrect: dict[str, int] = field(default_factory=dict)
    # DUPLICATE/UNKNOWN/EXPIRED -> [(id, version)]; version "" for UNKNOWN (no token to say which)
    not_counted: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def body(self) -> dict:
        return {
            "correct": sum(self.correct.values()),
            "incorrect": sum(self.incorrect.values()),
            "duplicate": [i for i, _ in self.not_counted.get(DUPLICATE, [])],
            "unknown": [i for i, _ in self.not_counted.get(UNKNOWN, [])],
            "expired": [i for i, _ in self.not_counted.get(EXPIRED, [])],
        }


def parse(doc: Any, signer: Signer) -> list[Item]:
    """``{"feedback": [{"id", "token", "label" | "labels"}, ...]}`` -> items, or InputError naming the
    problem. ``label`` is one class (a one-row answer); ``labels`` one class per row."""
    if not isinstance(doc, dict):
        raise InputError('feedback body must be a JSON object: {"feedback": [{"id", "token", "label"}]}')
    extra = sorted(set(doc) - {"feedback"})
    if extra:
        raise InputError(f"unknown field(s) {extra} in the feedback body: only 'feedback' is accepted")
    items = doc.get("feedback")
    if not isinstance(items, list) or not items:
        raise InputError('\'feedback\' must be a non-empty list of {"id", "token", "label"} objects')
    if len(items) > MAX_ITEMS:
        raise InputError(f"{len(items)} feedback items are over the maximum of {MAX_ITEMS} per request")
    return [_item(i, it, signer) for i, it in enumerate(items)]


def _item(i: int, it: Any, signer: Signer) -> Item:
    where = f"feedback[{i}]"
    if not isinstance(it, dict):
        raise InputError(f"{where} must be an object with 'id', 'token' and 'label' (or 'labels')")
    extra = sorted(set(it) - ITEM_FIELDS)
    if extra:
        raise InputError(f"{where} has unknown field(s) {extra}: allowed are {sorted(ITEM_FIELDS)}")
    for k in ("id", "token"):
        if not isinstance(it.get(k), str):
            raise InputError(f"{where}.{k} must be a string (the answer's x-request-id / x-feedback-token)")
    rid = check_request_id(it["id"], f"{where}.id")
    if ("label" in it) == ("labels" in it):
        raise InputError(f"{where} needs exactly one of 'label' (one row) or 'labels' (one per row)")
    if "labels" in it:
        raw = it["labels"]
        if not isinstance(raw, list) or not raw:
            raise InputError(f"{where}.labels must be a non-empty list, one class per row of the answer")
    else:
        raw = [it["label"]]
    labels = []
    for j, v in enumerate(raw):
        idx = signer.class_index(v) if isinstance(v, (int, float, str)) else None
        if idx is None:
            name = f"{where}.label" if "label" in it else f"{where}.labels[{j}]"
            raise InputError(f"{name} is {v!r}: not one of the model's classes {list(signer.classes)}"[:1000])
        labels.append(idx)
    answer = signer.verify(it["token"])
    if answer is not None:
        if answer.id != rid:
            answer = None  # a token of another answer: this id is not one we answered with it
        elif len(answer.labels) != len(labels):
            raise InputError(
                f"{where} has {len(labels)} label(s) but answer {rid!r} had {len(answer.labels)} row(s)"
            )
    return Item(rid, answer, tuple(labels))


def count(items: list[Item], ledger: Ledger, now_ms: int) -> Tally:
    """Count the (already validated) items: correct/incorrect rows per answering version, once each."""
    t = Tally()
    for it in items:
        a = it.answer
        why = UNKNOWN if a is None else ledger.status(a, now_ms)
        if why is not None:
            t.not_counted.setdefault(why, []).append((it.id, "" if a is None else a.version))
            continue
        ledger.add(a, now_ms)
        right = sum(p == y for p, y in zip(a.labels, it.labels, strict=True))
        t.correct[a.version] = t.correct.get(a.version, 0) + right
        t.incorrect[a.version] = t.incorrect.get(a.version, 0) + len(it.labels) - right
    return t
