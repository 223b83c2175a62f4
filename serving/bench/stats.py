"""Pure aggregation: per-cell medians and spreads, same-round ratios, targets, the printed table.

A *cell* is one wrk run: one server, one concurrency, one round. Every server is measured once per
concurrency in every round, back to back, so the ratio of two servers is taken **within a round**
(the two runs were seconds apart and saw the same background load) and then summarised over the
rounds as median and min–max.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Cell:
    server: str
    concurrency: int
    round: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    # CPU seconds the server's process tree used during the run, and that divided by wall time
    server_cpu_s: float = float("nan")
    server_cpu_share: float = float("nan")
    # share of the server core that was busy with *other* processes (other helpers, wrk must not be)
    other_load_on_server_core: float = float("nan")

    @property
    def cpu_us_per_request(self) -> float:
        return self.server_cpu_s / self.requests * 1e6 if self.requests else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "cpu_us_per_request": self.cpu_us_per_request}


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        vals = [v for v in values if v == v]  # drop NaN
        if not vals:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(statistics.median(vals), min(vals), max(vals), len(vals))

    @property
    def rel_spread(self) -> float:
        """(max - min) / median: 0.10 means the repeats span 10% of the median."""
        return (self.high - self.low) / self.median if self.median else float("nan")

    def fmt(self, digits: int = 2) -> str:
        if self.n == 0:
            return "n/a"
        if self.n == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} [{self.low:.{digits}f}–{self.high:.{digits}f}]"


@dataclass(frozen=True)
class Summary:
    server: str
    concurrency: int
    rps: Spread
    p50_ms: Spread
    p99_ms: Spread
    cpu_us_per_request: Spread
    server_cpu_share: Spread
    errors: int


def summarize(cells: Sequence[Cell]) -> dict[tuple[str, int], Summary]:
    groups: dict[tuple[str, int], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.server, c.concurrency), []).append(c)
    return {
        key: Summary(
            server=key[0],
            concurrency=key[1],
            rps=Spread.of(c.rps for c in group),
            p50_ms=Spread.of(c.p50_ms for c in group),
            p99_ms=Spread.of(c.p99_ms for c in group),
            cpu_us_per_request=Spread.of(c.cpu_us_per_request for c in group),
            server_cpu_share=Spread.of(c.server_cpu_share for c in group),
            errors=sum(c.errors for c in group),
        )
        for key, group in groups.items()
    }


def same_round_ratio(
    cells: Sequence[Cell], numerator: str, denominator: str, concurrency: int, metric: str = "rps"
) -> Spread:
    """``metric(numerator) / metric(denominator)`` per round, at one concurrency, summarised.

    ``metric`` is a Cell attribute (``rps``, ``p50_ms``, ``cpu_us_per_request`` ...). Rounds where
    either side is missing or the denominator is 0 are skipped.
    """
    by_round: dict[int, dict[str, Cell]] = {}
    for c in cells:
        if c.concurrency == concurrency and c.server in (numerator, denominator):
            by_round.setdefault(c.round, {})[c.server] = c
    ratios = []
    for pair in by_round.values():
        if numerator in pair and denominator in pair:
            den = getattr(pair[denominator], metric)
            if den:
                ratios.append(getattr(pair[numerator], metric) / den)
    return Spread.of(ratios)


@dataclass(frozen=True)
class Target:
    """``numerator`` req/s ÷ ``denominator`` req/s at ``concurrency`` must be >= ``minimum``."""

    label: str
    numerator: str
    denominator: str
    concurrency: int
    minimum: float


@dataclass(frozen=True)
class TargetResult:
    target: Target
    ratio: Spread
    # the same ratio computed from CPU time per request (denominator's / numerator's): less
    # sensitive to other processes stealing the server core than req/s is
    cpu_ratio: Spread

    @property
    def met(self) -> bool | None:
        if self.ratio.n == 0:
            return None
        return self.ratio.median >= self.target.minimum

    @property
    def verdict(self) -> str:
        return {True: "MET", False: "MISSED", None: "NOT MEASURED"}[self.met]


def evaluate(cells: Sequence[Cell], targets: Sequence[Target]) -> list[TargetResult]:
    out = []
    for t in targets:
        ratio = same_round_ratio(cells, t.numerator, t.denominator, t.concurrency)
        # cpu per request is "lower is better", so invert to keep "higher is better"
        cpu = same_round_ratio(cells, t.denominator, t.numerator, t.concurrency, "cpu_us_per_request")
        out.append(TargetResult(t, ratio, cpu))
    return out


def format_table(summaries: dict[tuple[str, int], Summary], servers: Sequence[str], baseline: str) -> str:
    """Fixed-width table: one row per (server, concurrency), medians with [min–max] over rounds.

    ``÷ baseline`` is the req/s ratio of medians; ``CPU ÷`` is baseline CPU µs/request ÷ this
    server's: the throughput ratio both would have with a whole core each (robust to core sharing).
    """
    concs = sorted({c for (_, c) in summaries})
    header = (
        f"{'server':<18} {'conc':>4}  {'req/s median [min–max]':<26} {'÷ ' + baseline:>8} {'CPU ÷':>6}  "
        f"{'p50 ms':>7} {'p99 ms':>7}  {'CPU µs/req':>10} {'srv CPU':>7} {'errors':>6}"
    )
    lines = [header, "-" * len(header)]
    for s in servers:
        for c in concs:
            row = summaries.get((s, c))
            if row is None:
                continue
            base = summaries.get((baseline, c))
            rel = row.rps.median / base.rps.median if base and base.rps.median else float("nan")
            cpu_rel = (
                base.cpu_us_per_request.median / row.cpu_us_per_request.median
                if base and row.cpu_us_per_request.median
                else float("nan")
            )
            lines.append(
                f"{s:<18} {c:>4}  {row.rps.fmt(0):<26} {rel:>8.2f} {cpu_rel:>6.2f}  "
                f"{row.p50_ms.median:>7.2f} {row.p99_ms.median:>7.2f}  "
                f"{row.cpu_us_per_request.median:>10.0f} {row.server_cpu_share.median:>7.0%} {row.errors:>6}"
            )
    return "\n".join(lines)


def format_ratios(cells: Sequence[Cell], servers: Sequence[str], baselines: Sequence[str]) -> str:
    """Every server ÷ each baseline, req/s, per concurrency: median [min–max] of same-round ratios."""
    concs = sorted({c.concurrency for c in cells})
    lines = []
    for base in baselines:
        lines.append(f"req/s ÷ {base} (same-round ratio, median [min–max] over rounds):")
        for s in servers:
            if s == base:
                continue
            parts = [f"c={c}: {same_round_ratio(cells, s, base, c).fmt(2)}" for c in concs]
            lines.append(f"  {s:<18} " + "   ".join(parts))
        lines.append(
            f"  same, from CPU µs/request ({base}'s ÷ this one's; robust to other load on the core):"
        )
        for s in servers:
            if s == base:
                continue
            parts = [
                f"c={c}: {same_round_ratio(cells, base, s, c, 'cpu_us_per_request').fmt(2)}" for c in concs
            ]
            lines.append(f"  {s:<18} " + "   ".join(parts))
    return "\n".join(lines)


def format_targets(results: Sequence[TargetResult]) -> str:
    lines = []
    for r in results:
        t = r.target
        lines.append(
            f"  {r.verdict:<7} {t.label}: {t.numerator} ÷ {t.denominator} req/s at c={t.concurrency} = "
            f"{r.ratio.fmt(2)} (need >= {t.minimum:g}; from CPU µs/request: {r.cpu_ratio.fmt(2)})"
        )
    return "\n".join(lines)


def format_markdown(
    cells: Sequence[Cell], servers: Sequence[str], baseline: str, peer: str | None = None
) -> str:
    """The table as Markdown: req/s median [min–max], same-round ratios to ``baseline`` (req/s and
    CPU), to ``peer`` (req/s), p50/p99 and CPU µs/request per endpoint and concurrency."""
    summaries = summarize(cells)
    concs = sorted({c.concurrency for c in cells})
    head = ["endpoint", "c", "req/s median [min–max]", f"÷ {baseline} (req/s)", f"÷ {baseline} (CPU)"]
    if peer:
        head.append(f"÷ {peer} (req/s)")
    head += ["p50 ms", "p99 ms", "CPU µs/req"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in servers:
        for c in concs:
            row = summaries.get((s, c))
            if row is None:
                continue
            cols = [
                s,
                str(c),
                row.rps.fmt(0),
                same_round_ratio(cells, s, baseline, c).fmt(2) if s != baseline else "1",
                same_round_ratio(cells, baseline, s, c, "cpu_us_per_request").fmt(2)
                if s != baseline
                else "1",
            ]
            if peer:
                cols.append(same_round_ratio(cells, s, peer, c).fmt(2) if s != peer else "1")
            cols += [
                f"{row.p50_ms.median:.2f}",
                f"{row.p99_ms.median:.2f}",
                f"{row.cpu_us_per_request.median:.0f}",
            ]
            lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)
