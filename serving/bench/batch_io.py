"""Benchmark: which library reads and writes the batch engine's tables fastest, measured on the same files.

    python -m serving.bench.batch_io                 # 300,000 rows, 3 interleaved rounds
    python -m serving.bench.batch_io --rows 1000000 --rounds 5

The batch command (``serving/batch``) must turn a table into one float32 matrix of the model's 30
feature columns (matched by name, extra columns skipped) plus the id column, and write ``id``,
``prediction`` and the ``prob_*`` columns back. This measures every well-kept reader and writer on
that exact job, on the same files, interleaved round by round (machine noise hits all alike):

inputs (one table, four files): CSV with **full-precision** floats (17 significant digits, as
``float64`` repr writes them), CSV with **short** floats (4 decimals), CSV with every field
**quoted** (and a text column holding commas), and **Parquet** (pyarrow's defaults: snappy, dictionary).

readers: the **engine's own** (``serving.batch.source``: the chosen reader plus its schema checks
and float32 conversion), **pyarrow** (``csv.open_csv`` streaming, the engine's reader before,
``csv.read_csv`` whole, ``ParquetFile.iter_batches``, ``read_table``), **pandas** (the C parser, its
pyarrow engine, ``read_parquet``) and **polars** (``read_csv``/``read_parquet`` whole, and
``scan_*`` streamed with ``collect_batches``). Each result is checked against the table's true
values cast to float32: equal, or at most one float32 ulp off (a parser that rounds the decimal text
straight to float32 and one that goes through float64 can differ by one ulp); a reader that fails
that is reported, not ranked.

writers (the output of 2-class scoring: int64 id, int64 prediction, two float32 probabilities):
**pyarrow** (``CSVWriter``/``ParquetWriter`` in chunks; Parquet with the engine's former
dictionary + snappy choice, with plain pages, and with defaults), **pandas** (``to_csv``,
``to_parquet``) and **polars** (``write_csv``, ``write_parquet``); each file is read back and
compared (|Δp| ≤ 1e-6, ids and labels equal).

It prints the median wall seconds, CPU seconds (all threads: on a shared machine the steadier
figure) and rows/s per contender and format, the ratio to the fastest, and the fastest correct one
per format. Results: ``bench_outputs/batch_io/results.json``. Import times are not included here
(each library is imported once up front); ``python -X importtime`` gives them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from serving.batch import source

OUT_DIR = Path("bench_outputs/batch_io")
N_FEATURES = 30
FEATURES = [f"f{i:02d}" for i in range(N_FEATURES)]
WANTED = ["id", *FEATURES]
CHUNK = source.auto_chunk_rows(N_FEATURES)
ROWS: dict[Path, int] = {}  # rows of each input file (to size pyarrow's CSV blocks like the engine did)


def make_table(rows: int, seed: int = 0) -> pa.Table:
    """An int64 id, 30 float64 features of assorted magnitudes, and two columns the model skips."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.integers(-3, 4, N_FEATURES)
    X = rng.normal(0, 1, (rows, N_FEATURES)) * scale + scale
    cols: dict[str, object] = {"id": np.arange(rows, dtype=np.int64)}
    cols.update({f: X[:, i] for i, f in enumerate(FEATURES)})
    cols["segment"] = pa.array(np.array(["north, east", "south", "west"])[np.arange(rows) % 3])
    cols["weight"] = rng.random(rows)
    return pa.table(cols)


def write_inputs(table: pa.Table, out: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """The four input files (written once per row count) and each one's true float32 feature values."""
    rows = table.num_rows
    full = np.column_stack([table.column(f).to_numpy() for f in FEATURES])
    short_table = table.select(["id"]).append_column("segment", table.column("segment"))
    short = np.round(full, 4)
    for i, f in enumerate(FEATURES):
        short_table = short_table.append_column(f, pa.array(short[:, i]))
    short_table = short_table.append_column("weight", table.column("weight"))
    files = {
        "csv_full": (out / f"full-{rows}.csv", full),
        "csv_short": (out / f"short-{rows}.csv", short),
        "csv_quoted": (out / f"quoted-{rows}.csv", short),
        "parquet": (out / f"table-{rows}.parquet", full),
    }
    for name, (path, _) in files.items():
        if path.exists():
            continue
        tmp = path.with_suffix(".tmp")
        if name == "csv_full":
            # float64 repr: pyarrow's writer gives the shortest round-trip text (up to 17 digits)
            pacsv.write_csv(table, tmp)
        elif name == "csv_short":
            pacsv.write_csv(short_table, tmp)
        elif name == "csv_quoted":
            short_table.to_pandas().to_csv(tmp, index=False, quoting=csv.QUOTE_ALL)
        else:
            pq.write_table(table, tmp)
        tmp.replace(path)
    ROWS.update({p: rows for p, _ in files.values()})
    return {k: (p, truth.astype(np.float32)) for k, (p, truth) in files.items()}


# --------------------------------------------------------------------------- readers
# each returns (ids int64 [n], features float32 [n, 30]) for the whole file, however it reads it


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty((len(arrays[0]), len(arrays)), np.float32)
    for j, a in enumerate(arrays):
        out[:, j] = a
    return out


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def read_engine(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The batch engine's own reader (``serving.batch.source``), stream of chunks, with its checks."""
    src = source.open_source(path, FEATURES, "id", CHUNK)
    parts = []
    row = 0
    for b in src.batches:
        ids = np.asarray(b.column("id"), dtype=np.int64) if src.format == "parquet" else None
        if ids is None:
            ids = np.asarray(pa.compute.cast(b.column("id"), pa.int64()))
        parts.append((ids, source.to_matrix(b, FEATURES, row)))
        row += b.num_rows
    src.close()
    return _concat(parts)


def read_pa_csv_stream(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """pyarrow's streaming reader, the engine's CSV reader before polars (blocks of about a chunk)."""
    types = {f: pa.float32() for f in FEATURES} | {"id": pa.int64()}
    block = max(int(CHUNK * path.stat().st_size / ROWS[path]), 1 << 16)
    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=block),
        convert_options=pacsv.ConvertOptions(column_types=types, include_columns=WANTED),
    )
    parts = [(b.column("id").to_numpy(), _stack([b.column(f).to_numpy() for f in FEATURES])) for b in reader]
    return _concat(parts)


def read_pa_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    types = {f: pa.float32() for f in FEATURES} | {"id": pa.int64()}
    t = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types, include_columns=WANTED))
    return t.column("id").to_numpy(), _stack([t.column(f).to_numpy() for f in FEATURES])


def read_pandas_c(path: Path) -> tuple[np.ndarray, np.ndarray]:
    df = pd.read_csv(path, usecols=WANTED, engine="c", dtype={"id": np.int64}, float_precision="high")
    return df["id"].to_numpy(), df[FEATURES].to_numpy(np.float32)


def read_pandas_c_chunked(path: Path) -> tuple[np.ndarray, np.ndarray]:
    parts = []
    for df in pd.read_csv(path, usecols=WANTED, engine="c", dtype={"id": np.int64}, chunksize=CHUNK):
        parts.append((df["id"].to_numpy(), df[FEATURES].to_numpy(np.float32)))
    return _concat(parts)


def read_pandas_pyarrow(path: Path) -> tuple[np.ndarray, np.ndarray]:
    df = pd.read_csv(path, usecols=WANTED, engine="pyarrow")
    return df["id"].to_numpy(), df[FEATURES].to_numpy(np.float32)


def _polars_overrides() -> dict:
    return {f: pl.Float32 for f in FEATURES} | {"id": pl.Int64}


def read_polars_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    df = pl.read_csv(path, columns=WANTED, schema_overrides=_polars_overrides())
    return df["id"].to_numpy(), df.select(FEATURES).to_numpy(order="c")


def read_polars_csv_f64(path: Path) -> tuple[np.ndarray, np.ndarray]:
    df = pl.read_csv(path, columns=WANTED, schema_overrides={f: pl.Float64 for f in FEATURES})
    return df["id"].to_numpy(), df.select(FEATURES).to_numpy().astype(np.float32)


def read_polars_scan_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    lf = pl.scan_csv(path, schema_overrides=_polars_overrides()).select(WANTED)
    parts = [
        (b["id"].to_numpy(), b.select(FEATURES).to_numpy(order="c"))
        for b in lf.collect_batches(chunk_size=CHUNK)
    ]
    return _concat(parts)


def read_pa_parquet(path: Path) -> tuple[np.ndarray, np.ndarray]:
    t = pq.read_table(path, columns=WANTED)
    return t.column("id").to_numpy(), _stack([t.column(f).to_numpy() for f in FEATURES])


def read_pandas_parquet(path: Path) -> tuple[np.ndarray, np.ndarray]:
    df = pd.read_parquet(path, columns=WANTED)
    return df["id"].to_numpy(), df[FEATURES].to_numpy(np.float32)


def read_polars_parquet(path: Path) -> tuple[np.ndarray, np.ndarray]:
    df = pl.read_parquet(path, columns=WANTED)
    return df["id"].to_numpy(), df.select(FEATURES).cast(pl.Float32).to_numpy(order="c")


def read_polars_scan_parquet(path: Path) -> tuple[np.ndarray, np.ndarray]:
    lf = pl.scan_parquet(path).select(WANTED)
    parts = [
        (b["id"].to_numpy(), b.select(FEATURES).cast(pl.Float32).to_numpy(order="c"))
        for b in lf.collect_batches(chunk_size=CHUNK)
    ]
    return _concat(parts)


CSV_READERS: dict[str, Callable] = {
    "serving.batch engine (polars + checks)": read_engine,
    "pyarrow open_csv stream": read_pa_csv_stream,
    "pyarrow read_csv": read_pa_csv,
    "pandas C parser": read_pandas_c,
    "pandas C parser, chunked": read_pandas_c_chunked,
    "pandas engine=pyarrow": read_pandas_pyarrow,
    "polars read_csv f32": read_polars_csv,
    "polars read_csv f64": read_polars_csv_f64,
    "polars scan_csv batches": read_polars_scan_csv,
}
PARQUET_READERS: dict[str, Callable] = {
    "serving.batch engine (pyarrow + checks)": read_engine,
    "pyarrow read_table": read_pa_parquet,
    "pandas read_parquet": read_pandas_parquet,
    "polars read_parquet": read_polars_parquet,
    "polars scan_parquet batches": read_polars_scan_parquet,
}


def check_read(result: tuple[np.ndarray, np.ndarray], truth: np.ndarray) -> str | None:
    """None when right: ids 0..n-1 and every value equal to the truth or one float32 ulp off."""
    ids, X = result
    if X.shape != truth.shape or X.dtype != np.float32:
        return f"shape/dtype {X.shape} {X.dtype}"
    if not np.array_equal(ids, np.arange(len(truth))):
        return "ids differ"
    ulps = np.abs(X.view(np.int32).astype(np.int64) - truth.view(np.int32).astype(np.int64))
    return None if int(ulps.max()) <= 1 else f"{int((ulps > 1).sum())} values more than 1 ulp off"


# --------------------------------------------------------------------------- writers


def output_table(rows: int, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    p = rng.random(rows).astype(np.float32)
    return pa.table(
        {
            "id": np.arange(rows, dtype=np.int64),
            "prediction": (p > 0.5).astype(np.int64),
            "prob_malignant": 1 - p,
            "prob_benign": p,
        }
    )


def _chunks(t: pa.Table):
    return t.to_batches(max_chunksize=CHUNK)


def write_pa_csv_stream(t: pa.Table, path: Path) -> None:
    with pacsv.CSVWriter(path, t.schema) as w:
        for b in _chunks(t):
            w.write_batch(b)


def write_pa_parquet_stream(t: pa.Table, path: Path) -> None:
    # the engine's settings before this bench: dictionary + snappy on id and prediction only
    codecs = {c: ("snappy" if c in ("id", "prediction") else "none") for c in t.schema.names}
    with pq.ParquetWriter(path, t.schema, compression=codecs, use_dictionary=["id", "prediction"]) as w:
        for b in _chunks(t):
            w.write_batch(b)


def write_pa_parquet_default(t: pa.Table, path: Path) -> None:
    pq.write_table(t, path)


def write_pa_parquet_plain(t: pa.Table, path: Path) -> None:
    with pq.ParquetWriter(path, t.schema, compression="none", use_dictionary=False) as w:
        for b in _chunks(t):
            w.write_batch(b)


def write_pandas_csv(t: pa.Table, path: Path) -> None:
    t.to_pandas().to_csv(path, index=False)


def write_pandas_parquet(t: pa.Table, path: Path) -> None:
    t.to_pandas().to_parquet(path, index=False)


def write_polars_csv(t: pa.Table, path: Path) -> None:
    pl.from_arrow(t).write_csv(path)


def write_polars_csv_stream(t: pa.Table, path: Path) -> None:
    with open(path, "wb") as f:
        for i, b in enumerate(_chunks(t)):
            pl.from_arrow(b).write_csv(f, include_header=i == 0)


def write_polars_parquet(t: pa.Table, path: Path) -> None:
    pl.from_arrow(t).write_parquet(path)


def write_polars_parquet_raw(t: pa.Table, path: Path) -> None:
    pl.from_arrow(t).write_parquet(path, compression="uncompressed")


CSV_WRITERS: dict[str, Callable] = {
    "pyarrow CSVWriter chunks": write_pa_csv_stream,
    "pandas to_csv": write_pandas_csv,
    "polars write_csv": write_polars_csv,
    "polars write_csv chunks": write_polars_csv_stream,
}
PARQUET_WRITERS: dict[str, Callable] = {
    "pyarrow ParquetWriter chunks, dict+snappy": write_pa_parquet_stream,
    "pyarrow write_table defaults": write_pa_parquet_default,
    "pyarrow ParquetWriter chunks, plain": write_pa_parquet_plain,
    "pandas to_parquet": write_pandas_parquet,
    "polars write_parquet": write_polars_parquet,
    "polars write_parquet uncompressed": write_polars_parquet_raw,
}


def check_write(path: Path, t: pa.Table) -> str | None:
    back = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    if back.column_names != t.column_names:
        return f"columns {back.column_names}"
    for c in ("id", "prediction"):
        if not np.array_equal(back.column(c).to_numpy(), t.column(c).to_numpy()):
            return f"{c} differs"
    for c in ("prob_malignant", "prob_benign"):
        dp = np.abs(back.column(c).to_numpy().astype(np.float64) - t.column(c).to_numpy())
        if dp.max() > 1e-6:
            return f"{c} off by {dp.max():.1e}"
    return None


# --------------------------------------------------------------------------- runner


def measure(contenders: dict[str, Callable], run: Callable[[Callable], object], rounds: int):
    """Wall seconds and CPU seconds (all threads) of each contender, round by round."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    cpu: dict[str, list[float]] = {k: [] for k in contenders}
    results: dict[str, object] = {}
    for _ in range(rounds):
        for name, fn in contenders.items():
            c0, t0 = time.process_time(), time.perf_counter()
            results[name] = run(fn)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return (times, cpu), results


def report(title: str, rows: int, measured, errors: dict[str, str | None]) -> dict:
    times, cpu = measured
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    ok = [k for k in med if errors[k] is None]
    best = min(ok, key=med.__getitem__) if ok else None
    print(f"\n{title}")
    print(f"  {'contender':38s} {'median s':>9s} {'CPU s':>7s} {'rows/s':>12s} {'÷ fastest':>9s}  check")
    for k in sorted(med, key=med.__getitem__):
        ratio = med[best] / med[k] if best else float("nan")
        print(
            f"  {k:38s} {med[k]:9.3f} {med_cpu[k]:7.3f} {rows / med[k]:12,.0f} {ratio:9.2f}  "
            f"{'ok' if errors[k] is None else 'WRONG: ' + errors[k]}{'  <- fastest' if k == best else ''}"
        )
    return {"median_s": med, "median_cpu_s": med_cpu, "errors": errors, "fastest": best, "runs_s": times}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.bench.batch_io", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"batch reader/writer benchmark: {args.rows:,} rows, {args.rounds} interleaved rounds, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; pyarrow {pa.__version__}, "
        f"pandas {pd.__version__}, polars {pl.__version__}"
    )
    inputs = write_inputs(make_table(args.rows), args.out)
    out: dict[str, dict] = {"rows": args.rows, "rounds": args.rounds}
    for kind, (path, truth) in inputs.items():
        readers = PARQUET_READERS if kind == "parquet" else CSV_READERS
        times, results = measure(readers, lambda fn, p=path: fn(p), args.rounds)
        errors = {k: check_read(r, truth) for k, r in results.items()}
        size = path.stat().st_size / 1e6
        out[f"read {kind}"] = report(f"read {kind} ({path.name}, {size:.0f} MB)", args.rows, times, errors)
    table = output_table(args.rows)
    for fmt, writers in (("csv", CSV_WRITERS), ("parquet", PARQUET_WRITERS)):
        paths = {k: args.out / f"w{i}.{fmt}" for i, k in enumerate(writers)}
        times, _ = measure(writers, lambda fn, w=writers, ps=paths: fn(table, ps[_name(w, fn)]), args.rounds)
        errors = {k: check_write(paths[k], table) for k in writers}
        title = f"write {fmt} (id, prediction, 2 float32 probabilities)"
        out[f"write {fmt}"] = report(title, args.rows, times, errors)
    (args.out / "results.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nresults: {args.out / 'results.json'} (load average now {os.getloadavg()[0]:.1f})")
    return 0


def _name(contenders: dict[str, Callable], fn: Callable) -> str:
    return next(k for k, v in contenders.items() if v is fn)


if __name__ == "__main__":
    sys.exit(main())
