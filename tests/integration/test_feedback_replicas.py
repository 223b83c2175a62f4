"""Feedback with two runtime replicas behind the local stack's HAProxy (real processes, real HTTP).

Both replicas serve the same version with the stack's shared feedback key, HAProxy balances 50/50
round robin, so answers and their feedback land on different replicas. The accuracy gate's reading
(``parse_exposition`` of each replica's ``/metrics``, summed) must equal the labels sent; repeats to
the replica that counted them are duplicates; bad tokens are unknown ids; malformed feedback is a
400 naming the problem; feedback for a replica that has since stopped is counted by the other one.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.contract import signals
from serving.demo.localstack import LocalStack, TrafficGenerator
from serving.rollout.metrics import Target
from serving.rollout.metrics.scrape import parse_exposition
from tests.modelfactory import breast_cancer

pytestmark = pytest.mark.integration


def _not_counted(text: str, reason: str) -> float:
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == signals.FEEDBACK_NOT_COUNTED_TOTAL and s.labels[signals.REASON] == reason
    )


@pytest.fixture(scope="module")
def stack(model_package, tmp_path_factory):
    work = tmp_path_factory.mktemp("feedback-stack")
    with LocalStack(model_package, model_package, work, prometheus=False, log=lambda *_: None) as s:
        s.router().set_weights(50, 50)
        yield s


def _gate_reading(stack, srv) -> tuple[float, float, str]:
    """(correct, total) as the accuracy gate reads them from one replica's /metrics, and the text."""
    text = srv.metrics_text()
    snap = parse_exposition(text, Target(stack.model, srv.version, f"{srv.url}/metrics"))
    return snap.labelled_correct, snap.labelled_total, text


def test_the_traffic_generator_sends_its_labels_to_the_endpoint(stack):
    X, y, _, _ = breast_cancer()
    with TrafficGenerator(
        stack.proxy_url, stack.model, X, y, rps=200, concurrency=4, batch=4, max_requests=60
    ) as tg:
        while tg.running:
            time.sleep(0.05)
    res = tg.result()
    rows = 4 * sum(a.status == 200 for a in res.answers)
    assert rows == 240 and res.feedback["failed"] == 0, res.failures()[:3]
    assert res.feedback["correct"] + res.feedback["incorrect"] == rows
    assert res.feedback["unknown"] == res.feedback["duplicate"] == 0
    readings = [_gate_reading(stack, srv) for srv in (stack.stable, stack.canary)]
    assert sum(r[0] for r in readings) == res.feedback["correct"] > 0
    assert sum(r[1] for r in readings) == rows
    assert all(r[1] > 0 for r in readings), "feedback through the proxy reached both replicas"


def test_feedback_across_two_replicas_behind_haproxy(stack):
    X, y, _, _ = breast_cancer()
    rng = np.random.default_rng(3)
    base = [_gate_reading(stack, srv) for srv in (stack.stable, stack.canary)]
    infer = f"{stack.proxy_url}/v2/models/{stack.model}/infer"
    fb_url = f"{stack.proxy_url}/v2/models/{stack.model}/feedback"
    answers = []  # (id, token, predicted, served_by)
    with httpx.Client(timeout=10) as c:
        for i in range(30):
            idx = rng.integers(0, len(X), 1 + i % 3)
            body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [len(idx), X.shape[1]]}]}
            body["inputs"][0]["data"] = X[idx].ravel().tolist()
            headers = {"x-request-id": f"hdr-{i}"} if i % 3 == 0 else {}
            if i % 3 == 1:
                body["id"] = f"body-{i}"
            r = c.post(infer, json=body, headers=headers)
            assert r.status_code == 200, r.text
            rid = r.headers["x-request-id"]
            assert r.json()["id"] == rid, "the V2 JSON id is the request id"
            if i % 3 == 0:
                assert rid == f"hdr-{i}"
            elif i % 3 == 1:
                assert rid == f"body-{i}"
            pred = r.json()["outputs"][0]["data"]
            answers.append((rid, r.headers["x-feedback-token"], pred, idx, r.headers["x-served-by"]))
        ids = {a[0] for a in answers}
        assert len(ids) == 30, "a made-up id is unique"
        assert {a[4] for a in answers} == {"stable", "canary"}, "both replicas answered"
        v1 = c.post(
            f"{stack.proxy_url}/v1/models/{stack.model}:predict",
            json={"instances": X[:1].tolist()},
            headers={"x-request-id": "v1-req"},
        )
        assert v1.headers["x-request-id"] == "v1-req" and v1.headers["x-feedback-token"]
        # refusals carry the id too (no token: nothing was predicted); a bad id is a 400 naming it
        bad = c.post(infer, json={"inputs": []}, headers={"x-request-id": "bad-1"})
        assert bad.status_code == 400 and bad.headers["x-request-id"] == "bad-1"
        assert "x-feedback-token" not in bad.headers
        one = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 30], "data": X[0].tolist()}]}
        bad = c.post(infer, json=one, headers={"x-request-id": "x" * 129})
        assert bad.status_code == 400 and "header x-request-id must be 1-128" in bad.json()["error"]
        bad = c.post(infer, json={**one, "id": "b"}, headers={"x-request-id": "a"})
        assert bad.status_code == 400 and "differ" in bad.json()["error"]

        # the truth for most rows, a flipped label for every fifth answer: incorrect is not zero
        items, correct, total = [], 0, 0
        for k, (rid, token, pred, idx, _) in enumerate(answers):
            truth = [int(v) if k % 5 else 1 - int(v) for v in y[idx]]
            items.append({"id": rid, "token": token, "labels": truth})
            correct += sum(p == t for p, t in zip(pred, truth, strict=True))
            total += len(truth)
        late = [it for it, a in zip(items, answers, strict=True) if a[4] == "canary"][-3:]
        now = [it for it in items if it not in late]
        counted_by = {}
        for chunk in (now[i::4] for i in range(4)):
            r = c.post(fb_url, json={"feedback": chunk})
            assert r.status_code == 200, r.text
            assert r.json()["duplicate"] == [] and r.json()["unknown"] == []
            counted_by.update({it["id"]: r.headers["x-served-by"] for it in chunk})
        assert set(counted_by.values()) == {"stable", "canary"}, "both replicas took feedback"

        # repeats to the replica that counted them, and a repeat inside one request: not counted
        for side in ("stable", "canary"):
            mine = [it for it in now if counted_by[it["id"]] == side]
            srv = stack.stable if side == "stable" else stack.canary
            r = c.post(f"{srv.url}/v2/models/{stack.model}/feedback", json={"feedback": mine + mine[:1]})
            assert r.status_code == 200 and r.json()["duplicate"] == [it["id"] for it in mine + mine[:1]]
            assert r.json()["correct"] == r.json()["incorrect"] == 0

        # unknown ids: a token that is not one, another answer's token under this id
        unknown = [
            {"id": "nope", "token": "v1.AAAA.AAAA", "label": 0},
            {"id": "hdr-0x", "token": answers[0][1], "labels": items[0]["labels"]},
        ]
        for it in unknown:
            r = c.post(fb_url, json={"feedback": [it]})
            assert r.status_code == 200 and r.json()["unknown"] == [it["id"]], r.text

        # malformed: refused whole with a 400 naming the problem, nothing counted
        for doc, message in [
            ({"feedback": [{**items[0], "extra": 1}]}, "feedback[0] has unknown field(s) ['extra']"),
            ({"feedback": [{**items[1], "labels": [7] * len(items[1]["labels"])}]}, "not one of"),
            ({"feedback": [items[2], {"id": 5, "token": "t", "label": 0}]}, "feedback[1].id must be"),
            ({"feedback": items[:1] * 1001}, "over the maximum of 1000"),
            ({"labels": []}, "unknown field(s) ['labels']"),
        ]:
            r = c.post(fb_url, json=doc)
            assert r.status_code == 400 and message in r.json()["error"], (message, r.text)
        assert c.post(fb_url, content=b"{").status_code == 400
        assert c.get(fb_url).status_code == 405

        # late: the canary that answered these is gone; the stable replica counts their feedback
        canary_correct, canary_total, canary_text = _gate_reading(stack, stack.canary)
        stack.router().set_weights(100, 0)
        stack.canary.stop()
        r = c.post(fb_url, json={"feedback": late})
        assert r.status_code == 200 and r.headers["x-served-by"] == "stable", r.text
        assert r.json()["correct"] + r.json()["incorrect"] == sum(len(it["labels"]) for it in late)
        stable_correct, stable_total, stable_text = _gate_reading(stack, stack.stable)

    base_correct, base_total = base[0][0] + base[1][0], base[0][1] + base[1][1]
    got = (stable_correct + canary_correct - base_correct, stable_total + canary_total - base_total)
    assert got == (correct, total)
    assert 0 < correct < total
    texts = (stable_text, canary_text)

    def added(reason: str) -> float:
        return sum(
            _not_counted(t, reason) - _not_counted(b[2], reason) for t, b in zip(texts, base, strict=True)
        )

    assert added("duplicate") == len(now) + 2, "every repeat reported and counted as a duplicate"
    assert added("unknown_id") == 2
