"""The pipeline's plain-function core (pipelines/core): every component's logic without kfp."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import onnx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core import data, evaluate, export, package, train, validate
from serving.contract import modelcard

LABEL = "target"


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return data.load_dataset()


@pytest.fixture(scope="module")
def split(frame):
    tr, te = data.split_dataset(frame, LABEL, 0.25, 7)
    X, y, features = data.xy(tr, LABEL)
    Xt, yt, _ = data.xy(te, LABEL)
    return X, y, Xt, yt, features, tr.attrs["class_names"]


@pytest.fixture(scope="module")
def fitted(split):
    X, y, *_ = split
    return {est: train.train(X, y, est, seed=0) for est in train.ESTIMATORS}


# ---------------------------------------------------------------- data


def test_bundled_data_and_fingerprint(frame, tmp_path):
    assert frame.shape == (569, 31) and frame.attrs["class_names"] == ["malignant", "benign"]
    fp = data.fingerprint(frame)
    # the same data through CSV and Parquet gives the same fingerprint; a changed value does not
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet", index=False)
    assert data.fingerprint(data.load_dataset(str(tmp_path / "d.csv"))) == fp
    assert data.fingerprint(data.load_dataset(str(tmp_path / "d.parquet"))) == fp
    changed = frame.copy()
    changed.iloc[0, 0] += 1.0
    assert data.fingerprint(changed) != fp


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_dataset(str(tmp_path / "nope.csv"))
    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(data.DataError, match=r"unsupported format '\.json'"):
        data.load_dataset(str(tmp_path / "d.json"))
    pd.DataFrame({"a": [1, 2], "b": [0, 1]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(data.DataError, match="label column 'y' is not in the data"):
        data.load_dataset(str(tmp_path / "d.csv"), "y")


def test_duplicate_column_names_are_refused_at_load(frame, tmp_path):
    """30 columns all named ``x``: pandas would read them as x, x.1, ..., x.29 and those names would
    become the card's feature names. The raw CSV header (and the Parquet schema) is checked."""
    path = tmp_path / "dup.csv"
    frame.iloc[:, :30].assign(y=frame[LABEL]).to_csv(path, index=False, header=["x"] * 30 + ["y"])
    assert list(pd.read_csv(path).columns[:3]) == ["x", "x.1", "x.2"]  # what pandas alone would keep
    with pytest.raises(data.DataError) as e:
        data.load_dataset(str(path), "y")
    assert str(e.value) == (
        f"data file {str(path)!r} has duplicate column names: 'x' (30 times); give every column a "
        "unique name (the names become the model's feature names)"
    )
    # several repeats (the label among them) are all named, before the label column is looked up
    (tmp_path / "two.csv").write_text("a,b,a,y,y\n1,2,3,0,1\n")
    with pytest.raises(data.DataError, match=r"duplicate column names: 'a' \(2 times\), 'y' \(2 times\);"):
        data.load_dataset(str(tmp_path / "two.csv"), "y")
    # Parquet: pyarrow stores repeated field names (pandas alone fails with a multi-line ArrowInvalid)
    table = pa.Table.from_arrays(
        [pa.array([1.0, 2.0]), pa.array([3.0, 4.0]), pa.array([0, 1])], ["x", "x", "y"]
    )
    pq.write_table(table, tmp_path / "dup.parquet")
    with pytest.raises(data.DataError, match=r"duplicate column names: 'x' \(2 times\);"):
        data.load_dataset(str(tmp_path / "dup.parquet"), "y")
    # names that merely look like pandas' renames, and unnamed columns, are not duplicates
    (tmp_path / "ok.csv").write_text("x,x.1,,,y\n1,2,3,4,0\n")
    assert list(data.load_dataset(str(tmp_path / "ok.csv"), "y").columns) == [
        "x",
        "x.1",
        "Unnamed: 2",
        "Unnamed: 3",
        "y",
    ]


def test_split_is_stratified_and_seeded(frame):
    a_tr, a_te = data.split_dataset(frame, LABEL, 0.25, 3)
    _, b_te = data.split_dataset(frame, LABEL, 0.25, 3)
    c_tr, _ = data.split_dataset(frame, LABEL, 0.25, 4)
    pd.testing.assert_frame_equal(a_te, b_te)
    assert not a_tr.equals(c_tr)
    assert len(a_te) == 143 and len(a_tr) == 426
    overall = frame[LABEL].mean()
    assert abs(a_tr[LABEL].mean() - overall) < 0.01 and abs(a_te[LABEL].mean() - overall) < 0.01


def test_string_labels_are_encoded():
    df = pd.DataFrame({"x": np.arange(40, dtype=float), "y": ["spam", "ham"] * 20})
    tr, _ = data.split_dataset(df, "y", 0.25, 0)
    assert tr.attrs["class_names"] == ["ham", "spam"]
    assert tr["y"].dtype == np.int64 and set(tr["y"]) == {0, 1}


# ---------------------------------------------------------------- validation: each bad case, its own message


def _fails(df, rule, match, **kw):
    report = validate.validate(df, LABEL, validate.Thresholds(**kw))
    assert report["failed"] == [rule], report["failed"]
    with pytest.raises(validate.DataValidationError, match=match):
        validate.raise_for_report(report)
    return report


def test_clean_data_passes_every_rule(frame):
    report = validate.validate(frame, LABEL)
    assert report["passed"] and len(report["rules"]) == 9
    validate.raise_for_report(report)
    assert "| min_rows | pass |" in validate.report_markdown(report)


def test_missing_column(frame):
    _fails(
        frame.drop(columns=["mean radius"]),
        "required_columns",
        r"missing column\(s\): mean radius",
        expected_columns=list(frame.columns),
    )


def test_nans_over_threshold(frame):
    df = frame.copy()
    df.loc[df.index[:60], "worst area"] = np.nan  # 10.5 %
    r = _fails(df, "missing_values", r"missing values over 0\.050 in 1 column\(s\): worst area=0\.105")
    assert r["rules"][3]["value"]["max_fraction"] == pytest.approx(60 / 569)


def test_single_class(frame):
    _fails(frame[frame[LABEL] == 1], "class_count", r"a single class \(1\) in label column 'target'")


def test_too_few_rows(frame):
    _fails(frame.head(50), "min_rows", "50 rows, fewer than the minimum 100", min_class_fraction=0.0)


def test_duplicate_heavy_data(frame):
    df = pd.concat([frame, frame.head(100)], ignore_index=True)
    _fails(df, "duplicate_rows", r"100 duplicate rows \(0\.149 of 669\), over 0\.050")


def test_outliers_and_label_balance(frame):
    df = frame.copy()
    df.loc[df.index[:80], "mean area"] = 1e6
    _fails(df, "outliers", r"outliers \(iqr, k=3\.0\) over 0\.100 in 1 column\(s\): mean area=0\.141")
    _fails(
        df,
        "outliers",
        r"outliers \(robust_z, k=3\.5\) over 0\.130 in 2 column\(s\): mean area=0\.162, area error=0\.142",
        outlier_method="robust_z",
        outlier_k=3.5,
        max_outlier_fraction=0.13,
    )
    rare = pd.concat([frame[frame[LABEL] == 1], frame[frame[LABEL] == 0].head(10)], ignore_index=True)
    _fails(rare, "label_balance", r"rarest class holds 0\.027 of rows, under 0\.050")


def test_several_broken_rules_are_all_named(frame):
    df = frame.head(50).copy()
    df.loc[df.index[:10], "mean radius"] = np.nan
    report = validate.validate(df, LABEL)
    with pytest.raises(validate.DataValidationError) as e:
        validate.raise_for_report(report)
    assert "(2 rule(s))" in str(e.value) and "min_rows: 50 rows" in str(e.value)
    assert "missing_values: missing values over 0.050 in 1 column(s): mean radius=0.200" in str(e.value)


@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_infinite_value_is_refused_by_a_named_rule(frame, tmp_path, value):
    """One +inf (or -inf) cell, read back from CSV as pandas parses it: sklearn would fail later at
    fit time ("Input X contains infinity"); finite_values names it before training."""
    df = frame.copy()
    df.loc[df.index[5], "mean texture"] = value
    df.to_csv(tmp_path / "inf.csv", index=False)
    loaded = data.load_dataset(str(tmp_path / "inf.csv"))
    r = _fails(
        loaded,
        "finite_values",
        r"finite_values: 1 infinite value\(s\) \(\+inf/-inf\) in 1 feature column\(s\): mean texture=1; ",
    )
    rule = next(x for x in r["rules"] if x["rule"] == "finite_values")
    assert rule["value"] == {"cells": 1, "columns": {"mean texture": 1}} and rule["threshold"] == 0
    assert "| finite_values | **FAIL** |" in validate.report_markdown(r)
    # several columns: counted per column, the worst first
    df.loc[df.index[:4], "worst area"] = -np.inf
    _fails(
        df,
        "finite_values",
        r"5 infinite value\(s\) .* in 2 feature column\(s\): worst area=4, mean texture=1",
    )


def test_non_numeric_feature_is_refused(frame):
    df = frame.assign(colour="red")
    _fails(df, "numeric_features", r"non-numeric feature column\(s\): colour \(object\)")


# ---------------------------------------------------------------- train


def test_pipelines_per_estimator(fitted):
    assert [n for n, _ in fitted["logistic_regression"].steps] == ["impute", "scale", "model"]
    # trees get no scaler: float32 ONNX and float64 sklearn then compare the same values
    assert [n for n, _ in fitted["random_forest"].steps] == ["impute", "model"]
    assert [n for n, _ in fitted["hist_gradient_boosting"].steps] == ["impute", "model"]
    for name, entry in train.ESTIMATORS.items():
        steps = [n for n, _ in fitted[name].steps]
        assert steps == (["impute", "scale", "model"] if entry.scale else ["impute", "model"]), name
        assert type(fitted[name].named_steps["model"]) is type(entry.factory())


def test_registry_is_a_fixed_table_of_classifiers():
    from sklearn.base import is_classifier

    assert set(train.ESTIMATORS) >= {
        "logistic_regression",
        "random_forest",
        "hist_gradient_boosting",
        "extra_trees",
        "gradient_boosting",
        "decision_tree",
    }
    for name, entry in train.ESTIMATORS.items():
        est = train.build_pipeline(name, seed=3).named_steps["model"]
        assert callable(entry.factory) and is_classifier(est) and hasattr(est, "predict_proba"), name
        assert est.get_params().get("random_state", 3) == 3, name  # seeded
    # only the linear model is scaled
    assert [n for n, e in train.ESTIMATORS.items() if e.scale] == ["logistic_regression"]
    with pytest.raises(TypeError):
        train.ESTIMATORS["mine"] = train.ESTIMATORS["random_forest"]  # read-only


def test_the_cli_reads_the_registry_without_importing_sklearn():
    import subprocess
    import sys

    code = (
        "import sys; from pipelines.cli import _parser; _parser(); "
        "assert not [m for m in sys.modules if m.startswith('sklearn')]"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.mark.parametrize(
    "name",
    [
        "sklearn.datasets.clear_data_home",  # the reproduction: it used to be called, deleting a folder
        "sklearn.ensemble.ExtraTreesClassifier",  # class paths are gone too, even of good classifiers
        "sklearn.semi_supervised.LabelSpreading",
        "os.system",
        "Random_Forest",
        "",
    ],
)
def test_estimator_outside_the_registry_is_refused_without_calling_anything(tmp_path, monkeypatch, name):
    home = tmp_path / "scikit_learn_data"
    (home / "keep").mkdir(parents=True)
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(home))
    with pytest.raises(train.TrainError) as e:
        train.build_pipeline(name)
    assert str(e.value) == (
        f"unknown estimator {name!r}: use one of logistic_regression, random_forest, "
        "hist_gradient_boosting, extra_trees, gradient_boosting, decision_tree"
    )
    with pytest.raises(train.TrainError, match="unknown estimator"):
        train.train(np.zeros((4, 2)), np.array([0, 1, 0, 1]), name)
    assert (home / "keep").is_dir()  # clear_data_home was not called


def test_hyperparameters_and_errors():
    pipe = train.build_pipeline("random_forest", {"n_estimators": 7, "max_depth": 3})
    assert pipe.named_steps["model"].n_estimators == 7
    with pytest.raises(train.TrainError, match=r"unknown hyperparameter.*: n_trees"):
        train.build_pipeline("random_forest", {"n_trees": 7})
    with pytest.raises(train.TrainError, match="unknown estimator 'svm'"):
        train.build_pipeline("svm")
    pipe = train.build_pipeline("extra_trees", {"n_estimators": 5}, seed=9)
    assert pipe.named_steps["model"].get_params()["n_estimators"] == 5
    assert pipe.named_steps["model"].random_state == 9


# ---------------------------------------------------------------- export and parity


@pytest.mark.parametrize("est", ["logistic_regression", "random_forest"])
def test_same_data_params_and_seed_give_byte_identical_onnx(fitted, split, est):
    """Reproducible packages: a second training with the same data, parameters, seed and libraries
    exports the same bytes, so the card's sha256 matches (skl2onnx's random graph name is pinned)."""
    X, y, _, _, features, _ = split
    again = export.to_onnx(train.train(X, y, est, seed=0), len(features))
    first = export.to_onnx(fitted[est], len(features))
    assert again == first
    assert onnx.load_from_string(first).graph.name == export.GRAPH_NAME


@pytest.mark.parametrize("est", train.ESTIMATORS)
def test_onnx_contract_and_parity(fitted, split, est):
    _, _, Xt, _, features, _ = split
    blob = export.to_onnx(fitted[est], len(features))
    graph = onnx.load_from_string(blob).graph
    assert [i.name for i in graph.input] == ["input"]
    assert [o.name for o in graph.output] == ["label", "probabilities"]  # plain tensors: no ZipMap
    assert "ZipMap" not in {n.op_type for n in graph.node}
    ops = export.opset(blob)  # pinned target opset: skl2onnx uses at most these versions
    assert ops["ai.onnx"] <= 17 and ops.get("ai.onnx.ml", 1) <= 3
    result = export.parity(fitted[est], blob, Xt)
    assert result["max_abs_prob_diff"] < 1e-4 and result["label_agreement"] == 1.0
    assert result["onnx_output_dtypes"] == {"label": "int64", "probabilities": "float32"}
    export.raise_for_parity(result)


def test_unconvertible_estimator_says_so(split):
    """The registry holds only convertible estimators, so the export error path is exercised with a
    fitted pipeline built here: skl2onnx has no converter for LabelSpreading."""
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.semi_supervised import LabelSpreading

    X, y, _, _, features, _ = split
    pipe = Pipeline([("impute", SimpleImputer(strategy="median")), ("model", LabelSpreading())]).fit(X, y)
    match = (
        r"skl2onnx cannot convert estimator sklearn\.semi_supervised\._label_propagation\.LabelSpreading "
        r"to ONNX \(MissingShapeCalculator\): use one of logistic_regression, .*, decision_tree "
    )
    with pytest.raises(export.ExportError, match=match):
        export.to_onnx(pipe, len(features))
    with pytest.raises(export.ExportError, match=match):  # what the train step runs right after fitting
        export.check_convertible(pipe, len(features))


def test_parity_failure_names_numbers():
    bad = {"rows": 10, "max_abs_prob_diff": 0.02, "label_agreement": 0.9, "label_mismatches": 1}
    with pytest.raises(
        export.ParityError,
        match=r"max abs probability difference 0\.02 >= 0\.0001; "
        r"label agreement 0\.9000 < 1\.0 \(1 of 10 rows differ\)",
    ):
        export.raise_for_parity(bad)


# ---------------------------------------------------------------- evaluate and gate


def test_evaluation_metrics_slices_and_plots(fitted, split):
    _, _, Xt, yt, features, names = split
    r = evaluate.evaluate(fitted["logistic_regression"], Xt, yt, names, features, "mean radius")
    assert set(r["metrics"]) == {"accuracy", "precision", "recall", "f1", "roc_auc", "log_loss"}
    assert r["metrics"]["accuracy"] > 0.9 and r["metrics"]["roc_auc"] > 0.95
    assert set(r["per_class"]) == {"malignant", "benign"}
    assert sum(r["per_class"][c]["support"] for c in r["per_class"]) == len(yt)
    assert np.array(r["confusion_matrix"]["matrix"]).sum() == len(yt)
    assert sum(s["rows"] for s in r["slices"].values()) == len(yt)
    assert all(k.startswith("mean radius") for k in r["slices"])
    pngs = evaluate.plots(r)
    assert all(b.startswith(b"\x89PNG") for b in pngs.values())
    html = evaluate.report_html(r, evaluate.gate(r["metrics"]), pngs)
    assert html.count("data:image/png;base64,") == 2
    # names from the data are escaped: the slice "mean radius <= x" is valid HTML, not a tag
    assert "<td>mean radius &lt;= " in html and "<td>mean radius <=" not in html


def test_gate_thresholds_and_baseline():
    m = {"accuracy": 0.95, "f1": 0.96, "roc_auc": 0.99}
    assert evaluate.gate(m)["passed"]
    g = evaluate.gate(m, evaluate.GateThresholds(min_accuracy=0.97))
    with pytest.raises(evaluate.GateError, match=r"accuracy >= 0\.97 failed \(got 0\.9500\)"):
        evaluate.raise_for_gate(g)
    base = {
        "name": "breast-cancer",
        "version": "1.0.0",
        "metrics": {"accuracy": 0.97, "f1": 0.96, "roc_auc": 0.99},
    }
    g = evaluate.gate(m, baseline_card=base)
    assert [c["passed"] for c in g["checks"]] == [True, True, True, False, True, True]
    with pytest.raises(
        evaluate.GateError, match=r"accuracy >= baseline breast-cancer@1\.0\.0 0\.9700 - 0\.01"
    ):
        evaluate.raise_for_gate(g)
    assert evaluate.gate(m, evaluate.GateThresholds(max_regression=0.03), base)["passed"]
    # a baseline card without metrics is not compared, and says so
    g = evaluate.gate(m, baseline_card={"name": "x", "version": "1.0.0", "metrics": {}})
    assert g["passed"] and "not compared" in g["checks"][-1]["note"]


def test_load_baseline_forms(tmp_path, model_package):
    card = json.loads((model_package / "model-card.json").read_text())
    assert evaluate.load_baseline("") is None
    assert evaluate.load_baseline(json.dumps(card))["sha256"] == card["sha256"]
    assert evaluate.load_baseline(str(model_package / "model-card.json"))["sha256"] == card["sha256"]
    assert evaluate.load_baseline(str(model_package.parent))["sha256"] == card["sha256"]
    with pytest.raises(ValueError, match="not valid JSON"):
        evaluate.load_baseline("{oops")
    with pytest.raises(ValueError, match="neither a JSON object nor an existing"):
        evaluate.load_baseline(str(tmp_path / "missing.json"))


# ---------------------------------------------------------------- package


def test_package_card_contract(tmp_path, fitted, split, model_package):
    *_, features, names = split
    blob = export.to_onnx(fitted["random_forest"], len(features))
    card = package.build_card(
        name="bc-rf",
        version="2.1.0",
        onnx_bytes=blob,
        feature_names=features,
        class_names=names,
        training_data={"fingerprint": "sha256:x", "rows": 569, "source": "sklearn:breast_cancer"},
        metrics={"accuracy": 0.95},
        estimator="random_forest",
        pipeline_run_id="run-1",
    )
    model_dir = package.package(tmp_path, card, blob)
    written = modelcard.verify_package(model_dir)
    assert (model_dir / "1" / "model.onnx").read_bytes() == blob
    assert written["sha256"] == modelcard.sha256_file(model_dir / "1" / "model.onnx")
    assert written["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 30], "features": features}
    ]
    assert written["outputs"] == [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
    ]
    assert written["classes"] == [0, 1] and written["class_names"] == ["malignant", "benign"]
    assert set(written["library_versions"]) >= {"scikit-learn", "skl2onnx", "onnx", "onnxruntime"}
    # every key the other parts rely on (tests/modelfactory.py's card) is present
    factory_card = json.loads((model_package / "model-card.json").read_text())
    assert set(factory_card) <= set(written)
    assert "sha256" in package.summary(written)
    for path in (model_dir / "1" / "model.onnx", model_dir / "model-card.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    with pytest.raises(modelcard.ModelPackageError, match="semantic"):
        package.build_card(
            name="bc",
            version="1",
            onnx_bytes=blob,
            feature_names=features,
            class_names=names,
            training_data={},
        )


def test_package_files_are_readable_by_other_uids(tmp_path, fitted, split):
    """S14: mkstemp creates 0600 files, unreadable by the runtime image's UID 10001 when the package is
    bind-mounted from another UID. Both files are 0644 whatever the umask, also when replacing."""
    *_, features, names = split
    blob = export.to_onnx(fitted["logistic_regression"], len(features))
    card = package.build_card(
        name="bc-mode",
        version="1.0.0",
        onnx_bytes=blob,
        feature_names=features,
        class_names=names,
        training_data={},
    )
    old = os.umask(0o077)
    try:
        model_dir = modelcard.write_package(tmp_path, card, blob)
        modelcard.write_package(tmp_path, dict(card, version="1.0.1"), blob)  # over the first
    finally:
        os.umask(old)
    for path in (model_dir / "1" / "model.onnx", model_dir / "model-card.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert modelcard.verify_package(model_dir)["version"] == "1.0.1"
    assert sorted(p.name for p in model_dir.rglob("*")) == [
        "1",
        "model-card.json",
        "model.onnx",
    ]  # no temp left
