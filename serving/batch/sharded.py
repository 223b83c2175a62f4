"""Sharded scoring: each shard (``shard.py``) scored on its own into a part, then one atomic commit.

The KFP sharded pipeline runs ``score_shard`` in one step per shard (``dsl.ParallelFor``) and
``commit_parts`` in a step after the loop, which KFP starts only when every shard step succeeded:
a failed shard fails the run and nothing is committed. ``score_sharded`` is the same flow in one
process (threads), for tests and for a machine with cores to spare.

A **part** is a folder: ``part.<format>`` (the shard's predictions, written by ``engine.score_file``)
and ``shard.json`` (the shard and its run summary). The **committed output** is a folder:

    <output>/part-00000.parquet ... part-<n-1>.parquet   the parts, in the input's row order
    <output>/_manifest.json                              shards, rows per part, model, columns

built under ``.<output name>.<random>.partial`` beside it and renamed into place in one step, so the
output folder either does not exist or is complete. ``commit_parts`` refuses a set of parts that is
not exactly shards ``0..n-1`` of one plan, scored by one model into one format (and, for Parquet,
with the row counts the plan expects).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from serving.batch.errors import BatchScoringError
from serving.batch.report import ScoreSummary
from serving.batch.shard import Shard, plan_shards

MANIFEST = "_manifest.json"
PART_INFO = "shard.json"
MANIFEST_VERSION = 1


def table_path(path: str | os.PathLike) -> Path:
    """The table behind a KFP Dataset artifact: the file, or the one file in a folder artifact."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in os.listdir(p) if not f.startswith("."))
        if len(files) != 1:
            raise BatchScoringError(
                f"dataset folder {str(p)!r} holds {len(files)} files; "
                "point dataset_uri at one CSV/Parquet file"
            )
        p = p / files[0]
    return p


def score_shard(model, input_path, shard: Shard, part_dir, *, output_fmt: str = "parquet", **options):
    """Score one shard into the part folder ``part_dir`` (created); returns the run summary.

    ``model``: a package path or a loaded ``BatchModel``; ``options`` go to ``engine.score_file``."""
    from serving.batch import engine

    part = Path(part_dir)
    part.mkdir(parents=True, exist_ok=True)
    summary = engine.score_file(
        model, input_path, part / f"part.{output_fmt}", output_fmt=output_fmt, shard=shard, **options
    )
    info = {"shard": shard.to_dict(), "summary": asdict(summary)}
    (part / PART_INFO).write_text(json.dumps(info) + "\n")
    return summary


def _read_part(part_dir: Path) -> tuple[Shard, ScoreSummary, Path]:
    try:
        info = json.loads((part_dir / PART_INFO).read_text())
        shard, summary = Shard.from_dict(info["shard"]), ScoreSummary(**info["summary"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BatchScoringError(f"{str(part_dir)!r} is not a scored shard ({PART_INFO}: {e})") from e
    data = part_dir / f"part.{summary.output_format}"
    if not data.is_file():
        raise BatchScoringError(f"shard {shard.index} in {str(part_dir)!r} has no {data.name}")
    return shard, summary, data


def check_parts(parts: list[tuple[Shard, ScoreSummary]]) -> None:
    """Pure: raise unless ``parts`` are shards ``0..n-1`` of one plan, once each, by one model into
    one format, each (Parquet) holding the rows its shard planned."""
    if not parts:
        raise BatchScoringError("no scored shards to commit")
    count = parts[0][0].count
    indices = sorted(s.index for s, _ in parts)
    if indices != list(range(count)) or any(s.count != count for s, _ in parts):
        raise BatchScoringError(
            f"cannot commit: expected shards 0..{count - 1} once each, got {indices}; "
            "every shard must succeed before the output is committed"
        )
    for what in ("model", "output_format", "id_column"):
        values = {getattr(m, what) for _, m in parts}
        if len(values) > 1:
            raise BatchScoringError(f"cannot commit: the shards differ in {what} ({sorted(values)})")
    for s, m in parts:
        if s.format == "parquet" and m.rows != s.rows:
            raise BatchScoringError(f"cannot commit: shard {s.index} scored {m.rows} rows, planned {s.rows}")


def merge_summaries(summaries: list[ScoreSummary], output: str) -> ScoreSummary:
    """Pure: one summary of the whole run (rows, counts and histogram added up; seconds: the
    slowest shard, which is the scoring's wall time when the shards ran side by side)."""
    first = summaries[0]
    counts = dict.fromkeys(first.class_counts, 0)
    hist = [0] * len(first.score_histogram)
    for s in summaries:
        for k, v in s.class_counts.items():
            counts[k] = counts.get(k, 0) + v
        hist = [a + b for a, b in zip(hist, s.score_histogram, strict=True)]
    return ScoreSummary(
        rows=sum(s.rows for s in summaries),
        seconds=max(s.seconds for s in summaries),
        output=output,
        input_format=first.input_format,
        output_format=first.output_format,
        id_column=first.id_column,
        class_counts=counts,
        model=first.model,
        score_histogram=hist,
    )


def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same filesystem: no copy
    except OSError:
        shutil.copyfile(src, dst)


def commit_parts(part_dirs: list, output, *, overwrite: bool = False) -> tuple[dict, ScoreSummary]:
    """Commit the scored parts as the folder ``output`` (atomically: renamed into place complete).

    Returns (the manifest, the merged summary). An existing ``output`` is refused unless
    ``overwrite``, in which case it is replaced after the new folder is complete."""
    read = sorted((_read_part(Path(p)) for p in part_dirs), key=lambda r: r[0].index)
    check_parts([(s, m) for s, m, _ in read])
    out = Path(output)
    if out.exists() and not overwrite:
        raise BatchScoringError(f"output {str(out)!r} already exists: remove it or choose another path")
    fmt = read[0][1].output_format
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        entries = []
        for shard, summary, data in read:
            name = f"part-{shard.index:05d}.{fmt}"
            _place(data, staging / name)
            entries.append(
                {"file": name, "shard": shard.index, "rows": summary.rows, "first_row": shard.first_row}
            )
        merged = merge_summaries([m for _, m, _ in read], str(out))
        manifest = {
            "version": MANIFEST_VERSION,
            "format": fmt,
            "model": merged.model,
            "id_column": merged.id_column,
            "rows": merged.rows,
            "shards": len(entries),
            "parts": entries,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700: give a new folder's usual mode
        if out.exists():  # overwrite: the old folder goes aside, the complete new one takes its name
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / out.name)
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest, merged


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_output(output) -> list[Path]:
    """The part files of a committed output folder, in row order (from its manifest)."""
    out = Path(output)
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise BatchScoringError(f"{str(out)!r} is not a committed sharded output ({MANIFEST}: {e})") from e
    return [out / p["file"] for p in manifest["parts"]]


def score_sharded(model_dir, input_path, output, shards: int, *, workers: int | None = None,
                  input_fmt: str = "auto", output_fmt: str = "parquet", overwrite: bool = False,
                  **options) -> tuple[dict, ScoreSummary]:  # fmt: skip
    """Plan ``shards`` shards, score them in ``workers`` threads (default one per shard), and commit
    only if every shard succeeded; else the first failing shard's error is raised, nothing is
    committed, and the parts are removed."""
    from serving.batch.model import load_model

    plan = plan_shards(input_path, shards, input_fmt)
    model = load_model(model_dir, options.pop("threads", 0))
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".shards"))
    try:
        parts = [scratch / f"shard-{s.index:05d}" for s in plan]
        with concurrent.futures.ThreadPoolExecutor(workers or len(plan)) as pool:
            futures = [
                pool.submit(
                    score_shard,
                    model,
                    input_path,
                    s,
                    p,
                    output_fmt=output_fmt,
                    input_fmt=input_fmt,
                    **options,
                )
                for s, p in zip(plan, parts, strict=True)
            ]
            errors = [f.exception() for f in futures]
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            raise failed
        return commit_parts(parts, out, overwrite=overwrite)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(scratch)
