"""Feedback logic without a server: tokens, strict parsing, counting once (serving.runtime.feedback)."""

from __future__ import annotations

import pytest

from serving.runtime import feedback as fb
from serving.runtime.core import InputError

KEY = b"k" * 32
NOW = 1_700_000_000_000
SIGNER = fb.Signer(KEY, (0, 1))


def _item(rid="a", predicted=(1,), version="1.0.0", at=NOW, **extra) -> dict:
    return {"id": rid, "token": SIGNER.issue(rid, version, list(predicted), at), **extra}


def _count(items: list[dict], ledger=None, now=NOW) -> fb.Tally:
    return fb.count(fb.parse({"feedback": items}, SIGNER), fb.Ledger() if ledger is None else ledger, now)


def test_a_token_verifies_only_unaltered_and_with_the_same_key():
    tok = SIGNER.issue("r1", "2.0.0", [1, 0], NOW)
    assert SIGNER.verify(tok) == fb.Answer("r1", "2.0.0", NOW, (1, 0))
    head, _payload, mac = tok.split(".")
    forged = fb._b64(b'["r1","2.0.0",%d,[0,0]]' % NOW)
    assert SIGNER.verify(f"{head}.{forged}.{mac}") is None, "altered predictions must not verify"
    assert fb.Signer(b"x" * 32, (0, 1)).verify(tok) is None, "another key must not verify"
    for junk in ("", "v1", "v1.!!.??", "v2." + tok[3:], tok + "x"):
        assert SIGNER.verify(junk) is None


def test_counts_rows_per_answering_version_once_and_reports_the_rest():
    ledger = fb.Ledger()
    t = _count(
        [
            {**_item("a", (1, 0), "1.0.0"), "labels": [1, 1]},  # one right, one wrong
            {**_item("b", (0,), "2.0.0"), "label": 0},
            {**_item("a", (1, 0), "1.0.0"), "labels": [1, 0]},  # the same id again in one request
            {"id": "c", "token": "v1.bogus.bogus", "label": 1},
            {**_item("b", (0,), "2.0.0"), "id": "d", "label": 0},  # b's token under another id
        ],
        ledger,
    )
    assert (t.correct, t.incorrect) == ({"1.0.0": 1, "2.0.0": 1}, {"1.0.0": 1, "2.0.0": 0})
    assert t.body() == {
        "correct": 2,
        "incorrect": 1,
        "duplicate": ["a"],
        "unknown": ["c", "d"],
        "expired": [],
    }
    again = _count([{**_item("b", (0,), "2.0.0"), "label": 1}], ledger)
    assert again.body()["duplicate"] == ["b"] and not again.correct and not again.incorrect
    same_id_other_version = _count([{**_item("b", (1,), "1.0.0"), "label": 1}], ledger)
    assert same_id_other_version.correct == {"1.0.0": 1}, "an id is one answer per version"


def test_late_feedback_within_the_ttl_counts_and_past_it_expires():
    ledger = fb.Ledger(ttl_ms=60_000)
    assert _count([{**_item("late", at=NOW - 59_000), "label": 1}], ledger).correct == {"1.0.0": 1}
    t = _count([{**_item("old", at=NOW - 61_000), "label": 1}], ledger)
    assert t.body()["expired"] == ["old"] and not t.correct


def test_a_full_ledger_forgets_the_oldest_and_then_refuses_them_so_none_counts_twice():
    ledger = fb.Ledger(max_entries=2)
    for i, rid in enumerate(("new", "old", "mid")):
        at = {"new": NOW - 10, "old": NOW - 30, "mid": NOW - 20}[rid]
        _count([{**_item(rid, at=at), "label": 1}], ledger, now=NOW + i)
    assert len(ledger) == 2 and ledger.floor_ms == NOW - 30, "the oldest answer is forgotten first"
    t = _count([{**_item("old", at=NOW - 30), "label": 1}], ledger)
    assert t.body()["expired"] == ["old"], "a forgotten id must not be counted a second time"
    assert _count([{**_item("mid", at=NOW - 20), "label": 1}], ledger).body()["duplicate"] == ["mid"]


@pytest.mark.parametrize(
    "doc, message",
    [
        ([], "must be a JSON object"),
        ({"feedback": [], "x": 1}, "unknown field(s) ['x']"),
        ({"feedback": []}, "non-empty list"),
        ({"feedback": [_item(label=1)] * (fb.MAX_ITEMS + 1)}, f"over the maximum of {fb.MAX_ITEMS}"),
        ({"feedback": ["a"]}, "feedback[0] must be an object"),
        ({"feedback": [_item(label=1, extra=1)]}, "feedback[0] has unknown field(s) ['extra']"),
        ({"feedback": [{"id": 7, "token": "t", "label": 1}]}, "feedback[0].id must be a string"),
        ({"feedback": [{"id": "a", "label": 1}]}, "feedback[0].token must be a string"),
        ({"feedback": [{"id": "a b", "token": "t", "label": 1}]}, "feedback[0].id must be 1-128 visible"),
        ({"feedback": [_item()]}, "exactly one of 'label'"),
        ({"feedback": [_item(label=1, labels=[1])]}, "exactly one of 'label'"),
        ({"feedback": [_item(label=1), _item(label=2)]}, "feedback[1].label is 2: not one of"),
        ({"feedback": [_item(label=True)]}, "feedback[0].label is True: not one of"),
        ({"feedback": [_item(label="1")]}, "feedback[0].label is '1': not one of"),
        ({"feedback": [_item(labels=[0, None])]}, "feedback[0].labels[1] is None"),
        ({"feedback": [_item(labels=[])]}, "labels must be a non-empty list"),
        ({"feedback": [_item(labels=[1, 1])]}, "feedback[0] has 2 label(s) but answer 'a' had 1 row(s)"),
    ],
)
def test_malformed_feedback_is_refused_whole_naming_the_problem(doc, message):
    ledger = fb.Ledger()
    with pytest.raises(InputError) as e:
        fb.count(fb.parse(doc, SIGNER), ledger, NOW)
    assert message in e.value.message and e.value.status == 400
    assert len(ledger) == 0, "nothing of a refused request is counted"


def test_float_labels_that_are_integers_match_integer_classes():
    assert _count([{**_item(), "label": 1.0}]).correct == {"1.0.0": 1}


@pytest.mark.parametrize(
    "header, body_id, want",
    [(b"abc", None, "abc"), (None, "xyz", "xyz"), (b"same", "same", "same")],
)
def test_request_id_comes_from_the_header_or_the_body(header, body_id, want):
    assert fb.request_id(header, body_id) == want


def test_request_id_is_made_when_none_is_sent_and_bad_ones_are_refused():
    a, b = fb.request_id(None), fb.request_id(None)
    assert a != b and len(a) == 32
    for header, body_id, message in [
        (b"x" * 129, None, "header x-request-id must be 1-128"),
        (b"has space", None, "header x-request-id must be"),
        (None, "", "V2 'id' must be"),
        (b"one", "two", "differ"),
    ]:
        with pytest.raises(InputError, match=message):
            fb.request_id(header, body_id)


def test_a_short_key_is_refused_and_none_is_generated():
    with pytest.raises(ValueError, match="at least 16 bytes"):
        fb.resolve_key({fb.KEY_ENV: "short"})
    assert fb.resolve_key({fb.KEY_ENV: "k" * 16}) == (b"k" * 16, False)
    key, generated = fb.resolve_key({})
    assert generated and len(key) == 64


def test_server_start_up_refuses_a_short_key_in_one_line_and_shares_a_made_one(monkeypatch, capsys):
    from serving.runtime import server

    monkeypatch.setenv(fb.KEY_ENV, "short")
    assert not server.feedback_key_ready()
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {fb.KEY_ENV} must be at least 16 bytes (got 5)"
    ]
    monkeypatch.delenv(fb.KEY_ENV)
    assert server.feedback_key_ready()
    made = server.os.environ[fb.KEY_ENV]  # inherited by every --workers process spawned after this
    assert len(made) == 64 and fb.resolve_key(server.os.environ) == (made.encode(), False)
