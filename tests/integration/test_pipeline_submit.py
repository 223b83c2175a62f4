"""`python -m pipelines submit` against a stand-in KFP API server on 127.0.0.1.

The stand-in speaks the KFP v2beta1 REST shapes that kfp.Client (kfp-server-api 2.17) sends and
reads: healthz, pipelines (list by filter, upload, upload_version, list versions), experiments,
runs and recurring runs. It parses every uploaded file strictly as a PipelineSpec, as the real
API server does, and records each request so the tests can check what a cluster would receive.
"""

from __future__ import annotations

import email
import json
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from pipelines.cli import main

pytestmark = pytest.mark.integration


class FakeKFP:
    def __init__(self):
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.experiments: dict[str, dict] = {}
        self.runs: list[dict] = []
        self.recurring: list[dict] = []
        self.log: list[tuple[str, str]] = []


def _handler(state: FakeKFP):
    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _spec_from_upload(self) -> str:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            msg = email.message_from_bytes(
                f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + raw
            )
            (part,) = [
                p
                for p in msg.get_payload()
                if p.get_param("name", header="content-disposition") == "uploadfile"
            ]
            text = part.get_payload(decode=True).decode()
            doc = next(yaml.safe_load_all(text))
            spec = json_format.ParseDict(doc, pipeline_spec_pb2.PipelineSpec())  # strict, like the server
            return spec.pipeline_info.name

        def do_GET(self):
            u = urlparse(self.path)
            q = parse_qs(u.query)
            state.log.append(("GET", u.path))
            if u.path == "/apis/v2beta1/healthz":
                return self._send(200, {"commit_sha": "fake", "tag_name": "2.17.0", "multi_user": False})
            if u.path == "/apis/v2beta1/pipelines":
                pred = json.loads(q["filter"][0])["predicates"][0]
                found = [
                    p
                    for p in state.pipelines.values()
                    if p["display_name"] == pred.get("stringValue", pred.get("string_value"))
                ]
                return self._send(200, {"pipelines": found, "total_size": len(found)} if found else {})
            if u.path.startswith("/apis/v2beta1/pipelines/") and u.path.endswith("/versions"):
                pid = u.path.split("/")[4]
                vs = sorted(state.versions.get(pid, []), key=lambda v: v["created_at"], reverse=True)
                return self._send(
                    200,
                    {"pipeline_versions": vs[: int(q.get("page_size", ["100"])[0])], "total_size": len(vs)},
                )
            if u.path == "/apis/v2beta1/experiments":
                pred = json.loads(q["filter"][0])["predicates"][0]
                found = [
                    e
                    for e in state.experiments.values()
                    if e["display_name"] == pred.get("stringValue", pred.get("string_value"))
                ]
                return self._send(200, {"experiments": found, "total_size": len(found)} if found else {})
            return self._send(404, {"error": f"no route {u.path}", "code": 5})

        def do_POST(self):
            u = urlparse(self.path)
            q = parse_qs(u.query)
            state.log.append(("POST", u.path))
            now = time.strftime("%Y-%m-%dT%H:%M:%S.") + f"{time.time_ns() % 10**9:09d}Z"
            if u.path == "/apis/v2beta1/pipelines/upload":
                self._spec_from_upload()
                pid = str(uuid.uuid4())
                p = {"pipeline_id": pid, "display_name": q["name"][0], "created_at": now}
                state.pipelines[pid] = p
                state.versions[pid] = [
                    {
                        "pipeline_id": pid,
                        "pipeline_version_id": str(uuid.uuid4()),
                        "display_name": q["name"][0],
                        "created_at": now,
                    }
                ]
                return self._send(200, p)
            if u.path == "/apis/v2beta1/pipelines/upload_version":
                self._spec_from_upload()
                pid = q["pipelineid"][0]
                if pid not in state.pipelines:
                    return self._send(404, {"error": "pipeline not found", "code": 5})
                v = {
                    "pipeline_id": pid,
                    "pipeline_version_id": str(uuid.uuid4()),
                    "display_name": q["name"][0],
                    "created_at": now,
                }
                state.versions[pid].append(v)
                return self._send(200, v)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if u.path == "/apis/v2beta1/experiments":
                e = dict(body, experiment_id=str(uuid.uuid4()), created_at=now)
                state.experiments[e["experiment_id"]] = e
                return self._send(200, e)
            if u.path == "/apis/v2beta1/runs":
                r = dict(body, run_id=str(uuid.uuid4()), state="PENDING", created_at=now)
                state.runs.append(r)
                return self._send(200, r)
            if u.path == "/apis/v2beta1/recurringruns":
                if not body.get("trigger", {}).get("cron_schedule", {}).get("cron"):
                    return self._send(400, {"error": "trigger.cron_schedule.cron is required", "code": 3})
                r = dict(body, recurring_run_id=str(uuid.uuid4()), status="ENABLED", created_at=now)
                state.recurring.append(r)
                return self._send(200, r)
            return self._send(404, {"error": f"no route {u.path}", "code": 5})

    return H


@pytest.fixture
def kfp_api():
    state = FakeKFP()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_first_submit_uploads_then_runs_then_new_version_and_schedule(kfp_api, capsys):
    host, state = kfp_api
    rc = main(
        [
            "submit",
            "--host",
            host,
            "--experiment",
            "ct",
            "--estimator",
            "random_forest",
            "-p",
            "min_rows=200",
            "--version",
            "1.1.0",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "new pipeline 'training-pipeline'" in out.out
    (pipeline,) = state.pipelines.values()
    assert pipeline["display_name"] == "training-pipeline"
    (exp,) = state.experiments.values()
    assert exp["display_name"] == "ct"
    (run,) = state.runs
    assert run["experiment_id"] == exp["experiment_id"]
    assert run["pipeline_version_reference"] == {
        "pipeline_id": pipeline["pipeline_id"],
        "pipeline_version_id": state.versions[pipeline["pipeline_id"]][0]["pipeline_version_id"],
    }
    assert run["runtime_config"]["parameters"] == {
        "estimator": "random_forest",
        "min_rows": 200,
        "model_version": "1.1.0",
    }
    assert f"run_id         {run['run_id']}" in out.out

    # second submit: the pipeline exists, so a new version; --recurring makes a schedule
    rc = main(
        ["submit", "--host", host, "--experiment", "ct", "--recurring", "0 0 3 * * *", "--version-name", "v2"]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "new version 'v2'" in out.out
    assert len(state.pipelines) == 1 and len(state.experiments) == 1  # reused, not duplicated
    v2 = state.versions[pipeline["pipeline_id"]][-1]
    assert v2["display_name"] == "v2"
    (rec,) = state.recurring
    assert rec["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert rec["pipeline_version_reference"]["pipeline_version_id"] == v2["pipeline_version_id"]
    assert rec["max_concurrency"] == "1" or rec["max_concurrency"] == 1
    assert rec["no_catchup"] is True and rec["mode"] == "ENABLE"
    assert f"recurring_run  {rec['recurring_run_id']}" in out.out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_host_is_one_clear_line(capsys):
    t0 = time.monotonic()
    rc = main(["submit", "--host", f"http://127.0.0.1:{_free_port()}", "--timeout", "3"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and time.monotonic() - t0 < 30  # no 25 s of kfp.Client healthz retries
    assert len(err.splitlines()) == 1
    assert err.startswith("error: cannot reach the KFP API at http://127.0.0.1:") and "port-forward" in err


def test_bad_arguments_are_refused_before_any_request(kfp_api, capsys):
    host, state = kfp_api
    assert main(["submit", "--host", host, "--recurring", "0 3 * * *"]) == 1
    assert "not a 6-field cron expression" in capsys.readouterr().err
    assert main(["submit", "--host", host, "-p", "no_such=1"]) == 2
    assert "the pipeline has no such parameter" in capsys.readouterr().err
    assert main(["submit", "--host", host, "-p", "min_rows=many"]) == 2
    assert "min_rows='many' must be of type Integer" in capsys.readouterr().err
    assert state.log == []
