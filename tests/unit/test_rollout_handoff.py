"""The KFP step's hand-off to the operator (serving/rollout/handoff.py, cluster.py's pure parts), without a
cluster: the ModelRollout spec built from the step's parameters (and read back by the operator's own
mapping into the record it would drive), the refusals before any API call, when a status is the end of
*this* version's rollout, and the evidence rendered as Markdown and KFP metrics from a real status (the
operator's status_view of a rollout the controller drove in a simulated world). The step against a real
API server and operator is tests/controlplane/test_kfp_identity.py."""

from __future__ import annotations

import json

import pytest

from serving.rollout import cluster, handoff
from serving.rollout import operator as op
from serving.rollout.crstore import status_view
from serving.rollout.gates import DriftGate, LatencyGate, SuccessRateGate
from tests.unit.test_rollout_controller import World, make

BASE = {
    "fullname": "bc-mlrollout-model",
    "model_name": "breast-cancer",
    "storage_uri": "s3://mlpipeline/v2/artifacts/run/package",
    "version": "2.0.0",
}


def test_the_spec_is_what_the_operator_drives():
    spec = handoff.spec(
        **BASE,
        steps="20,50,100",
        interval_s=1.5,
        threshold=3,
        min_success_rate=0.95,
        max_p99_ms=250.0,
        max_drift=0.2,
        metrics=handoff.prometheus("http://prom:9090"),
    )
    assert spec["model"] == {"name": "breast-cancer", "storageUri": BASE["storage_uri"], "version": "2.0.0"}
    assert spec["strategy"] == {
        "steps": [20, 50, 100],
        "interval": "1500ms",
        "threshold": 3,
        "postPromotionIntervals": 0,
        "router": "gateway_api",
        "gates": {"minSuccessRate": 0.95, "maxP99Ms": 250.0, "maxDrift": 0.2},
    }
    obj = handoff.manifest("bc-mlrollout-model", "models", spec)
    assert obj["spec"]["target"] == {"release": {"fullname": "bc-mlrollout-model"}}, "nulls only in patches"
    assert obj["spec"]["metrics"] == {"provider": "prometheus", "url": "http://prom:9090"}
    # the operator's own mapping reads it back as the rollout the step asked for
    rec = op.build_record(obj, "1.0.0", "")
    assert rec.spec == {"steps": [20, 50, 100], "interval_s": 1.5, "threshold": 3, "max_inconclusive": 5}
    # the CRD's default gates compare with stable: of the step's limits only the p99 one acts there
    gates = {type(g): g for g in rec.gate_objects()}
    assert gates[LatencyGate].max_ms == 250.0 and SuccessRateGate not in gates
    # with compareWithStable false the absolute limits are the step's
    obj["spec"]["strategy"]["gates"]["compareWithStable"] = False
    gates = {type(g): g for g in op.build_record(obj, "1.0.0", "").gate_objects()}
    assert gates[SuccessRateGate].min_rate == 0.95 and gates[LatencyGate].max_ms == 250.0
    assert gates[DriftGate].max_drift == 0.2
    assert (rec.canary["model"], rec.canary["version"]) == ("breast-cancer", "2.0.0")
    assert rec.router["route"] == "bc-mlrollout-model" and rec.metrics["url"] == "http://prom:9090"


# the step's comparison settings, none at its default (also tests/controlplane/test_modelrollout_crd.py)
COMPARE = {
    "compare_with_stable": True,
    "alpha": 0.02,
    "max_error_increase": 0.01,
    "latency_min_effect": 0.1,
    "drift_min_effect": 0.2,
    "accuracy_min_effect": 0.03,
}


def test_the_comparison_settings_are_what_the_operator_drives():
    from serving.rollout.gates import AccuracyVsStable, DriftTest, ErrorRateVsStable, LatencyVsStable

    spec = handoff.spec(**BASE, **COMPARE, metrics=handoff.prometheus("http://prom:9090"))
    assert spec["strategy"]["gates"] == {
        "compareWithStable": True,
        "alpha": 0.02,
        "maxErrorIncrease": 0.01,
        "latencyMinEffect": 0.1,
        "driftMinEffect": 0.2,
        "accuracyMinEffect": 0.03,
    }
    rec = op.build_record(handoff.manifest("bc-mlrollout-model", "models", spec), "1.0.0", "")
    gates = {type(g): g for g in rec.gate_objects()}
    # the absolute p99 limit beside the four comparisons, alpha split over them (a union bound)
    assert set(gates) == {LatencyGate, ErrorRateVsStable, LatencyVsStable, DriftTest, AccuracyVsStable}
    assert {g.alpha for t, g in gates.items() if t is not LatencyGate} == {0.02 / 4}
    assert gates[ErrorRateVsStable].min_effect == 0.01 and gates[LatencyVsStable].min_effect == 0.1
    assert gates[DriftTest].min_effect == 0.2 and gates[AccuracyVsStable].min_effect == 0.03
    # off, with the step's "no accuracy comparison" (0): the absolute gates, the settings still written
    off = handoff.spec(
        **BASE, compare_with_stable=False, alpha=0.05, accuracy_min_effect=0.0, metrics=spec["metrics"]
    )
    assert off["strategy"]["gates"] == {"compareWithStable": False, "alpha": 0.05}
    rec = op.build_record(handoff.manifest("bc-mlrollout-model", "models", off), "1.0.0", "")
    assert {type(g) for g in rec.gate_objects()} == {SuccessRateGate, LatencyGate, DriftGate}


def test_gate_fields_are_the_operators():
    assert all(op.GATE_FIELDS[camel] == snake for snake, camel in handoff.GATE_FIELDS.items())


def test_a_merge_patch_replaces_what_the_step_owns():
    spec = handoff.spec(
        **BASE,
        metrics={"provider": "scrape", "stableMetricsUrl": "http://s/m", "canaryMetricsUrl": "http://c/m"},
    )
    # the other target and metrics keys are nulled, so an object made for other settings keeps none
    assert spec["target"] == {"release": {"fullname": BASE["fullname"]}, "inferenceService": None}
    assert spec["metrics"] == {
        "provider": "scrape",
        "url": None,
        "stableMetricsUrl": "http://s/m",
        "canaryMetricsUrl": "http://c/m",
    }
    assert "metrics" not in handoff.spec(**BASE), "empty prometheus_url: the object's own spec.metrics"
    assert handoff.prometheus("") is None
    assert handoff.spec(**BASE)["strategy"]["gates"] == {}, "unset gates keep the CRD's defaults"


@pytest.mark.parametrize(
    ("seconds", "text"), [(60.0, "60s"), (1.5, "1500ms"), (2, "2s"), (0.25, "250ms"), (3600.0, "3600s")]
)
def test_interval_as_the_crd_duration(seconds, text):
    assert handoff.interval_text(seconds) == text
    assert op.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"min_success_rate": 2.0}, "min-success-rate"),
        ({"min_success_rate": -1.0}, "min-success-rate"),
        ({"max_p99_ms": -5.0}, "max-p99-ms"),
        ({"max_drift": 0.0}, "max-drift"),
        ({"steps": "10,5,100"}, "strictly increasing"),
        ({"steps": "10,50"}, "the last step must be 100"),
        ({"steps": "10,x"}, "invalid literal"),
        ({"interval_s": 0.0}, "interval"),
        ({"interval_s": float("nan")}, "interval"),
        ({"threshold": 0}, "threshold"),
        ({"router": "local_proxy"}, "router must be gateway_api, kserve_knative or kserve_canary"),
        ({"fullname": ""}, "release_fullname is required"),
        # the comparisons' settings, refused whether compare_with_stable is on or not
        ({"alpha": 0.7}, "--alpha"),
        ({"alpha": 0.0, "compare_with_stable": True}, "--alpha"),
        ({"max_error_increase": 0.0}, "--max-error-increase"),
        ({"max_error_increase": 1.5}, "--max-error-increase"),
        ({"latency_min_effect": 0.6}, "--latency-min-effect"),
        ({"drift_min_effect": 3.0}, "--drift-min-effect"),
        ({"accuracy_min_effect": -0.1}, "--accuracy-min-effect"),
        ({"accuracy_min_effect": 1.5}, "--accuracy-min-effect"),
        ({"compare_with_stable": "yes"}, "compare_with_stable must be true or false"),
    ],
)
def test_nonsense_is_refused_before_any_api_call(kw, message, tmp_path):
    """The step's function refuses with the CLI's messages (api=object(): any API call would fail)."""
    card = tmp_path / "pkg" / "bc" / "model-card.json"
    card.parent.mkdir(parents=True)
    card.write_text(json.dumps({"version": "2.0.0"}))
    args = {"namespace": "models", "fullname": "m", "model_name": "m", **kw}
    with pytest.raises(ValueError, match=message):
        cluster.progressive_rollout(
            object(),
            package_dir=str(tmp_path / "pkg"),
            package_uri="minio://b/p",
            report_path=str(tmp_path / "r.md"),
            log_metric=lambda *_: None,
            **args,
        )
    assert not (tmp_path / "r.md").exists()


def test_the_package_version_and_uri():
    assert cluster.to_storage_uri("minio://mlpipeline/v2/artifacts/x") == "s3://mlpipeline/v2/artifacts/x"
    assert cluster.to_storage_uri("s3://b/x") == "s3://b/x"


def test_a_package_without_exactly_one_card_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"expected one model-card\.json under the model artifact, found 0"):
        cluster.package_version(str(tmp_path))


# --------------------------------------------------------------------------- outcome and evidence


def _status(tmp_path, **world_kw) -> dict:
    """A real ModelRollout status: the controller drives a rollout in a simulated world, the operator's
    status_view renders its record (with the record itself, as the status store writes it)."""
    store, c, _ = make(tmp_path, World(**world_kw), threshold=1)
    c.run(max_seconds=60)
    rec = store.load()
    return {**status_view(rec, {}, 2, 1_000.0), "record": json.dumps({"pending": None})}


def _obj(status: dict) -> dict:
    return {
        "metadata": {"name": "bc", "namespace": "models"},
        "spec": {"strategy": {"steps": [10, 25, 50, 100]}},
        "status": status,
    }


def test_outcome_is_this_versions_end_only(tmp_path):
    done = _obj(_status(tmp_path))
    assert handoff.outcome(done, "2.0.0") == "Promoted"
    assert handoff.outcome(done, "3.0.0") is None, "the previous rollout's end is not ours"
    live = _obj({**done["status"], "phase": "Progressing"})
    assert handoff.outcome(live, "2.0.0") is None
    pending = _obj({**done["status"], "record": json.dumps({"pending": {"action": "promote"}})})
    assert handoff.outcome(pending, "2.0.0") is None, "decided but not applied yet"
    assert handoff.outcome(_obj({}), "2.0.0") is None and handoff.outcome(None, "2.0.0") is None
    failed = _obj({"canaryVersion": "2.0.0", "phase": "Failed"})
    assert handoff.outcome(failed, "2.0.0") == "Failed"


def test_evidence_as_markdown_and_metrics(tmp_path):
    obj = _obj(_status(tmp_path))
    md = handoff.markdown(obj)
    assert md.startswith("# Rollout of 2.0.0: Promoted\n")
    assert "stable 1.0.0 -> canary 2.0.0, step 4/4, canary weight 100 %" in md
    rows = [
        line
        for line in md.splitlines()
        if line.startswith("| success_rate ")
        or line.startswith("| latency_p99 ")
        or line.startswith("| drift_js ")
    ]
    assert len(rows) == 3 and all("**pass**" in r for r in rows)
    (sr,) = [r for r in rows if r.startswith("| success_rate ")]
    gate = next(g for g in obj["status"]["lastAnalysis"] if g["gate"] == "success_rate")
    assert f"| >= {gate['threshold']:.4g} | {gate['n']} |" in sr
    history = obj["status"]["history"]
    assert f"## History ({len(history)} decisions)" in md
    assert md.count("| promote |") == 1 and "| start |" in md
    m = handoff.kfp_metrics(obj)
    assert m["promoted"] == 1.0 and m["canary_weight"] == 100.0 and m["step"] == 4.0
    assert m["analyses_pass"] == sum(1 for h in history if h.get("verdict") == "pass") >= 4
    assert m["analyses_fail"] == 0.0
    assert m["success_rate"] == pytest.approx(gate["value"]) and m["success_rate_n"] == gate["n"]
    assert {"latency_p99", "drift_js", "drift_js_n"} <= set(m)


def test_a_rollback_is_one_line_naming_the_failed_gate(tmp_path):
    obj = _obj(_status(tmp_path, error_rate=0.5))
    assert handoff.outcome(obj, "2.0.0") == "RolledBack"
    line = handoff.failure_line(obj, "2.0.0")
    assert line.startswith("canary 2.0.0 RolledBack on ModelRollout models/bc: ")
    assert "[failed gates: success_rate=" in line and "\n" not in line
    m = handoff.kfp_metrics(obj)
    assert m["promoted"] == 0.0 and m["canary_weight"] == 0.0 and m["analyses_fail"] >= 1
    assert "| **fail** |" in handoff.markdown(obj)


def test_markdown_cells_cannot_break_the_table():
    obj = _obj(
        {
            "phase": "Paused",
            "canaryVersion": "2.0.0",
            "message": "a | b\nc",
            "history": [{"time": "t", "event": "pause", "action": "pause", "reason": "x|y\nz"}],
        }
    )
    md = handoff.markdown(obj)
    assert "> a \\| b c" in md and "| x\\|y z |" in md
    assert "No analysis was made." in md


def test_a_timeout_says_where_the_rollout_stands():
    other = _obj({"phase": "Progressing", "canaryVersion": "1.5.0", "message": "step 2"})
    line = handoff.timeout_line(other, "2.0.0", 30, "models/bc")
    assert "did not end within 30 s; it still shows 1.5.0 (Progressing)" in line
    none = handoff.timeout_line(_obj({}), "2.0.0", 30, "models/bc")
    assert "the operator has written no status" in none and "already the stable version" in none
    ours = _obj({"phase": "Paused", "canaryVersion": "2.0.0", "step": 2, "canaryWeight": 25})
    assert "Paused at step 2, canary 25%" in handoff.timeout_line(ours, "2.0.0", 30, "models/bc")


# --------------------------------------------------------------------------- the wait


def test_the_wait_watches_the_one_object_and_recovers_from_410(monkeypatch):
    """A watch by name (field selector, from the read's resourceVersion); 410 Gone re-reads and watches
    again; it returns on the event that ends this version's rollout, not on the previous rollout's end."""
    from kubernetes import watch
    from kubernetes.client.rest import ApiException

    def obj(rv, **status):
        return {
            "metadata": {"name": "bc", "namespace": "models", "resourceVersion": rv},
            "spec": {"strategy": {"steps": [50, 100]}},
            "status": status,
        }

    old_end = {"phase": "Promoted", "canaryVersion": "1.0.0", "stableVersion": "0.9.0"}
    reads = [obj("5", **old_end), obj("7", **old_end)]
    streams: list[dict] = []

    class FakeApi:
        def get_namespaced_custom_object(self, *a):
            return reads.pop(0)

        def list_namespaced_custom_object(self, *a, **kw):
            raise AssertionError("only through the watch")

    def stream(self, fn, *args, **kw):
        streams.append(kw)
        if len(streams) == 1:
            raise ApiException(status=410, reason="Gone")
        yield {"type": "MODIFIED", "object": obj("8", phase="Progressing", canaryVersion="2.0.0", step=1)}
        yield {"type": "MODIFIED", "object": obj("9", phase="Promoted", canaryVersion="2.0.0", step=2)}
        raise AssertionError("read past the end")

    monkeypatch.setattr(watch.Watch, "stream", stream)
    lines: list[str] = []
    done = cluster.wait(FakeApi(), "models", "bc", "2.0.0", 30, lines.append)
    assert done["metadata"]["resourceVersion"] == "9"
    assert [s["resource_version"] for s in streams] == ["5", "7"]
    assert all(s["field_selector"] == "metadata.name=bc" and s["timeout_seconds"] <= 30 for s in streams)
    assert len(lines) == 3 and "Promoted 0.9.0 -> 1.0.0" in lines[0] and "step 1/2" in lines[1]


def test_the_wait_times_out_with_where_the_rollout_stands(monkeypatch):
    from kubernetes import watch

    live = {
        "metadata": {"name": "bc", "namespace": "models", "resourceVersion": "5"},
        "status": {"phase": "Paused", "canaryVersion": "2.0.0", "step": 1, "canaryWeight": 50},
    }

    class FakeApi:
        def get_namespaced_custom_object(self, *a):
            return live

        def list_namespaced_custom_object(self, *a, **kw):
            raise AssertionError("only through the watch")

    monkeypatch.setattr(watch.Watch, "stream", lambda self, fn, *a, **kw: iter(()))
    with pytest.raises(cluster.WaitTimeout, match=r"did not end within 0\.2 s: Paused at step 1, canary 50%"):
        cluster.wait(FakeApi(), "models", "bc", "2.0.0", 0.2, lambda _m: None)


def test_a_comparisons_evidence_in_the_report_metrics_and_failure_line(tmp_path):
    """A 5 %-erroring canary under the comparisons, rolled back at its first analysis: the Markdown row,
    the KFP metrics and the failure line carry the comparison's effect and stable's n beside its
    statistic and boundary (value and threshold)."""
    from serving.rollout import controller as ctl
    from serving.rollout import gates
    from serving.rollout.machine import RolloutSpec
    from serving.rollout.store import FileStateStore
    from tests.unit.test_rollout_controller import CANARY, DEAD_ROUTER, SCRAPE, STABLE

    world = World(error_rate=0.05)
    store = FileStateStore(tmp_path / "state.json")
    rec = ctl.new_record(
        RolloutSpec((10, 100), 10.0, 2, 3), gates.defaults(compare=True), STABLE, CANARY, DEAD_ROUTER, SCRAPE
    )
    ctl.begin(store, rec)
    ctl.Controller(store, router=world, provider=world, clock=world.clock, sleep=world.sleep).run(
        max_seconds=60
    )
    obj = _obj({**status_view(store.load(), {}, 2, 1_000.0), "record": json.dumps({"pending": None})})
    assert obj["status"]["phase"] == "RolledBack"
    (g,) = [g for g in obj["status"]["lastAnalysis"] if g["gate"] == "error_rate_vs_stable"]
    assert g["verdict"] == "fail" and g["effect"] == pytest.approx(0.05) and g["statistic"] >= g["boundary"]
    (row,) = [r for r in handoff.markdown(obj).splitlines() if r.startswith("| error_rate_vs_stable ")]
    assert row.endswith(f"| {g['n']} | {g['baselineN']} | **fail** | {g['effect']:+.4g} |"), row
    (limit,) = [r for r in handoff.markdown(obj).splitlines() if r.startswith("| latency_p99 ")]
    assert limit.endswith("| **pass** |  |"), "an absolute limit has no effect"
    m = handoff.kfp_metrics(obj)
    assert m["error_rate_vs_stable"] == pytest.approx(g["statistic"])
    assert m["error_rate_vs_stable_effect"] == pytest.approx(0.05)
    assert m["error_rate_vs_stable_stable_n"] == g["baselineN"] > 0
    assert "latency_p99_effect" not in m
    line = handoff.failure_line(obj, "2.0.0")
    assert f"error_rate_vs_stable={g['value']:.4g} (threshold <={g['threshold']:.4g}, n={g['n']}, " in line
    assert line.endswith(f"stable n={g['baselineN']}, effect {g['effect']:+.4g})]"), line
