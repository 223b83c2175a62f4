"""Webhooks and notifications: the state machine's two answers to a "no" (machine.refuse, analyse with
``awaiting``), the controller asking them at the right moments, hooks.py and notify.py (pure), and
hookhttp.py against a real HTTP server on 127.0.0.1 (retries and timeouts bounded)."""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import threading
import time

import pytest

from serving.rollout import hooks, machine, notify
from serving.rollout import operator as op
from serving.rollout.crstore import conditions
from serving.rollout.gates import GateResult, Verdict
from serving.rollout.hookhttp import HookClient, Sender
from serving.rollout.machine import Action, Phase, RolloutSpec
from tests.unit.test_rollout_controller import World, make

SPEC = RolloutSpec((10, 50, 100), 10.0, 2, 3)
PASS = [GateResult("success_rate", Verdict.PASS, 1.0, 0.99, ">=", 50)]
FAIL = [GateResult("success_rate", Verdict.FAIL, 0.5, 0.99, ">=", 50)]


def at_last_step() -> machine.RolloutState:
    st, _ = machine.start(SPEC, 0.0)
    st, _ = machine.analyse(st, SPEC, PASS, 10.0)
    st, _ = machine.analyse(st, SPEC, PASS, 20.0)
    assert st.step_index == 2 and st.weight == 100
    return st


# --------------------------------------------------------------------------- the state machine


def test_a_pre_rollout_no_ends_the_rollout_before_any_traffic_moves():
    st, d = machine.refuse(SPEC, 5.0, "pre-rollout webhook smoke said no: HTTP 412")
    assert (st.phase, st.weight, st.step_index, d.action, d.weight) == (
        Phase.ROLLED_BACK,
        0,
        0,
        Action.ROLLBACK,
        0,
    )
    assert st.history[-1]["event"] == "pre-rollout" and "HTTP 412" in st.reason
    with pytest.raises(machine.InvalidTransition, match="already RolledBack"):
        machine.resume(st, SPEC, 6.0)


def test_an_unconfirmed_promotion_holds_at_the_last_step_and_is_still_analysed():
    st = at_last_step()
    held, d = machine.analyse(st, SPEC, PASS, 30.0, awaiting="confirm-promotion webhook ok said no: HTTP 403")
    assert d.action is Action.HOLD and held.phase is Phase.PROGRESSING and held.weight == 100
    assert machine.AWAITING in d.reason and "HTTP 403" in d.reason
    assert (held.failed_checks, held.inconclusive_checks) == (0, 0), "waiting counts toward nothing"
    assert machine.awaiting_promotion(held, SPEC) and not machine.awaiting_promotion(st, SPEC)
    for i in range(10):  # any number of waits never pauses or promotes
        held, d = machine.analyse(held, SPEC, PASS, 40.0 + i, awaiting="no")
        assert d.action is Action.HOLD
    failed, d = machine.analyse(held, SPEC, FAIL, 60.0, awaiting="no")
    assert (
        d.action is Action.HOLD and failed.failed_checks == 1 and not machine.awaiting_promotion(failed, SPEC)
    )
    failed, d = machine.analyse(failed, SPEC, FAIL, 70.0, awaiting="no")
    assert failed.phase is Phase.ROLLED_BACK, "a failing canary still rolls back while it waits"
    done, d = machine.analyse(held, SPEC, PASS, 80.0)
    assert done.phase is Phase.PROMOTED
    # before the last step the approval is not asked for: the pass advances
    st, _ = machine.start(SPEC, 0.0)
    nxt, d = machine.analyse(st, SPEC, PASS, 10.0, awaiting="no")
    assert d.action is Action.SET_WEIGHT and nxt.weight == 50


# --------------------------------------------------------------------------- the controller asks


def test_the_controller_asks_pre_rollout_before_the_first_weight_and_a_no_rolls_back(tmp_path):
    w = World()
    _store, c, _ = make(tmp_path, w)
    asked = []
    c.pre_start = lambda: asked.append(w.weights) or "pre-rollout webhook smoke said no: HTTP 500"
    rec = c.run(max_seconds=30)
    assert asked == [(100, 0)], "asked once, before any traffic moved"
    assert rec.state["phase"] == "RolledBack" and rec.pending is None
    assert w.calls == [("rollback",)], "no weight ever set"
    assert "HTTP 500" in rec.state["reason"]
    evs = [op.event_for(h, rec) for h in rec.state["history"]]
    assert [e[1] for e in evs if e] == ["RolledBack"]


def test_the_controller_waits_for_the_confirmation_at_the_last_step_only(tmp_path):
    w = World()
    store, c, _ = make(tmp_path, w)
    answers = iter(["no", "still no", None])
    asked_at = []

    def confirm():
        asked_at.append(store.load().state["weight"])
        return next(answers)

    c.confirm = confirm
    rec = c.run(max_seconds=30)
    assert rec.state["phase"] == "Promoted"
    assert asked_at == [100, 100, 100], "asked after each passing analysis at the last step, and only there"
    holds = [h for h in rec.state["history"] if h["action"] == "hold"]
    assert len(holds) == 2 and all(machine.AWAITING in h["reason"] for h in holds)
    assert w.calls[-2:] == [("set", 0, 100), ("promote",)]


def test_the_progressing_condition_says_it_awaits_the_promotion(tmp_path):
    w = World()
    store, c, _ = make(tmp_path, w)
    c.confirm = lambda: "confirm-promotion webhook ok said no: HTTP 403"
    c.run(stop=lambda: machine.AWAITING in (store.load().state or {}).get("reason", ""), max_seconds=30)
    rec = store.load()
    cond = {x["type"]: x for x in conditions(rec, [], 1, 0.0)}["Progressing"]
    assert (
        cond["status"] == "True" and cond["reason"] == "AwaitingPromotion" and "HTTP 403" in cond["message"]
    )


# --------------------------------------------------------------------------- hooks.py, notify.py


def test_webhooks_from_the_spec_with_bounded_timeouts():
    spec = {"webhooks": [
        {"name": "a", "type": "pre-rollout", "url": "http://x/a"},
        {"name": "b", "type": "confirm-promotion", "url": "https://x/b", "timeout": "1h"},
    ]}  # fmt: skip
    a, b = hooks.webhooks_of(spec)
    assert (a.timeout_s, b.timeout_s) == (hooks.DEFAULT_TIMEOUT_S, hooks.MAX_TIMEOUT_S)
    assert hooks.of_type([a, b], "confirm-promotion") == [b]
    for bad, msg in (
        ({"name": "c", "type": "later", "url": "http://x"}, r"webhooks\[0\]\.type"),
        ({"name": "c", "type": "rollback", "url": "file:///etc/passwd"}, r"webhooks\[0\]\.url"),
        ({"name": "c", "type": "rollback", "url": "http://x", "timeout": "soon"}, r"webhooks\[0\]\.timeout"),
    ):
        with pytest.raises(ValueError, match=msg):
            hooks.webhooks_of({"webhooks": [bad]})


def test_answers_retries_and_the_gate_verdict():
    h = hooks.Webhook("ok", "confirm-promotion", "http://x")
    assert hooks.answer(h, hooks.Outcome(204)) is None
    assert hooks.answer(h, hooks.Outcome(403, "wait\nfor QA")) == (
        "confirm-promotion webhook ok said no: HTTP 403: wait for QA"
    )
    assert "did not answer (ConnectError" in hooks.answer(h, hooks.Outcome(error="ConnectError: refused"))
    assert [hooks.retryable(hooks.Outcome(s)) for s in (200, 403, 429, 503)] == [False, False, True, True]
    assert hooks.retryable(hooks.Outcome(error="ReadTimeout"))
    assert [hooks.backoff_s(i) for i in (1, 2, 3, 10)] == [0.5, 1.0, 2.0, 5.0]
    assert hooks.first_no([None, "b", "c"]) == "b" and hooks.first_no([None]) is None
    assert hooks.after_end("Promoted") == ("post-rollout",)
    assert hooks.after_end("Aborted") == ("rollback", "post-rollout")


def _records(tmp_path, **world_kw):
    """Every record a store held during one driven rollout, in order (the operator sees each write)."""
    w = World(**world_kw)
    store, c, _ = make(tmp_path, w, threshold=1)
    seen = [store.load()]
    real = store.update_with

    def spy(fn, **kw):
        out = real(fn, **kw)
        seen.append(store.load())
        return out

    store.update_with = spy
    c.run(max_seconds=30)
    return seen


def test_the_end_is_announced_once_when_applied_and_notifications_follow_the_decisions(tmp_path):
    recs = _records(tmp_path)
    ends = [i for i, (a, b) in enumerate(itertools.pairwise(recs)) if hooks.finished(a, b)]
    assert len(ends) == 1 and recs[ends[0] + 1].phase == "Promoted" and recs[ends[0] + 1].pending is None
    events = [e for a, b in itertools.pairwise(recs) for e in notify.events(a, b, op.new_decisions(a, b))]
    assert events == ["Started", "Promoted"], "advancing steps are Events, not notifications"
    rolled = _records(tmp_path / "bad", error_rate=0.5)
    events = [e for a, b in itertools.pairwise(rolled) for e in notify.events(a, b, op.new_decisions(a, b))]
    assert events == ["Started", "RolledBack"]


def test_payloads_carry_the_decision_and_its_evidence(tmp_path):
    rec = _records(tmp_path)[-1]
    body = hooks.payload("models", "churn", rec, "post-rollout", 0.0)
    assert body["kind"] == "ModelRolloutWebhook" and body["type"] == "post-rollout"
    assert (body["phase"], body["step"], body["steps"], body["canaryWeight"]) == (
        "Promoted",
        4,
        [10, 25, 50, 100],
        100,
    )
    assert (body["stableVersion"], body["canaryVersion"], body["model"]) == ("1.0.0", "2.0.0", "m")
    assert {g["gate"] for g in body["evidence"]} == {"success_rate", "latency_p99", "drift_js"}
    assert all({"value", "threshold", "op", "n", "verdict"} <= set(g) for g in body["evidence"])
    note = notify.generic("models", "churn", rec, "Promoted", 0.0)
    assert note["kind"] == "ModelRolloutNotification" and note["event"] == "Promoted" and "type" not in note
    assert (
        note["severity"] == "info" and notify.generic("m", "c", rec, "RolledBack", 0)["severity"] == "warning"
    )
    msg = notify.slack(note)
    assert "models/churn: Promoted" in msg["text"] and "success_rate" in msg["text"]
    assert msg["blocks"][0]["type"] == "section" and msg["blocks"][-1]["type"] == "context"
    fields = [f for b in msg["blocks"] for f in b.get("fields", [])]
    assert len(fields) == 3 and all("(n=" in f["text"] and "*pass*" in f["text"] for f in fields)
    json.dumps(msg)  # a JSON body


# --------------------------------------------------------------------------- hookhttp.py, over HTTP


class Server:
    """127.0.0.1: answers ``codes`` in turn (the last one repeats), sleeps ``delay_s`` first."""

    def __init__(self, codes=(200,), delay_s=0.0):
        self.codes, self.delay_s, self.bodies = list(codes), delay_s, []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                outer.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                time.sleep(outer.delay_s)
                code = outer.codes.pop(0) if len(outer.codes) > 1 else outer.codes[0]
                with contextlib.suppress(OSError):  # a client that timed out has gone
                    self.send_response(code)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"no")

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(request):
    made = []

    def start(**kw):
        made.append(Server(**kw))
        return made[-1]

    yield start
    for s in made:
        s.close()


def test_a_gate_retries_a_server_error_once_and_takes_a_4xx_as_no(server):
    client = HookClient(sleep=lambda s: None)
    flaky = server(codes=(503, 200))
    assert client.ask([hooks.Webhook("a", "pre-rollout", flaky.url, 2.0)], {"x": 1}) is None
    assert len(flaky.bodies) == 2 and flaky.bodies[0] == {"x": 1, "type": "pre-rollout"}
    no = server(codes=(403,))
    gate = [
        hooks.Webhook("b", "confirm-promotion", no.url, 2.0),
        hooks.Webhook("c", "confirm-promotion", flaky.url),
    ]
    assert client.ask(gate, {}) == "confirm-promotion webhook b said no: HTTP 403: no"
    assert len(no.bodies) == 1, "a 4xx is an answer: not retried"
    assert len(flaky.bodies) == 2, "the first no decides: the others are not asked"


def test_a_slow_webhook_times_out_within_its_bound(server):
    slow = server(delay_s=1.0)
    client = HookClient(sleep=lambda s: None)
    t0 = time.monotonic()
    why = client.ask([hooks.Webhook("slow", "pre-rollout", slow.url, 0.3)], {})
    took = time.monotonic() - t0
    assert why.startswith("pre-rollout webhook slow did not answer (ReadTimeout"), why
    assert took < 0.3 * hooks.GATE_ATTEMPTS + 0.5, took
    dead = HookClient(sleep=lambda s: None).ask(
        [hooks.Webhook("d", "pre-rollout", "http://127.0.0.1:9/x", 1)], {}
    )
    assert "did not answer (ConnectError" in dead


def test_fire_and_forget_delivers_with_bounded_retries(server):
    s = server(codes=(500, 500, 500, 200))
    sender = Sender(HookClient(sleep=lambda s: None))
    sender.submit("rollback webhook rb", s.url, {"n": 1}, 2.0)
    sender.submit("broken", s.url, {"n": {1, 2}}, 2.0)  # not JSON: lost, and the sender lives on
    sender.submit("rollback webhook rb", s.url, {"n": 2}, 2.0)
    sender.close(timeout_s=10)
    assert [b["n"] for b in s.bodies] == [1, 1, 1, 2], "3 attempts for the first, then the next one"
    assert not sender.thread.is_alive()
