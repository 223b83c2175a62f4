"""The watch after promotion on the real local stack: two KServe runtimes, HAProxy, Prometheus.

The real CLI (``python -m serving.rollout start --watch-after-promotion N``) promotes a good canary;
then the promoted version's serving process comes back broken (the canary server's runtime replaced by
one of the same version with ``MLROLLOUT_FAULT_ERROR_RATE``, HAProxy's weights untouched), the watch
fails and the previous model is restored: every answer after the rollback carries ``x-model-version``
1.0.0 again. A good version passes the watch and stays promoted. Traffic is real HTTP through HAProxy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.demo.badmodel import with_version
from serving.demo.localstack import TrafficGenerator
from serving.rollout import controller as ctl
from serving.rollout.gates import DriftGate, LatencyGate, SuccessRateGate
from serving.rollout.machine import RolloutSpec
from serving.rollout.store import FileStateStore

# the same skip, and the same stack fixture (one per module: stable v1 = logistic regression, canary v2 =
# random forest)
from tests.integration.test_rollout_local import packages, pytestmark, stack  # noqa: F401
from tests.modelfactory import breast_cancer

REPO = Path(__file__).resolve().parents[2]
INTERVAL = 2.0
X, Y, _, _ = breast_cancer()


def traffic(s) -> TrafficGenerator:
    return TrafficGenerator(s.proxy_url, s.model, X, Y, rps=120, concurrency=24, batch=16, max_seconds=150)


def _state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _wait(what: str, fn, timeout_s: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if v := fn():
            return v
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the CLI exited ({proc.returncode}) before {what}:\n{proc.stdout.read()}")
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")


def test_a_version_broken_after_promotion_is_rolled_back_to_the_previous_model(
    stack,  # noqa: F811
    packages,  # noqa: F811
    tmp_path,
):
    state_file = tmp_path / "state.json"
    cmd = [
        sys.executable, "-m", "serving.rollout", "start", "--router", "local_proxy",
        "--haproxy-socket", str(stack.haproxy_socket), "--metrics", "prometheus",
        "--prometheus-url", stack.prometheus_url, "--model", stack.model,
        "--stable-version", "1.0.0", "--canary-version", "2.0.0", "--steps", "50,100",
        "--interval", f"{INTERVAL:g}s", "--max-p99-ms", "2000", "--watch-after-promotion", "40",
        "--max-inconclusive", "8", "--state-file", str(state_file), "--no-report", "--max-seconds", "120",
        # the absolute gates: the canary (a random forest) differs from stable (logistic regression) for
        # real, which the default comparisons with stable would rightly roll back before the watch
        "--no-compare",
    ]  # fmt: skip
    with traffic(stack) as tg:
        time.sleep(INTERVAL)  # stable-only traffic first: the drift gate's stable reference
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            # promoted and watching: the promotion applied, the watch's window open, one interval passed
            s = _wait(
                "the first passed watch interval",
                lambda: (
                    (s := _state(state_file))
                    and s.get("state")
                    and s["state"]["phase"] == "Verifying"
                    and s["state"].get("watch_passes", 0) >= 1
                    and s
                ),
                90,
                proc,
            )
            assert s["pending"] is None and s["watch"]["start"] is not None
            promoted_at = next(h["t"] for h in s["state"]["history"] if h["action"] == "promote")
            broken_at = time.time()
            # the promoted version's process comes back broken: same version, half its answers 500
            stack.replace_canary(packages["v2"], {"MLROLLOUT_FAULT_ERROR_RATE": "0.5"}, keep_weights=True)
            out, _ = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        rec = _state(state_file)
        t_end = rec["state"]["history"][-1]["t"]
        time.sleep(1.5)  # traffic after the rollback
    answers = tg.result()
    assert proc.returncode == 3, out
    st = rec["state"]
    last = st["history"][-1]
    assert st["phase"] == "RolledBack" and (last["event"], last["action"]) == ("watch", "restore"), out
    assert st["reason"].startswith("rollback: after promotion, watch interval"), st["reason"]
    failed = {e["gate"] for e in last["evidence"] if e["verdict"] == "fail"}
    assert failed == {"success_rate"}, last["evidence"]
    assert (
        "FAIL -> rollback: after promotion" in out and "rollout RolledBack: rollback: after promotion" in out
    )
    assert stack.router().get_weights() == (100, 0)
    # by the answers' version header: after the promotion the new version answered everything, after
    # the rollback the previous model does again
    promoted = answers.window(promoted_at + 0.5, broken_at)
    assert promoted.total > 50 and set(promoted.by_version()) == {"2.0.0"}, promoted.by_version()
    after = answers.window(t_end + 0.3, t_end + 10)
    assert after.total > 20 and set(after.by_version()) == {"1.0.0"}, after.by_version()
    assert after.failures() == [], after.failures()[:3]
    # the broken version's errors reached clients (what the watch bounds), none of the previous model's
    assert answers.model_failures("2.0.0") and answers.model_failures("1.0.0") == []
    watch = [h for h in st["history"] if h["event"] == "watch"]
    print(
        f"watch: {len(watch)} intervals ({st.get('watch_passes', 0)} passed before the breakage), "
        f"restored {t_end - min(a.t for a in answers.model_failures('2.0.0')):.1f} s after the first "
        "failed answer; answers: "
        f"{promoted.total} from 2.0.0 before it broke, {len(answers.model_failures('2.0.0'))} failed 2.0.0 "
        f"answers, {after.total} after the rollback all 1.0.0"
    )


def test_a_good_version_passes_the_watch_and_stays_promoted(stack, packages, tmp_path):  # noqa: F811
    stack.replace_canary(with_version(packages["v2"], tmp_path / "v2b", "2.1.0"), {})
    with traffic(stack) as tg:
        time.sleep(INTERVAL)
        store = FileStateStore(tmp_path / "state.json")
        gates = [SuccessRateGate(0.99, 20), LatencyGate(2000.0, min_requests=20), DriftGate(0.15, "js", 400)]
        rec = ctl.new_record(
            RolloutSpec((50, 100), INTERVAL, threshold=2, max_inconclusive=6, post_promotion_intervals=2),
            gates,
            stack.stable_target,
            stack.canary_target,
            stack.router().config(),
            stack.metrics_config(),
        )
        ctl.begin(store, rec)
        logs: list[str] = []
        rec = ctl.Controller(store, router=stack.router(), provider=stack.provider(), log=logs.append).run(
            max_seconds=90
        )
        t_end = time.time()
        time.sleep(1.5)
    st = rec.rollout_state
    assert st.phase.value == "Promoted" and st.watch_passes == 2, "\n".join(logs)
    assert [h["event"] for h in st.history][-2:] == ["watch", "watch"]
    assert stack.router().get_weights() == (0, 100)
    after = tg.result().window(t_end + 0.3, t_end + 10)
    assert after.total > 20 and set(after.by_version()) == {"2.1.0"}, after.by_version()
    assert any("] watch 2/2 PASS -> promote: the watch after promotion passed 2/2" in line for line in logs)
