"""Operator commands, webhooks and notifications with a real operator process on the real control plane.

The setting of test_operator.py (a release of the model chart, scripted runtimes' /metrics following the
real HTTPRoute, `python -m serving.rollout operator` processes stopped by PID), plus a real HTTP server on
127.0.0.1 in this test process that plays every webhook and notification endpoint: it records each POST
and answers with the status its test sets (a confirm-promotion webhook says no with 403 until it is
flipped to 200). `kubectl mlrollout status` and `pause` run as subprocesses of the real kubectl, which
finds the package's `kubectl-mlrollout` entry point on PATH; the other commands run the same client code
(`crctl.plugin_main`, `cli.main` with `--name`) in this process, against the same API server and operator,
since every interpreter start costs seconds on a loaded 2-core machine.

Shown here, on one release (installing one costs most of the time): an abort rolls back and fires the
rollback webhook and a Slack-compatible notification; wrong-phase and unknown-object commands fail with
one line and exit 2; then, the ModelRollout declared again, the pre-rollout webhook is asked before any
traffic moves, the rollout waits at its last step while the approval webhook says no (condition reason
AwaitingPromotion, analyses still running), pause holds the weight and stops analysing across more than
two intervals, resume continues, the webhook's yes promotes; the notifier receives the promotion with
each gate's value, threshold, n and verdict, and the post-rollout webhook fires.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

from serving.rollout import commands, crctl, crd
from serving.rollout.cli import main as cli_main
from tests.controlplane.conftest import NS, ROOT, Kube
from tests.controlplane.test_operator import events, finished, kc, route_weights, status, world

__all__ = ["kc", "world"]  # the fixtures, shared with test_operator.py
INTERVAL = "1s"
FAST_GATES = {"minPredictions": 100, "minRequests": 20}


class Hooks:
    """Every webhook and notification endpoint: records (path, JSON body), answers ``codes[path]``."""

    def __init__(self):
        self.codes: dict[str, int] = {}
        self.calls: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                with outer.lock:
                    outer.calls.append((self.path, body))
                    code = outer.codes.get(self.path, 200)
                msg = b"approved" if code < 300 else b"not approved yet"
                self.send_response(code)
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self, path: str) -> list[dict]:
        with self.lock:
            return [b for p, b in self.calls if p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooks():
    h = Hooks()
    yield h
    h.close()


@pytest.fixture
def plugin_env(kc: Kube, tmp_path: Path) -> dict[str, str]:
    """PATH with kubectl and the package's `kubectl-mlrollout` console script (what pip generates from
    pyproject's [project.scripts] entry point), and no other way to find the plugin."""
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["kubectl-mlrollout"]
    module, func = target.split(":")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "kubectl-mlrollout"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
    script.chmod(0o755)
    os.symlink(kc.kubectl_bin, bindir / "kubectl")
    return {**kc.env, "PATH": str(bindir), "PYTHONPATH": str(ROOT)}


def kubectl_mlrollout(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["kubectl", "mlrollout", *args], env=env, capture_output=True, text=True, timeout=60
    )


def plugin(capsys, k: Kube, *args: str) -> int:
    capsys.readouterr()
    return crctl.plugin_main([*args, "-n", NS, "--kubeconfig", k.env["KUBECONFIG"]])


def analyses(k: Kube, name: str) -> int:
    return json.loads(status(k, name)["record"])["state"]["analyses"]


def condition(st: dict, typ: str) -> dict:
    return next(c for c in st["conditions"] if c["type"] == typ)


def test_abort_then_confirm_promotion_pause_resume_with_webhooks_and_notifications(
    world, kc, hooks, plugin_env, capsys
):
    full, rt = world.release("opcmd")
    world.operator("op-cmd-a", "op-cmd", "--notify-url", f"{hooks.url}/notify",
                   "--notify-slack-url", f"{hooks.url}/slack")  # fmt: skip
    hooks.codes["/approve"] = 403  # the approval webhook says no until the test flips it
    approve = {"name": "approve", "type": "confirm-promotion", "url": f"{hooks.url}/approve", "timeout": "5s"}
    strategy = {"steps": [50, 100], "interval": INTERVAL, "maxInconclusive": 20, "gates": FAST_GATES}

    # 1. abort rolls back and fires the rollback webhook and a Slack-compatible notification (the
    #    plugin's code in this process: an interpreter start costs seconds on a loaded machine; the real
    #    kubectl runs the plugin from PATH for status and pause below)
    hooks_1 = [approve, {"name": "rb", "type": "rollback", "url": f"{hooks.url}/rollback"}]
    world.rollout("opcmd", full, rt, spec={"webhooks": hooks_1}, **strategy)
    kc.wait("a live step", lambda: status(kc, "opcmd").get("canaryWeight", 0) >= 50, 60, every_s=0.3)
    assert plugin(capsys, kc, "abort", "opcmd", "--reason", "bad dashboard") == 0
    assert capsys.readouterr().out.startswith("abort: Applied; phase Aborted")
    st = finished(kc, "opcmd", 30)
    assert st["phase"] == "Aborted" and st["canaryWeight"] == 0 and "bad dashboard" in st["message"]
    assert st["lastCommand"]["command"] == "abort" and st["lastCommand"]["result"] == "Applied"
    assert route_weights(kc, full) == [100, 0]
    rb = kc.wait("the rollback webhook", lambda: hooks.bodies("/rollback"), 15)
    assert rb[0]["type"] == "rollback" and rb[0]["phase"] == "Aborted" and rb[0]["canaryWeight"] == 0
    slack = kc.wait(
        "the Slack message", lambda: [b for b in hooks.bodies("/slack") if "Aborted" in b["text"]], 15
    )
    assert slack[0]["blocks"][0]["type"] == "section" and "opcmd" in slack[0]["text"]
    assert any(e["reason"] == "Aborted" for e in events(kc, "opcmd"))
    # what cannot apply: one line on stderr, exit 2, nothing sent
    assert plugin(capsys, kc, "promote", "opcmd") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already Aborted" in err, err
    assert plugin(capsys, kc, "status", "nosuch") == 2
    assert "ModelRollout models/nosuch not found" in capsys.readouterr().err
    assert commands.requested(kc.get(crd.PLURAL, "opcmd")).verb == "abort", "the refused promote set nothing"

    # 2. the same rollout declared again (a new object: its record starts afresh from the stable 1.0.0)
    kc.run("-n", NS, "delete", crd.PLURAL, "opcmd", "--wait=true")
    hooks_2 = [
        {"name": "pre", "type": "pre-rollout", "url": f"{hooks.url}/pre"},
        approve,
        {"name": "post", "type": "post-rollout", "url": f"{hooks.url}/post"},
    ]
    world.rollout("opcmd", full, rt, spec={"webhooks": hooks_2}, **strategy)
    # the last step passes but the approval webhook says no: the rollout holds there, still analysed
    st = kc.wait(
        "waiting for the approval",
        lambda: (
            (s := status(kc, "opcmd")).get("conditions")
            and condition(s, "Progressing")["reason"] == "AwaitingPromotion"
            and s
        ),
        60,
        every_s=0.3,
    )
    assert st["phase"] == "Progressing" and st["step"] == 2 and st["canaryWeight"] == 100
    assert "HTTP 403" in condition(st, "Progressing")["message"], condition(st, "Progressing")
    pre = hooks.bodies("/pre")
    assert pre and pre[0]["type"] == "pre-rollout" and pre[0]["phase"] == "Pending"
    assert pre[0]["canaryWeight"] == 0, "pre-rollout is asked before any traffic moves"
    asked = hooks.bodies("/approve")
    assert asked and all(b["evidence"] for b in asked), "each approval request carries the evidence"
    out = kubectl_mlrollout(plugin_env, "status", "opcmd", "-n", NS)
    assert out.returncode == 0, out.stderr
    assert "phase Progressing, step 2/2 [50, 100], canary weight 100%" in out.stdout, out.stdout
    assert "error_rate_vs_stable" in out.stdout and "AwaitingPromotion" in out.stdout, out.stdout
    # pause: the weight holds and no analysis runs across more than two intervals
    out = kubectl_mlrollout(plugin_env, "pause", "opcmd", "-n", NS, "--reason", "checking a dashboard")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("pause: Applied; phase Paused"), out.stdout
    held = analyses(kc, "opcmd")
    time.sleep(2.5)
    st = status(kc, "opcmd")
    assert st["phase"] == "Paused" and "checking a dashboard" in st["message"]
    assert analyses(kc, "opcmd") == held, "paused: no analysis"
    assert route_weights(kc, full) == [0, 100] and st["canaryWeight"] == 100
    # a second pause is refused by the CLI, in the state machine's words, one line, exit 2
    assert plugin(capsys, kc, "pause", "opcmd") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already Paused" in err, err
    # resume (python -m serving.rollout on the CR, in this process): analyses continue, still waiting
    capsys.readouterr()
    assert (
        cli_main(["resume", "--namespace", NS, "--name", "opcmd", "--kubeconfig", kc.env["KUBECONFIG"]]) == 0
    )
    assert capsys.readouterr().out.startswith("resume: Applied; phase Progressing")
    kc.wait("analyses again", lambda: analyses(kc, "opcmd") >= held + 2, 20, every_s=0.3)
    assert status(kc, "opcmd")["phase"] == "Progressing"
    # the approval comes: promoted at the next analysis
    hooks.codes["/approve"] = 200
    st = finished(kc, "opcmd", 30)
    assert st["phase"] == "Promoted", st.get("message")
    # the notifier: the promotion with each gate's value, threshold, n and verdict
    promoted = kc.wait(
        "the Promoted notification",
        lambda: [b for b in hooks.bodies("/notify") if b["event"] == "Promoted"],
        15,
    )
    note = promoted[0]
    assert note["kind"] == "ModelRolloutNotification" and note["phase"] == "Promoted"
    assert note["stableVersion"] == "1.0.0" and note["canaryVersion"] == "2.0.0"
    gates = {g["gate"]: g for g in note["evidence"]}
    assert {"latency_p99", "error_rate_vs_stable", "latency_vs_stable", "drift_chi2"} <= set(gates)
    assert all({"value", "threshold", "n", "verdict"} <= set(g) for g in gates.values())
    e = gates["error_rate_vs_stable"]
    assert e["verdict"] == "pass" and e["n"] >= 20 and {"effect", "statistic"} <= set(e)
    seen = [b["event"] for b in hooks.bodies("/notify")]
    assert seen.count("Started") == 2 and {"AwaitingPromotion", "Paused", "Resumed"} <= set(seen), seen
    post = kc.wait("the post-rollout webhook", lambda: hooks.bodies("/post"), 15)
    assert post[0]["type"] == "post-rollout" and post[0]["phase"] == "Promoted"
    reasons = [e["reason"] for e in events(kc, "opcmd")]
    assert {"Paused", "Resumed", "Promoted"} <= set(reasons), reasons
