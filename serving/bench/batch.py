"""Benchmark: the batch command end to end against the in-process floor and a pandas + sklearn script.

    python -m serving.bench.batch                    # make bench-batch: 300k and 3M rows, 1 round
    python -m serving.bench.batch --rows 300000 --rounds 3 --models forest --formats csv

For each row count, model (a scaled logistic regression: cheap, I/O-bound; a 50-tree random forest:
compute-bound) and format (CSV with full-precision floats, Parquet) it writes one table of unseen
rows to ``bench_outputs/batch/`` (git-ignored) and measures, interleaved round by round:

* **command**: ``python -m serving.batch --input FILE --output OUT`` as a new process, the way a
  user or a KFP step runs it: interpreter start-up, imports, sha256 check, session, read, schema
  checks, scoring, writing and the atomic rename;
* **floor**: the fastest in-process file-to-file scorer we can build from the same libraries, with no
  start-up, no checks and no overlap: the fastest of polars and pyarrow reading the feature columns
  into one float32 matrix, plus onnxruntime on that matrix (the faster of its default session
  options and the command's), plus the faster of polars and pyarrow writing the same output columns
  (id, prediction, probabilities) in the same format; each part timed on its own, their minimums
  added up;
* **pandas + sklearn**: ``serving/bench/batch_peer.py`` as a new process: pandas reads the table, the
  fitted sklearn pipeline's ``predict_proba`` scores it, pandas writes the same columns.

It prints rows/s of each, the ratios command ÷ floor (target ≥ 0.80 at 3M rows) and command ÷
pandas + sklearn (target ≥ 3), and checks on every cell that the command's output equals in-process
onnxruntime on the same matrix (labels equal, probabilities within 1e-6). The command's fixed cost
(the same command on a 1,000-row file, and a bare ``python -c pass``) is printed first: it is what
the 300k figures pay on top of the per-row work. Results: ``bench_outputs/batch/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from serving.contract import modelcard
from serving.contract.session import session_options

OUT_DIR = Path("bench_outputs/batch")
PEER_SCRIPT = Path(__file__).with_name("batch_peer.py")
TARGET_FLOOR = 0.80
TARGET_PEER = 3.0
PARITY_ATOL = 1e-6


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
    """``rows`` unseen rows (training rows resampled, plus 1% noise), as float64 columns (as tables
    usually are), an int64 ``id`` and two columns the model does not use (skipped, not read)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(X), rows)
    Xb = X[idx].astype(np.float64) + rng.normal(0, 0.01, (rows, X.shape[1])) * X.std(0)
    # full precision (up to 17 significant digits in CSV): the hardest text for a CSV parser, and what
    # a float64 export writes
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


def _process(argv: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    dt_s = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
    return dt_s


def run_command(model_dir: Path, inp: Path, out: Path) -> float:
    """The real shell command as a new process."""
    return _process([sys.executable, "-m", "serving.batch", "--model_dir", str(model_dir),
                     "--input", str(inp), "--output", str(out), "--no-progress"])  # fmt: skip


def run_peer(peer_files: tuple[Path, Path], inp: Path, out: Path) -> float:
    """The plain pandas + sklearn script as a new process."""
    return _process(
        [sys.executable, str(PEER_SCRIPT), str(peer_files[0]), str(peer_files[1]), str(inp), str(out)]
    )


# --------------------------------------------------------------------------- the in-process floor


def _timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def read_polars(inp: Path, features: list[str]) -> tuple[np.ndarray, np.ndarray]:
    cols = ["id", *features]
    if inp.suffix == ".csv":
        df = pl.read_csv(inp, columns=cols, schema_overrides={f: pl.Float32 for f in features})
    else:
        df = pl.read_parquet(inp, columns=cols).with_columns(pl.col(features).cast(pl.Float32))
    return df["id"].to_numpy(), df.select(features).to_numpy(order="c")


def read_pyarrow(inp: Path, features: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if inp.suffix == ".csv":
        types = {f: pa.float32() for f in features}
        opts = pacsv.ConvertOptions(column_types=types, include_columns=["id", *features])
        t = pacsv.read_csv(inp, convert_options=opts)
    else:
        t = pq.read_table(inp, columns=["id", *features])
    X = np.empty((t.num_rows, len(features)), np.float32)
    for j, f in enumerate(features):
        X[:, j] = t.column(f).to_numpy()
    return t.column("id").to_numpy(), X


def _output_columns(ids, label, proba, class_names) -> dict[str, np.ndarray]:
    cols = {"id": ids, "prediction": label.astype(np.int64)}
    cols.update({f"prob_{c}": np.ascontiguousarray(proba[:, j]) for j, c in enumerate(class_names)})
    return cols


def write_polars(cols: dict[str, np.ndarray], out: Path) -> None:
    df = pl.DataFrame(cols)
    if out.suffix == ".csv":
        df.write_csv(out)
    else:
        df.write_parquet(out, compression="uncompressed")


def write_pyarrow(cols: dict[str, np.ndarray], out: Path) -> None:
    t = pa.table(cols)
    if out.suffix == ".csv":
        pacsv.write_csv(t, out)
    else:
        pq.write_table(t, out, compression="none", use_dictionary=False)


def run_floor(inp: Path, out: Path, features, class_names, sessions) -> tuple[float, dict, tuple]:
    """(floor seconds, each part's best time, (ids, label, proba) as in-process onnxruntime gives)."""
    parts = {}
    parts["read polars"], (ids, X) = _timed(lambda: read_polars(inp, features))
    parts["read pyarrow"], _ = _timed(lambda: read_pyarrow(inp, features))
    ort_s = []
    for s in sessions:
        dt_s, (label, proba) = _timed(lambda s=s: s.run(["label", "probabilities"], {"input": X}))
        ort_s.append(dt_s)
    parts["onnxruntime"] = min(ort_s)
    cols = _output_columns(ids, label, proba, class_names)
    parts["write polars"], _ = _timed(lambda: write_polars(cols, out))
    parts["write pyarrow"], _ = _timed(lambda: write_pyarrow(cols, out))
    floor = (
        min(parts["read polars"], parts["read pyarrow"])
        + parts["onnxruntime"]
        + min(parts["write polars"], parts["write pyarrow"])
    )
    return floor, parts, (ids, label, proba)


def check_parity(out: Path, class_names, expected) -> tuple[float, int, bool]:
    """(max |Δp|, labels that differ, ids in order) of the command's output vs in-process onnxruntime."""
    ids, label, proba = expected
    t = pq.read_table(out) if out.suffix == ".parquet" else pacsv.read_csv(out)
    got = np.column_stack([t.column(f"prob_{c}").to_numpy() for c in class_names]).astype(np.float64)
    same_ids = np.array_equal(t.column("id").to_numpy().astype(np.int64), ids.astype(np.int64))
    return float(np.abs(got - proba).max()), int((t.column("prediction").to_numpy() != label).sum()), same_ids


# --------------------------------------------------------------------------- main


def startup(model_dir: Path, X: np.ndarray, features: list[str], out: Path) -> dict[str, float]:
    """The command's fixed cost: the command on a 1,000-row table, and a bare interpreter."""
    small = out / "startup-1000.parquet"
    write_input(make_table(X, features, 1000, seed=1), "parquet", small)
    small_csv = out / "startup-1000.csv"
    write_input(make_table(X, features, 1000, seed=1), "csv", small_csv)
    bare = min(_process([sys.executable, "-c", "pass"]) for _ in range(3))
    cmd = min(run_command(model_dir, small, out / "startup-out.parquet") for _ in range(3))
    cmd_csv = min(run_command(model_dir, small_csv, out / "startup-out.csv") for _ in range(3))
    return {"python -c pass": bare, "command, 1,000-row Parquet": cmd, "command, 1,000-row CSV": cmd_csv}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.bench.batch", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="300000,3000000", help="comma list of row counts")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--models", default="logreg,forest", help="comma list of logreg, forest")
    ap.add_argument("--formats", default="csv,parquet", help="comma list of csv, parquet")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    row_counts = [int(r) for r in args.rows.split(",")]
    print(
        f"batch scoring benchmark: {args.rows} rows, {args.rounds} round(s), {os.cpu_count()} CPUs, "
        f"onnxruntime {ort.__version__}, pyarrow {pa.__version__}, polars {pl.__version__}; "
        f"load average at start {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    models = {}
    for est in args.models.split(","):
        model_dir, pipe, features, X = build_model(args.out / "models", est)
        card = json.loads((model_dir / "model-card.json").read_text())
        class_names = [str(c) for c in card.get("class_names") or card["classes"]]
        peer = (args.out / f"peer-{est}.pkl", args.out / f"peer-{est}-features.json")
        peer[0].write_bytes(pickle.dumps((pipe, class_names)))
        peer[1].write_text(json.dumps(features))
        onnx_file = str(modelcard.onnx_path(model_dir))
        sessions = [
            ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"]),
            ort.InferenceSession(onnx_file, session_options(), providers=["CPUExecutionProvider"]),
        ]
        models[est] = (model_dir, features, X, class_names, peer, sessions)
    first = next(iter(models.values()))
    fixed = startup(first[0], first[2], first[1], args.out)
    print("start-up: " + ", ".join(f"{k} {v:.2f} s" for k, v in fixed.items()), flush=True)
    results = []
    for rows in row_counts:
        tables = {}
        for est, (model_dir, features, X, class_names, peer, sessions) in models.items():
            table = tables.setdefault("t", make_table(X, features, rows))  # one table for both models
            for fmt in args.formats.split(","):
                inp = args.out / f"input-{rows}.{fmt}"
                write_input(table, fmt, inp)
                out = args.out / f"scored-{est}.{fmt}"
                times: dict[str, list[float]] = {"command": [], "floor": [], "pandas+sklearn": []}
                for _ in range(args.rounds):
                    times["command"].append(run_command(model_dir, inp, out))
                    floor_out = args.out / f"floor-{est}.{fmt}"
                    floor_s, parts, expected = run_floor(inp, floor_out, features, class_names, sessions)
                    max_dp, flips, same_ids = check_parity(out, class_names, expected)
                    times["floor"].append(floor_s)
                    times["pandas+sklearn"].append(run_peer(peer, inp, args.out / f"peer-{est}.{fmt}"))
                med = {k: rows / statistics.median(v) for k, v in times.items()}
                res = {
                    "rows": rows, "model": est, "format": fmt, "rows_per_s": med,
                    "command_vs_floor": med["command"] / med["floor"],
                    "command_vs_pandas_sklearn": med["command"] / med["pandas+sklearn"],
                    "floor_parts_s": parts, "seconds": times,
                    "parity_max_abs_dp": max_dp, "parity_label_mismatches": flips,
                    "parity_ids_equal": same_ids,
                    "input_bytes": inp.stat().st_size, "load_average_1m_after": os.getloadavg()[0],
                }  # fmt: skip
                results.append(res)
                print(f"  {_row(res)}", flush=True)
    print()
    print(_HEADER)
    for r in results:
        print(_row(r))
    print(
        f"command: python -m serving.batch as a process (start-up included); floor: fastest in-process "
        f"read + onnxruntime + write, no start-up (target cmd/floor ≥ {TARGET_FLOOR:.2f} at 3M rows); "
        f"pandas+sklearn: serving/bench/batch_peer.py as a process (target cmd/pd ≥ {TARGET_PEER:.0f}); "
        f"parity: command output vs in-process onnxruntime (|Δp| ≤ {PARITY_ATOL:g}, 0 label flips)"
    )
    (args.out / "results.json").write_text(
        json.dumps({"startup_s": fixed, "cells": results}, indent=2) + "\n"
    )
    print(f"results: {args.out / 'results.json'} (load average now {os.getloadavg()[0]:.1f})")
    ok = all(
        r["parity_label_mismatches"] == 0 and r["parity_max_abs_dp"] <= PARITY_ATOL and r["parity_ids_equal"]
        for r in results
    )
    return 0 if ok else 1


_HEADER = (
    f"{'rows':>9s} {'model':7s} {'format':7s} {'command r/s':>12s} {'floor r/s':>12s} {'pd+skl r/s':>11s}"
    f" {'cmd/floor':>9s} {'cmd/pd':>7s}  parity"
)


def _row(r: dict) -> str:
    m = r["rows_per_s"]
    parity_ok = (
        r["parity_label_mismatches"] == 0 and r["parity_max_abs_dp"] <= PARITY_ATOL and r["parity_ids_equal"]
    )
    return (
        f"{r['rows']:>9,} {r['model']:7s} {r['format']:7s} {m['command']:>12,.0f} {m['floor']:>12,.0f} "
        f"{m['pandas+sklearn']:>11,.0f} {r['command_vs_floor']:>9.2f} "
        f"{r['command_vs_pandas_sklearn']:>7.2f}  "
        f"{'ok' if parity_ok else 'MISMATCH'}: max|Δp| {r['parity_max_abs_dp']:.1e}, "
        f"{r['parity_label_mismatches']} label flips"
    )


if __name__ == "__main__":
    sys.exit(main())
