"""Batch scoring (the ``serving.batch`` engine + the ``serving.batch`` command), in-process.

Every comparison is against onnxruntime (and sklearn) run here on the same rows, never against
hard-coded numbers. The real-subprocess and signal tests are in tests/integration/test_batch_cli.py.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import time

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from serving.batch import cli, engine
from serving.batch.errors import BatchScoringError, SchemaMismatchError
from serving.batch.model import prob_column_names
from serving.batch.report import summary_markdown
from serving.contract import modelcard
from tests.modelfactory import breast_cancer


@pytest.fixture(scope="module")
def data():
    X, _, features, class_names = breast_cancer()
    return X, [str(f) for f in features], [str(c) for c in class_names]


@pytest.fixture(scope="module")
def reference(model_package):
    """In-process onnxruntime on the same model file: the oracle."""
    sess = ort.InferenceSession(str(modelcard.onnx_path(model_package)), providers=["CPUExecutionProvider"])

    def run(X):
        label, proba = sess.run(["label", "probabilities"], {"input": np.ascontiguousarray(X, np.float32)})
        return label, proba

    return run


def table(X, features, *, reverse=True, extra=True, ids=True) -> pa.Table:
    """Feature columns in *reverse* order (matching must be by name), plus columns the model ignores."""
    cols = {}
    if ids:
        cols["customer"] = pa.array([f"c{i:05d}" for i in range(len(X))])
    order = list(reversed(range(len(features)))) if reverse else range(len(features))
    for j in order:
        cols[features[j]] = pa.array(X[:, j].astype(np.float64))
    if extra:
        cols["note"] = pa.array(["free text, ignored"] * len(X))
        cols["ts"] = pa.array(np.arange(len(X)).astype("datetime64[s]"))
    return pa.table(cols)


def write(t: pa.Table, path):
    if str(path).endswith(".csv"):
        pacsv.write_csv(t, path)
    else:
        pq.write_table(t, path)
    return path


def read(path) -> pa.Table:
    if str(path).endswith(".csv"):
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
    return pq.read_table(path)


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".partial")


@pytest.mark.parametrize("in_fmt", ["csv", "parquet"])
@pytest.mark.parametrize("out_fmt", ["csv", "parquet"])
def test_scores_match_in_process_onnxruntime(tmp_path, model_package, data, reference, in_fmt, out_fmt):
    """Same rows, many chunks, columns shuffled and extra columns: predictions equal ORT's."""
    X, features, class_names = data
    X = np.concatenate([X, X[::-1]])  # 1138 rows; chunks of 100 -> more than ten chunks
    inp = write(table(X, features), tmp_path / f"in.{in_fmt}")
    out = tmp_path / f"out.{out_fmt}"
    chunks = []
    summary = engine.score_file(
        model_package, inp, out, chunk_rows=100, id_column="customer", progress=chunks.append
    )
    assert len(chunks) > 1 and sum(chunks) == len(X) == summary.rows
    # Parquet chunks are exact; CSV chunks are sized in bytes from the first rows: close to 100
    assert max(chunks) == 100 if in_fmt == "parquet" else 50 <= max(chunks) <= 200
    got = read(out)
    assert got.column_names == ["customer", "prediction", *[f"prob_{c}" for c in class_names]]
    assert got.column("customer").to_pylist() == [f"c{i:05d}" for i in range(len(X))]
    label, proba = reference(X)
    np.testing.assert_array_equal(got.column("prediction").to_numpy(), label)
    probs = np.column_stack([got.column(f"prob_{c}").to_numpy() for c in class_names])
    # parquet input holds float64 that ORT's caller casts to float32 exactly as we do: identical.
    # CSV goes through decimal text, so allow float32 rounding; text output also rounds.
    tol = 0 if (in_fmt, out_fmt) == ("parquet", "parquet") else 1e-6
    np.testing.assert_allclose(probs, proba, rtol=0, atol=tol)
    counts = np.bincount(label, minlength=2)
    assert summary.class_counts == {class_names[0]: counts[0], class_names[1]: counts[1]}
    assert leftovers(tmp_path) == []


def test_scores_agree_with_sklearn(tmp_path, data):
    """The package's ONNX graph and the sklearn pipeline it came from agree through the batch path."""
    from tests.modelfactory import build_package

    model_dir, pipe = build_package(tmp_path / "models", estimator="random_forest")
    X, features, class_names = data
    out = tmp_path / "out.parquet"
    engine.score_file(model_dir, write(table(X, features), tmp_path / "in.parquet"), out, chunk_rows=64)
    got = read(out)
    np.testing.assert_array_equal(got.column("prediction").to_numpy(), pipe.predict(X))
    probs = np.column_stack([got.column(f"prob_{c}").to_numpy() for c in class_names])
    np.testing.assert_allclose(probs, pipe.predict_proba(X), atol=1e-5)


def test_output_gets_the_usual_file_mode(tmp_path, model_package, data):
    """The temporary file is private while written; the result has the mode of any new file."""
    X, features, _ = data
    plain = tmp_path / "plain.txt"
    plain.write_text("")
    out = tmp_path / "out.parquet"
    engine.score_file(model_package, write(table(X[:10], features), tmp_path / "in.parquet"), out)
    assert out.stat().st_mode == plain.stat().st_mode


def test_row_numbers_when_no_id_column(tmp_path, model_package, data):
    X, features, _ = data
    inp = write(table(X[:300], features, ids=False), tmp_path / "in.parquet")
    engine.score_file(model_package, inp, tmp_path / "out.csv", chunk_rows=64)
    got = read(tmp_path / "out.csv")
    assert got.column_names[0] == "row_number"
    assert got.column("row_number").to_pylist() == list(range(300))


def test_parquet_id_keeps_its_type(tmp_path, model_package, data):
    X, features, _ = data
    t = table(X[:50], features, ids=False).append_column("id", pa.array(np.arange(1000, 1050)))
    engine.score_file(model_package, write(t, tmp_path / "in.parquet"), tmp_path / "out.parquet")
    got = read(tmp_path / "out.parquet")
    assert got.schema.field("id").type == pa.int64()  # 'id' is picked up by default
    assert got.column("id").to_pylist() == list(range(1000, 1050))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_missing_column_stops_before_output(tmp_path, model_package, data, fmt):
    X, features, _ = data
    t = table(X[:20], features)
    t = t.drop_columns([features[3]])
    inp = write(t, tmp_path / f"in.{fmt}")
    with pytest.raises(SchemaMismatchError, match=rf"lacks 1 column\(s\).*'{features[3]}'"):
        engine.score_file(model_package, inp, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_mistyped_column_names_column_and_value(tmp_path, model_package, data, fmt):
    X, features, _ = data
    t = table(X[:20], features)
    bad = [str(v) for v in X[:20, 5]]
    bad[7] = "12,5 mm"
    t = t.set_column(t.schema.get_field_index(features[5]), features[5], pa.array(bad))
    inp = write(t, tmp_path / f"in.{fmt}")
    with pytest.raises(SchemaMismatchError, match=rf"'{features[5]}'.*'12,5 mm'"):
        engine.score_file(model_package, inp, tmp_path / "out.csv")
    assert list(tmp_path.iterdir()) == [inp]


def test_numeric_strings_are_accepted(tmp_path, model_package, data, reference):
    """'Cast to float32' is the rule, not the declared type: numeric text in Parquet is fine."""
    X, features, _ = data
    t = table(X[:30], features)
    i = t.schema.get_field_index(features[0])
    t = t.set_column(i, features[0], pa.array([repr(float(v)) for v in X[:30, 0]]))
    engine.score_file(model_package, write(t, tmp_path / "in.parquet"), tmp_path / "out.parquet")
    np.testing.assert_array_equal(read(tmp_path / "out.parquet").column("prediction"), reference(X[:30])[0])


def test_uncastable_parquet_type_is_refused_up_front(tmp_path, model_package, data):
    X, features, _ = data
    t = table(X[:10], features)
    i = t.schema.get_field_index(features[2])
    t = t.set_column(i, features[2], pa.array(np.arange(10).astype("datetime64[s]")))
    with pytest.raises(SchemaMismatchError, match=rf"'{features[2]}'.*timestamp\[m?s\].*float32"):
        engine.score_file(model_package, write(t, tmp_path / "in.parquet"), tmp_path / "out.csv")


@pytest.mark.parametrize("value", [None, float("nan"), float("inf")])
def test_missing_or_non_finite_value_names_column_and_row(tmp_path, model_package, data, value):
    X, features, _ = data
    t = table(X[:200], features)
    col = X[:200, 9].astype(np.float64).tolist()
    col[150] = value
    t = t.set_column(t.schema.get_field_index(features[9]), features[9], pa.array(col, pa.float64()))
    with pytest.raises(SchemaMismatchError, match=rf"'{features[9]}'.*row 150") as err:
        engine.score_file(
            model_package, write(t, tmp_path / "in.parquet"), tmp_path / "o.parquet", chunk_rows=64
        )
    assert leftovers(tmp_path) == [] and not (tmp_path / "o.parquet").exists()
    # the reason is the true one: a policy (the pipeline's graph would impute a gap), not "cannot score"
    want = "infinity is no measurement" if value == float("inf") else "refused on purpose: a package from"
    assert want in str(err.value) and "cannot score" not in str(err.value)


@pytest.mark.parametrize("out_fmt", ["csv", "parquet"])
def test_failure_in_a_late_chunk_keeps_the_previous_output(tmp_path, model_package, data, out_fmt):
    """Earlier chunks were already written to the temp file: the old output must survive intact."""
    X, features, _ = data
    Xn = np.concatenate([X, X])
    col = Xn[:, 0].astype(object).astype(str)
    col[-3] = "oops"  # in the last chunk
    t = table(Xn, features)
    t = t.set_column(t.schema.get_field_index(features[0]), features[0], pa.array(col))
    inp = write(t, tmp_path / "in.csv")
    out = tmp_path / f"out.{out_fmt}"
    out.write_bytes(b"previous results")
    seen = []
    with pytest.raises(SchemaMismatchError, match="oops"):
        engine.score_file(model_package, inp, out, chunk_rows=100, progress=seen.append)
    assert sum(seen) >= 100  # chunks had been scored and written before the failure
    assert out.read_bytes() == b"previous results"
    assert leftovers(tmp_path) == []


def test_header_only_csv_gives_an_empty_result(tmp_path, model_package, data):
    _, features, class_names = data
    inp = tmp_path / "in.csv"
    inp.write_text(",".join(["id", *features]) + "\n")
    for out in (tmp_path / "out.csv", tmp_path / "out.parquet"):
        summary = engine.score_file(model_package, inp, out)
        got = read(out)
        assert summary.rows == 0 and got.num_rows == 0
        assert got.column_names == ["id", "prediction", *[f"prob_{c}" for c in class_names]]


def test_zero_row_parquet_gives_an_empty_result(tmp_path, model_package, data):
    X, features, _ = data
    inp = write(table(X[:0], features), tmp_path / "in.parquet")
    engine.score_file(model_package, inp, tmp_path / "out.parquet")
    assert read(tmp_path / "out.parquet").num_rows == 0


def test_zero_byte_file_is_a_clear_error(tmp_path, model_package, capsys):
    inp = tmp_path / "in.csv"
    inp.write_bytes(b"")
    rc = cli.main(
        ["--model_dir", str(model_package), "--input", str(inp), "--output", str(tmp_path / "o.csv")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "is empty (no header row)" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_cli_error_is_one_line_naming_the_column(tmp_path, model_package, data, capsys):
    X, features, _ = data
    inp = write(table(X[:10], features).drop_columns([features[0]]), tmp_path / "in.parquet")
    rc = cli.main(
        ["--model_dir", str(model_package), "--input", str(inp), "--output", str(tmp_path / "o.csv")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and repr(features[0]) in err[0]
    assert not (tmp_path / "o.csv").exists()


def test_cli_refuses_a_tampered_model(tmp_path, model_package, data, capsys):
    X, features, _ = data
    copy = shutil.copytree(model_package, tmp_path / "m" / model_package.name)
    card = json.loads((copy / "model-card.json").read_text())
    (copy / "model-card.json").write_text(json.dumps(dict(card, sha256="0" * 64)))
    inp = write(table(X[:10], features), tmp_path / "in.parquet")
    rc = cli.main(["--model_dir", str(copy), "--input", str(inp), "--output", str(tmp_path / "o.csv")])
    assert rc == 2 and "sha256 mismatch" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


def test_cli_output_extension_and_overwrite_rules(tmp_path, model_package, data, capsys):
    X, features, _ = data
    inp = write(table(X[:10], features), tmp_path / "in.parquet")
    base = ["--model_dir", str(model_package), "--input", str(inp), "--output"]
    assert cli.main([*base, str(tmp_path / "o.txt")]) == 2
    assert "*.csv or *.parquet" in capsys.readouterr().err
    (tmp_path / "o.csv").write_text("keep me")
    assert cli.main([*base, str(tmp_path / "o.csv"), "--no-overwrite"]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "o.csv").read_text() == "keep me"
    assert cli.main([*base, str(tmp_path / "o.csv"), "--id-column", "nope"]) == 2
    assert "'nope'" in capsys.readouterr().err and (tmp_path / "o.csv").read_text() == "keep me"


def test_cli_unwritable_output_is_one_line(tmp_path, model_package, data, capsys):
    X, features, _ = data
    inp = write(table(X[:10], features), tmp_path / "in.parquet")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    rc = cli.main(
        ["--model_dir", str(model_package), "--input", str(inp), "--output", str(blocker / "o.csv")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "not-a-folder" in err[0]


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_cli_progress_bar_and_summary(tmp_path, model_package, data, monkeypatch):
    X, features, _ = data
    inp = write(table(X, features), tmp_path / "in.parquet")
    argv = ["--model_dir", str(model_package), "--input", str(inp), "--output", str(tmp_path / "o.parquet")]
    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    assert cli.main([*argv, "--chunk-rows", "50"]) == 0
    shown = tty.getvalue()
    assert "rows/s" in shown and f"{len(X)}/{len(X)}" in shown  # the bar knew the Parquet row count
    assert shown.strip().splitlines()[-1].startswith(f"scored {len(X):,} rows in ")
    quiet = _Tty()
    monkeypatch.setattr("sys.stderr", quiet)
    assert cli.main([*argv, "--no-progress"]) == 0
    lines = quiet.getvalue().strip().splitlines()
    assert len(lines) == 1 and "rows/s" in lines[0] and "\r" not in quiet.getvalue()


def test_score_histogram_and_reports(tmp_path, model_package, data, reference):
    """The histogram is the runtime's score (P(positive class)) binned by 0.05, over every row."""
    import xml.etree.ElementTree as ET

    X, features, _ = data
    inp = write(table(X, features), tmp_path / "in.parquet")
    rc = cli.main(
        ["--model_dir", str(model_package), "--input", str(inp), "--output", str(tmp_path / "o.parquet"),
         "--chunk-rows", "100", "--report", str(tmp_path / "r.html")]
    )  # fmt: skip
    assert rc == 0
    summary = engine.score_file(model_package, inp, tmp_path / "o2.parquet", chunk_rows=100)
    _, proba = reference(X)
    expected = np.bincount(np.minimum((proba[:, 1] * 20).astype(int), 19), minlength=20)
    assert summary.score_histogram == expected.tolist() and sum(summary.score_histogram) == len(X)
    html = (tmp_path / "r.html").read_text()
    svg = ET.fromstring(html[html.index("<svg") : html.index("</svg>") + 6])
    rects = [e for e in svg.iter() if e.tag.endswith("rect")]
    assert len(rects) == 20
    heights = [float(r.get("height")) for r in rects]
    assert heights.index(max(heights)) == int(np.argmax(expected))  # tallest bar = fullest bin
    md = summary_markdown(summary)
    assert f"| 0.95-1.00 | {expected[19]:,} |" in md


def test_prob_column_names_are_safe_and_unique():
    assert prob_column_names(["no churn", "churn!"]) == ["prob_no_churn", "prob_churn"]
    assert prob_column_names(["a b", "a-b", "a/b"]) == ["prob_0", "prob_1", "prob_2"]


def _argv(model_package, inp, out, *extra) -> list[str]:
    return ["--model_dir", str(model_package), "--input", str(inp), "--output", str(out), *extra]


def _snapshot(folder) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its sha256: what a refused run must not change."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
        if not p.is_symlink()
    } | {str(p.relative_to(folder)): f"-> {os.readlink(p)}" for p in folder.rglob("*") if p.is_symlink()}


def _no_work(*args, **kwargs):
    raise AssertionError("the model was loaded: the refusal came after work had started")


@pytest.mark.parametrize(
    "alias",
    ["input", "input-relative", "input-symlink", "input-hardlink",
     "output", "output-relative", "output-symlink", "output-hardlink"],
)  # fmt: skip
def test_cli_report_must_not_be_the_input_or_the_output(
    tmp_path, model_package, data, capsys, monkeypatch, alias
):
    """hardening.md S12: --report pointing at the input replaced the input Parquet with HTML (exit 0),
    and --report == --output replaced the scored output. Both are refused now, before any work."""
    X, features, _ = data
    inp = write(table(X[:20], features), tmp_path / "in.parquet")
    out = tmp_path / "o.parquet"
    if alias == "output-hardlink":
        out.write_bytes(b"previous results")  # a hard link needs an existing file
    target, how = alias.split("-") if "-" in alias else (alias, "path")
    named = inp if target == "input" else out
    report = {
        "path": named,
        "relative": os.path.relpath(named, tmp_path / "sub"),  # ../in.parquet, from a working dir below
        "symlink": tmp_path / "r.html",
        "hardlink": tmp_path / "r.html",
    }[how]
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    if how == "symlink":
        os.symlink(named, report)  # dangling for the output, which does not exist yet
    elif how == "hardlink":
        os.link(named, report)
    before = _snapshot(tmp_path)
    monkeypatch.setattr(engine, "load_model", _no_work)
    rc = cli.main(_argv(model_package, inp, out, "--report", str(report)))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: report {str(report)!r} is the {target} file")
    assert "choose another --report" in err[0]
    assert _snapshot(tmp_path) == before  # input, any previous output and the link untouched


def test_cli_report_is_written_like_the_output(tmp_path, model_package, data, capsys):
    """Atomic (a hidden partial renamed into place), with the usual file mode; a missing folder is
    created, as the output's is."""
    X, features, _ = data
    inp = write(table(X, features), tmp_path / "in.parquet")
    plain = tmp_path / "plain.txt"
    plain.write_text("")
    report = tmp_path / "new" / "deeper" / "r.html"
    assert cli.main(_argv(model_package, inp, tmp_path / "o.parquet", "--report", str(report))) == 0
    assert report.read_text().startswith("<!doctype html>") and report.stat().st_mode == plain.stat().st_mode
    assert pq.read_table(tmp_path / "o.parquet").num_rows == len(X)
    assert leftovers(tmp_path) == [] and os.listdir(report.parent) == ["r.html"]
    assert capsys.readouterr().err.strip().endswith("]")  # the summary line still closes the run


def test_cli_report_that_cannot_be_written_leaves_the_old_output(
    tmp_path, model_package, data, capsys, monkeypatch
):
    """The failure was 'exit 2, but the output was already committed': the report is now complete
    before the output is renamed, so a report that fails (here: a full disk) keeps the old output."""
    X, features, _ = data
    inp = write(table(X, features), tmp_path / "in.parquet")
    out, report = tmp_path / "o.parquet", tmp_path / "r.html"
    out.write_bytes(b"previous results")
    report.write_text("previous report")

    def full_disk(summary):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(report))

    monkeypatch.setattr(engine, "summary_html", full_disk)
    rc = cli.main(_argv(model_package, inp, out, "--report", str(report)))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "No space left on device" in err[0], err
    assert out.read_bytes() == b"previous results" and report.read_text() == "previous report"
    assert leftovers(tmp_path) == []


def test_cli_report_that_cannot_be_created_is_refused_before_any_work(
    tmp_path, model_package, data, capsys, monkeypatch
):
    X, features, _ = data
    inp = write(table(X[:20], features), tmp_path / "in.parquet")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setattr(engine, "load_model", _no_work)
    for report in (blocker / "r.html", tmp_path):  # under a file; a directory
        rc = cli.main(_argv(model_package, inp, tmp_path / "o.parquet", "--report", str(report)))
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and str(report) in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet", "not-a-folder"]


def test_report_folder_that_cannot_be_created_fails_before_scoring(
    tmp_path, model_package, data, monkeypatch
):
    """mkdir of the report's folder fails (e.g. permissions): nothing is scored and no partial is left."""
    X, features, _ = data
    inp = write(table(X[:20], features), tmp_path / "in.parquet")
    real_mkdir = engine.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name == "denied":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(engine.Path, "mkdir", mkdir)
    seen = []
    with pytest.raises(PermissionError):
        engine.score_file(
            model_package, inp, tmp_path / "o.parquet", report_path=tmp_path / "denied" / "r.html",
            progress=seen.append,
        )  # fmt: skip
    assert seen == [] and sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


def test_csv_header_that_is_not_utf8_is_one_line(tmp_path, model_package, data, capsys):
    """hardening.md 6: a header cell 'n\\xe4me' (Latin-1) gave exit 1 and a UnicodeDecodeError traceback."""
    X, features, _ = data
    inp = tmp_path / "in.csv"
    rows = "".join(",".join(["1", "x", *map(repr, map(float, r))]) + "\n" for r in X[:5])
    inp.write_bytes(",".join(["id", "n\xe4me", *features]).encode("latin-1") + b"\n" + rows.encode())
    rc = cli.main(_argv(model_package, inp, tmp_path / "o.csv"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: the header of CSV {str(inp)!r} is not valid UTF-8")
    assert "column #2 (n\\xe4me)" in err[0] and "0xe4" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_corrupt_parquet_data_page_is_one_line(tmp_path, model_package, data, capsys):
    """hardening.md 6: flipped bytes in a data page: pyarrow's thrift error spans lines (and quotes a
    control character); the command still prints exactly one line naming the file."""
    X, features, _ = data
    inp = write(table(X, features), tmp_path / "in.parquet")
    page = pq.ParquetFile(inp).metadata.row_group(0).column(3).data_page_offset
    raw = bytearray(inp.read_bytes())
    raw[page : page + 16] = bytes(b ^ 0xFF for b in raw[page : page + 16])
    inp.write_bytes(raw)
    with pytest.raises(OSError, match="\n"):  # the reproduction: pyarrow's message has a newline
        for _ in pq.ParquetFile(inp).iter_batches():
            pass
    rc = cli.main(_argv(model_package, inp, tmp_path / "o.csv"))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.rstrip("\n").isprintable()  # one line, no control bytes
    assert err.startswith(f"error: cannot read the data of Parquet file {str(inp)!r}") and "damaged" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]


def test_cli_error_line_is_one_bounded_line(tmp_path, model_package, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise BatchScoringError("line one\nline two\r\n\t" + "x" * 100_000)

    monkeypatch.setattr(engine, "load_model", fail)
    assert cli.main(_argv(model_package, tmp_path / "in.csv", tmp_path / "o.csv")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: line one line two xxx") and len(err) <= 1010


@pytest.mark.parametrize(
    ("extra", "what"),
    [
        (["--chunk-rows", "abc"], "argument --chunk-rows/--chunk_rows: invalid int value: 'abc'"),
        (["--input-format", "xml"], "argument --input-format: invalid choice: 'xml'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--threads", "-1"], "argument --threads: expected a whole number, 0 or more"),
        (["--threads", "two"], "argument --threads: expected a whole number, 0 or more"),
    ],
)
def test_cli_argument_errors_are_one_line(tmp_path, model_package, capsys, extra, what):
    """hardening.md 6: argparse printed its 7-line usage block; now one 'error: <what>; see --help' line
    (and --threads -1, once accepted silently, is refused)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(_argv(model_package, tmp_path / "in.csv", tmp_path / "o.csv", *extra))
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"python -m serving.batch: error: {what}")
    assert err[0].endswith("; see python -m serving.batch --help")
    assert cli.build_parser().parse_args(_argv(model_package, "i", "o.csv", "--threads", "0")).threads == 0


def test_stale_partials_of_the_same_output_are_removed(tmp_path, model_package, data):
    """hardening.md 6: a run killed with SIGKILL leaves '.<name>.XXXXXXXX.partial'; the next successful
    run for the same output (or report) removes those older than itself, and nothing else."""
    X, features, _ = data
    inp = write(table(X[:20], features), tmp_path / "in.parquet")
    folder = tmp_path / "out"
    folder.mkdir()
    old, future = time.time() - 3600, time.time() + 3600
    stale = [folder / ".o.parquet.k1ll3d_x.partial", folder / ".r.html.abcd1234.partial"]
    kept = [
        folder / ".o.parquet.st1llrun.partial",  # newer than the run: another run still writing
        folder / ".other.parquet.abcd1234.partial",  # another output's
        folder / "o.parquet.abcd1234.partial",  # not hidden: not ours
        folder / ".o.parquet.abcd1234.partial.keep",
        folder / ".o.parquet.notes",
        folder / ".o.parquet.ABCD1234.partial",  # mkstemp never makes capitals
    ]
    for p in stale + kept:
        p.write_bytes(b"PAR1 half written")
        os.utime(p, (old, old))
    os.utime(kept[0], (future, future))
    (folder / ".o.parquet.adirxxxx.partial").mkdir()  # not a regular file
    os.symlink(inp, folder / ".o.parquet.alinkxxx.partial")  # a link, not a file of ours
    os.utime(folder / ".o.parquet.alinkxxx.partial", (old, old), follow_symlinks=False)
    kept += [folder / ".o.parquet.adirxxxx.partial", folder / ".o.parquet.alinkxxx.partial"]
    with pytest.raises(BatchScoringError):  # a failed run removes nothing
        engine.score_file(model_package, inp, folder / "o.parquet", chunk_rows=0)
    assert all(p.exists() for p in stale)
    engine.score_file(model_package, inp, folder / "o.parquet", report_path=folder / "r.html")
    assert not any(p.exists() for p in stale)
    assert all(os.path.lexists(p) for p in kept) and inp.exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["o.parquet", "r.html", *(p.name for p in kept)]
    )


@pytest.fixture
def both_paths(monkeypatch):
    """Run a callable with the small-file path (pyarrow) and the large-file path (polars)."""
    from serving.batch import source

    def run(fn):
        out = []
        for threshold in (1 << 62, 0):  # never polars, always polars
            monkeypatch.setattr(source, "POLARS_MIN_BYTES", threshold)
            out.append(fn())
        return out

    return run


def test_polars_and_pyarrow_csv_paths_score_and_write_alike(
    tmp_path, model_package, data, reference, both_paths
):
    X, features, _ = data
    t = table(X, features)
    ids = [f'c{i:05d}, "north"' if i % 7 == 0 else f"c{i:05d}" for i in range(len(X))]  # quotes and commas
    t = t.set_column(0, "customer", pa.array(ids))
    i = t.schema.get_field_index(features[4])
    t = t.set_column(i, features[4], pa.array([repr(float(v)) for v in X[:, 4]]))  # full-precision text
    inp = write(t, tmp_path / "in.csv")

    def run():
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}.csv"
        engine.score_file(model_package, inp, out, chunk_rows=100, id_column="customer")
        return out

    small, large = both_paths(run)
    assert small.read_bytes() != b"" and read(small).equals(read(large))
    got = read(large)
    assert got.column("customer").to_pylist() == ids
    label, proba = reference(X)
    np.testing.assert_array_equal(got.column("prediction").to_numpy(), label)
    np.testing.assert_allclose(got.column("prob_benign").to_numpy(), proba[:, 1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", ["12,5 mm", "", "NA", "oops"])
def test_polars_and_pyarrow_csv_paths_refuse_alike(tmp_path, model_package, data, both_paths, bad):
    """A value polars refuses is re-read by pyarrow: the same one line, naming column and row or value."""
    X, features, _ = data
    t = table(X[:300], features)
    col = [str(v) for v in X[:300, 5]]
    col[250] = bad
    t = t.set_column(t.schema.get_field_index(features[5]), features[5], pa.array(col))
    inp = write(t, tmp_path / "in.csv")

    def run():
        with pytest.raises(SchemaMismatchError) as e:
            engine.score_file(model_package, inp, tmp_path / "o.csv", chunk_rows=64)
        return str(e.value)

    small, large = both_paths(run)
    assert small == large and features[5] in small
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv"]


def test_polars_and_pyarrow_parquet_paths_score_alike(tmp_path, model_package, data, reference, both_paths):
    from serving.batch import sharded

    X, features, _ = data
    t = table(X, features, extra=False)
    inp = tmp_path / "in.parquet"
    pq.write_table(t, inp, row_group_size=100)

    def run():
        n = len(list(tmp_path.iterdir()))
        engine.score_file(model_package, inp, tmp_path / f"o{n}.parquet", chunk_rows=64, id_column="customer")
        sharded.score_sharded(model_package, inp, tmp_path / f"s{n}", 3, id_column="customer")  # row ranges
        return read(tmp_path / f"o{n}.parquet"), pa.concat_tables(
            read(p) for p in sharded.read_output(tmp_path / f"s{n}")
        )

    (small, small_sharded), (large, large_sharded) = both_paths(run)
    assert small.equals(large) and small_sharded.equals(large_sharded)
    assert large_sharded.column("customer").equals(large.column("customer"))
    np.testing.assert_array_equal(large.column("prediction").to_numpy(), reference(X)[0])


def test_polars_path_refuses_a_damaged_parquet_page_like_pyarrow(tmp_path, model_package, data, both_paths):
    X, features, _ = data
    inp = write(table(X, features, extra=False), tmp_path / "in.parquet")
    page = pq.ParquetFile(inp).metadata.row_group(0).column(3).data_page_offset
    raw = bytearray(inp.read_bytes())
    raw[page : page + 16] = bytes(b ^ 0xFF for b in raw[page : page + 16])
    inp.write_bytes(raw)

    def run():
        with pytest.raises(BatchScoringError) as e:
            engine.score_file(model_package, inp, tmp_path / "o.csv")
        return str(e.value)

    small, large = both_paths(run)
    assert small == large and "damaged" in large
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]
