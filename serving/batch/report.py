"""What a batch run reports: :class:`ScoreSummary` and its Markdown and HTML (score distribution)
renderings for the KFP run page and the command's ``--report``."""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.contract import signals

SCORE_BINS = len(signals.SCORE_BUCKETS)  # the report's bins are the runtime's score buckets (0.05 wide)


@dataclass
class ScoreSummary:
    rows: int
    seconds: float
    output: str
    input_format: str
    output_format: str
    id_column: str
    class_counts: dict[str, int]
    model: str
    # rows per score bin [i/20, (i+1)/20); score = P(positive class) for binary models, else
    # P(predicted class): ``signals.score``, the score the serving runtime histograms
    score_histogram: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"scored {self.rows:,} rows in {self.seconds:.2f} s ({self.rows_per_s:,.0f} rows/s) "
            f"with {self.model} -> {self.output}"
        )


def run_metrics(s: ScoreSummary) -> dict[str, float]:
    """What a KFP step logs as its Metrics: rows, seconds, rows per second, rows per predicted class."""
    out: dict[str, float] = {
        "rows": s.rows,
        "seconds": round(s.seconds, 3),
        "rows_per_second": round(s.rows_per_s, 1),
    }
    out.update({f"predicted_{name}": n for name, n in s.class_counts.items()})
    return out


def write_pages(s: ScoreSummary, markdown_path: str, html_path: str) -> None:
    """The run page's Markdown report and HTML score plot (a KFP step's Markdown and HTML outputs)."""
    with open(markdown_path, "w", encoding="utf-8") as f:
        f.write(summary_markdown(s))
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(summary_html(s))


def summary_markdown(s: ScoreSummary) -> str:
    """A short report for the KFP UI (Markdown artifact): volume, speed, predicted-class shares."""
    lines = [
        f"## Batch scoring: {s.model}",
        "",
        f"- rows scored: **{s.rows:,}** ({s.input_format} -> {s.output_format}, id column `{s.id_column}`)",
        f"- time: {s.seconds:.2f} s ({s.rows_per_s:,.0f} rows/s)",
        "",
        "| predicted class | rows | share |",
        "| --- | ---: | ---: |",
    ]
    for name, n in s.class_counts.items():
        share = n / s.rows if s.rows else 0.0
        lines.append(f"| {name} | {n:,} | {share:.1%} |")
    lines += ["", "| score | rows |", "| --- | ---: |"]
    for i, n in enumerate(s.score_histogram):
        lines.append(f"| {i / SCORE_BINS:.2f}-{(i + 1) / SCORE_BINS:.2f} | {n:,} |")
    return "\n".join(lines) + "\n"


def summary_html(s: ScoreSummary) -> str:
    """The score distribution as a self-contained HTML page (inline SVG, no plotting library):
    the KFP UI renders it on the run page; compare it across runs to spot a shift in the data."""
    width, height, pad = 600, 220, 30
    top = max(s.score_histogram) or 1
    bar_w = (width - 2 * pad) / SCORE_BINS
    bars = []
    for i, n in enumerate(s.score_histogram):
        h = (height - 2 * pad) * n / top
        x, y = pad + i * bar_w, height - pad - h
        lo, hi = i / SCORE_BINS, (i + 1) / SCORE_BINS
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" height="{h:.1f}" fill="#3b78c2">'
            f"<title>score {lo:.2f}-{hi:.2f}: {n:,} rows</title></rect>"
        )
    ticks = "".join(
        f'<text x="{pad + t * (width - 2 * pad):.1f}" y="{height - pad + 16}" font-size="11" '
        f'text-anchor="middle">{t:.2f}</text>'
        for t in (0, 0.25, 0.5, 0.75, 1.0)
    )
    shares = ", ".join(f"{k}: {v:,}" for k, v in s.class_counts.items())
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{s.model} batch scores</title></head>"
        f"<body style='font-family:sans-serif'><h3>Score distribution: {s.model}, {s.rows:,} rows</h3>"
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#555"/>'
        f"{''.join(bars)}{ticks}</svg>"
        f"<p>score = P(positive class) (binary) or P(predicted class); tallest bar {top:,} rows. "
        f"Predicted classes: {shares}.</p></body></html>\n"
    )
