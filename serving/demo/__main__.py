"""``make demo``: the whole loop on one machine, no cluster.

1. train model versions 1.0.0 and 1.1.0 with the KFP training pipeline run locally (kfp.local), each
   packaged as ``<name>/1/model.onnx`` + ``model-card.json``; 1.1.0 is gated against 1.0.0's card;
2. serve 1.0.0 with the project's KServe runtime and send a few V1 and V2 protocol predictions;
3. roll 1.1.0 out 10→25→50→100 behind HAProxy under generated traffic, Prometheus feeding the gates,
   then roll out a deliberately bad canary 1.1.1 and watch it rolled back.

Everything lands in ``demo_outputs/`` (git-ignored): models and their evaluation reports, rollout reports,
PNG timelines and state files; the last lines printed say where each is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / "demo_outputs"


def banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def train(out: Path, version: str, extra: list[str]) -> tuple[Path, Path | None]:
    """Train and package ``version``; returns (package folder, its evaluation report as ``.html``)."""
    from pipelines.cli import main as pipelines_main
    from serving.contract import modelcard

    dest = out / "models" / f"v{version}"
    before = set(_evaluation_reports(out))
    # --force: demo_outputs/ is the demo's own; every demo run retrains the same versions
    argv = [
        "run",
        "--output",
        str(dest),
        "--version",
        version,
        "--pipeline-root",
        str(out / "kfp"),
        "--force",
    ]
    argv += extra
    print(f"$ python -m pipelines {' '.join(argv)}", flush=True)
    rc = pipelines_main(argv)
    if rc != 0:
        raise SystemExit(f"demo: training {version} failed (exit {rc}); see the error above")
    return modelcard.find_package(dest), _keep_report(out, version, before)


def _evaluation_reports(out: Path) -> list[Path]:
    # kfp.local names an output artifact's file after the output ("report"), without an extension
    return sorted((out / "kfp").glob("*/evaluate/report"))


def _keep_report(out: Path, version: str, before: set[Path]) -> Path | None:
    """Copy this run's evaluate report (HTML: metrics, confusion matrix, ROC) to a name a browser opens."""
    new = [p for p in _evaluation_reports(out) if p not in before]
    if not new:
        return None
    html = out / "models" / f"v{version}-evaluation.html"
    shutil.copyfile(new[-1], html)
    return html


def serve_and_predict(model_dir: Path) -> None:
    from pipelines.core import data
    from serving.contract import modelcard
    from serving.runtime.client import RuntimeServer

    features = modelcard.load_card(model_dir)["inputs"][0]["features"]
    df = data.load_dataset()  # the demo trains on the bundled breast_cancer data
    rows = df[features].sample(3, random_state=7).to_numpy(dtype=float).round(4).tolist()
    with RuntimeServer(model_dir) as srv:
        print(f"runtime up: {srv.name} {srv.version} on {srv.url} (gRPC {srv.grpc_target})")
        v1 = srv.predict_v1(rows[:2], probabilities=True)
        print(f"V1  POST /v1/models/{srv.name}:predict  ->  {json.dumps(v1)}")
        named = [dict(zip(features, rows[2], strict=True))]
        v1n = srv.predict_v1(named)
        print(f"V1  named-feature instance              ->  {json.dumps(v1n)}")
        v2 = srv.infer_v2(rows)
        outs = {o["name"]: o["data"] for o in v2["outputs"]}
        print(f"V2  POST /v2/models/{srv.name}/infer    ->  label={outs.get('label')}")
        print(f"    probabilities={[round(p, 4) for p in outs.get('probabilities', [])]}")
    print("runtime stopped")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: demo_outputs/)")
    p.add_argument(
        "--bad",
        default="drift",
        choices=["drift", "errors", "latency"],
        help="what is wrong with the bad canary (default: drift: only the ML gate can see it)",
    )
    p.add_argument("--interval", type=float, default=3.0, help="analysis interval in seconds (default 3)")
    ns = p.parse_args(argv)
    out = Path(ns.out).resolve()
    shutil.rmtree(out / "kfp", ignore_errors=True)
    t0 = time.monotonic()

    banner("1/3  Train 1.0.0 and 1.1.0 with the KFP training pipeline (kfp.local)")
    v1, v1_html = train(out, "1.0.0", [])
    v2, v2_html = train(out, "1.1.0", ["--hyperparameters", '{"C": 0.3}', "--baseline-card", str(v1)])

    banner("2/3  Serve 1.0.0 with the KServe ONNX runtime; V1 and V2 protocol predictions")
    serve_and_predict(v1)

    banner("3/3  Progressive rollout 1.0.0 -> 1.1.0 behind HAProxy, Prometheus-fed gates; then a bad 1.1.1")
    from serving.demo.rollout import run_demo

    summary = run_demo(v1, v2, out / "rollout", bad=ns.bad, interval_s=ns.interval)
    banner(f"demo finished in {time.monotonic() - t0:.0f} s")
    print(summary_text(summary, [("1.0.0", v1, v1_html), ("1.1.0", v2, v2_html)]))
    return 0 if summary["ok"] else 1


def summary_text(summary: dict, models: list[tuple[str, Path, Path | None]]) -> str:
    """Where every artefact is and how to look at it: the last thing the demo prints."""
    good, bad = summary["good"], summary["bad"]
    lines = []
    for version, pkg, html in models:
        lines.append(f"model {version:8} {pkg}")
        if html:
            lines.append(f"  evaluation report (metrics, confusion matrix, ROC): {html}")
    for title, part in (
        (f"good rollout -> {good['version']}: {good['phase']}", good),
        (
            f"bad canary {bad['version']} ({bad['kind']}): {bad['phase']}; failed gates: {bad['failures']}",
            bad,
        ),
    ):
        lines += [
            title,
            f"  report   {part['report']}",
            f"  timeline {part['png']}",
            f"  state    {part['state']}",
        ]
    lines.append(f"inspect a rollout: .venv/bin/python -m serving.rollout status --state-file {bad['state']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
