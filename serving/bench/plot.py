"""Bar chart of the benchmark (matplotlib, Agg): req/s and p99 per endpoint and concurrency."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from serving.bench.stats import Summary


def bar_chart(summaries: dict[tuple[str, int], Summary], endpoints: Sequence[str], path: Path) -> Path:
    concs = sorted({c for (_, c) in summaries})
    fig, (ax_rps, ax_p99, ax_cpu) = plt.subplots(1, 3, figsize=(18, 4.8))
    width = 0.8 / max(1, len(endpoints))
    for i, ep in enumerate(endpoints):
        xs, rps, lo, hi, p99, cpu = [], [], [], [], [], []
        for j, c in enumerate(concs):
            s = summaries.get((ep, c))
            if s is None:
                continue
            xs.append(j + (i - (len(endpoints) - 1) / 2) * width)
            rps.append(s.rps.median)
            lo.append(s.rps.median - s.rps.low)
            hi.append(s.rps.high - s.rps.median)
            p99.append(s.p99_ms.median)
            cpu.append(s.cpu_us_per_request.median)
        ax_rps.bar(xs, rps, width, yerr=[lo, hi], capsize=2, label=ep)
        ax_p99.bar(xs, p99, width, label=ep)
        ax_cpu.bar(xs, cpu, width, label=ep)
    titles = (
        (ax_rps, "req/s (median, min–max over rounds)"),
        (ax_p99, "p99 latency, ms (log)"),
        (ax_cpu, "server CPU µs per request (log; lower is better)"),
    )
    for ax, title in titles:
        ax.set_xticks(range(len(concs)), [f"c={c}" for c in concs])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    ax_p99.set_yscale("log")
    ax_cpu.set_yscale("log")
    ax_rps.legend(fontsize=8)
    fig.suptitle("mlrollout serving benchmark: 1 server core, wrk on another core, same model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
