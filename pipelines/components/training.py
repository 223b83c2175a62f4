"""KFP v2 lightweight components of the training pipeline: thin wrappers over ``pipelines.core``.

Each component is hermetic: imports sit inside the function, the base image is explicit, the
packages it imports are pinned, and the core modules it imports (and theirs) travel inside the
compiled YAML (``_env.component``). The ``core`` parameter is that embedded tree; kfp injects it
at run time and it is not part of the component's interface.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from pipelines.components._env import component

_DATA = ("pandas", "pyarrow", "scikit-learn")
_ONNX = (*_DATA, "skl2onnx", "onnxruntime")


@component(*_DATA)
def load_data(
    source: str,
    label_column: str,
    model_name: str,
    model_version: str,
    dataset: Output[Dataset],
    core: dsl.EmbeddedInput[dsl.Dataset],
):
    """Load sklearn's bundled breast_cancer data (empty source) or a CSV/Parquet file.

    Args:
        source: A CSV/Parquet file: a path (local runs only: the step's container has no
            other files) or an https:// URL (any run, e.g. an object store's presigned URL); empty =
            sklearn's bundled breast_cancer data.
        label_column: Name of the label column.
        model_name: The model's name, checked here (a DNS-1123 label) before any training.
        model_version: The model's version, checked here (semantic version X.Y.Z).
        dataset: The loaded table (Parquet), with rows, columns and a data fingerprint.
    """
    from pipelines.core import data
    from serving.contract import modelcard

    # fail before any training when the name or version would be refused at packaging time
    modelcard.check_name(model_name)
    modelcard.check_version(model_version)
    df = data.load_dataset(source, label_column)
    data.write_dataset(df, dataset.path)
    dataset.metadata.update(
        {
            "rows": len(df),
            "columns": len(df.columns),
            "source": df.attrs["source"],
            "fingerprint": data.fingerprint(df),
            "label_column": label_column,
        }
    )
    print(f"loaded {len(df)} rows x {len(df.columns)} columns from {df.attrs['source']}")


@component(*_DATA)
def validate_data(
    dataset: Input[Dataset],
    label_column: str,
    expected_columns: str,
    min_rows: int,
    max_missing_fraction: float,
    max_duplicate_fraction: float,
    max_outlier_fraction: float,
    outlier_method: str,
    outlier_k: float,
    min_class_fraction: float,
    report: Output[Artifact],
    report_md: Output[Markdown],
    core: dsl.EmbeddedInput[dsl.Dataset],
):
    """Schema, missing and infinite values, duplicates, outliers, label balance, row count: fail on any
    broken rule.

    Args:
        dataset: The loaded table.
        label_column: Name of the label column.
        expected_columns: Comma-separated columns that must be present; empty = no such check.
        min_rows: Fewest rows the data may have.
        max_missing_fraction: Largest share of missing values in any one column.
        max_duplicate_fraction: Largest share of rows that repeat an earlier row.
        max_outlier_fraction: Largest share of outliers in any one column.
        outlier_method: ``iqr`` (Tukey fences) or ``robust_z`` (median/MAD).
        outlier_k: The IQR multiplier (``iqr``) or the z limit (``robust_z``).
        min_class_fraction: Smallest share the rarest class may have.
        report: Every rule with its numbers (JSON).
        report_md: The same as Markdown, for the run page.
    """
    import json

    from pipelines.core import data, validate

    df = data.read_dataset(dataset.path)
    t = validate.Thresholds(
        min_rows=min_rows,
        max_missing_fraction=max_missing_fraction,
        max_duplicate_fraction=max_duplicate_fraction,
        max_outlier_fraction=max_outlier_fraction,
        outlier_method=outlier_method,
        outlier_k=outlier_k,
        min_class_fraction=min_class_fraction,
        expected_columns=[c.strip() for c in expected_columns.split(",") if c.strip()],
    )
    result = validate.validate(df, label_column, t)
    with open(report.path, "w") as f:
        json.dump(result, f, indent=2)
    with open(report_md.path, "w") as f:
        f.write(validate.report_markdown(result))
    report.metadata.update({"passed": result["passed"], "failed": result["failed"]})
    validate.raise_for_report(result)
    print(f"data validation passed: {len(result['rules'])} rules")


@component(*_DATA)
def split(
    dataset: Input[Dataset],
    label_column: str,
    test_size: float,
    seed: int,
    train_data: Output[Dataset],
    test_data: Output[Dataset],
    core: dsl.EmbeddedInput[dsl.Dataset],
):
    """Stratified, seeded train/test split (labels encoded to 0..k-1).

    Args:
        dataset: The validated table.
        label_column: Name of the label column.
        test_size: Share of rows held out.
        seed: Seed of the split.
        train_data: The training rows.
        test_data: The held-out rows.
    """
    from pipelines.core import data

    train, test = data.split_dataset(data.read_dataset(dataset.path), label_column, test_size, seed)
    data.write_dataset(train, train_data.path)
    data.write_dataset(test, test_data.path)
    train_data.metadata.update({"rows": len(train), "class_names": train.attrs["class_names"]})
    test_data.metadata.update({"rows": len(test)})
    print(f"split: {len(train)} train rows, {len(test)} test rows")


@component(*_ONNX)
def train(
    train_data: Input[Dataset],
    label_column: str,
    estimator: str,
    hyperparameters: str,
    seed: int,
    model: Output[Model],
    core: dsl.EmbeddedInput[dsl.Dataset],
):
    """Fit the inference pipeline (preprocessing + a registered estimator); saves it with joblib.

    Args:
        train_data: The training rows.
        label_column: Name of the label column.
        estimator: A name from ``ESTIMATORS`` in ``pipelines/core/train.py``.
        hyperparameters: JSON object of estimator parameters, e.g. ``{"C": 0.5}``.
        seed: Seed of the estimator.
        model: The fitted sklearn ``Pipeline`` (joblib).
    """
    import json

    import joblib

    from pipelines.core import data, export
    from pipelines.core import train as core_train

    try:
        params = json.loads(hyperparameters or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"hyperparameters must be a JSON object, e.g. '{{\"C\": 0.5}}': {e}") from e
    if not isinstance(params, dict):
        raise ValueError(f"hyperparameters must be a JSON object, got {hyperparameters!r}")
    X, y, _ = data.xy(data.read_dataset(train_data.path), label_column)
    pipe = core_train.train(X, y, estimator, params, seed)
    export.check_convertible(pipe, X.shape[1])  # an unconvertible estimator fails here, not after evaluation
    joblib.dump(pipe, model.path)
    model.metadata.update(
        {
            "estimator": estimator,
            "framework": "scikit-learn",
            "hyperparameters": json.dumps(core_train.effective_hyperparameters(pipe)),
        }
    )
    print(f"trained {estimator}: {' -> '.join(name for name, _ in pipe.steps)}")


@component(*_DATA, "matplotlib")
def evaluate(
    model: Input[Model],
    test_data: Input[Dataset],
    label_column: str,
    slice_feature: str,
    min_accuracy: float,
    min_f1: float,
    min_roc_auc: float,
    max_regression: float,
    baseline_card: str,
    metrics: Output[Metrics],
    classification_metrics: Output[ClassificationMetrics],
    report: Output[HTML],
    evaluation: Output[Artifact],
    core: dsl.EmbeddedInput[dsl.Dataset],
):
    """Held-out metrics, per class and per slice; gate vs thresholds and vs the baseline card.

    Args:
        model: The fitted sklearn ``Pipeline``.
        test_data: The held-out rows.
        label_column: Name of the label column.
        slice_feature: Feature to slice on (at or below / above its median); empty = the first.
        min_accuracy: Gate: least held-out accuracy.
        min_f1: Gate: least held-out F1.
        min_roc_auc: Gate: least held-out ROC AUC.
        max_regression: Largest drop allowed against the baseline card.
        baseline_card: The serving model's card (JSON text or a path); empty = no comparison.
        metrics: Held-out and per-slice metrics.
        classification_metrics: Confusion matrix and ROC curve.
        report: HTML report with plots.
        evaluation: Every number and the gate's verdict (JSON).
    """
    import json
    import math

    import joblib

    from pipelines.core import data
    from pipelines.core import evaluate as core_eval

    test = data.read_dataset(test_data.path)
    X, y, features = data.xy(test, label_column)
    pipe = joblib.load(model.path)
    result = core_eval.evaluate(pipe, X, y, list(test.attrs["class_names"]), features, slice_feature)
    baseline = core_eval.load_baseline(baseline_card)
    thresholds = core_eval.GateThresholds(min_accuracy, min_f1, min_roc_auc, max_regression)
    gate = core_eval.gate(result["metrics"], thresholds, baseline)
    result["gate"] = gate

    for name, value in result["metrics"].items():
        if not math.isnan(value):
            metrics.log_metric(name, round(value, 6))
    for name, s in result["slices"].items():
        metrics.log_metric(f"slice[{name}].accuracy", round(s["accuracy"], 6))
    cm = result["confusion_matrix"]
    classification_metrics.log_confusion_matrix(cm["labels"], cm["matrix"])
    roc = result["roc_curve"]
    classification_metrics.log_roc_curve(roc["fpr"], roc["tpr"], roc["thresholds"])
    pngs = core_eval.plots(result)
    with open(report.path, "w") as f:
        f.write(core_eval.report_html(result, gate, pngs))
    with open(evaluation.path, "w") as f:
        json.dump(result, f, indent=2)
    evaluation.metadata.update({"gate_passed": gate["passed"]})
    core_eval.raise_for_gate(gate)
    print("evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()))


@component(*_ONNX)
def export_onnx(
    model: Input[Model],
    train_data: Input[Dataset],
    label_column: str,
    onnx_model: Output[Model],
    core: dsl.EmbeddedInput[dsl.Dataset],
):
    """skl2onnx, ZipMap off, float32 input ``input``, pinned target opset.

    Args:
        model: The fitted sklearn ``Pipeline``.
        train_data: The training rows (for the feature count).
        label_column: Name of the label column.
        onnx_model: The ONNX graph.
    """
    import joblib

    from pipelines.core import data, export

    features = data.feature_columns(data.read_dataset(train_data.path), label_column)
    onnx_bytes = export.to_onnx(joblib.load(model.path), len(features))
    with open(onnx_model.path, "wb") as f:
        f.write(onnx_bytes)
    onnx_model.metadata.update({"framework": "onnx", "opset": str(export.opset(onnx_bytes))})
    print(f"exported ONNX: {len(onnx_bytes)} bytes, opset {export.opset(onnx_bytes)}")


@component(*_ONNX)
def verify_onnx(
    model: Input[Model],
    onnx_model: Input[Model],
    test_data: Input[Dataset],
    label_column: str,
    max_abs_prob_diff: float,
    min_label_agreement: float,
    parity: Output[Metrics],
    parity_report: Output[Artifact],
    core: dsl.EmbeddedInput[dsl.Dataset],
):
    """onnxruntime vs sklearn on the held-out rows; fail when parity breaks.

    Args:
        model: The fitted sklearn ``Pipeline``.
        onnx_model: The ONNX graph.
        test_data: The held-out rows.
        label_column: Name of the label column.
        max_abs_prob_diff: Largest absolute probability difference allowed.
        min_label_agreement: Least share of rows where ONNX and sklearn agree.
        parity: The parity numbers.
        parity_report: The same as JSON.
    """
    import json

    import joblib

    from pipelines.core import data, export

    X, _, _ = data.xy(data.read_dataset(test_data.path), label_column)
    with open(onnx_model.path, "rb") as f:
        result = export.parity(joblib.load(model.path), f.read(), X)
    for key in ("max_abs_prob_diff", "mean_abs_prob_diff", "label_agreement"):
        parity.log_metric(key, result[key])
    with open(parity_report.path, "w") as f:
        json.dump(result, f, indent=2)
    export.raise_for_parity(result, max_abs_prob_diff, min_label_agreement)
    print(
        f"ONNX parity: max|dp| {result['max_abs_prob_diff']:.2e}, label agreement {result['label_agreement']}"
    )


@component(*_ONNX)
def package_model(
    onnx_model: Input[Model],
    model: Input[Model],
    dataset: Input[Dataset],
    train_data: Input[Dataset],
    evaluation: Input[Artifact],
    parity_report: Input[Artifact],
    label_column: str,
    model_name: str,
    model_version: str,
    pipeline_run_id: str,
    package: Output[Model],
    core: dsl.EmbeddedInput[dsl.Dataset],
):
    """``<package>/<name>/1/model.onnx`` + ``<package>/<name>/model-card.json`` (a Triton repository).

    Args:
        onnx_model: The verified ONNX graph.
        model: The fitted sklearn ``Pipeline`` (its estimator and hyperparameters go in the card).
        dataset: The full table (its fingerprint goes in the card).
        train_data: The training rows (feature and class names).
        evaluation: The evaluation's JSON (metrics and gate go in the card).
        parity_report: The parity check's JSON.
        label_column: Name of the label column.
        model_name: The model's name, a DNS-1123 label.
        model_version: The model's version, a semantic version X.Y.Z.
        pipeline_run_id: The KFP run that built the package.
        package: The model package folder.
    """
    import json
    import os

    from pipelines.core import data
    from pipelines.core import package as core_package

    full = data.read_dataset(dataset.path)
    train = data.read_dataset(train_data.path)
    with open(evaluation.path) as f:
        ev = json.load(f)
    with open(parity_report.path) as f:
        par = json.load(f)
    with open(onnx_model.path, "rb") as f:
        onnx_bytes = f.read()
    card = core_package.build_card(
        name=model_name,
        version=model_version,
        onnx_bytes=onnx_bytes,
        feature_names=data.feature_columns(train, label_column),
        class_names=list(train.attrs["class_names"]),
        training_data={
            "fingerprint": data.fingerprint(full),
            "rows": len(full),
            "columns": len(full.columns),
            "train_rows": len(train),
            "source": full.attrs.get("source", ""),
            "label_column": label_column,
        },
        metrics=ev["metrics"],
        estimator=str(model.metadata.get("estimator", "")),
        hyperparameters=json.loads(model.metadata.get("hyperparameters", "{}")),
        pipeline_run_id=pipeline_run_id,
        extra={
            "evaluation": {k: ev[k] for k in ("per_class", "slices", "rows")},
            "gate": ev["gate"],
            "parity": par,
        },
    )
    os.makedirs(package.path, exist_ok=True)
    model_dir = core_package.package(package.path, card, onnx_bytes)
    with open(model_dir / "model-card.json") as f:
        written = json.load(f)
    package.metadata.update(
        {
            "name": model_name,
            "version": model_version,
            "sha256": written["sha256"],
            "model_dir": model_name,
            "format": "onnx",
        }
    )
    print(core_package.summary(written))
