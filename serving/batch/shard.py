"""Splitting one input table into shards that separate processes (KFP steps) score independently.

A shard is a slice of the file that its scorer can read without the others:

* **Parquet**: a range of rows ``[start, stop)``. When the file has at least as many row groups as
  shards, the cuts fall on row-group boundaries (each shard decodes only its own groups); otherwise
  rows are split evenly and a shard decodes the groups it overlaps and keeps its rows.
* **CSV**: a range of bytes ``[start, stop)`` that begins and ends on a line start; each shard reads
  the header line and then its own bytes. Cutting on newlines is right because the reader does not
  accept newlines inside quoted values anyway (pyarrow's ``newlines_in_values`` is off).

Every shard also carries ``first_row``, the row number of its first row in the whole file: it names
rows in error messages and numbers the ``row_number`` id column, so shards agree with one
single-process run. For CSV it is the count of line ends before the shard (one fast pass over the
bytes, at the plan step); a file with blank lines (the reader skips them) numbers rows after a blank
line one higher than a single run would.

``plan_rows`` and ``plan_bytes`` are the pure splitting rules; ``plan_shards`` reads the file's
metadata (or scans the CSV's bytes) and applies them.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from serving.batch.errors import BatchScoringError

_SCAN_BYTES = 8 << 20  # read size when counting line ends and looking for a cut point


@dataclass(frozen=True)
class Shard:
    """One slice of the input: rows ``[start, stop)`` (Parquet) or bytes ``[start, stop)`` (CSV)."""

    index: int
    count: int
    format: str  # 'csv' (byte range) or 'parquet' (row range)
    start: int
    stop: int
    first_row: int  # row number, in the whole file, of the shard's first row
    rows: int  # rows in the shard (CSV: line ends in its bytes)
    header_end: int = 0  # CSV: bytes of the header line (read by every shard)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Shard:
        # a KFP loop item arrives as a JSON struct, whose numbers are floats: 3.0 -> 3
        try:
            shard = cls(
                **{k: (d[k] if k == "format" else int(d[k])) for k in cls.__dataclass_fields__ if k in d}
            )
        except (TypeError, ValueError) as e:
            raise BatchScoringError(f"not a shard description: {d!r} ({e})") from e
        if shard.format not in ("csv", "parquet") or not 0 <= shard.index < shard.count:
            raise BatchScoringError(f"not a shard description: {d!r}")
        return shard


def check_shards(n: int) -> int:
    if not isinstance(n, int) or n < 1:
        raise BatchScoringError(f"the number of shards must be a whole number, 1 or more (got {n!r})")
    return n


def plan_rows(group_rows: list[int], n: int) -> list[tuple[int, int]]:
    """Row ranges ``[(start, stop), ...]`` for ``n`` shards of a file whose row groups hold
    ``group_rows`` rows: on row-group boundaries when there are enough groups (contiguous groups, as
    even in rows as the groups allow), else an even split of the rows. Never an empty range, except
    the single one of an empty file."""
    check_shards(n)
    total = sum(group_rows)
    if total == 0:
        return [(0, 0)]
    n = min(n, total)
    ends = [sum(group_rows[: i + 1]) for i in range(len(group_rows))]
    if len(group_rows) >= n:
        cuts, g = [], 0
        for i in range(1, n):
            # the first group end at or after the i-th even cut, leaving a group for each later shard
            target = total * i / n
            while g < len(ends) - (n - i) - 1 and ends[g] < target:
                g += 1
            cuts.append(ends[g])
            g += 1
        bounds = [0, *cuts, total]
    else:
        bounds = [total * i // n for i in range(n + 1)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def plan_bytes(size: int, header_end: int, n: int, next_line_start) -> list[tuple[int, int]]:
    """Byte ranges for ``n`` shards of a CSV of ``size`` bytes whose header line ends at
    ``header_end``; ``next_line_start(offset)`` is the first line start at or after ``offset``
    (``size`` when there is none). Empty ranges are dropped (a file with fewer lines than shards)."""
    check_shards(n)
    body = size - header_end
    if body <= 0:
        return [(header_end, header_end)]
    cuts = [header_end]
    for i in range(1, n):
        cut = next_line_start(header_end + body * i // n)
        cuts.append(max(cut, cuts[-1]))
    cuts.append(size)
    ranges = [(a, b) for a, b in itertools.pairwise(cuts) if b > a]
    return ranges or [(header_end, header_end)]


# --------------------------------------------------------------------------- the I/O shell


def _next_line_start(f, offset: int, size: int) -> int:
    """The first offset at or after ``offset`` that starts a line (just after a ``\\n``)."""
    if offset <= 0:
        return 0
    f.seek(offset - 1)
    pos = offset - 1
    while pos < size:
        block = f.read(_SCAN_BYTES)
        if not block:
            break
        i = block.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(block)
    return size


def _count_lines(f, start: int, stop: int) -> int:
    """Line ends in ``[start, stop)``, plus one for a last line without its ``\\n``."""
    f.seek(start)
    left, n, last = stop - start, 0, b""
    while left > 0:
        block = f.read(min(_SCAN_BYTES, left))
        if not block:
            break
        n += block.count(b"\n")
        left -= len(block)
        last = block
    return n + (1 if last and not last.endswith(b"\n") else 0)


def _plan_csv(path: Path, n: int) -> list[Shard]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_end = _next_line_start(f, 1, size) if size else 0
        ranges = plan_bytes(size, header_end, n, lambda off: _next_line_start(f, off, size))
        rows = [_count_lines(f, a, b) for a, b in ranges]
    firsts = [sum(rows[:i]) for i in range(len(rows))]
    return [
        Shard(i, len(ranges), "csv", a, b, first, k, header_end)
        for i, ((a, b), first, k) in enumerate(zip(ranges, firsts, rows, strict=True))
    ]


def _plan_parquet(path: Path, n: int) -> list[Shard]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        md = pq.read_metadata(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise BatchScoringError(f"cannot read {str(path)!r} as Parquet ({e}); pass input_format csv") from e
    ranges = plan_rows([md.row_group(i).num_rows for i in range(md.num_row_groups)], n)
    return [Shard(i, len(ranges), "parquet", a, b, a, b - a) for i, (a, b) in enumerate(ranges)]


def plan_shards(path: str | os.PathLike, n: int, fmt: str = "auto") -> list[Shard]:
    """At most ``n`` shards covering every row of the file once, in order (fewer when the file has
    fewer rows, or is empty: one empty shard)."""
    from serving.batch.source import input_format

    check_shards(n)
    p = Path(path)
    if not p.is_file():
        raise BatchScoringError(f"input file {str(p)!r} does not exist (or is not a file)")
    return (_plan_parquet if input_format(p, fmt) == "parquet" else _plan_csv)(p, n)
