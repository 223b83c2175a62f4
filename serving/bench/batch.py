"""Benchmark: the batch command vs raw in-process onnxruntime vs sklearn ``predict_proba``.

    python -m serving.bench.batch            # make bench-batch
    python -m serving.bench.batch --rows 1000000 --rounds 3 --formats parquet,csv

For each model (a scaled logistic regression: cheap, I/O-bound; a random forest: compute-bound)
and each input format it writes a table of ``--rows`` rows to ``bench_outputs/batch/`` (git-ignored)
and measures, interleaved round by round so machine noise hits every contender alike:

* **command**: ``python -m serving.batch`` run *in-process* through its ``main(argv)`` entry point
  (the same code path as the shell command, minus the interpreter start-up): sha256 check, model
  load, chunked read, schema checks, scoring, writing and the atomic rename, timed wall-clock;
* **raw ORT**: ``InferenceSession.run`` on the same rows already in memory as one C-contiguous
  float32 matrix: the best of {onnxruntime's default session options, the command's options} x
  {one call over all rows, one call per chunk of the command's chunk size};
* **sklearn**: the fitted sklearn pipeline's ``predict_proba`` on the same rows in memory (float64);
* **read floor**: pyarrow reading the feature columns of the same file, nothing else, to show how
  much of the command's time the file format itself costs;
* **subprocess**: the same command as a new ``python -m serving.batch`` process (interpreter
  start-up and imports included), as a user runs it.

It prints rows/s per round, the medians and the ratios command ÷ raw ORT (target ≥ 0.80),
command ÷ sklearn and command ÷ read floor, and checks the command's output against raw ORT.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from serving.batch import cli, source
from serving.contract import modelcard
from serving.contract.session import session_options

OUT_DIR = Path("bench_outputs/batch")
TARGET = 0.80


def build_model(out_root: Path, estimator: str):
    """A real packaged model (exported and packaged by the training pipeline's core) and its sklearn
    pipeline, plus the feature names and the training matrix."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from pipelines.core import export, package

    data = load_breast_cancer()
    X, y = data.data.astype(np.float32), data.target.astype(np.int64)
    est = (
        LogisticRegression(max_iter=5000, random_state=0)
        if estimator == "logreg"
        else RandomForestClassifier(n_estimators=50, max_depth=12, random_state=0, n_jobs=1)
    )
    pipe = Pipeline([("scale", StandardScaler()), ("model", est)]).fit(X, y)
    onnx_bytes = export.to_onnx(pipe, X.shape[1])
    features = list(data.feature_names)
    card = package.build_card(
        name=f"bench-{estimator}",
        version="1.0.0",
        onnx_bytes=onnx_bytes,
        feature_names=features,
        class_names=list(data.target_names),
        training_data={"fingerprint": "bench", "rows": int(X.shape[0]), "source": "sklearn:breast_cancer"},
        estimator=estimator,
        pipeline_run_id="bench",
    )
    return modelcard.write_package(out_root, card, onnx_bytes), pipe, features, X


def make_table(X: np.ndarray, features: list[str], rows: int, seed: int = 0) -> pa.Table:
    """``rows`` resampled rows with 1% noise, as float64 columns (as tables usually are), an int64
    ``id`` and two columns the model does not use (they must be skipped, not read)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(X), rows)
    Xb = X[idx].astype(np.float64) + rng.normal(0, 0.01, (rows, X.shape[1])) * X.std(0)
    Xb = np.round(Xb, 4)  # measurements carry a few decimals, not 17 digits (matters for CSV size)
    cols = {"id": np.arange(rows, dtype=np.int64)}
    cols.update({f: Xb[:, i] for i, f in enumerate(features)})
    cols["segment"] = pa.array(np.array(["a", "b", "c"])[idx % 3])
    cols["weight"] = rng.random(rows)
    return pa.table(cols)


def write_input(table: pa.Table, fmt: str, path: Path) -> None:
    """Written once per row count and reused (the data is seeded, so the file is the same)."""
    if not path.exists():
        tmp = path.with_suffix(path.suffix + ".tmp")
        if fmt == "parquet":
            pq.write_table(table, tmp)
        else:
            pacsv.write_csv(table, tmp)
        tmp.replace(path)


def run_command(model_dir: Path, inp: Path, out: Path, chunk_rows: int | None) -> float:
    argv = ["--model_dir", str(model_dir), "--input", str(inp), "--output", str(out), "--no-progress"]
    if chunk_rows:
        argv += ["--chunk-rows", str(chunk_rows)]
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    dt_s = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"batch command failed ({rc}): {err.getvalue().strip()}")
    return dt_s


def run_subprocess(model_dir: Path, inp: Path, out: Path, chunk_rows: int | None) -> float:
    """The real shell command, interpreter start-up and imports included."""
    argv = [sys.executable, "-m", "serving.batch", "--model_dir", str(model_dir), "--input", str(inp),
            "--output", str(out), "--no-progress"]  # fmt: skip
    if chunk_rows:
        argv += ["--chunk-rows", str(chunk_rows)]
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    dt_s = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"batch command failed ({p.returncode}): {p.stderr.strip()}")
    return dt_s


def run_raw_ort(sessions: list[ort.InferenceSession], Xf: np.ndarray, chunk_rows: int) -> float:
    """The best time over the sessions (onnxruntime defaults, and the command's options) of one
    ``run`` over all rows and of one ``run`` per chunk: the strongest raw-ORT peer we can build."""
    best = float("inf")
    for session in sessions:
        t0 = time.perf_counter()
        session.run(["label", "probabilities"], {"input": Xf})
        best = min(best, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for s in range(0, len(Xf), chunk_rows):
            session.run(["label", "probabilities"], {"input": Xf[s : s + chunk_rows]})
        best = min(best, time.perf_counter() - t0)
    return best


def run_sklearn(pipe, X64: np.ndarray) -> float:
    t0 = time.perf_counter()
    pipe.predict_proba(X64)
    return time.perf_counter() - t0


def run_read_floor(inp: Path, fmt: str, features: list[str], chunk_rows: int) -> float:
    t0 = time.perf_counter()
    src = source.open_source(inp, features, None, chunk_rows, fmt)
    for _ in src.batches:
        pass
    src.close()
    return time.perf_counter() - t0


def check_parity(out: Path, session: ort.InferenceSession, Xf: np.ndarray) -> tuple[float, int]:
    t = pq.read_table(out) if out.suffix == ".parquet" else pacsv.read_csv(out)
    label, proba = session.run(["label", "probabilities"], {"input": Xf})
    got = np.column_stack([t.column(c).to_numpy() for c in t.column_names if c.startswith("prob_")])
    return float(np.abs(got - proba).max()), int((t.column("prediction").to_numpy() != label).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.bench.batch", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk-rows", type=int, default=None, help="default: the command's automatic size")
    ap.add_argument("--models", default="logreg,forest", help="comma list of logreg, forest")
    ap.add_argument("--formats", default="parquet,csv", help="comma list of parquet, csv")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"batch scoring benchmark: {args.rows:,} rows, {args.rounds} interleaved rounds, chunk "
        f"{args.chunk_rows or 'auto'} rows, {os.cpu_count()} CPUs, onnxruntime {ort.__version__}, "
        f"pyarrow {pa.__version__}; command run in-process via serving.batch.cli.main; "
        f"load average at start {os.getloadavg()[0]:.1f}"
    )
    results = []
    for est in args.models.split(","):
        model_dir, pipe, features, X = build_model(args.out / "models", est)
        table = make_table(X, features, args.rows)
        chunk = args.chunk_rows or source.auto_chunk_rows(len(features))
        X64 = np.column_stack([table.column(f).to_numpy() for f in features])
        Xf = np.ascontiguousarray(X64, dtype=np.float32)
        onnx_file = str(modelcard.onnx_path(model_dir))
        sessions = [
            ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"]),
            ort.InferenceSession(onnx_file, session_options(), providers=["CPUExecutionProvider"]),
        ]
        session = sessions[0]
        for fmt in args.formats.split(","):
            inp = args.out / f"input-{args.rows}.{fmt}"
            write_input(table, fmt, inp)
            out = args.out / f"scored-{est}.{fmt}"
            rates: dict[str, list[float]] = {
                "command": [], "raw_ort": [], "sklearn": [], "read_floor": [], "subprocess": []
            }  # fmt: skip
            for r in range(args.rounds):
                rates["command"].append(args.rows / run_command(model_dir, inp, out, args.chunk_rows))
                rates["raw_ort"].append(args.rows / run_raw_ort(sessions, Xf, chunk))
                rates["sklearn"].append(args.rows / run_sklearn(pipe, X64))
                rates["read_floor"].append(args.rows / run_read_floor(inp, fmt, features, chunk))
                rates["subprocess"].append(args.rows / run_subprocess(model_dir, inp, out, args.chunk_rows))
                print(
                    f"  {est:7s} {fmt:7s} round {r + 1}: "
                    + "  ".join(f"{k} {v[-1]:>12,.0f} rows/s" for k, v in rates.items()),
                    flush=True,
                )
            med = {k: statistics.median(v) for k, v in rates.items()}
            per_round = [c / o for c, o in zip(rates["command"], rates["raw_ort"], strict=True)]
            max_dp, flips = check_parity(out, session, Xf)
            res = {
                "model": est,
                "format": fmt,
                "rows": args.rows,
                "median_rows_per_s": med,
                "command_vs_raw_ort": med["command"] / med["raw_ort"],
                "command_vs_raw_ort_per_round": per_round,
                "command_vs_sklearn": med["command"] / med["sklearn"],
                "command_vs_read_floor": med["command"] / med["read_floor"],
                "subprocess_vs_raw_ort": med["subprocess"] / med["raw_ort"],
                "parity_max_abs_dp": max_dp,
                "parity_label_mismatches": flips,
                "input_bytes": inp.stat().st_size,
                "load_average_1m_after": os.getloadavg()[0],
            }
            results.append(res)
    print()
    print(
        f"{'model':7s} {'format':7s} {'command':>11s} {'raw ORT':>11s} {'sklearn':>11s} {'read floor':>11s}"
        f" {'subprocess':>11s}  {'cmd/ORT':>7s} {'cmd/skl':>7s} {'cmd/read':>8s} {'sub/ORT':>7s}  parity"
    )
    for r in results:
        m = r["median_rows_per_s"]
        flag = "ok" if r["command_vs_raw_ort"] >= TARGET else f"below {TARGET:.2f} target"
        print(
            f"{r['model']:7s} {r['format']:7s} {m['command']:>11,.0f} {m['raw_ort']:>11,.0f} "
            f"{m['sklearn']:>11,.0f} {m['read_floor']:>11,.0f} {m['subprocess']:>11,.0f}  "
            f"{r['command_vs_raw_ort']:>7.2f} {r['command_vs_sklearn']:>7.2f} "
            f"{r['command_vs_read_floor']:>8.2f} {r['subprocess_vs_raw_ort']:>7.2f}  "
            f"max|dp| {r['parity_max_abs_dp']:.1e}, {r['parity_label_mismatches']} label flips  ({flag})"
        )
    print(
        "rows/s are medians over rounds; cmd/ORT: command ÷ raw onnxruntime on the same rows in memory "
        f"(target ≥ {TARGET:.2f}); cmd/read: command ÷ pyarrow reading the same file and nothing else; "
        "subprocess: `python -m serving.batch` as a new process (start-up and imports included)"
    )
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.out / 'results.json'} (load average now {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
