"""Batch (offline) scoring: a CSV or Parquet table in, predictions and probabilities out.

One implementation shared by the command (``python -m serving.batch``) and the KFP component
(``pipelines/components/batch.py``, which embeds this package), so both score the same way:

* the model package is found and its sha256 checked (``modelcard.verify_package``) first;
* the input is streamed in chunks with pyarrow (``csv.open_csv`` / ``ParquetFile.iter_batches``),
  only the model's feature columns (matched by *name*) and the id column are read; extra
  columns are ignored;
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
import os
import queue
import re
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.core import modelcard

# Chunks of about 2 MB of float32 features (17,476 rows at 30 features) stay cache-sized: on the
# benchmark's 1M-row table 16k-row chunks beat 64k and 128k (serving/batch/README.md).
CHUNK_BYTES = 2 << 20
DEFAULT_CHUNK_ROWS = 16_384  # what open_source uses when called without a model at hand
ROW_NUMBER_COLUMN = "row_number"
DEFAULT_ID_COLUMN = "id"
PREDICTION_COLUMN = "prediction"
PROB_PREFIX = "prob_"
SCORE_BINS = 20
FORMATS = ("csv", "parquet")
_SUFFIX_FORMAT = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_QUEUE_DEPTH = 2  # chunks in flight between two stages: enough to overlap, little memory
_POLL_S = 0.1
# The read and write threads run at nice +5 (Linux, per thread): onnxruntime's parallel sections
# stall whenever one of their threads is pre-empted, so the I/O threads should yield to them.
# Measured on the 2-core box, interleaved runs of 1M Parquet rows: forest +5% (median of 4),
# logistic +15% (median of 5). Workers that pyarrow's thread pool spawns from these threads inherit
# the lower priority too (they do the same I/O work). Set to 0 to turn off.
IO_THREAD_NICE = 5


class BatchScoringError(ValueError):
    """The input, output or model cannot be scored; the message says what is wrong and how to fix it."""


class SchemaMismatchError(BatchScoringError):
    """The input table does not match the model card's input schema (missing or mistyped column)."""


def one_line(text: object, limit: int = 300) -> str:
    """``text`` with every run of whitespace and control characters (newlines included) collapsed to
    one space, at most ``limit`` characters: for third-party messages (pyarrow's can span lines and
    quote raw bytes) and for whole error lines."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class BatchModel:
    """A verified model package with its onnxruntime session."""

    name: str
    version: str
    features: list[str]
    input_name: str
    classes: list[Any]
    class_names: list[str]
    session: ort.InferenceSession = field(repr=False)

    @property
    def prob_columns(self) -> list[str]:
        return prob_column_names(self.class_names)

    def score(self, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels int64 [n], probabilities float32 [n, n_classes]) for a float32 [n, n_features] matrix."""
        label, proba = self.session.run(["label", "probabilities"], {self.input_name: matrix})
        return label, proba


def prob_column_names(class_names: list[str]) -> list[str]:
    """``prob_<class name>`` with anything but letters, digits, '-' and '.' turned into '_'; unique."""
    names = [
        PROB_PREFIX + (re.sub(r"[^0-9A-Za-z.-]+", "_", str(c)).strip("_") or str(i))
        for i, c in enumerate(class_names)
    ]
    if len(set(names)) != len(names):  # two class names collapse to one: fall back to indices
        names = [f"{PROB_PREFIX}{i}" for i in range(len(class_names))]
    return names


def session_options(threads: int = 0, spinning: bool = False) -> ort.SessionOptions:
    """intra-op threads: 0 lets onnxruntime use one thread per physical core (its default).

    Spinning is off by default: idle onnxruntime threads would otherwise busy-wait between
    chunks and take the cores the reader and writer threads need.
    """
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.intra_op_num_threads = max(0, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def load_model(model_dir: str | os.PathLike, threads: int = 0, spinning: bool = False) -> BatchModel:
    """Find the package under ``model_dir``, verify its sha256 and open an onnxruntime session."""
    pkg = modelcard.find_package(model_dir)
    card = modelcard.verify_package(pkg)
    inputs = card["inputs"]
    if len(inputs) != 1 or inputs[0].get("datatype") != "FP32" or not inputs[0].get("features"):
        raise modelcard.ModelPackageError(
            f"model card in {str(pkg)!r} must declare one FP32 input with feature names "
            "(inputs[0].features); re-package the model with the training pipeline"
        )
    sess = ort.InferenceSession(
        str(modelcard.onnx_path(pkg)), session_options(threads, spinning), providers=["CPUExecutionProvider"]
    )
    outputs = {o.name for o in sess.get_outputs()}
    if not {"label", "probabilities"} <= outputs:
        raise modelcard.ModelPackageError(
            f"{str(modelcard.onnx_path(pkg))!r} has outputs {sorted(outputs)}, expected 'label' and "
            "'probabilities' (export with skl2onnx options zipmap=False)"
        )
    n_classes = sess.get_outputs()[[o.name for o in sess.get_outputs()].index("probabilities")].shape[-1]
    classes = list(card.get("classes") or [])
    if not classes and isinstance(n_classes, int):
        classes = list(range(n_classes))
    class_names = [str(c) for c in (card.get("class_names") or classes)]
    return BatchModel(
        name=card["name"],
        version=card["version"],
        features=list(inputs[0]["features"]),
        input_name=inputs[0].get("name", sess.get_inputs()[0].name),
        classes=classes,
        class_names=class_names,
        session=sess,
    )


# --------------------------------------------------------------------------- formats


def input_format(path: str | os.PathLike, declared: str = "auto") -> str:
    """'csv' or 'parquet': the declared one, else by extension, else by the Parquet magic bytes."""
    if declared != "auto":
        if declared not in FORMATS:
            raise BatchScoringError(f"unknown input format {declared!r}: use one of auto, csv, parquet")
        return declared
    p = Path(path)
    if p.suffix.lower() in _SUFFIX_FORMAT:
        return _SUFFIX_FORMAT[p.suffix.lower()]
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise BatchScoringError(f"cannot read input {str(p)!r}: {e.strerror or e}") from e
    return "parquet" if magic == b"PAR1" else "csv"


def output_format(path: str | os.PathLike, declared: str = "auto") -> str:
    """'csv' or 'parquet' from the declared format or the output file's extension."""
    if declared != "auto":
        if declared not in FORMATS:
            raise BatchScoringError(f"unknown output format {declared!r}: use one of auto, csv, parquet")
        return declared
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX_FORMAT:
        raise BatchScoringError(
            f"cannot tell the output format from {str(path)!r}: name the output file *.csv or *.parquet"
        )
    return _SUFFIX_FORMAT[suffix]


# --------------------------------------------------------------------------- reading


@dataclass
class Source:
    """An opened input: its batches (only the needed columns), row count when known, id column."""

    format: str
    columns: list[str]
    id_column: str | None
    total_rows: int | None
    batches: Iterator[pa.RecordBatch]
    close: Callable[[], None] = lambda: None
    id_type: pa.DataType | None = None  # the id column's type as written out (None: row numbers)


def _castable(t: pa.DataType) -> bool:
    return (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_decimal(t)
        or pa.types.is_null(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_dictionary(t)
    )


def _resolve_id_column(columns: list[str], id_column: str | None, path: Path) -> str | None:
    if id_column is None:
        return DEFAULT_ID_COLUMN if DEFAULT_ID_COLUMN in columns else None
    if id_column not in columns:
        raise SchemaMismatchError(
            f"id column {id_column!r} is not in {str(path)!r} (its columns: {_preview(columns)}); "
            "pass --id-column with one of them, or leave it out to number the rows"
        )
    return id_column


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _check_columns(columns: list[str], features: list[str], path: Path) -> None:
    missing = [f for f in features if f not in columns]
    if missing:
        raise SchemaMismatchError(
            f"input {str(path)!r} lacks {len(missing)} column(s) the model needs: {_preview(missing)}; "
            f"columns are matched by name: add them or rename the input's columns to the model card's "
            f"feature names"
        )


def _open_csv(path: Path, features: list[str], id_column: str | None, chunk_rows: int) -> Source:
    probe_bytes = 1 << 20
    try:
        probe = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=probe_bytes))
    except pa.ArrowInvalid as e:
        if "Empty CSV file" in str(e):
            raise BatchScoringError(
                f"input {str(path)!r} is empty (no header row): write a header with the model's "
                "feature names, even for a table with no rows"
            ) from e
        raise BatchScoringError(f"cannot parse CSV {str(path)!r}: {one_line(e)}") from e
    try:
        columns = list(probe.schema.names)
    except UnicodeDecodeError as e:  # pyarrow keeps the header as bytes and decodes it here
        probe.close()
        raise BatchScoringError(_header_not_utf8(path, probe.schema, e)) from e
    try:
        first = probe.read_next_batch()
        probed = min(probe_bytes, path.stat().st_size)
        per_row = probed / first.num_rows if first.num_rows else 256.0
    except StopIteration:
        per_row = 256.0
    except pa.ArrowInvalid:
        per_row = 256.0  # the real reader below reports the problem with column names
    _check_columns(columns, features, path)
    id_col = _resolve_id_column(columns, id_column, path)
    wanted = list(dict.fromkeys([*features, *([id_col] if id_col else [])]))
    types = {f: pa.float32() for f in features}
    if id_col and id_col not in types:
        types[id_col] = pa.string()  # ids are copied through verbatim, never re-typed
    # pyarrow's CSV reader is sized in bytes: turn the row count into a block size from the first rows
    block = int(min(max(chunk_rows * per_row * 1.05, 1 << 16), 1 << 30))
    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=block, use_threads=True),
            convert_options=pacsv.ConvertOptions(
                column_types=types, include_columns=wanted, strings_can_be_null=False
            ),
        )
    except pa.ArrowInvalid as e:
        raise _csv_error(e, columns, path) from e

    def batches() -> Iterator[pa.RecordBatch]:
        while True:
            try:
                yield reader.read_next_batch()
            except StopIteration:
                return
            except pa.ArrowInvalid as e:
                raise _csv_error(e, columns, path) from e

    id_type = None if not id_col else pa.float32() if id_col in types and id_col in features else pa.string()
    return Source("csv", columns, id_col, None, batches(), reader.close, id_type)


def _header_not_utf8(path: Path, schema: pa.Schema, e: UnicodeDecodeError) -> str:
    where = ""
    for i in range(len(schema)):
        try:
            _ = schema.field(i).name
        except UnicodeDecodeError:
            where = f"column #{i + 1} ({e.object.decode('utf-8', 'backslashreplace')}): "
            break
    return (
        f"the header of CSV {str(path)!r} is not valid UTF-8 ({where}{e.reason}, byte "
        f"0x{e.object[e.start]:02x}); save the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
    )


def _csv_error(e: Exception, columns: list[str], path: Path) -> BatchScoringError:
    m = re.search(r"In CSV column #(\d+): .*?invalid value '(.*)'", str(e))
    if m and int(m.group(1)) < len(columns):
        name = columns[int(m.group(1))]
        return SchemaMismatchError(
            f"column {name!r} in {str(path)!r} holds a value that is not a number: {m.group(2)!r}; "
            "the model needs every feature column castable to float32: clean or re-encode that column"
        )
    return BatchScoringError(f"cannot parse CSV {str(path)!r}: {one_line(e)}")


def _open_parquet(path: Path, features: list[str], id_column: str | None, chunk_rows: int) -> Source:
    try:
        pf = pq.ParquetFile(path, memory_map=True)
    except (pa.ArrowInvalid, OSError) as e:
        raise BatchScoringError(
            f"cannot read {str(path)!r} as Parquet ({one_line(e)}); if it is CSV, name it *.csv or "
            "pass --input-format csv"
        ) from e
    schema = pf.schema_arrow
    columns = list(schema.names)
    _check_columns(columns, features, path)
    for f in features:
        t = schema.field(f).type
        if not _castable(t):
            raise SchemaMismatchError(
                f"column {f!r} in {str(path)!r} has type {t}, which cannot be cast to float32; "
                "the model needs numeric feature columns"
            )
    id_col = _resolve_id_column(columns, id_column, path)
    wanted = list(dict.fromkeys([*features, *([id_col] if id_col else [])]))

    def batches() -> Iterator[pa.RecordBatch]:
        # the footer was fine; a damaged data page only shows once it is read
        try:
            yield from pf.iter_batches(batch_size=chunk_rows, columns=wanted, use_threads=True)
        except (pa.ArrowException, OSError) as e:
            raise BatchScoringError(
                f"cannot read the data of Parquet file {str(path)!r} ({one_line(e)}): the file is "
                "damaged or truncated; write it again"
            ) from e

    return Source(
        "parquet",
        columns,
        id_col,
        pf.metadata.num_rows,
        batches(),
        pf.close,
        schema.field(id_col).type if id_col else None,
    )


def open_source(
    path: str | os.PathLike,
    features: list[str],
    id_column: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    fmt: str = "auto",
) -> Source:
    p = Path(path)
    if not p.is_file():
        raise BatchScoringError(f"input file {str(p)!r} does not exist (or is not a file)")
    fmt = input_format(p, fmt)
    opener = _open_csv if fmt == "csv" else _open_parquet
    return opener(p, features, id_column, chunk_rows)


# --------------------------------------------------------------------------- conversion


def _cast_column(col: pa.Array, name: str) -> pa.Array:
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    try:
        return pc.cast(col, pa.float32(), safe=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        sample = _first_bad_value(col)
        raise SchemaMismatchError(
            f"column {name!r} cannot be cast to float32 (e.g. value {sample!r}); the model needs "
            "numeric feature columns: clean or re-encode that column"
        ) from e


def _first_bad_value(col: pa.Array) -> Any:
    for v in col.to_pylist():
        if v is None:
            continue
        try:
            float(v)
        except (TypeError, ValueError):
            return v
    return None


_NUMPY_TYPES = {
    pa.int8(): np.int8, pa.int16(): np.int16, pa.int32(): np.int32, pa.int64(): np.int64,
    pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32, pa.uint64(): np.uint64,
    pa.float16(): np.float16, pa.float32(): np.float32, pa.float64(): np.float64,
}  # fmt: skip


# ``Array.to_numpy`` and ``pa.array`` make pyarrow import pandas on first use: about a second of
# start-up (measured) that the batch command has no use for. These two go through the buffers.
def _as_numpy(col: pa.Array) -> np.ndarray:
    """Zero-copy numpy view of a null-free numeric array (booleans/decimals are cast first)."""
    dtype = _NUMPY_TYPES.get(col.type)
    if dtype is None:
        col, dtype = pc.cast(col, pa.float32()), np.float32
    if len(col) == 0:
        return np.empty(0, dtype)
    itemsize = np.dtype(dtype).itemsize
    return np.frombuffer(col.buffers()[1], dtype=dtype, count=len(col), offset=col.offset * itemsize)


def _from_numpy(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """Zero-copy arrow array over a 1-d numpy array (no nulls)."""
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(values)])


def auto_chunk_rows(n_features: int) -> int:
    """Rows per chunk so one chunk's float32 matrix is about ``CHUNK_BYTES``."""
    return int(min(max(CHUNK_BYTES // (4 * max(1, n_features)), 1024), 1 << 20))


def to_matrix(batch: pa.RecordBatch, features: list[str], first_row: int = 0) -> np.ndarray:
    """One C-contiguous float32 ``[rows, len(features)]`` matrix; rejects nulls and NaN/inf.

    ``first_row`` is the batch's offset in the file, used only to name the offending row.
    """
    n = batch.num_rows
    out = np.empty((n, len(features)), dtype=np.float32)
    for j, name in enumerate(features):
        col = batch.column(name)
        t = col.type
        if not (pa.types.is_floating(t) or pa.types.is_integer(t) or pa.types.is_boolean(t)):
            col = _cast_column(col, name)  # strings, decimals, dictionaries: arrow's cast, with checks
        if col.null_count:
            row = first_row + int(pc.index(pc.is_null(col), True).as_py())
            raise SchemaMismatchError(
                f"column {name!r} has {col.null_count} missing value(s) (empty/NA/null; first at row {row}); "
                "the model cannot score missing values: impute or drop those rows"
            )
        # numpy casts (float64/int -> float32) while it scatters into the row-major matrix: one pass
        out[:, j] = _as_numpy(col)
    finite = np.isfinite(out)
    if not finite.all():
        r, c = np.argwhere(~finite)[0]
        raise SchemaMismatchError(
            f"column {features[c]!r} has a non-finite value ({out[r, c]}) at row {first_row + int(r)}; "
            "the model cannot score NaN or infinity: impute or drop those rows"
        )
    return out


# --------------------------------------------------------------------------- writing


def output_schema(model: BatchModel, id_type: pa.DataType | None, id_name: str) -> pa.Schema:
    fields = [pa.field(id_name, id_type or pa.int64()), pa.field(PREDICTION_COLUMN, pa.int64())]
    fields += [pa.field(c, pa.float32()) for c in model.prob_columns]
    return pa.schema(fields)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _partial_file(target: Path) -> Path:
    """An empty ``.<name>.<random>.partial`` beside ``target`` (its folder is created if missing)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode of a new file
    return Path(tmp)


def _partial_pattern(target: Path) -> re.Pattern[str]:
    # what ``_partial_file`` (tempfile.mkstemp: 8 characters of [a-z0-9_]) names for this target
    return re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}\.partial")


def remove_stale_partials(target: str | os.PathLike, older_than: float) -> list[Path]:
    """Remove the partial files of ``target`` (``.<name>.<random>.partial`` beside it) last modified
    before ``older_than`` (a ``time.time()``): what earlier runs killed with SIGKILL left behind.

    Only regular files of exactly that name pattern are touched; a newer one may belong to a run
    still writing the same output and is kept. Returns the removed paths; errors are ignored.
    """
    target = Path(target)
    pattern = _partial_pattern(target)
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_mtime < older_than:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


class _AtomicTextWriter:
    """A text file (the HTML report) written to ``.<name>.<random>.partial``, renamed by ``commit``."""

    def __init__(self, target: Path):
        self.target = target
        self.tmp = _partial_file(target)

    def write(self, text: str) -> None:
        with open(self.tmp, "w", encoding="utf-8") as f:
            f.write(text)

    def commit(self) -> None:
        os.replace(self.tmp, self.target)

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)


class _AtomicTableWriter:
    """Writes batches to ``.<name>.<random>.partial`` beside the target; ``commit`` renames it into place."""

    def __init__(self, target: Path, fmt: str, schema: pa.Schema):
        self.target = target
        self.tmp = _partial_file(target)
        self._closed = False
        try:
            if fmt == "parquet":
                # probabilities are high-entropy floats: dictionary encoding and compression cost
                # CPU (2-4x the write time, measured) and save next to nothing; ids and labels keep both
                keys = [schema.names[0], PREDICTION_COLUMN]
                codecs = {c: ("snappy" if c in keys else "none") for c in schema.names}
                self._w = pq.ParquetWriter(self.tmp, schema, compression=codecs, use_dictionary=keys)
            else:
                self._w = pacsv.CSVWriter(self.tmp, schema)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise

    def write(self, batch: pa.RecordBatch) -> None:
        self._w.write_batch(batch)

    def finish(self) -> None:
        """Write the footer and close the partial file (where a full disk shows), not yet renamed."""
        if not self._closed:
            self._closed = True
            self._w.close()

    def commit(self) -> None:
        self.finish()
        os.replace(self.tmp, self.target)

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # the partial file goes next, whatever state the writer is in
            self._w.close()
        self.tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- pipeline


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
    # P(predicted class): the same score the serving runtime exports as mlrollout_prediction_score
    score_histogram: list[int] = field(default_factory=lambda: [0] * SCORE_BINS)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"scored {self.rows:,} rows in {self.seconds:.2f} s ({self.rows_per_s:,.0f} rows/s) "
            f"with {self.model} -> {self.output}"
        )


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
) -> ScoreSummary:
    """Score ``input_path`` into ``output_path`` (atomically).

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
    src = open_source(input_path, model.features, id_column, chunk_rows, input_fmt)
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
        writer = _AtomicTableWriter(out, out_fmt, schema)
        try:  # an unwritable report folder shows now, before any row is scored
            report_writer = None if report is None else _AtomicTextWriter(report)
        except BaseException:
            writer.abort()
            raise
    except BaseException:
        src.close()
        raise
    features = model.features
    n_classes = len(model.prob_columns)
    counts = np.zeros(max(1, len(model.classes)), dtype=np.int64)
    hist = np.zeros(SCORE_BINS, dtype=np.int64)
    class_index = {c: i for i, c in enumerate(model.classes)}
    offset = [0]

    def convert(batch: pa.RecordBatch):
        first = offset[0]
        offset[0] += batch.num_rows
        ids = (
            batch.column(src.id_column)
            if src.id_column
            else _from_numpy(np.arange(first, first + batch.num_rows, dtype=np.int64), pa.int64())
        )
        return ids, to_matrix(batch, features, first)

    def score(item):
        ids, matrix = item
        if len(matrix):
            label, proba = model.score(matrix)
        else:
            label, proba = np.empty(0, np.int64), np.empty((0, n_classes), np.float32)
        if proba.shape[1] != n_classes:
            raise modelcard.ModelPackageError(
                f"model returned {proba.shape[1]} probability columns but its card names {n_classes} "
                "classes; re-package the model"
            )
        return ids, label, proba

    def write_result(item):
        ids, label, proba = item
        probs_t = np.ascontiguousarray(proba.T, dtype=np.float32)
        arrays = [
            ids,
            _from_numpy(label.astype(np.int64, copy=False), pa.int64()),
            *(_from_numpy(p, pa.float32()) for p in probs_t),
        ]
        writer.write(pa.RecordBatch.from_arrays(arrays, schema=schema))
        if len(model.classes) and len(label):
            values, n = np.unique(label, return_counts=True)
            for v, k in zip(values.tolist(), n.tolist(), strict=True):
                if v in class_index:
                    counts[class_index[v]] += k
        if len(label):
            score = proba[:, 1] if n_classes == 2 else proba.max(axis=1)
            bins = np.clip((score * SCORE_BINS).astype(np.int64), 0, SCORE_BINS - 1)
            hist[:] += np.bincount(bins, minlength=SCORE_BINS)
        if progress is not None:
            progress(len(label))
        return len(label)

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
        names = (
            model.class_names if len(model.class_names) == len(counts) else [str(c) for c in model.classes]
        )
        summary = ScoreSummary(
            rows=offset[0],
            seconds=time.perf_counter() - t0,
            output=str(out),
            input_format=src.format,
            output_format=out_fmt,
            id_column=id_name,
            class_counts={str(n): int(c) for n, c in zip(names, counts.tolist(), strict=False)},
            model=f"{model.name}:{model.version}",
            score_histogram=hist.tolist(),
        )
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
