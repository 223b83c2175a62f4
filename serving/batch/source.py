"""The batch engine's input: a CSV or Parquet table opened as a stream of record batches (only the
model's feature columns and the id column), and each batch turned into one float32 matrix.

Columns are matched by *name* and checked against the model's features before a row is scored: a
missing column, or one that cannot be cast to float32, stops the run with a message naming it.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from serving.batch.errors import BatchScoringError, SchemaMismatchError, one_line

if TYPE_CHECKING:
    from serving.batch.shard import Shard

# Chunks of about 2 MB of float32 features (17,476 rows at 30 features) stay cache-sized: on the
# benchmark's 1M-row table 16k-row chunks beat 64k and 128k (serving/batch/README.md).
CHUNK_BYTES = 2 << 20
DEFAULT_CHUNK_ROWS = 16_384  # what open_source uses when called without a model at hand
DEFAULT_ID_COLUMN = "id"
# Inputs from this size on are read with polars (CSV, and Parquet of plain numeric/string columns)
# and CSV output is written with polars; smaller ones stay on pyarrow. polars read the benchmark's
# files with 35-50% less CPU than pyarrow and wrote CSV 3x faster (python -m serving.bench.batch_io),
# but importing it costs about 0.27 CPU-s, which a file pays back from some 30-90 MB
# (serving/batch/README.md).
POLARS_MIN_BYTES = 32 << 20


def use_polars(input_bytes: int) -> bool:
    """Whether a run over an input of this size reads it, and writes CSV, with polars."""
    return input_bytes >= POLARS_MIN_BYTES


FORMATS = ("csv", "parquet")
SUFFIX_FORMAT = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def input_format(path: str | os.PathLike, declared: str = "auto") -> str:
    """'csv' or 'parquet': the declared one, else by extension, else by the Parquet magic bytes."""
    if declared != "auto":
        if declared not in FORMATS:
            raise BatchScoringError(f"unknown input format {declared!r}: use one of auto, csv, parquet")
        return declared
    p = Path(path)
    if p.suffix.lower() in SUFFIX_FORMAT:
        return SUFFIX_FORMAT[p.suffix.lower()]
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise BatchScoringError(f"cannot read input {str(p)!r}: {e.strerror or e}") from e
    return "parquet" if magic == b"PAR1" else "csv"


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
    first_row: int = 0  # row number of the first batch's first row in the whole file (a shard's offset)


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


class _ByteRange(io.RawIOBase):
    """The header line of a CSV file followed by its bytes ``[start, stop)``: one shard as a file."""

    def __init__(self, path: Path, header_end: int, start: int, stop: int):
        self._f = open(path, "rb")  # noqa: SIM115 - closed with this object
        self._parts = [(0, header_end), (max(start, header_end), stop)]

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self._parts:
            pos, stop = self._parts[0]
            if pos >= stop:
                self._parts.pop(0)
                continue
            self._f.seek(pos)
            n = self._f.readinto(memoryview(b)[: min(len(b), stop - pos)])
            if not n:
                self._parts.pop(0)
                continue
            self._parts[0] = (pos + n, stop)
            return n
        return 0

    def close(self) -> None:
        self._f.close()
        super().close()


def _open_csv(
    path: Path, features: list[str], id_column: str | None, chunk_rows: int, shard: Shard | None = None
) -> Source:
    def stream():
        # a whole file goes to pyarrow by path (its own buffered reads); a shard through _ByteRange
        if shard is None:
            return path
        return io.BufferedReader(_ByteRange(path, shard.header_end, shard.start, shard.stop), 1 << 20)

    probe_bytes = 1 << 20
    try:
        probe = pacsv.open_csv(stream(), read_options=pacsv.ReadOptions(block_size=probe_bytes))
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
        size = path.stat().st_size if shard is None else shard.header_end + shard.stop - shard.start
        probed = min(probe_bytes, size)
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
    probe.close()

    def arrow_batches() -> Iterator[pa.RecordBatch]:
        try:
            reader = pacsv.open_csv(
                stream(),
                read_options=pacsv.ReadOptions(block_size=block, use_threads=True),
                convert_options=pacsv.ConvertOptions(
                    column_types=types, include_columns=wanted, strings_can_be_null=False
                ),
            )
        except pa.ArrowInvalid as e:
            raise _csv_error(e, columns, path) from e
        try:
            while True:
                try:
                    yield reader.read_next_batch()
                except StopIteration:
                    return
                except pa.ArrowInvalid as e:
                    raise _csv_error(e, columns, path) from e
        finally:
            reader.close()

    first_row = shard.first_row if shard is not None else 0
    schema = pa.schema([pa.field(c, types[c]) for c in wanted])
    id_type = None if not id_col else pa.float32() if id_col in types and id_col in features else pa.string()
    if not use_polars(path.stat().st_size if shard is None else shard.stop - shard.start):
        batches = arrow_batches()
    else:
        overrides = {f.name: "Float32" if f.type == pa.float32() else "String" for f in schema}

        def scan(pl):
            dtypes = {k: getattr(pl, v) for k, v in overrides.items()}
            return pl.scan_csv(
                stream(), infer_schema=False, schema_overrides=dtypes, empty_string_is_null=False
            )

        batches = _polars_batches(
            scan, schema, chunk_rows, arrow_batches, features, first_row, f"parse CSV {str(path)!r}"
        )
    return Source("csv", columns, id_col, None, batches, batches.close, id_type, first_row)


def _polars_batches(scan, schema: pa.Schema, chunk_rows: int, arrow_batches, features: list[str],
                    first_row: int, what: str) -> Iterator[pa.RecordBatch]:  # fmt: skip
    """The needed columns read by polars (``scan(pl)``, a LazyFrame, streamed in ``chunk_rows``
    batches), as arrow batches of ``schema``.

    polars is the reader for large files because it was the fastest correct one on full-precision,
    short and quoted CSV floats and on Parquet (``python -m serving.bench.batch_io``:
    serving/batch/README.md). When polars refuses the input (text in a number column, ``NA``, a
    ragged line, a damaged page), the same bytes are read again with pyarrow's reader up to the bad
    row, so the error is the one line pyarrow's path gives, naming the column, the value or the row
    (the rows before it were already scored, as ever: the partial output is thrown away).
    """
    import polars as pl

    try:
        for df in scan(pl).select(schema.names).collect_batches(chunk_size=chunk_rows):
            yield from df.to_arrow().cast(schema).to_batches()
    except pl.exceptions.PolarsError as e:
        row = first_row
        for b in arrow_batches():  # raises the one-line error where the bad value is
            to_matrix(b, features, row)
            row += b.num_rows
        raise BatchScoringError(f"cannot {what}: {one_line(e)}") from e


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


def _polars_plain(t: pa.DataType) -> bool:
    """Types that go through polars and back to arrow unchanged (others stay on pyarrow's reader)."""
    return (
        pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_string(t)
    )


def _row_range(pf: pq.ParquetFile, start: int, stop: int):
    """(row groups overlapping rows ``[start, stop)``, the first row of the first of them)."""
    groups, first, row = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row < stop and row + n > start:
            groups.append(g)
            first = row if first is None else first
        row += n
    return groups, start if first is None else first


def _slice_rows(batches: Iterator[pa.RecordBatch], at: int, start: int, stop: int):
    """The rows ``[start, stop)`` of ``batches``, whose first row is row ``at`` of the file."""
    for b in batches:
        lo, hi = max(start - at, 0), min(stop - at, b.num_rows)
        at += b.num_rows
        if hi > lo:
            yield b if (lo, hi) == (0, b.num_rows) else b.slice(lo, hi - lo)
        if at >= stop:
            return


def _open_parquet(
    path: Path, features: list[str], id_column: str | None, chunk_rows: int, shard: Shard | None = None
) -> Source:
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

    def arrow_batches() -> Iterator[pa.RecordBatch]:
        # the footer was fine; a damaged data page only shows once it is read
        try:
            if shard is None:
                yield from pf.iter_batches(batch_size=chunk_rows, columns=wanted, use_threads=True)
                return
            groups, at = _row_range(pf, shard.start, shard.stop)
            if groups:
                it = pf.iter_batches(
                    batch_size=chunk_rows, row_groups=groups, columns=wanted, use_threads=True
                )
                yield from _slice_rows(it, at, shard.start, shard.stop)
        except (pa.ArrowException, OSError) as e:
            raise BatchScoringError(
                f"cannot read the data of Parquet file {str(path)!r} ({one_line(e)}): the file is "
                "damaged or truncated; write it again"
            ) from e

    batches = arrow_batches()
    wanted_schema = pa.schema([schema.field(c) for c in wanted])
    if use_polars(path.stat().st_size) and all(_polars_plain(f.type) for f in wanted_schema):

        def scan(pl):
            lf = pl.scan_parquet(path)
            return lf if shard is None else lf.slice(shard.start, shard.rows)

        first = 0 if shard is None else shard.start
        what = f"read the data of Parquet file {str(path)!r}"
        batches = _polars_batches(scan, wanted_schema, chunk_rows, arrow_batches, features, first, what)
    return Source(
        "parquet",
        columns,
        id_col,
        pf.metadata.num_rows if shard is None else shard.rows,
        batches,
        lambda: (batches.close(), pf.close()),
        schema.field(id_col).type if id_col else None,
        0 if shard is None else shard.start,
    )


def open_source(
    path: str | os.PathLike,
    features: list[str],
    id_column: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    fmt: str = "auto",
    shard: Shard | None = None,
) -> Source:
    """The input opened and checked; ``shard`` (``serving.batch.shard``): only that slice of it."""
    p = Path(path)
    if not p.is_file():
        raise BatchScoringError(f"input file {str(p)!r} does not exist (or is not a file)")
    fmt = input_format(p, fmt)
    if shard is not None and shard.format != fmt:
        raise BatchScoringError(f"shard {shard.index} was planned for {shard.format}, but the input is {fmt}")
    opener = _open_csv if fmt == "csv" else _open_parquet
    return opener(p, features, id_column, chunk_rows, shard)


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


def from_numpy(values: np.ndarray, type_: pa.DataType) -> pa.Array:
    """Zero-copy arrow array over a 1-d numpy array (no nulls)."""
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(type_, len(values), [None, pa.py_buffer(values)])


def auto_chunk_rows(n_features: int) -> int:
    """Rows per chunk so one chunk's float32 matrix is about ``CHUNK_BYTES``."""
    return int(min(max(CHUNK_BYTES // (4 * max(1, n_features)), 1024), 1 << 20))


# Why a row with a gap is refused. Not because it cannot be scored: packages trained by this project's
# pipeline carry the training medians in their graph (an ONNX Imputer before the estimator) and would
# score it; but a batch answer for that row would rest on a filled-in value nobody asked for.
MISSING_POLICY = (
    "refused on purpose: a package from this project's pipeline would fill any of its feature columns "
    "with the training median inside its graph and score the row on that guess; fill or drop those rows first"
)
INFINITE_POLICY = (
    "infinity is no measurement (the graph fills only missing values): fix or drop those rows first"
)


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
                + MISSING_POLICY
            )
        # numpy casts (float64/int -> float32) while it scatters into the row-major matrix: one pass
        out[:, j] = _as_numpy(col)
    finite = np.isfinite(out)
    if not finite.all():
        r, c = np.argwhere(~finite)[0]
        why = MISSING_POLICY if np.isnan(out[r, c]) else INFINITE_POLICY
        raise SchemaMismatchError(
            f"column {features[c]!r} has a non-finite value ({out[r, c]}) at row {first_row + int(r)}; " + why
        )
    return out
