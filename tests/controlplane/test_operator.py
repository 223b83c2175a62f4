"""The rollout operator (serving/rollout/operator.py) as real processes against the real control plane.

Each test installs a release of the model chart (strategy canary, `install_canary`), applies the
ModelRollout CRD server-side, starts `python -m serving.rollout operator` processes (stopped by PID at
the end) and creates a ModelRollout whose `spec.metrics` points the scrape provider at a tiny HTTP
server in this test process. That server plays the two runtimes' `/metrics`: scripted counters
(`World`, the unit tests' simulated traffic) that follow the weights of the real HTTPRoute, read
from the API server every 0.2 s, so the operator's own route changes decide what the gates see.

Shown here: a good canary walks the steps to promotion with the status columns visible in `kubectl get
modelrollouts` and an Event per decision carrying the gate evidence, and the operator's metrics; a hand
edit of the route's weights put back within one interval; a bad canary rolled back; two replicas, one
acting, the leader SIGKILLed mid-rollout and the standby resuming at the same step within two lease
durations.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serving.rollout import crd
from serving.rollout.routers import GatewayApiRouter
from tests.controlplane.conftest import NS, ROOT, Kube
from tests.controlplane.test_rollout import V1_URI, V2_URI, install_canary, served_uris
from tests.unit.test_rollout_controller import CANARY, STABLE, World

CRD_FILE = ROOT / "helm" / "mlrollout-operator" / "crds" / "modelrollouts.mlrollout.io.yaml"
INTERVAL_S = 2.0
LEASE_S = 4.0


# --------------------------------------------------------------------------- scripted runtimes


def exposition(world: World, target) -> str:
    """The runtime's /metrics text (README contract) for one side of the scripted world."""
    s = world.snaps[target.version]
    base = f'model="{target.model}",version="{target.version}"'
    lines = []
    for status, n in s.requests.items():
        lines.append(f'mlrollout_requests_total{{{base},protocol="v2",status="{status}"}} {n}')
    for le, n in sorted(s.latency.items()):
        le_s = "+Inf" if math.isinf(le) else repr(le)
        lines.append(f'mlrollout_request_duration_seconds_bucket{{{base},protocol="v2",le="{le_s}"}} {n}')
    for le, n in sorted(s.scores.items()):
        le_s = "+Inf" if math.isinf(le) else repr(le)
        lines.append(f'mlrollout_prediction_score_bucket{{{base},le="{le_s}"}} {n}')
    return "\n".join(lines) + "\n"


class Runtimes:
    """Both sides' /metrics on 127.0.0.1 (``/stable/metrics``, ``/canary/metrics``), counters growing
    with the live HTTPRoute's weights."""

    def __init__(self, route: GatewayApiRouter, **world_kw):
        self.route, self.world = route, World(rps=400.0, **world_kw)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = outer.body(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.threads = [
            threading.Thread(target=self.server.serve_forever, daemon=True),
            threading.Thread(target=self._tick, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def body(self, path: str) -> bytes | None:
        """The /metrics text for ``path`` (None: not found)."""
        side = {"/stable/metrics": STABLE, "/canary/metrics": CANARY}.get(path)
        if side is None:
            return None
        with self.lock:
            return exposition(self.world, side).encode()

    def _tick(self) -> None:
        last = time.monotonic()
        while not self.stop.wait(0.2):
            with contextlib.suppress(Exception):  # a failed read keeps the last weights
                w = self.route.get_weights()
                with self.lock:
                    self.world.weights = w
            now = time.monotonic()
            with self.lock:
                self.world.sleep(now - last)
            last = now

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- operator processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OperatorProc:
    def __init__(self, k: Kube, identity: str, lease: str, log_dir: Path, extra: tuple[str, ...] = ()):
        self.identity, self.metrics_port = identity, free_port()
        self.log_path = log_dir / f"{identity}.log"
        env = {**k.env, "PYTHONPATH": str(ROOT)}
        cmd = [
            sys.executable, "-m", "serving.rollout", "operator", "--namespace", NS,
            "--kubeconfig", k.env["KUBECONFIG"], "--lease-name", lease, "--lease-namespace", NS,
            "--identity", identity, "--lease-duration", f"{LEASE_S:g}s", "--resync", "3s",
            "--metrics-port", str(self.metrics_port), *extra,
        ]  # fmt: skip
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def metrics(self) -> str:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def text(self) -> str:
        return self.log_path.read_text()


@pytest.fixture(scope="module")
def kc(k: Kube) -> Kube:
    k.run("apply", "--server-side", "--force-conflicts", "--field-manager=mlrollout-operator-test",
          "-f", str(CRD_FILE))  # fmt: skip
    k.run("wait", "--for=condition=Established", f"crd/{crd.CRD_NAME}", "--timeout=60s")
    return k


@pytest.fixture
def world(kc, request, tmp_path):
    """Releases ``op<name>``, their scripted runtimes, operator processes (by PID), ModelRollouts and
    Leases; all stopped or removed after."""
    made: dict = {"ops": [], "runtimes": [], "releases": [], "rollouts": [], "leases": set()}

    def release(name: str, **world_kw):
        full = install_canary(kc, name)
        made["releases"].append(name)
        route = GatewayApiRouter(
            full, NS, f"{full}-stable-predictor", f"{full}-canary-predictor", api=kc.api()
        )
        made["runtimes"].append(Runtimes(route, **world_kw))
        return full, made["runtimes"][-1]

    def operator(identity: str, lease: str, *extra: str):
        op = OperatorProc(kc, identity, lease, tmp_path, extra)
        made["ops"].append(op)
        made["leases"].add(lease)
        return op

    def rollout(name: str, full: str, runtimes: Runtimes, spec: dict | None = None, **strategy):
        obj = {
            "apiVersion": crd.API_VERSION,
            "kind": crd.KIND,
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "target": {"release": {"fullname": full}},
                "model": {"name": STABLE.model, "storageUri": V2_URI, "version": CANARY.version},
                "strategy": {
                    "steps": [20, 50, 100],
                    "interval": f"{INTERVAL_S:g}s",
                    "threshold": 1,
                    **strategy,
                },
                "metrics": {
                    "provider": "scrape",
                    "stableMetricsUrl": f"{runtimes.url}/stable/metrics",
                    "canaryMetricsUrl": f"{runtimes.url}/canary/metrics",
                },
                **(spec or {}),
            },
        }
        kc.run("apply", "-f", "-", input=json.dumps(obj))
        made["rollouts"].append(name)

    ns = type("W", (), {"release": staticmethod(release), "operator": staticmethod(operator),
                         "rollout": staticmethod(rollout), "made": made})  # fmt: skip
    try:
        yield ns
    finally:
        for op in made["ops"]:
            op.stop()
        for op in made["ops"]:
            print(f"--- operator {op.identity} (PID {op.pid}) log tail ---\n{op.text()[-3000:]}")
        for rt in made["runtimes"]:
            rt.close()
        for name in made["rollouts"]:
            kc.run("-n", NS, "delete", crd.PLURAL, name, "--ignore-not-found", "--wait=true", check=False)
        for lease in made["leases"]:
            kc.run("-n", NS, "delete", "lease", lease, "--ignore-not-found", check=False)
        for name in made["releases"]:
            kc.helm("uninstall", name, "-n", NS, "--wait", "--timeout", "60s", check=False)


# --------------------------------------------------------------------------- helpers


def status(k: Kube, name: str) -> dict:
    return (k.get(crd.PLURAL, name) or {}).get("status") or {}


def route_weights(k: Kube, full: str) -> list[int]:
    return [b["weight"] for b in k.get("httproute", full)["spec"]["rules"][0]["backendRefs"]]


def events(k: Kube, name: str) -> list[dict]:
    """The Events on this ModelRollout object (its uid: Events of an earlier one of that name outlive it)."""
    uid = k.get(crd.PLURAL, name)["metadata"]["uid"]
    sel = f"involvedObject.name={name},involvedObject.kind={crd.KIND},involvedObject.uid={uid}"
    return k.items("events", "--field-selector", sel)


def finished(k: Kube, name: str, timeout_s: float = 180) -> dict:
    """The status once the rollout has ended and its last action is applied (persist, then act: the
    phase is written before the router's promote or rollback, which clears ``pending`` when done)."""

    def done():
        s = status(k, name)
        if s.get("phase") in ("Promoted", "RolledBack", "Aborted"):
            return s if json.loads(s["record"]).get("pending") is None else None
        return None

    return k.wait(f"{name} to end", done, timeout_s)


def lease_holder(k: Kube, lease: str) -> str | None:
    obj = k.get("lease", lease)
    return (obj or {}).get("spec", {}).get("holderIdentity")


# --------------------------------------------------------------------------- tests


def test_a_good_canary_is_promoted_with_status_events_metrics_and_weights_reasserted(world, kc):
    full, _rt = (r := world.release("opgood"))
    op = world.operator("op-good-a", "op-good")
    kc.wait("the operator leading", lambda: lease_holder(kc, "op-good") == "op-good-a", 30)
    world.rollout("opgood", full, r[1], steps=[10, 20, 30, 50, 100])
    st = kc.wait("the first step", lambda: (s := status(kc, "opgood")).get("step", 0) >= 1 and s, 120)
    assert st["phase"] == "Progressing" and st["stableVersion"] == "1.0.0" and st["canaryVersion"] == "2.0.0"
    record = json.loads(st["record"])
    assert record["state"]["phase"] == "Progressing", "the full record is in status.record"
    # someone edits the route by hand mid-rollout: the operator puts the state's weight back within one
    # interval (plus the time of one reconcile)
    kc.wait("a live step", lambda: status(kc, "opgood").get("canaryWeight", 0) >= 10, 30)
    ref = "/spec/rules/0/backendRefs"
    edit = [
        {"op": "replace", "path": f"{ref}/0/weight", "value": 100},
        {"op": "replace", "path": f"{ref}/1/weight", "value": 0},
    ]
    kc.run("-n", NS, "patch", "httproute", full, "--type=json", "-p", json.dumps(edit))
    edited = time.monotonic()
    kc.wait(
        "the weights re-asserted",
        lambda: (
            (w := route_weights(kc, full)) != [100, 0] and w[1] == status(kc, "opgood").get("canaryWeight")
        ),
        INTERVAL_S + 3,
        every_s=0.2,
    )
    assert time.monotonic() - edited <= INTERVAL_S + 3
    st = finished(kc, "opgood")
    assert st["phase"] == "Promoted", st.get("message")
    assert st["canaryWeight"] == 100 and st["step"] == 5
    assert route_weights(kc, full) == [100, 0], (
        "promoted: stable serves the canary's model, all traffic on it"
    )
    assert served_uris(kc, f"{full}-stable") == {V2_URI}
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds["Promoted"] == "True" and conds["Ready"] == "True" and conds["Progressing"] == "False"
    # the CRD's default gates: the p99 limit beside the comparisons with stable
    assert {g["gate"] for g in st["lastAnalysis"]} == {
        "latency_p99",
        "error_rate_vs_stable",
        "latency_vs_stable",
        "drift_chi2",
    }
    assert all(g["verdict"] == "pass" for g in st["lastAnalysis"])
    assert st["observedGeneration"] == kc.get(crd.PLURAL, "opgood")["metadata"]["generation"]
    # kubectl get modelrollouts: the printer columns
    out = kc.run("-n", NS, "get", crd.PLURAL, "opgood").stdout.split("\n")
    assert out[0].split() == ["NAME", "PHASE", "WEIGHT", "STEP", "STABLE", "CANARY", "AGE"]
    assert out[1].split()[:6] == ["opgood", "Promoted", "100", "5", "1.0.0", "2.0.0"]
    # an Event per decision, with the evidence
    evs = kc.wait(
        "the Promoted event",
        lambda: (e := events(kc, "opgood")) and any(x["reason"] == "Promoted" for x in e) and e,
        15,
    )
    reasons = [e["reason"] for e in sorted(evs, key=lambda e: e["lastTimestamp"])]
    assert reasons.count("Started") == 1 and reasons.count("StepAdvanced") >= 4 and reasons[-1] == "Promoted"
    promoted = next(e for e in evs if e["reason"] == "Promoted")
    assert "latency_p99=" in promoted["message"] and "error_rate_vs_stable: effect" in promoted["message"]
    assert all(e.get("reportingInstance") == "op-good-a" for e in evs)
    # the operator's metrics
    text = op.metrics()
    assert f'mlrollout_operator_rollout_phase{{name="opgood",namespace="{NS}",phase="Promoted"}} 1.0' in text
    assert f'mlrollout_operator_canary_weight{{name="opgood",namespace="{NS}"}} 100.0' in text
    assert 'mlrollout_operator_gate_value{gate="latency_p99",name="opgood"' in text
    assert 'mlrollout_operator_analyses_total{name="opgood",namespace="models",verdict="pass"}' in text
    assert (
        'mlrollout_operator_rollout_duration_seconds_count{namespace="models",phase="Promoted"} 1.0' in text
    )
    # nothing more to do: the same spec starts nothing new
    time.sleep(INTERVAL_S * 2)
    again = status(kc, "opgood")
    assert again["phase"] == "Promoted" and json.loads(again["record"])["created_at"] == record["created_at"]


def test_a_bad_canary_is_rolled_back(world, kc):
    full, rt = world.release("opbad", error_rate=0.3)
    world.operator("op-bad-a", "op-bad")
    world.rollout("opbad", full, rt)
    st = finished(kc, "opbad")
    assert st["phase"] == "RolledBack", st.get("message")
    assert st["canaryWeight"] == 0
    failed = [g for g in st["lastAnalysis"] if g["verdict"] == "fail"]
    assert [g["gate"] for g in failed] == ["error_rate_vs_stable"]  # the default comparison
    assert route_weights(kc, full) == [100, 0]
    assert served_uris(kc, f"{full}-stable") == {V1_URI}, "stable keeps its model"
    evs = kc.wait(
        "the RolledBack event", lambda: [e for e in events(kc, "opbad") if e["reason"] == "RolledBack"], 15
    )
    assert evs[0]["type"] == "Warning" and "error_rate_vs_stable: effect +0.3" in evs[0]["message"]


def test_two_replicas_one_acts_and_the_standby_resumes_at_the_same_step(world, kc):
    full, rt = world.release("opha")
    a = world.operator("op-ha-a", "op-ha")
    kc.wait("a leading", lambda: lease_holder(kc, "op-ha") == "op-ha-a", 30)
    b = world.operator("op-ha-b", "op-ha")
    world.rollout("opha", full, rt, steps=[10, 20, 30, 40, 50, 60, 100], interval="2s")
    kc.wait("step 3", lambda: status(kc, "opha").get("step", 0) >= 3, 120)
    a.kill()  # SIGKILL: no clean Lease release
    killed = time.monotonic()
    at_kill = status(kc, "opha")
    step = at_kill["step"]
    assert lease_holder(kc, "op-ha") == "op-ha-a", "b never took the Lease while a lived"
    kc.wait("b leading", lambda: lease_holder(kc, "op-ha") == "op-ha-b", 2 * LEASE_S, every_s=0.2)
    took = time.monotonic() - killed
    assert took <= 2 * LEASE_S
    # b resumes the persisted rollout: the same record (created_at), the same step, no second start

    st = finished(kc, "opha")
    assert st["phase"] == "Promoted", st.get("message")
    rec = json.loads(st["record"])
    assert rec["created_at"] == json.loads(at_kill["record"])["created_at"], "the same rollout, resumed"
    hist = rec["state"]["history"]
    assert [h["event"] for h in hist].count("start") == 1, "resumed, not restarted"
    # b's first analysis judged the step a left, at its weight (a timeline point's weight is the weight
    # the analysis judged; history entries hold the state after each decision)
    last_t = json.loads(at_kill["record"])["timeline"][-1]["t"]
    after = [p for p in rec["timeline"] if p["t"] > last_t]
    assert after and after[0]["weight"] == at_kill["canaryWeight"], (after[:1], at_kill["canaryWeight"])
    first = next(line for line in b.text().splitlines() if " PASS -> " in line or " FAIL -> " in line)
    assert f"step {step}/7 " in first, first
    evs = events(kc, "opha")
    by = {e["reportingInstance"] for e in evs}
    assert by == {"op-ha-a", "op-ha-b"}
    assert all(e["reportingInstance"] == "op-ha-a" for e in evs if e["reason"] == "Started"), (
        "only the leader acted before the kill"
    )


def test_one_operator_drives_several_rollouts_at_once(world, kc):
    one, rt1 = world.release("opmany1")
    two, rt2 = world.release("opmany2", error_rate=0.3)
    world.operator("op-many-a", "op-many")
    world.rollout("opmany1", one, rt1, steps=[10, 20, 30, 50, 100])
    world.rollout("opmany2", two, rt2, steps=[10, 20, 30, 50, 100], threshold=2)
    # both progress side by side (one worker thread each), each to its own end
    kc.wait(
        "both live",
        lambda: all(status(kc, n).get("step", 0) >= 1 for n in ("opmany1", "opmany2")),
        120,
    )
    a, b = finished(kc, "opmany1"), finished(kc, "opmany2")
    assert (a["phase"], b["phase"]) == ("Promoted", "RolledBack")
    ra, rb = json.loads(a["record"]), json.loads(b["record"])
    overlap = min(ra["timeline"][-1]["t"], rb["timeline"][-1]["t"]) - max(ra["created_at"], rb["created_at"])
    assert overlap > 0, "the two rollouts ran at the same time"
    assert route_weights(kc, one) == [100, 0] and route_weights(kc, two) == [100, 0]
