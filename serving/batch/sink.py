"""The batch engine's output: the predictions table and the HTML report, each written to a
``.<name>.<random>.partial`` file beside its target and renamed into place only when complete, so a
failed or interrupted run leaves no partial output behind; and the clean-up of the partial files
that killed (SIGKILL) earlier runs left.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from serving.batch.errors import BatchScoringError
from serving.batch.source import FORMATS, SUFFIX_FORMAT

if TYPE_CHECKING:
    from serving.batch.model import BatchModel

PREDICTION_COLUMN = "prediction"


def output_format(path: str | os.PathLike, declared: str = "auto") -> str:
    """'csv' or 'parquet' from the declared format or the output file's extension."""
    if declared != "auto":
        if declared not in FORMATS:
            raise BatchScoringError(f"unknown output format {declared!r}: use one of auto, csv, parquet")
        return declared
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_FORMAT:
        raise BatchScoringError(
            f"cannot tell the output format from {str(path)!r}: name the output file *.csv or *.parquet"
        )
    return SUFFIX_FORMAT[suffix]


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


class AtomicTextWriter:
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


class _PolarsCsvWriter:
    """CSV through polars' writer, one ``write_csv`` per batch (3-5x pyarrow's ``CSVWriter`` on the
    output columns, measured: serving/batch/README.md); the header is written first, so a table
    with no rows still gets one. Float32 probabilities are written as their shortest round-trip text."""

    def __init__(self, path: Path, schema: pa.Schema):
        import polars as pl

        self._pl = pl
        self._f = open(path, "wb")  # noqa: SIM115 - closed by close()
        # the header alone, quoted as polars quotes it (not ``schema.empty_table()``: that imports pandas)
        pl.DataFrame({n: pl.Series(n, [], dtype=pl.String) for n in schema.names}).write_csv(self._f)

    def write_batch(self, batch: pa.RecordBatch) -> None:
        self._pl.from_arrow(batch).write_csv(self._f, include_header=False)

    def close(self) -> None:
        self._f.close()


class AtomicTableWriter:
    """Writes batches to ``.<name>.<random>.partial`` beside the target; ``commit`` renames it into place."""

    def __init__(self, target: Path, fmt: str, schema: pa.Schema, polars_csv: bool = True):
        self.target = target
        self.tmp = _partial_file(target)
        self._closed = False
        try:
            if fmt == "parquet":
                # no dictionary encoding, no compression: probabilities are high-entropy floats and
                # ids mostly unique, so both cost CPU and save little; plain pages were the fastest
                # Parquet writer measured (python -m serving.bench.batch_io: 3x the dictionary +
                # snappy settings, on a par with polars), for a file 10-30% larger
                self._w = pq.ParquetWriter(self.tmp, schema, compression="none", use_dictionary=False)
            elif polars_csv:
                self._w = _PolarsCsvWriter(self.tmp, schema)
            else:  # small outputs: pyarrow's writer, no polars import (serving.batch.source.use_polars)
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
