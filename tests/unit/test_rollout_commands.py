"""Operator commands on a ModelRollout: the annotation protocol (commands.py, pure), the client
(crctl.py: what it refuses before sending, waiting for the acknowledgement, the status text, its errors
without a cluster) and the entry point the package installs for kubectl."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

import pytest

from serving.rollout import commands, crctl
from serving.rollout import operator as op

ROOT = Path(__file__).parents[2]


def obj(phase="Progressing", step=2, annotations=None, last=None, **status) -> dict:
    st = {"phase": phase, "step": step, "canaryWeight": 25, "stableVersion": "1.0.0",
          "canaryVersion": "2.0.0", "message": "advance: all gates passed", **status}  # fmt: skip
    if last:
        st["lastCommand"] = last
    return {
        "metadata": {"name": "churn", "namespace": "models", "annotations": annotations or {}},
        "spec": {"model": {"name": "churn", "version": "2.0.0"}, "strategy": {"steps": [10, 25, 50, 100]}},
        "status": st,
    }


def test_a_command_is_annotations_with_a_nonce_pending_until_acknowledged():
    patch = commands.request("promote", "n1", "  QA signed\noff ")
    ann = patch["metadata"]["annotations"]
    assert ann == {
        commands.COMMAND: "promote",
        commands.COMMAND_ID: "n1",
        commands.COMMAND_REASON: "QA signed off",
    }
    assert commands.request("pause", "n2")["metadata"]["annotations"][commands.COMMAND_REASON] is None, (
        "an earlier command's reason is removed"
    )
    with pytest.raises(ValueError, match="unknown command 'skip'"):
        commands.request("skip", "n3")
    o = obj(annotations=ann)
    assert commands.pending(o) == commands.Command("promote", "n1", "QA signed off")
    assert commands.pending(o, acked="n1") is None, "acknowledged a moment ago (the cache lags)"
    done = obj(
        annotations=ann,
        last=commands.ack(commands.Command("promote", "n1"), "Applied", "ok", 0)["lastCommand"],
    )
    assert commands.pending(done) is None, "applied once"
    assert commands.pending(obj()) is None and commands.pending(None) is None
    assert commands.pending(obj(annotations={commands.COMMAND: "pause"})) is None, "no id, no command"


def test_wrong_phases_are_refused_in_the_state_machines_words():
    assert commands.refusal("pause", obj()["status"]) is None
    assert commands.refusal("abort", obj(phase="Paused")["status"]) is None
    assert (
        commands.refusal("resume", obj()["status"]) == "cannot resume: the rollout is Progressing, not Paused"
    )
    assert (
        commands.refusal("pause", obj(phase="Paused")["status"])
        == "cannot pause: the rollout is already Paused"
    )
    why = commands.refusal("promote", obj(phase="Aborted", message="aborted by operator")["status"])
    assert why.startswith("cannot promote: the rollout is already Aborted (aborted by operator)")
    assert "not started yet" in commands.refusal("pause", {"phase": "Progressing", "step": 0})
    assert "no rollout is live (phase none: no status)" in commands.refusal("pause", {})
    assert "no rollout is live (phase Initialized" in commands.refusal("abort", {"phase": "Initialized"})
    assert "unknown command" in commands.refusal("skip", obj()["status"])


def test_the_acknowledgement_and_the_reason_the_decision_records():
    cmd = commands.Command("abort", "0123456789abcdef", "bad dashboard")
    assert commands.machine_reason(cmd) == "aborted by operator command 0123456789ab: bad dashboard"
    assert "(kubectl mlrollout)" in commands.machine_reason(commands.Command("resume", "x"))
    a = commands.ack(cmd, commands.REJECTED, "cannot abort:\n  already Promoted", 0.0)["lastCommand"]
    assert a == {"id": cmd.id, "command": "abort", "result": "Rejected",
                 "message": "cannot abort: already Promoted", "time": "1970-01-01T00:00:00Z"}  # fmt: skip


def test_a_resume_is_its_own_event():
    h = {"event": "resume", "action": "set_weight", "step_index": 1, "weight": 25, "reason": "resume at 25%"}
    rec = type("R", (), {"spec": {"steps": [10, 25]}, "canary": {"model": "m", "version": "2"},
                         "stable": {"version": "1"}})()  # fmt: skip
    assert op.event_for(h, rec)[1] == "Resumed"


class FakeApi:
    """The two calls crctl makes, over an in-memory object; ``ack`` plays the operator."""

    def __init__(self, o, ack=None):
        self.o, self.ack, self.patches = o, ack, []

    def get_namespaced_custom_object(self, g, v, ns, plural, name, **kw):
        if name != self.o["metadata"]["name"]:
            raise type("E", (Exception,), {"status": 404})()
        if self.ack and self.patches:
            cid = self.patches[-1]["metadata"]["annotations"][commands.COMMAND_ID]
            self.o["status"]["lastCommand"] = {"id": cid, "command": "pause", **self.ack}
        return copy.deepcopy(self.o)

    def patch_namespaced_custom_object(self, g, v, ns, plural, name, body, **kw):
        self.patches.append(body)
        self.o["metadata"]["annotations"].update(body["metadata"]["annotations"])


def test_send_waits_for_the_ack_and_refuses_before_sending():
    api = FakeApi(obj(), ack={"result": "Applied", "message": "paused"})
    got = crctl.send(api, "models", "churn", "pause", wait_s=5, poll_s=0)
    assert got["result"] == "Applied" and len(api.patches) == 1
    api = FakeApi(obj(phase="Promoted"))
    with pytest.raises(
        crctl.CommandError, match="models/churn: cannot pause: the rollout is already Promoted"
    ):
        crctl.send(api, "models", "churn", "pause")
    assert api.patches == [], "nothing sent"
    with pytest.raises(crctl.CommandError, match="ModelRollout models/nosuch not found"):
        crctl.send(api, "models", "nosuch", "pause")
    api = FakeApi(obj(), ack={"result": "Rejected", "message": "cannot pause: the rollout is already Paused"})
    with pytest.raises(crctl.CommandError, match="the operator rejected pause: cannot pause"):
        crctl.send(api, "models", "churn", "pause", wait_s=5, poll_s=0)
    api = FakeApi(obj())
    with pytest.raises(crctl.CommandError, match=r"no operator acknowledged pause .* within 0.05s"):
        crctl.send(api, "models", "churn", "pause", wait_s=0.05, poll_s=0.01)
    assert commands.pending(api.o) is not None, "it stays pending"
    assert crctl.send(FakeApi(obj()), "models", "churn", "abort", wait_s=0) is None


def test_status_shows_phase_step_weight_versions_evidence_conditions_and_commands():
    o = obj(
        annotations=commands.request("promote", "feedbeef")["metadata"]["annotations"],
        last={"id": "x", "command": "pause", "result": "Applied", "time": "t", "message": "paused by"},
        lastAnalysisTime="2026-01-01T00:00:00Z",
        lastAnalysis=[
            {
                "gate": "success_rate",
                "value": 0.9987,
                "threshold": 0.99,
                "op": ">=",
                "n": 812,
                "verdict": "pass",
            },
            {
                "gate": "drift_js",
                "value": None,
                "threshold": 0.15,
                "op": "<=",
                "n": 3,
                "baselineN": 900,
                "verdict": "inconclusive",
            },
            {
                "gate": "latency_p99",
                "value": 12.5,
                "threshold": 500.0,
                "op": "<=",
                "n": 812,
                "unit": "ms",
                "verdict": "pass",
            },
        ],
        conditions=[
            {"type": "Progressing", "status": "True", "reason": "AwaitingPromotion", "message": "HTTP 403"}
        ],
    )
    text = crctl.format_status(o)
    assert "ModelRollout models/churn: churn 1.0.0 -> 2.0.0" in text
    assert "phase Progressing, step 2/4 [10, 25, 50, 100], canary weight 25%" in text
    lines = text.splitlines()
    row = next(line for line in lines if line.strip().startswith("success_rate"))
    assert row.split() == ["success_rate", "0.9987", ">=", "0.99", "812", "pass"]
    assert next(line for line in lines if "drift_js" in line).split() == [
        "drift_js", "n/a", "<=", "0.15", "3", "vs", "900", "inconclusive",
    ]  # fmt: skip
    assert "12.5ms" in text and "<= 500ms" in text
    assert "Progressing  True   AwaitingPromotion  HTTP 403" in text
    assert "last command: pause Applied" in text and "pending command: promote (id feedbeef)" in text


def test_without_a_cluster_every_error_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    missing = str(tmp_path / "nope.kubeconfig")
    assert crctl.plugin_main(["status", "churn", "-n", "models", "--kubeconfig", missing]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no cluster: cannot load a kubeconfig") and err.count("\n") == 1, err
    dead = tmp_path / "dead.kubeconfig"
    dead.write_text(
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u, namespace: team}}]\ncurrent-context: x\n"
    )
    assert crctl.default_namespace(str(dead)) == "team", "the context's namespace, as kubectl"
    assert crctl.plugin_main(["pause", "churn", "--kubeconfig", str(dead)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: cannot reach the API server to read ModelRollout team/churn")
        and err.count("\n") == 1
    ), err
    with pytest.raises(SystemExit) as e:
        crctl.plugin_main(["skip", "churn"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_python_m_serving_rollout_acts_on_the_cr_with_name(tmp_path, capsys, monkeypatch):
    from serving.rollout.cli import main

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    missing = str(tmp_path / "nope.kubeconfig")
    assert main(["promote", "--namespace", "models", "--name", "churn", "--kubeconfig", missing]) == 2
    assert capsys.readouterr().err.startswith("error: no cluster")
    assert main(["pause", "--name", "churn", "--state-file", str(tmp_path / "s.json")]) == 2
    assert "leave out --state-file" in capsys.readouterr().err


def test_the_package_installs_the_kubectl_plugin():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, func = scripts["kubectl-mlrollout"].split(":")
    assert (module, func) == ("serving.rollout.crctl", "plugin_main")
    assert getattr(crctl, func) is crctl.plugin_main
