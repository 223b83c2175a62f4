"""serving/rollout/health.py: the operator's /healthz and /metrics, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import socket
import threading

import httpx
import pytest

from serving.rollout import health
from serving.rollout.operator import Operator, OperatorMetrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served():
    """serve(check) -> base URL; every server is shut down after the test."""
    servers = []

    def _serve(check):
        port = free_port()
        servers.append(health.serve(port, OperatorMetrics().registry, check, addr="127.0.0.1"))
        return f"http://127.0.0.1:{port}"

    yield _serve
    for s in servers:
        s.shutdown()
        s.server_close()


def test_healthz_is_ok_while_the_check_passes_and_503_with_the_reason_after(served):
    problem: list[str | None] = [None]
    base = served(lambda: problem[0])
    r = httpx.get(f"{base}/healthz", timeout=5)
    assert (r.status_code, r.text) == (200, "ok\n")
    problem[0] = "thread(s) watch stopped"
    r = httpx.get(f"{base}/healthz", timeout=5)
    assert (r.status_code, r.text) == (503, "thread(s) watch stopped\n")


def test_metrics_are_prometheus_clients_exposition_of_the_operator_registry(served):
    base = served(lambda: None)
    r = httpx.get(f"{base}/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    # the families exist before any rollout (the helm test relies on it)
    for family in ("mlrollout_operator_rollout_phase", "mlrollout_operator_canary_weight"):
        assert f"# TYPE {family} gauge" in r.text


def test_operator_problem_names_the_dead_threads():
    alive = threading.Event()
    t_ok = threading.Thread(target=alive.wait, name="lease", daemon=True)
    t_dead = threading.Thread(target=lambda: None, name="watch", daemon=True)
    t_unstarted = threading.Thread(target=lambda: None, name="later")
    t_ok.start()
    t_dead.start()
    t_dead.join()
    try:
        problem = Operator.problem(None, [t_ok, t_dead, t_unstarted])  # self is unused
        assert problem == "thread(s) watch stopped"
        assert Operator.problem(None, [t_ok, t_unstarted]) is None
    finally:
        alive.set()
