"""The end-of-rollout report: a text summary and a PNG timeline (a verdict strip, the weights, and one panel
per gate that ran: success rate, p99, drift, accuracy; a comparison with stable shows its statistic against
its decision boundary at every analysis, with the effect and n on each side written beside the points)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from serving.rollout.gates import GateResult
from serving.rollout.machine import decision_line
from serving.rollout.record import RolloutRecord


def _gate_cfg(record: RolloutRecord) -> dict[str, dict[str, Any]]:
    out = {}
    for g, cfg in zip(record.gate_objects(), record.gates, strict=True):
        out[g.name] = cfg
    return out


def _thresholds(record: RolloutRecord) -> dict[str, float]:
    return {g.name: float(g.threshold) for g in record.gate_objects()}


def text_report(record: RolloutRecord, traffic: Any = None) -> str:
    st, spec = record.state, record.spec
    t0 = st["history"][0]["t"] if st and st.get("history") else record.created_at
    lines = [
        f"Rollout of {record.canary['model']}: {record.stable['version']} (stable) -> "
        f"{record.canary['version']} (canary)",
        f"  router {record.router['router']}, metrics {record.metrics['provider']}, "
        f"steps {'shadow step, then ' if spec.get('shadow') else ''}{spec['steps']}, "
        f"interval {spec['interval_s']:g}s, rollback after {spec['threshold']} failed checks, "
        f"pause after {spec['max_inconclusive']} inconclusive",
        "  gates: "
        + "; ".join(
            f"{name} ({', '.join(f'{k}={v}' for k, v in cfg.items() if k not in ('kind', 'name'))})"
            for name, cfg in _gate_cfg(record).items()
        ),
        f"  outcome: {st['phase']} after {st['analyses']} analyses ({st['failed_checks']} failed): "
        f"{st['reason']}",
        "",
        f"  {'t(s)':>6} {'weight':>6} {'obs.share':>9} {'verdict':>12}  {'action':<10} gates",
    ]
    for p in record.timeline:
        req = p.get("requests") or {}
        tot = req.get("stable", 0) + req.get("canary", 0)
        share = f"{100 * req.get('canary', 0) / tot:8.1f}%" if tot else "      n/a"
        if p.get("mirrored"):  # the shadow step: the users' share is 0; the canary answered copies
            share = " mirrored"
        gates = ", ".join(f"{k}={'n/a' if v is None else f'{v:.4g}'}" for k, v in p["gates"].items())
        lines.append(
            f"  {p['t'] - t0:6.1f} {p['weight']:5d}% {share} {p['verdict'] or '':>12}  "
            f"{p['action']:<10} {gates}"
        )
    lines.append("")
    lines.append("  decisions:")
    for h in (st or {}).get("history", []):
        lines.append(
            f"    +{h['t'] - t0:6.1f}s {h['event']:<8} weight {h['weight']:3d}%  "
            f"{decision_line(h['action'], h['reason'])}"
        )
    last = next((h for h in reversed((st or {}).get("history", [])) if h.get("evidence")), None)
    if last is not None:
        # every gate of the deciding analysis with its evidence: value, boundary, n on each side, and
        # for a comparison with stable the effect size and its sequential test
        lines += ["", f"  evidence of the last analysis (+{last['t'] - t0:.1f}s):"]
        lines += [f"    {GateResult.from_dict(g).summary()}" for g in last["evidence"]]
    if traffic is not None and traffic.total:
        fails = traffic.failures()
        proxy = traffic.proxy_failures()
        lines += [
            "",
            f"  client traffic: {traffic.total} requests, {len(fails)} failed "
            f"({len(proxy)} without a model answer, i.e. proxy/network; "
            f"{len(traffic.model_failures(record.canary['version']))} from the canary, "
            f"{len(traffic.model_failures(record.stable['version']))} from stable)",
            "  answers by version: "
            + ", ".join(f"{v or '?'}={n}" for v, n in sorted(traffic.by_version().items())),
            "  canary share of client answers per weight set (answers from a model, errors included): "
            + ", ".join(
                f"{w}%{' after promote' if what == 'promote' else ''} -> {share:.1f}% (n={n})"
                for _, w, share, n, what in client_shares(record, traffic)
            ),
        ]
    return "\n".join(lines) + "\n"


def client_shares(
    record: RolloutRecord, traffic: Any, guard_s: float = 0.3
) -> list[tuple[float, int, float, int, str]]:
    """Per weight the router was told: (t_mid, weight, canary share of client answers, n, action), from
    the ``x-model-version`` header of every answer a model gave, errors included (a canary answering
    500 still got its share of the traffic; leaving those out made a 10 % weight read as 6.8 %).
    Answers without the header (proxy or network failures) are left out: no model was reached."""
    hist = [
        h for h in record.state.get("history", []) if h["action"] in ("set_weight", "promote", "rollback")
    ]
    out = []
    canary = record.canary["version"]
    for h, nxt in zip(hist, [*hist[1:], None], strict=True):
        t0 = h["t"] + guard_s
        t1 = nxt["t"] if nxt else max((a.t for a in traffic.answers), default=t0)
        answered = [a for a in traffic.answers if t0 <= a.t < t1 and a.version]
        if answered:
            share = sum(a.version == canary for a in answered) / len(answered)
            out.append(((t0 + t1) / 2, h["weight"], 100 * share, len(answered), h["action"]))
    return out


# how each analysis point of a gate is drawn, by that gate's verdict; an analysis with no value (too few
# samples) still gets a mark, at the bottom edge of its panel, so no analysis is invisible
VERDICT_STYLE = {
    "pass": ("o", "tab:green", "pass"),
    "fail": ("X", "tab:red", "fail"),
    "inconclusive": ("v", "tab:gray", "inconclusive (no value: too few samples), at the panel's edge"),
}
# y-axis label and scale per gate kind: every axis says its unit; latency is on a log scale so a few-ms
# p99 and a threshold of hundreds of ms are both readable
_AXES = {
    "SuccessRateGate": ("fraction", "linear", "share of canary requests answered without error"),
    "LatencyGate": ("ms (log scale)", "log", "p99 latency of canary requests"),
    "DriftGate": ("{method} distance", "linear", "prediction drift canary vs stable (0 = same)"),
    "AccuracyGate": (
        "fraction",
        "linear",
        "accuracy on labelled feedback; threshold: stable's minus the drop",
    ),
}
# a comparison with stable (gates.sequential_verdict): its statistic on a z scale (the error gate's: the
# canary's count of all errors, gates.ErrorRateVsStable), FAIL where it passes the boundary, which moves
# with n on each side; the y label says which statistic
_COMPARISON_AXES = {
    "ErrorRateVsStable": ("canary errors", "server errors, exact count test (boundary: the most that pass)"),
    "AccuracyVsStable": ("z, wrong shares", "wrong-answer share on labelled feedback"),
    "LatencyVsStable": ("z, Mann-Whitney", "latency histograms (effect: P(canary slower) - 1/2)"),
    "DriftTest": ("sqrt(chi2)", "score histograms (effect: Cohen's w)"),
}
_MAX_EFFECT_LABELS = 8  # more analyses than this: label the first, the failures and the last only
_REASON_CHARS = 34  # the verdict strip's labels are rotated text: keep each to what fits its height


def _is_value(v: Any) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def analyses(record: RolloutRecord) -> list[dict[str, Any]]:
    """Every analysis of the rollout: its time, decision, overall verdict, a short reason, and per gate
    (value, verdict, detail). The details (why a gate was inconclusive) come from the decision history."""
    evidence = {
        h["t"]: {e["gate"]: e for e in h.get("evidence", [])} for h in (record.state or {}).get("history", [])
    }
    out = []
    for p in record.timeline:
        ev = evidence.get(p["t"], {})
        gates = {
            k: (
                v if _is_value(v) else None,
                p.get("verdicts", {}).get(k, "pass"),
                ev.get(k, {}).get("detail", ""),
                ev.get(k, {}).get("threshold"),  # comparative gates move theirs with the stable side
            )
            for k, v in p["gates"].items()
        }
        out.append(
            {"t": p["t"], "action": p["action"], "verdict": p["verdict"] or "inconclusive", "gates": gates}
        )
    for a in out:
        a["reason"] = short_reason(a)
    return out


def comparison_evidence(record: RolloutRecord, gate: str) -> list[dict[str, Any]]:
    """Per analysis of a comparison with stable: the time, verdict, statistic, boundary (None while
    there is no information), effect, and n on each side, from the decision history's evidence."""
    out = []
    for h in (record.state or {}).get("history", []):
        for e in h.get("evidence", []):
            if e.get("gate") == gate and e.get("sequential"):
                out.append(
                    {
                        "t": h["t"],
                        "verdict": e["verdict"],
                        "statistic": e.get("statistic"),
                        "boundary": e.get("boundary"),
                        "effect": e.get("effect"),
                        "n": e.get("samples"),
                        "m": e.get("baseline_samples"),
                    }
                )
    return out


def effect_label(e: dict[str, Any]) -> str:
    """``effect +0.0104`` and ``n 1732 vs 1673`` (canary vs stable) on two lines, and for a FAIL the
    statistic against its boundary: what a comparison's point is written with. Four decimals: the effects
    are shares or differences of shares, and a float-noise 1e-15 reads as the 0 it is."""
    effect = "effect n/a" if e["effect"] is None else f"effect {round(e['effect'], 4) + 0.0:+.4f}"
    text = f"{effect}\nn {e['n']} vs {e['m']}"
    if e["verdict"] == "fail" and e["statistic"] is not None and e["boundary"] is not None:
        text += f"\n{e['statistic']:.3f} >= {e['boundary']:.3f}"
    return text


def short_reason(analysis: dict[str, Any]) -> str:
    """``fail: accuracy, drift_js`` / ``inconclusive: drift_js (fewer than 400 ...)`` / ``pass``."""
    verdict = analysis["verdict"]
    named = [(k, g[2]) for k, g in analysis["gates"].items() if g[1] == verdict]
    if verdict == "pass" or not named:
        return verdict
    gates = ", ".join(k for k, _ in named) if len(named) <= 2 else f"{len(named)} gates"
    text = f"{verdict}: {gates}"
    detail = next((d for _, d in named if d), "")
    if detail and verdict == "inconclusive":
        text += f" ({detail})"
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def failure_order(record: RolloutRecord) -> list[tuple[float, str]]:
    """(seconds since start, gate) for each gate that failed, at its first failure, in that order: the
    story of a rollback ("accuracy at 3 s, then drift_js at 6 s") rather than only its last reason."""
    t0, seen, out = _t0(record), set(), []
    for a in analyses(record):
        for k, g in a["gates"].items():
            if g[1] == "fail" and k not in seen:
                seen.add(k)
                out.append((a["t"] - t0, k))
    return out


def describe_failures(record: RolloutRecord) -> str:
    """``accuracy at 3.0 s, then drift_js at 6.0 s``, or ``no gate failed``."""
    order = failure_order(record)
    if not order:
        return "no gate failed"
    by_time: dict[float, list[str]] = {}
    for t, gate in order:  # gates that first failed in the same analysis are named together
        by_time.setdefault(t, []).append(gate)
    return ", then ".join(f"{' and '.join(gates)} at {t:.1f} s" for t, gates in by_time.items())


def _t0(record: RolloutRecord) -> float:
    hist = (record.state or {}).get("history", [])
    return hist[0]["t"] if hist else record.created_at


def _axis(cfg: dict[str, Any]) -> tuple[str, str, str]:
    """(y label with the unit, y scale, what the panel shows) for a gate's config."""
    label, scale, about = _AXES.get(cfg.get("kind", ""), ("value", "linear", ""))
    return label.format(method=str(cfg.get("method", "")).upper() or "drift"), scale, about


def _plot_weights(ax, record: RolloutRecord, t0: float, traffic: Any) -> None:
    hist = record.state.get("history", [])
    ts, ws = [], []
    for h in hist:  # a step line from the decision history (what the router was told)
        if ts:
            ts.append(h["t"] - t0)
            ws.append(ws[-1])
        ts.append(h["t"] - t0)
        ws.append(h["weight"])
    end = (
        max([ts[-1] if ts else 0] + [p["t"] - t0 for p in record.timeline]) + record.spec["interval_s"] * 0.3
    )
    if ts:
        ts.append(end)
        ws.append(ws[-1])
    ax.plot(ts, ws, color="tab:blue", label="canary weight (set)")
    obs = []
    for p in record.timeline:
        req = p.get("requests") or {}
        tot = req.get("stable", 0) + req.get("canary", 0)
        if tot and not p.get("mirrored"):  # mirrored copies are no share of the users' traffic
            obs.append((p["t"] - t0, 100 * req["canary"] / tot))
    if obs:
        ax.plot(*zip(*obs, strict=True), "o", color="tab:orange", label="canary share in the analysis window")
    if traffic is not None and traffic.total:
        cs = client_shares(record, traffic)
        ax.plot(
            [c[0] - t0 for c in cs],
            [c[2] for c in cs],
            "x",
            color="tab:purple",
            ms=9,
            label="canary share of client answers (x-model-version)",
        )
    ax.set_ylabel("canary traffic (%)")
    ax.set_ylim(-5, 105)
    ax.legend(loc="upper left", fontsize=7)


def _plot_strip(ax, items: list[dict[str, Any]], t0: float) -> None:
    """One mark per analysis, coloured by its verdict, with the verdict and its reason written above."""
    for a in items:
        marker, color, _ = VERDICT_STYLE[a["verdict"]]
        ax.plot(a["t"] - t0, 0, marker, color=color, ms=10)
        ax.annotate(a["reason"], (a["t"] - t0, 0.25), rotation=90, fontsize=6.5, ha="center", va="bottom")
    ax.set_ylim(-0.5, 4)
    ax.set_yticks([])
    ax.set_ylabel("analyses")


def _plot_gate(ax, name: str, cfg: dict[str, Any], items, t0: float, threshold: float | None) -> None:
    label, scale, about = _axis(cfg)
    ax.set_yscale(scale)
    if scale == "log":  # plain numbers (20, 50, 200), not 2x10^1
        from matplotlib.ticker import FuncFormatter

        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
    pts = [(a["t"] - t0, *a["gates"][name]) for a in items if name in a["gates"]]
    valued = [(x, y, v) for x, y, v, _, _ in pts if y is not None]
    ax.plot([x for x, _, _ in valued], [y for _, y, _ in valued], "-", color="0.7")
    for verdict, (marker, color, _) in VERDICT_STYLE.items():
        mine = [(x, y) for x, y, v in valued if v == verdict]
        if mine:
            ax.plot(*zip(*mine, strict=True), marker, color=color, ms=8)
    empty = [x for x, y, *_ in pts if y is None]
    # no value to plot: a mark at the bottom edge (x in data, y in axes fraction)
    ax.plot(empty, [0.04] * len(empty), "v", color="tab:gray", ms=8, transform=ax.get_xaxis_transform())
    _plot_threshold(ax, [(x, thr) for x, *_, thr in pts if thr is not None], threshold)
    ax.set_ylabel(label, fontsize=8)
    ax.set_title(f"{name}: {about}" if about else name, fontsize=8, loc="left")


def _plot_comparison(ax, name: str, cfg: dict[str, Any], record: RolloutRecord, t0: float) -> None:
    """A comparison with stable: its statistic at every analysis (marked by verdict) against the decision
    boundary at that analysis (which moves with n on each side), each point labelled with its effect
    and n canary vs stable."""
    label, about = _COMPARISON_AXES[cfg["kind"]]
    ev = comparison_evidence(record, name)
    valued = [e for e in ev if e["statistic"] is not None]
    ax.plot([e["t"] - t0 for e in valued], [e["statistic"] for e in valued], "-", color="0.7")
    for verdict, (marker, color, _) in VERDICT_STYLE.items():
        mine = [(e["t"] - t0, e["statistic"]) for e in valued if e["verdict"] == verdict]
        if mine:
            ax.plot(*zip(*mine, strict=True), marker, color=color, ms=8)
    empty = [e["t"] - t0 for e in ev if e["statistic"] is None]
    ax.plot(empty, [0.04] * len(empty), "v", color="tab:gray", ms=8, transform=ax.get_xaxis_transform())
    bounded = [(e["t"] - t0, e["boundary"]) for e in ev if e["boundary"] is not None]
    if bounded:  # no boundary while neither side has a failure (no information): nothing to draw there
        ax.plot(*zip(*bounded, strict=True), ls="--", color="tab:red", lw=1, drawstyle="steps-post")
        ax.annotate(  # at the left edge: the points (and their labels) start one interval later
            f"boundary {bounded[-1][1]:.4g}",
            (0.005, bounded[-1][1]),
            xycoords=("axes fraction", "data"),
            ha="left",
            va="bottom",
            fontsize=7,
            color="tab:red",
        )
    labelled = valued
    if len(valued) > _MAX_EFFECT_LABELS:
        keep = {0, len(valued) - 1} | {i for i, e in enumerate(valued) if e["verdict"] == "fail"}
        labelled = [e for i, e in enumerate(valued) if i in keep]
    for e in labelled:
        ax.annotate(
            effect_label(e),
            (e["t"] - t0, e["statistic"]),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=6.5,
            color="tab:red" if e["verdict"] == "fail" else "0.25",
        )
    tops = [e["statistic"] for e in valued] + [b for _, b in bounded]
    if tops:  # room above the highest point for its label
        lo = min(0.0, *tops)
        ax.set_ylim(lo - 0.1 * (max(tops) - lo or 1), max(tops) + 0.45 * (max(tops) - lo or 1))
    ax.set_ylabel(label, fontsize=8)
    alpha = cfg.get("alpha")
    ax.set_title(
        f"{name}: canary vs stable, {about}; FAIL at the boundary"
        + (f" (alpha {alpha:.3g})" if alpha is not None else ""),
        fontsize=8,
        loc="left",
    )


def _plot_threshold(ax, per_analysis: list[tuple[float, float]], fixed: float | None) -> None:
    """The threshold each analysis was judged against (a comparative gate's moves with stable), else the
    gate's configured one."""
    if per_analysis:
        xs, ys = zip(*per_analysis, strict=True)
        if len(set(ys)) == 1:
            ax.axhline(ys[0], color="tab:red", ls="--", lw=1)
        else:
            ax.plot(xs, ys, ls="--", color="tab:red", lw=1, drawstyle="steps-post")
        last = ys[-1]
    elif fixed is not None:
        ax.axhline(fixed, color="tab:red", ls="--", lw=1)
        last = fixed
    else:
        return
    ax.annotate(
        f"threshold {last:.4g}",
        (1, last),
        xycoords=("axes fraction", "data"),
        ha="right",
        va="bottom",
        fontsize=7,
        color="tab:red",
    )


def _mark_decisions(axes, record: RolloutRecord, t0: float) -> None:
    for h in record.state.get("history", []):
        if h["action"] in ("promote", "rollback"):
            color = "black" if h["action"] == "promote" else "tab:red"
            for ax in axes:
                ax.axvline(h["t"] - t0, color=color, lw=1)
            axes[1].annotate(h["action"], (h["t"] - t0, 50), rotation=90, fontsize=8, va="center")


def _legend(fig) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], ls="", marker=m, color=c, ms=8, label=text) for m, c, text in VERDICT_STYLE.values()
    ]
    handles += [
        Line2D([], [], color="tab:red", ls="--", lw=1, label="gate threshold / a comparison's boundary"),
        Line2D([], [], color="black", lw=1, label="promote"),
        Line2D([], [], color="tab:red", lw=1, label="rollback"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=7)


def panel_names(record: RolloutRecord) -> list[str]:
    """The PNG's panels top to bottom: the verdict strip, the weights, then every gate that ran."""
    return ["analyses", "canary weight", *_gate_cfg(record)]


def plot_timeline(
    record: RolloutRecord, path: str | os.PathLike, title: str | None = None, traffic: Any = None
) -> Path:
    """A verdict strip (every analysis, its verdict and reason), the canary weight, then one panel per
    gate that ran, sharing the time axis."""
    import matplotlib.pyplot as plt

    fig = timeline_figure(record, title, traffic)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def timeline_figure(record: RolloutRecord, title: str | None = None, traffic: Any = None):
    """The timeline as a matplotlib Figure (its axes in :func:`panel_names` order); the caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0, items, cfgs = _t0(record), analyses(record), _gate_cfg(record)
    thresholds = _thresholds(record)
    ratios = [2.2, 2.0] + [1.3] * (len(panel_names(record)) - 2)
    fig, axes = plt.subplots(
        len(ratios),
        1,
        figsize=(9, 1.3 * sum(ratios) + 1),
        sharex=True,
        layout="constrained",
        gridspec_kw={"height_ratios": ratios},
    )
    _plot_strip(axes[0], items, t0)
    _plot_weights(axes[1], record, t0, traffic)
    for ax, (name, cfg) in zip(axes[2:], cfgs.items(), strict=True):
        if cfg.get("kind") in _COMPARISON_AXES:
            _plot_comparison(ax, name, cfg, record, t0)
        else:
            _plot_gate(ax, name, cfg, items, t0, thresholds.get(name))
    _mark_decisions(axes, record, t0)
    _legend(fig)
    axes[-1].set_xlabel("time since rollout start (s)")
    st = record.state
    fig.suptitle(
        title
        or f"{record.canary['model']} {record.stable['version']} -> {record.canary['version']}: {st['phase']}"
    )
    return fig


def write_report(
    record: RolloutRecord,
    out_dir: str | os.PathLike,
    stem: str = "rollout",
    traffic: Any = None,
    title: str | None = None,
) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    txt = out / f"{stem}-report.txt"
    txt.write_text(text_report(record, traffic))
    png = plot_timeline(record, out / f"{stem}-timeline.png", title, traffic=traffic)
    return txt, png
