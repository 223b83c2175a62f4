"""The end-of-rollout report: a text summary and a PNG timeline (weights, success rate, p99, drift)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from serving.rollout.gates import GateResult
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
        f"steps {spec['steps']}, "
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
        gates = ", ".join(f"{k}={'n/a' if v is None else f'{v:.4g}'}" for k, v in p["gates"].items())
        lines.append(
            f"  {p['t'] - t0:6.1f} {p['weight']:5d}% {share} {p['verdict'] or '':>12}  "
            f"{p['action']:<10} {gates}"
        )
    lines.append("")
    lines.append("  decisions:")
    for h in (st or {}).get("history", []):
        lines.append(
            f"    +{h['t'] - t0:6.1f}s {h['event']:<8} {h['action']:<10} weight {h['weight']:3d}%  "
            f"{h['reason']}"
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
            "  canary share of client answers per weight: "
            + ", ".join(f"{w}% -> {share:.1f}% (n={n})" for _, w, share, n in client_shares(record, traffic)),
        ]
    return "\n".join(lines) + "\n"


def client_shares(
    record: RolloutRecord, traffic: Any, guard_s: float = 0.3
) -> list[tuple[float, int, float, int]]:
    """Per weight the router was told: (t_mid, weight, canary share of client answers, n), from the
    ``x-model-version`` header of every answer the traffic generator received."""
    hist = [
        h for h in record.state.get("history", []) if h["action"] in ("set_weight", "promote", "rollback")
    ]
    out = []
    canary = record.canary["version"]
    for h, nxt in zip(hist, [*hist[1:], None], strict=True):
        t0 = h["t"] + guard_s
        t1 = nxt["t"] if nxt else max((a.t for a in traffic.answers), default=t0)
        ok = [a for a in traffic.answers if t0 <= a.t < t1 and a.status == 200]
        if ok:
            share = sum(a.version == canary for a in ok) / len(ok)
            out.append(((t0 + t1) / 2, h["weight"], 100 * share, len(ok)))
    return out


# how each analysis point of a gate is drawn, by that gate's verdict
VERDICT_STYLE = (("pass", "o", "tab:green"), ("inconclusive", "o", "tab:gray"), ("fail", "X", "tab:red"))


def plot_timeline(
    record: RolloutRecord, path: str | os.PathLike, title: str | None = None, traffic: Any = None
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = record.state
    hist = st.get("history", [])
    t0 = hist[0]["t"] if hist else record.created_at
    tl = record.timeline
    thresholds = _thresholds(record)

    fig, axes = plt.subplots(4, 1, figsize=(9, 9), sharex=True, constrained_layout=True)
    # weights: a step line from the decision history (what the router was told)
    ts, ws = [], []
    for h in hist:
        if ts:
            ts.append(h["t"] - t0)
            ws.append(ws[-1])
        ts.append(h["t"] - t0)
        ws.append(h["weight"])
    end = max([ts[-1] if ts else 0] + [p["t"] - t0 for p in tl]) + record.spec["interval_s"] * 0.3
    if ts:
        ts.append(end)
        ws.append(ws[-1])
    ax = axes[0]
    ax.plot(ts, ws, drawstyle="default", color="tab:blue", label="canary weight (set)")
    obs_t, obs = [], []
    for p in tl:
        req = p.get("requests") or {}
        tot = req.get("stable", 0) + req.get("canary", 0)
        if tot:
            obs_t.append(p["t"] - t0)
            obs.append(100 * req["canary"] / tot)
    ax.plot(obs_t, obs, "o", color="tab:orange", label="canary share, analysis window (server counters)")
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
    ax.set_ylabel("canary %")
    ax.set_ylim(-5, 105)
    ax.legend(loc="upper left", fontsize=8)

    def series(gate_prefix: str, scale: float = 1.0):
        xs, ys, failed, name = [], [], [], None
        for p in tl:
            for k, v in p["gates"].items():
                if k.startswith(gate_prefix):
                    name = k
                    if v is not None and not (isinstance(v, float) and math.isnan(v)):
                        xs.append(p["t"] - t0)
                        ys.append(v * scale)
                        failed.append(p.get("verdicts", {}).get(k, "pass"))
        return xs, ys, failed, name

    for ax, prefix, label in (
        (axes[1], "success_rate", "success rate"),
        (axes[2], "latency_p99", "p99 latency (ms)"),
        (axes[3], "drift", "drift"),
    ):
        xs, ys, verdicts, name = series(prefix)
        ax.plot(xs, ys, "-", color="tab:gray", lw=1)
        for verdict, marker, color in VERDICT_STYLE:
            pts = [(x, y) for x, y, v in zip(xs, ys, verdicts, strict=True) if v == verdict]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker, color=color, ms=8, label=verdict)
        thr = thresholds.get(name or "")
        if thr is not None:
            ax.axhline(thr, color="tab:red", ls="--", lw=1, label=f"threshold {thr:g}")
            ax.legend(loc="upper left", fontsize=8)
        ax.set_ylabel(label if name is None else name.replace("_", " "))
        if not xs:
            ax.text(0.5, 0.5, "no conclusive sample", transform=ax.transAxes, ha="center", color="gray")
    for h in hist:
        if h["action"] in ("promote", "rollback"):
            for ax in axes:
                ax.axvline(h["t"] - t0, color="black" if h["action"] == "promote" else "tab:red", lw=1)
            axes[0].annotate(h["action"], (h["t"] - t0, 50), rotation=90, fontsize=8, va="center")
    axes[-1].set_xlabel("seconds since rollout start")
    fig.suptitle(
        title
        or f"{record.canary['model']} {record.stable['version']} -> {record.canary['version']}: {st['phase']}"
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


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
