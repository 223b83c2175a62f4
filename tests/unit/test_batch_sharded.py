"""Sharded batch scoring (``serving.batch.shard``, ``serving.batch.sharded``): the splitting rules,
the shard readers, and the commit that happens only when every shard succeeded, against one
single-process run of the same engine on the same file (the oracle)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from serving.batch import engine, sharded
from serving.batch.errors import BatchScoringError, SchemaMismatchError
from serving.batch.report import ScoreSummary
from serving.batch.shard import Shard, plan_bytes, plan_rows, plan_shards
from tests.modelfactory import breast_cancer

# --------------------------------------------------------------------------- pure splitting rules


def test_plan_rows_cuts_on_row_groups_when_there_are_enough():
    assert plan_rows([10, 10, 10, 10], 4) == [(0, 10), (10, 20), (20, 30), (30, 40)]
    assert plan_rows([10] * 8, 4) == [(0, 20), (20, 40), (40, 60), (60, 80)]
    assert plan_rows([100, 1, 1, 1], 2) == [(0, 100), (100, 103)]
    # a big last group: every shard still gets at least one group
    assert plan_rows([1, 1, 1, 100], 4) == [(0, 1), (1, 2), (2, 3), (3, 103)]


def test_plan_rows_splits_evenly_inside_too_few_groups():
    assert plan_rows([10], 4) == [(0, 2), (2, 5), (5, 7), (7, 10)]
    assert plan_rows([3], 8) == [(0, 1), (1, 2), (2, 3)]  # never an empty shard
    assert plan_rows([], 4) == [(0, 0)] and plan_rows([0], 3) == [(0, 0)]
    with pytest.raises(BatchScoringError, match="number of shards"):
        plan_rows([10], 0)


def test_plan_bytes_cuts_on_line_starts():
    text = b"h\n" + b"".join(b"%d,x\n" % i for i in range(10))
    starts = [i + 1 for i, c in enumerate(text) if c == ord("\n")]

    def next_start(off):
        return next((s for s in starts if s >= off), len(text))

    ranges = plan_bytes(len(text), 2, 3, next_start)
    assert ranges[0][0] == 2 and ranges[-1][1] == len(text)
    assert all(a in starts or a == 2 for a, _ in ranges)
    assert b"".join(text[a:b] for a, b in ranges) == text[2:]
    assert plan_bytes(2, 2, 4, next_start) == [(2, 2)]  # header only: one empty shard


# --------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def rows():
    X, _, features, _ = breast_cancer()
    return X, [str(f) for f in features]


def _table(X, features) -> pa.Table:
    cols = {"customer": [f"c{i:04d}" for i in range(len(X))]}
    cols |= {f: X[:, j].astype(np.float64) for j, f in enumerate(features)}
    return pa.table(cols)


def _write(t: pa.Table, path, row_group_size=None):
    if path.suffix == ".csv":
        pacsv.write_csv(t, path)
    else:
        pq.write_table(t, path, row_group_size=row_group_size)
    return path


def _read(path) -> pa.Table:
    if path.suffix == ".csv":
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    return pq.read_table(path)


def _committed(out) -> pa.Table:
    return pa.concat_tables([_read(p) for p in sharded.read_output(out)])


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_plan_covers_every_row_once_in_order(tmp_path, rows, fmt):
    X, features = rows
    path = _write(_table(X, features), tmp_path / f"t.{fmt}", row_group_size=150)
    plan = plan_shards(path, 4)
    assert [s.index for s in plan] == [0, 1, 2, 3] and {s.count for s in plan} == {4}
    assert [s.first_row for s in plan] == [sum(s.rows for s in plan[:i]) for i in range(4)]
    assert sum(s.rows for s in plan) == len(X)
    if fmt == "parquet":  # 4 row groups of 150, 150, 150, 119: the cuts are the group boundaries
        assert [(s.start, s.stop) for s in plan] == [(0, 150), (150, 300), (300, 450), (450, 569)]
    assert Shard.from_dict(json.loads(json.dumps(plan[2].to_dict()))) == plan[2]


@pytest.mark.parametrize(
    ("fmt", "ids"), [("parquet", True), ("csv", True), ("csv", False), ("parquet", False)]
)
def test_four_shards_one_failing_commit_nothing_then_all_equal_one_run(
    tmp_path, model_package, rows, fmt, ids
):
    X, features = rows
    t = _table(X, features)
    if not ids:
        t = t.drop_columns(["customer"])
    bad_row = 500  # in the last of the 4 shards
    bad = X.copy()
    bad[bad_row, 3] = np.nan
    bad_t = _table(bad, features) if ids else _table(bad, features).drop_columns(["customer"])
    inp = _write(bad_t, tmp_path / f"in.{fmt}", row_group_size=150)
    out = tmp_path / "scored"
    # NaN (Parquet) or an empty field (CSV): the row is named by its number in the whole file
    with pytest.raises(SchemaMismatchError, match=rf"\brow {bad_row}\b"):
        sharded.score_sharded(model_package, inp, out, 4, workers=2, output_fmt=fmt, chunk_rows=64)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [inp.name]  # no parts, no partial folder left

    _write(t, inp, row_group_size=150)
    manifest, summary = sharded.score_sharded(
        model_package, inp, out, 4, workers=2, output_fmt=fmt, chunk_rows=64
    )
    single = tmp_path / f"single.{fmt}"
    expected = engine.score_file(model_package, inp, single, chunk_rows=64)
    got, want = _committed(out), _read(single)
    assert got.column_names == want.column_names
    assert got.equals(want)  # ids (or row numbers), labels and probabilities, in row order
    assert manifest["shards"] == 4 and manifest["rows"] == len(X) == summary.rows
    assert [p["rows"] for p in manifest["parts"]] == [s.rows for s in plan_shards(inp, 4)]
    assert summary.class_counts == expected.class_counts
    assert summary.score_histogram == expected.score_histogram
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([inp.name, "scored", single.name])


def _summary(**kw) -> ScoreSummary:
    base = dict(
        rows=10,
        seconds=1.0,
        output="x",
        input_format="parquet",
        output_format="parquet",
        id_column="id",
        class_counts={"a": 4, "b": 6},
        model="m:1",
        score_histogram=[1] * 20,
    )
    return ScoreSummary(**(base | kw))


def test_check_parts_refuses_an_incomplete_or_mixed_set():
    s = [Shard(i, 3, "parquet", 10 * i, 10 * i + 10, 10 * i, 10) for i in range(3)]
    sharded.check_parts([(x, _summary()) for x in s])  # complete: fine
    with pytest.raises(BatchScoringError, match=r"expected shards 0\.\.2 once each, got \[0, 2\]"):
        sharded.check_parts([(s[0], _summary()), (s[2], _summary())])
    with pytest.raises(BatchScoringError, match=r"got \[0, 1, 1, 2\]"):
        sharded.check_parts([(x, _summary()) for x in [*s, s[1]]])
    with pytest.raises(BatchScoringError, match="differ in model"):
        sharded.check_parts([(s[0], _summary(model="m:2")), (s[1], _summary()), (s[2], _summary())])
    with pytest.raises(BatchScoringError, match="shard 1 scored 9 rows, planned 10"):
        sharded.check_parts([(s[0], _summary()), (s[1], _summary(rows=9)), (s[2], _summary())])
    with pytest.raises(BatchScoringError, match="no scored shards"):
        sharded.check_parts([])


def test_merge_summaries_adds_up():
    m = sharded.merge_summaries(
        [_summary(), _summary(rows=5, seconds=3.0, class_counts={"a": 5, "b": 0})], "o"
    )
    assert (m.rows, m.seconds, m.class_counts, m.output) == (15, 3.0, {"a": 9, "b": 6}, "o")
    assert m.score_histogram == [2] * 20


def test_commit_refuses_a_missing_part_and_leaves_no_output(tmp_path, model_package, rows):
    X, features = rows
    inp = _write(_table(X, features), tmp_path / "in.parquet", row_group_size=150)
    plan = plan_shards(inp, 4)
    parts = [tmp_path / f"p{s.index}" for s in plan]
    for s, p in zip(plan[:3], parts, strict=False):
        sharded.score_shard(model_package, inp, s, p)
    with pytest.raises(BatchScoringError, match=r"got \[0, 1, 2\]"):
        sharded.commit_parts(parts[:3], tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    sharded.score_shard(model_package, inp, plan[3], parts[3])
    sharded.commit_parts(parts, tmp_path / "out")
    assert _committed(tmp_path / "out").num_rows == len(X)
    with pytest.raises(BatchScoringError, match="already exists"):
        sharded.commit_parts(parts, tmp_path / "out")
