"""The KFP step's hand-off to the operator: the ModelRollout a training run declares, and how it ended.

Pure (no I/O, no clock): :mod:`serving.rollout.cluster` makes the API calls. A training run does not
drive traffic itself: it declares the desired model and the strategy on the release's ModelRollout
(``spec.model``, ``spec.strategy``), the operator (operator.py) runs the state machine, and the step
reads the outcome back from the object's status: each analysis's evidence (gate, value, threshold,
n, verdict) and the history the operator wrote there.

* :func:`spec` builds the spec from the step's parameters. The values are checked by the same
  constructors the CLI and the operator use (``RolloutSpec``, the gates), so nonsense is a ValueError
  before any API call; the API server's CEL rules are the last word.
* :func:`outcome` says when the object shows the end of *this* model's rollout: ``status.canaryVersion``
  is our version (the status may still describe the previous rollout right after the patch, or a live
  one that the operator finishes first), the phase is terminal, and the record's last action is applied
  (persist, then act: the phase is written before the promotion's data-plane work is done).
* :func:`markdown` and :func:`kfp_metrics` render the evidence for the KFP UI.
"""

from __future__ import annotations

import json
import math
from typing import Any

from serving.rollout import crd
from serving.rollout.gates import defaults as default_gates
from serving.rollout.machine import RolloutSpec, parse_steps
from serving.rollout.routers import ROUTERS, choices

PROMOTED = "Promoted"
# the phases after which the operator does nothing more for a version; all but Promoted fail the step.
# "Failed" is not in the CRD's phase enum today: listed so that a phase added for a rollout that
# cannot run ends the wait at once instead of at the timeout.
TERMINAL = ("Promoted", "RolledBack", "Aborted", "Failed")
# the step's gate parameters as spec.strategy.gates fields (the CRD's camelCase of gates.DEFAULTS;
# tests/unit/test_rollout_handoff.py keeps them equal to operator.GATE_FIELDS)
GATE_FIELDS = {
    "min_success_rate": "minSuccessRate",
    "max_p99_ms": "maxP99Ms",
    "max_drift": "maxDrift",
    # the comparisons with stable (compareWithStable): the false-rollback rate and the smallest effects
    "alpha": "alpha",
    "max_error_increase": "maxErrorIncrease",
    "latency_min_effect": "latencyMinEffect",
    "drift_min_effect": "driftMinEffect",
    "accuracy_min_effect": "accuracyMinEffect",
}
# metrics keys the step owns in spec.metrics (the others are set to null, so a merge patch leaves none)
METRICS_KEYS = ("provider", "url", "stableMetricsUrl", "canaryMetricsUrl")


def interval_text(seconds: float) -> str:
    """Seconds as the CRD's duration string: ``60.0`` -> ``60s``, ``1.5`` -> ``1500ms``."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise ValueError(f"interval must be a positive number of seconds, got {seconds!r}")
    ms = round(seconds * 1000)
    if ms < 1:
        raise ValueError(f"interval must be at least 1 ms, got {seconds!r} s")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def spec(
    *,
    fullname: str,
    model_name: str,
    storage_uri: str,
    version: str,
    router: str = "gateway_api",
    steps: str = "10,25,50,100",
    interval_s: float = 60.0,
    threshold: int = RolloutSpec.threshold,
    post_promotion_intervals: int = RolloutSpec.post_promotion_intervals,
    min_success_rate: float | None = None,
    max_p99_ms: float | None = None,
    max_drift: float | None = None,
    compare_with_stable: bool | None = None,
    alpha: float | None = None,
    max_error_increase: float | None = None,
    latency_min_effect: float | None = None,
    drift_min_effect: float | None = None,
    accuracy_min_effect: float | None = None,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``spec`` of the release's ModelRollout for this model (ValueError for a value no rollout takes).

    ``metrics``: ``spec.metrics`` to set (None: leave the object's own, or, on create, none: the
    operator's ``--prometheus-url``). A gate left None keeps the CRD's default. ``compare_with_stable``
    is ``compareWithStable`` (the comparisons with stable instead of the absolute gates); their
    settings are checked whether it is on or not, as the operator does. ``accuracy_min_effect`` 0 is
    "no accuracy comparison", as None (a KFP parameter cannot be None, and the CRD refuses 0)."""
    fit = [n for n, cls in ROUTERS.items() if hasattr(cls, "for_release")]
    if router not in fit:
        raise ValueError(f"router must be {choices(fit)}, got {router!r}")
    if not fullname:
        raise ValueError("release_fullname is required: the release whose ModelRollout the step sets")
    if not model_name:
        raise ValueError("model_name is required (the runtime's `model` metric label)")
    ws = parse_steps(steps)
    rs = RolloutSpec(ws, interval_s, threshold, post_promotion_intervals=post_promotion_intervals)
    if rs.post_promotion_intervals and router != "gateway_api":
        raise ValueError(
            f"the watch after promotion (post_promotion_intervals) needs router gateway_api, got {router!r}: "
            "kserve_knative cannot restore the previous model"
        )
    if ws and ws[-1] != 100:
        raise ValueError(f"the last step must be 100 (the ModelRollout promotes from 100 %), got {list(ws)}")
    if compare_with_stable is not None and not isinstance(compare_with_stable, bool):
        raise ValueError(f"compare_with_stable must be true or false, got {compare_with_stable!r}")
    if accuracy_min_effect == 0 and not isinstance(accuracy_min_effect, bool):
        accuracy_min_effect = None
    given = {
        "min_success_rate": min_success_rate,
        "max_p99_ms": max_p99_ms,
        "max_drift": max_drift,
        "alpha": alpha,
        "max_error_increase": max_error_increase,
        "latency_min_effect": latency_min_effect,
        "drift_min_effect": drift_min_effect,
        "accuracy_min_effect": accuracy_min_effect,
    }
    gates = {k: v for k, v in given.items() if v is not None}
    # the gates' own range checks (ValueError, naming the CLI flag), as the operator will build them
    default_gates(compare=bool(compare_with_stable), **gates)
    fields = {GATE_FIELDS[k]: v for k, v in gates.items()}
    if compare_with_stable is not None:
        fields["compareWithStable"] = compare_with_stable
    out: dict[str, Any] = {
        "target": {"release": {"fullname": fullname}, "inferenceService": None},
        "model": {"name": model_name, "storageUri": storage_uri, "version": version},
        "strategy": {
            "steps": list(rs.steps),
            "interval": interval_text(interval_s),
            "threshold": rs.threshold,
            # always written, so a patch of an existing ModelRollout sets it (0: no watch)
            "postPromotionIntervals": rs.post_promotion_intervals,
            "router": router,
            "gates": fields,
        },
    }
    if metrics is not None:
        out["metrics"] = {k: metrics.get(k) for k in METRICS_KEYS}
    return out


def prometheus(url: str) -> dict[str, Any] | None:
    """``spec.metrics`` for the step's ``prometheus_url`` (empty: None, the object's own setting)."""
    return {"provider": "prometheus", "url": url} if url else None


def _without_nulls(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _without_nulls(v) for k, v in d.items() if v is not None}
    return d


def manifest(name: str, namespace: str, spec_: dict[str, Any]) -> dict[str, Any]:
    """The whole object to create (the nulls that make a merge patch remove a field are dropped)."""
    return {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": _without_nulls(spec_),
    }


def _record(status: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(status.get("record") or "{}")
    except (TypeError, ValueError):
        return {}


def outcome(obj: dict[str, Any] | None, version: str) -> str | None:
    """The terminal phase of ``version``'s rollout on ``obj``, or None while it is not over (or not
    begun: the status may still be the previous rollout's)."""
    st = (obj or {}).get("status") or {}
    if st.get("canaryVersion") != version or st.get("phase") not in TERMINAL:
        return None
    if _record(st).get("pending"):  # decided, not yet applied to the data plane
        return None
    return st["phase"]


def progress(obj: dict[str, Any]) -> tuple:
    """What a progress line shows; a new line when it changes."""
    st = obj.get("status") or {}
    return (
        st.get("phase"),
        st.get("stableVersion"),
        st.get("canaryVersion"),
        st.get("step"),
        st.get("canaryWeight"),
    )


def progress_line(obj: dict[str, Any]) -> str:
    st = obj.get("status") or {}
    meta = obj["metadata"]
    if not st.get("phase"):
        return f"ModelRollout {meta['namespace']}/{meta['name']}: waiting for the operator"
    steps = ((obj.get("spec") or {}).get("strategy") or {}).get("steps") or []
    return (
        f"ModelRollout {meta['namespace']}/{meta['name']}: {st.get('phase')} "
        f"{st.get('stableVersion')} -> {st.get('canaryVersion')}, step {st.get('step')}/{len(steps)}, "
        f"canary {st.get('canaryWeight')}%" + (f": {st['message']}" if st.get("message") else "")
    )


def _num(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cell(v: Any) -> str:
    """A Markdown table cell: no line breaks, no column separators."""
    return " ".join(str(v if v is not None else "").split()).replace("|", "\\|")


def _effect(g: dict[str, Any]) -> str:
    """A comparison's effect (canary minus stable, in the gate's scale), signed; "" for a limit."""
    e = g.get("effect")
    return f"{e:+.4g}" if isinstance(e, int | float) and math.isfinite(e) else ""


def _comparison_evidence(g: dict[str, Any]) -> str:
    """``, stable n=1041, effect +0.0153`` for a comparison with stable (its value and threshold are
    the statistic and the boundary); "" for an absolute limit."""
    if not _effect(g):
        return ""
    return f", stable n={g.get('baselineN')}, effect {_effect(g)}"


def failure_line(obj: dict[str, Any], version: str) -> str:
    """The one line the step fails with on RolledBack, Aborted or Failed."""
    st = obj.get("status") or {}
    meta = obj["metadata"]
    failed = [g for g in st.get("lastAnalysis") or [] if g.get("verdict") == "fail"]
    gates = "; ".join(
        f"{g['gate']}={_num(g.get('value'))} (threshold {g.get('op', '')}{_num(g.get('threshold'))}, "
        f"n={g.get('n')}" + _comparison_evidence(g) + ")"
        for g in failed
    )
    why = " ".join((st.get("message") or "no reason recorded").split())
    return f"canary {version} {st.get('phase')} on ModelRollout {meta['namespace']}/{meta['name']}: {why}" + (
        f" [failed gates: {gates}]" if gates else ""
    )


def timeout_line(obj: dict[str, Any] | None, version: str, timeout_s: float, name: str) -> str:
    st = (obj or {}).get("status") or {}
    where = f"ModelRollout {name}"
    if st.get("canaryVersion") != version:
        now = (
            f"it still shows {st.get('canaryVersion')} ({st.get('phase')})"
            if st.get("phase")
            else "the operator has written no status"
        )
        return (
            f"{where}: the rollout of {version} did not end within {timeout_s:g} s; {now} "
            f"(is the operator running, and is {version} not already the stable version?)"
            + (f" last message: {' '.join(st['message'].split())}" if st.get("message") else "")
        )
    return (
        f"{where}: the rollout of {version} did not end within {timeout_s:g} s: {st.get('phase')} at "
        f"step {st.get('step')}, canary {st.get('canaryWeight')}% (the operator carries on; "
        f"`kubectl get modelrollouts` follows it)"
    )


def evidence(obj: dict[str, Any]) -> dict[str, Any]:
    """The rollout's outcome and evidence, as the status holds it (the KFP outputs' one source)."""
    st = obj.get("status") or {}
    steps = ((obj.get("spec") or {}).get("strategy") or {}).get("steps") or []
    return {
        "name": obj["metadata"]["name"],
        "namespace": obj["metadata"]["namespace"],
        "phase": st.get("phase"),
        "message": st.get("message", ""),
        "stable_version": st.get("stableVersion"),
        "canary_version": st.get("canaryVersion"),
        "step": st.get("step"),
        "steps": len(steps),
        "canary_weight": st.get("canaryWeight"),
        "last_analysis_time": st.get("lastAnalysisTime"),
        "last_analysis": list(st.get("lastAnalysis") or []),
        "history": list(st.get("history") or []),
    }


def markdown(obj: dict[str, Any]) -> str:
    """The KFP Markdown report: outcome, the last analysis per gate, and every decision in the history."""
    e = evidence(obj)
    lines = [
        f"# Rollout of {e['canary_version']}: {e['phase']}",
        "",
        f"ModelRollout `{e['namespace']}/{e['name']}`: stable {e['stable_version']} -> canary "
        f"{e['canary_version']}, step {e['step']}/{e['steps']}, canary weight {e['canary_weight']} %.",
        "",
        f"> {_cell(e['message'])}",
        "",
        f"## Last analysis ({e['last_analysis_time'] or 'none'})",
        "",
    ]
    if e["last_analysis"]:
        # a comparison with stable: value and threshold are its statistic and decision boundary at this
        # look, the effect its size (canary minus stable); an absolute limit has no effect
        lines += [
            "| gate | value | threshold | n | stable n | verdict | effect |",
            "|---|---|---|---|---|---|---|",
        ]
        for g in e["last_analysis"]:
            unit = f" {g['unit']}" if g.get("unit") else ""
            lines.append(
                f"| {_cell(g['gate'])} | {_num(g.get('value'))}{unit} | {_cell(g.get('op', ''))} "
                f"{_num(g.get('threshold'))}{unit} | {g.get('n', 0)} | {_num(g.get('baselineN'))} "
                f"| **{_cell(g['verdict'])}** | {_effect(g)} |"
            )
    else:
        lines.append("No analysis was made.")
    lines += ["", f"## History ({len(e['history'])} decisions)", ""]
    if e["history"]:
        lines += [
            "| time | event | step | weight | action | verdict | phase | reason |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for h in e["history"]:
            lines.append(
                "| "
                + " | ".join(
                    _cell(h.get(k))
                    for k in ("time", "event", "step", "weight", "action", "verdict", "phase", "reason")
                )
                + " |"
            )
    return "\n".join(lines) + "\n"


def kfp_metrics(obj: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics for the KFP UI: the outcome, the final weight and step, analyses by verdict (in
    the history the status keeps), each gate's last value and sample count, and for a comparison with
    stable its effect and stable's sample count."""
    e = evidence(obj)
    out: dict[str, float] = {
        "promoted": 1.0 if e["phase"] == PROMOTED else 0.0,
        "canary_weight": float(e["canary_weight"] or 0),
        "step": float(e["step"] or 0),
    }
    for verdict in ("pass", "fail", "inconclusive"):
        out[f"analyses_{verdict}"] = float(sum(1 for h in e["history"] if h.get("verdict") == verdict))
    for g in e["last_analysis"]:
        if isinstance(g.get("value"), int | float) and math.isfinite(g["value"]):
            out[f"{g['gate']}"] = float(g["value"])
        out[f"{g['gate']}_n"] = float(g.get("n") or 0)
        if _effect(g):  # a comparison with stable: its effect and stable's n beside its statistic
            out[f"{g['gate']}_effect"] = float(g["effect"])
            out[f"{g['gate']}_stable_n"] = float(g.get("baselineN") or 0)
    return out
