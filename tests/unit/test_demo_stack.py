"""``python -m serving.demo.stack``: the printed rollout command is one the rollout CLI accepts, PIDs are
matched with their start time before any signal, and bad input is one line. (Starting the real stack
takes ~25 s on 2 cores; it is the same LocalStack the rollout integration tests start.)"""

from __future__ import annotations

import json
import os
import shlex

from serving.demo import stack
from serving.rollout.cli import build_parser

INFO = {
    "dir": "/tmp/s",
    "model": "breast-cancer",
    "stable_version": "1.0.0",
    "canary_version": "1.1.0",
    "proxy_url": "http://127.0.0.1:1",
    "prometheus_url": "http://127.0.0.1:2",
    "haproxy_socket": "/tmp/s/haproxy.sock",
}


def test_the_printed_rollout_command_is_valid_for_the_rollout_cli():
    argv = shlex.split(stack.rollout_command(INFO))
    assert argv[:4] == [".venv/bin/python", "-m", "serving.rollout", "start"]
    a = build_parser().parse_args(argv[3:])
    assert (a.router, a.haproxy_socket, a.prometheus_url) == (
        "local_proxy",
        "/tmp/s/haproxy.sock",
        INFO["prometheus_url"],
    )
    assert (a.stable_version, a.canary_version, a.state_file) == ("1.0.0", "1.1.0", "/tmp/s/rollout.json")


def test_a_cohort_stack_prints_the_cohort_flags_the_rollout_cli_takes(tmp_path, capsys):
    info = {**INFO, "cohort": "hash:header:x-user-id", "cohort_map": "/tmp/s/cohort.map"}
    a = build_parser().parse_args(shlex.split(stack.rollout_command(info))[3:])
    assert (a.cohort_header, a.cohort_map) == ("x-user-id", "/tmp/s/cohort.map")
    a = build_parser().parse_args(
        shlex.split(stack.rollout_command({**info, "cohort": "match:cookie:canary=always"}))[3:]
    )
    assert (a.match_cookie, a.cohort_header) == ("canary=always", None)
    # a bad spec is one line, before anything starts
    pkg = tmp_path / "nope"
    assert stack.main(["up", "--dir", str(tmp_path), "--cohort", "hash:query:x", "--stable", str(pkg)]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_a_pid_counts_as_ours_only_with_its_start_time():
    me = os.getpid()
    mine = {"processes": [{"pid": me, "start_time": stack._start_time(me)}]}
    reused = {"processes": [{"pid": me, "start_time": "1"}]}
    assert stack._alive(mine) == [me] and stack._alive(reused) == []


def test_up_without_packages_and_down_without_a_stack(tmp_path, capsys):
    assert stack.main(["up", "--dir", str(tmp_path), "--stable", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no model package at {tmp_path / 'nope'}") and len(err.splitlines()) == 1
    assert stack.main(["down", "--dir", str(tmp_path)]) == 0
    assert "nothing to stop" in capsys.readouterr().out
    (tmp_path / stack.STATE).write_text(json.dumps({**INFO, "processes": [{"pid": 1, "start_time": "0"}]}))
    assert stack.main(["down", "--dir", str(tmp_path)]) == 0  # PID 1 with another start time: not signalled
    assert not (tmp_path / stack.STATE).exists()
