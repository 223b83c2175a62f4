"""Batch (offline) scoring: a CSV or Parquet table in, predictions and probabilities out.

The engine: ``score_file`` checks the paths, loads the model (``model.py``), opens the input
(``source.py``) and runs read -> score -> write (``sink.py``) as three stages, then reports
(``report.py``). One implementation shared by the command (``python -m serving.batch``) and the KFP
component (``pipelines/components/batch.py``, which embeds this package), so both score the same way:

* the model package is found and its sha256 checked (``modelcard.verify_package``) first;
* the input is streamed in chunks (polars ``scan_csv``/``scan_parquet`` for inputs from 32 MiB,
  pyarrow ``csv.open_csv`` / ``ParquetFile.iter_batches`` below: ``source.use_polars``), only the
  model's feature columns (matched by *name*) and the id column are read; extra columns are ignored;
* the columns are checked against the card's input schema before a single row is written: a
  missing column, or one that cannot be cast to float32, stops the run with a message naming it;
* each chunk becomes one C-contiguous float32 matrix and one ``InferenceSession.run`` call;
* reading/converting, scoring and writing run in three threads joined by small bounded queues
  (pyarrow, numpy and onnxruntime release the GIL), so I/O overlaps with inference;
* the output is written to a temporary file next to the destination and renamed into place only
  when every row is written, so a failed or interrupted run leaves no partial output behind; the
  optional HTML report is written the same way and is complete before the output is renamed;
* a successful run removes the ``.<output name>.<random>.partial`` files that killed (SIGKILL)
  earlier runs of the same output left behind.

Output columns: the id column (the input's ``id_column``, or ``row_number`` counting from 0),
``prediction`` (the model's ``label`` output, i.e. one of the card's ``classes``) and one
``prob_<class name>`` float32 column per class, in the card's class order.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from serving.batch.errors import BatchScoringError
from serving.batch.model import BatchModel, load_model
from serving.batch.report import SCORE_BINS, ScoreSummary, summary_html
from serving.batch.sink import (
    PREDICTION_COLUMN,
    AtomicTableWriter,
    AtomicTextWriter,
    output_format,
    output_schema,
    remove_stale_partials,
)
from serving.batch.source import Source, auto_chunk_rows, from_numpy, open_source, to_matrix, use_polars

if TYPE_CHECKING:
    from serving.batch.shard import Shard
from serving.contract import modelcard, signals

ROW_NUMBER_COLUMN = "row_number"
_QUEUE_DEPTH = 2  # chunks in flight between two stages: enough to overlap, little memory
_POLL_S = 0.1
# The read and write threads run at nice +5 (Linux, per thread): onnxruntime's parallel sections
# stall whenever one of their threads is pre-empted, so the I/O threads should yield to them.
# Measured on the 2-core box, interleaved runs of 1M Parquet rows: forest +5% (median of 4),
# logistic +15% (median of 5). Workers that pyarrow's thread pool spawns from these threads inherit
# the lower priority too (they do the same I/O work). Set to 0 to turn off.
IO_THREAD_NICE = 5


def _lower_thread_priority(nice: int) -> None:
    # Linux only: there a thread id addresses one thread; elsewhere PRIO_PROCESS means a process
    if nice > 0 and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class _Stage(threading.Thread):
    """Runs ``fn(item)`` on every item of an input queue (or of an iterator) into an output queue."""

    _END = object()

    def __init__(self, name: str, stop: threading.Event, source, fn, out: queue.Queue | None):
        super().__init__(name=name, daemon=True)
        self.stop, self.source, self.fn, self.out = stop, source, fn, out
        self.error: BaseException | None = None

    def _items(self):
        if isinstance(self.source, queue.Queue):
            while not self.stop.is_set():
                try:
                    item = self.source.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if item is _Stage._END:
                    return
                yield item
        else:
            yield from self.source

    def _put(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def run(self) -> None:
        if self.name != "batch-score":
            _lower_thread_priority(IO_THREAD_NICE)
        try:
            for item in self._items():
                if self.stop.is_set():
                    return
                result = self.fn(item)
                if self.out is not None:
                    self._put(result)
            if self.out is not None:
                self._put(_Stage._END)
        except BaseException as e:  # handed to the main thread, which re-raises it
            self.error = e
            self.stop.set()


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """One path once made absolute with symlinks resolved (relative paths and links included)."""
    return Path(a).resolve() == Path(b).resolve()


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """``_same_path``, or two existing names of one file (a hard link)."""
    if _same_path(a, b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def _check_creatable(path: Path, option: str) -> None:
    ancestor = next(a for a in path.absolute().parents if a.exists())  # the filesystem root exists
    if not ancestor.is_dir():
        raise BatchScoringError(
            f"{str(ancestor)!r} is a file, so {str(path)!r} cannot be created: fix {option}"
        )


def _check_report(report: Path, input_path: Path, out: Path) -> None:
    for other, what in ((input_path, "input"), (out, "output")):
        if _same_file(report, other):
            raise BatchScoringError(
                f"report {str(report)!r} is the {what} file {str(other)!r}: writing it would replace "
                f"the {what}; choose another --report path (e.g. report.html)"
            )
    if report.is_dir():
        raise BatchScoringError(f"report {str(report)!r} is a directory: give a file name (*.html)")
    _check_creatable(report, "--report")


def check_paths(
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    output_fmt: str = "auto",
    overwrite: bool = True,
    report_path: str | os.PathLike | None = None,
    chunk_rows: int | None = None,
) -> str:
    """The checks ``score_file`` makes before it loads the model or reads a row (output format,
    overwrite, output or report == input, report == output, folders that cannot be created).
    Returns the output format. The command also calls it before it loads the model."""
    if chunk_rows is not None and chunk_rows < 1:
        raise BatchScoringError(
            f"chunk rows must be at least 1 (got {chunk_rows}); leave it out for automatic"
        )
    out = Path(output_path)
    out_fmt = output_format(out, output_fmt)
    if out.exists() and not overwrite:
        raise BatchScoringError(
            f"output {str(out)!r} already exists and overwriting is off (--no-overwrite): remove it or "
            "choose another output path"
        )
    if out.exists() and out.is_dir():
        raise BatchScoringError(f"output {str(out)!r} is a directory: give a file name (*.csv / *.parquet)")
    if Path(input_path).exists() and out.exists() and _same_path(out, input_path):
        raise BatchScoringError("output would overwrite the input file: choose another output path")
    _check_creatable(out, "--output")
    if report_path is not None:
        _check_report(Path(report_path), Path(input_path), out)
    return out_fmt


@dataclass
class _ScoreState:
    """What the three stages of one ``score_file`` run share: the model, the open input, the output
    writer, and the tallies the summary reports (rows, predicted classes, score histogram)."""

    model: BatchModel
    src: Source
    writer: AtomicTableWriter
    schema: pa.Schema
    progress: Callable[[int], None] | None = None
    rows: int = 0  # rows read so far: the next batch's first row number
    counts: np.ndarray = field(init=False)
    hist: np.ndarray = field(init=False)
    class_index: dict[Any, int] = field(init=False)

    def __post_init__(self) -> None:
        self.counts = np.zeros(max(1, len(self.model.classes)), dtype=np.int64)
        self.hist = np.zeros(SCORE_BINS, dtype=np.int64)
        self.class_index = {c: i for i, c in enumerate(self.model.classes)}

    @property
    def n_classes(self) -> int:
        return len(self.model.prob_columns)


def _convert(state: _ScoreState, batch: pa.RecordBatch) -> tuple[pa.Array, np.ndarray]:
    """Read stage: (ids, float32 feature matrix) of one input batch."""
    first = state.src.first_row + state.rows  # row number in the whole file (a shard starts later)
    state.rows += batch.num_rows
    ids = (
        batch.column(state.src.id_column)
        if state.src.id_column
        else from_numpy(np.arange(first, first + batch.num_rows, dtype=np.int64), pa.int64())
    )
    return ids, to_matrix(batch, state.model.features, first)


def _score(state: _ScoreState, item: tuple[pa.Array, np.ndarray]) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Score stage: one ``InferenceSession.run`` per chunk."""
    ids, matrix = item
    n_classes = state.n_classes
    if len(matrix):
        label, proba = state.model.score(matrix)
    else:
        label, proba = np.empty(0, np.int64), np.empty((0, n_classes), np.float32)
    if proba.shape[1] != n_classes:
        raise modelcard.ModelPackageError(
            f"model returned {proba.shape[1]} probability columns but its card names {n_classes} "
            "classes; re-package the model"
        )
    return ids, label, proba


def _write_result(state: _ScoreState, item: tuple[pa.Array, np.ndarray, np.ndarray]) -> int:
    """Write stage: one output batch, plus the class counts and score histogram of its rows."""
    ids, label, proba = item
    model = state.model
    probs_t = np.ascontiguousarray(proba.T, dtype=np.float32)
    arrays = [
        ids,
        from_numpy(label.astype(np.int64, copy=False), pa.int64()),
        *(from_numpy(p, pa.float32()) for p in probs_t),
    ]
    state.writer.write(pa.RecordBatch.from_arrays(arrays, schema=state.schema))
    if len(model.classes) and len(label):
        values, n = np.unique(label, return_counts=True)
        for v, k in zip(values.tolist(), n.tolist(), strict=True):
            if v in state.class_index:
                state.counts[state.class_index[v]] += k
    if len(label):
        score = signals.score(proba)
        bins = np.clip((score * SCORE_BINS).astype(np.int64), 0, SCORE_BINS - 1)
        state.hist[:] += np.bincount(bins, minlength=SCORE_BINS)
    if state.progress is not None:
        state.progress(len(label))
    return len(label)


def _summary(state: _ScoreState, seconds: float, out: Path, out_fmt: str, id_name: str) -> ScoreSummary:
    model = state.model
    names = (
        model.class_names if len(model.class_names) == len(state.counts) else [str(c) for c in model.classes]
    )
    return ScoreSummary(
        rows=state.rows,
        seconds=seconds,
        output=str(out),
        input_format=state.src.format,
        output_format=out_fmt,
        id_column=id_name,
        class_counts={str(n): int(c) for n, c in zip(names, state.counts.tolist(), strict=False)},
        model=f"{model.name}:{model.version}",
        score_histogram=state.hist.tolist(),
    )


def score_file(
    model_dir: str | os.PathLike | BatchModel,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    chunk_rows: int | None = None,
    id_column: str | None = None,
    input_fmt: str = "auto",
    output_fmt: str = "auto",
    threads: int = 0,
    spinning: bool = False,
    overwrite: bool = True,
    progress: Callable[[int], None] | None = None,
    on_open: Callable[[Source], None] | None = None,
    pipelined: bool = True,
    report_path: str | os.PathLike | None = None,
    shard: Shard | None = None,
) -> ScoreSummary:
    """Score ``input_path`` into ``output_path`` (atomically).

    ``shard`` (``serving.batch.shard.plan_shards``): score only that slice of the input; its rows
    keep their row numbers in the whole file (errors, the ``row_number`` id).

    ``on_open(source)`` is called once the input is open and checked (``source.total_rows`` is the
    row count when the format records it), ``progress(n)`` after each chunk of ``n`` rows is written.
    ``report_path``: also write ``summary_html`` there, atomically too, and complete before the
    output is renamed into place (a report that cannot be written leaves the old output as it was).
    After the rename, partial files that killed earlier runs left for the same output (or report)
    are removed.

    Raises ``BatchScoringError`` (bad input/output), ``modelcard.ModelPackageError`` (bad package).
    """
    t0 = time.perf_counter()
    started = time.time()  # partial files last written before this are leftovers of earlier runs
    out_fmt = check_paths(
        input_path,
        output_path,
        output_fmt=output_fmt,
        overwrite=overwrite,
        report_path=report_path,
        chunk_rows=chunk_rows,
    )
    out = Path(output_path)
    report = None if report_path is None else Path(report_path)
    model = model_dir if isinstance(model_dir, BatchModel) else load_model(model_dir, threads, spinning)
    chunk_rows = chunk_rows or auto_chunk_rows(len(model.features))
    src = open_source(input_path, model.features, id_column, chunk_rows, input_fmt, shard)
    try:
        if on_open is not None:
            on_open(src)
        id_name = src.id_column or ROW_NUMBER_COLUMN
        if id_name in (PREDICTION_COLUMN, *model.prob_columns):
            raise BatchScoringError(
                f"id column {id_name!r} has the name of an output column: rename it in the input, or "
                "pass another --id-column"
            )
        schema = output_schema(model, src.id_type, id_name)
        polars_csv = use_polars(Path(input_path).stat().st_size)
        writer = AtomicTableWriter(out, out_fmt, schema, polars_csv)
        try:  # an unwritable report folder shows now, before any row is scored
            report_writer = None if report is None else AtomicTextWriter(report)
        except BaseException:
            writer.abort()
            raise
    except BaseException:
        src.close()
        raise
    state = _ScoreState(model, src, writer, schema, progress)
    convert = functools.partial(_convert, state)
    score = functools.partial(_score, state)
    write_result = functools.partial(_write_result, state)

    stop = threading.Event()
    q_conv: queue.Queue = queue.Queue(_QUEUE_DEPTH)
    q_scored: queue.Queue = queue.Queue(_QUEUE_DEPTH)
    stages = [
        _Stage("batch-read", stop, src.batches, convert, q_conv),
        _Stage("batch-score", stop, q_conv, score, q_scored),
        _Stage("batch-write", stop, q_scored, write_result, None),
    ]
    committed = report_done = False
    try:
        if not pipelined:  # one thread, stage after stage (kept for the benchmark's comparison)
            for batch in src.batches:
                write_result(score(convert(batch)))
            stages = []
        for s in stages:
            s.start()
        # the main thread only waits, so it stays responsive to SIGINT/SIGTERM (KeyboardInterrupt)
        while any(s.is_alive() for s in stages):
            stages[-1].join(timeout=_POLL_S)
            if stop.is_set():
                break
        for s in stages:
            if s.error is not None:
                raise s.error
        writer.finish()
        summary = _summary(state, time.perf_counter() - t0, out, out_fmt, id_name)
        if report_writer is not None:
            report_writer.write(summary_html(summary))  # complete before the output is renamed
        writer.commit()
        committed = True
        if report_writer is not None:
            report_writer.commit()  # a rename in the folder where its file was just written
        report_done = True
    finally:
        if not committed:
            stop.set()
            for s in stages:
                s.join(timeout=10)
            writer.abort()
        if report_writer is not None and not report_done:
            report_writer.abort()
        src.close()
    for target in (out, *([report] if report is not None else [])):
        remove_stale_partials(target, started)
    return summary
