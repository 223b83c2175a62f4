"""The training pipeline: data -> validated -> split -> trained -> evaluated (gated) -> ONNX ->
parity-verified -> packaged model (``<name>/1/model.onnx`` + ``model-card.json``), and with
``deploy=True`` -> the package handed to the rollout operator (``components/rollout.py``).

Every threshold is a pipeline parameter, so the Kubeflow dashboard shows and overrides them.
"""

from kfp import dsl
from kfp.dsl import Model

from pipelines.components import rollout
from pipelines.components._env import pipeline
from pipelines.components.training import (
    evaluate,
    export_onnx,
    load_data,
    package_model,
    split,
    train,
    validate_data,
    verify_onnx,
)

PIPELINE_NAME = "training-pipeline"


@pipeline(
    name=PIPELINE_NAME,
    description="Train a scikit-learn classifier, gate it, export it to verified ONNX and package it "
    "(model.onnx + model-card.json, a Triton/KServe model repository); with deploy=true, roll it out "
    "as a canary on measured gates.",
)
def training_pipeline(
    # data
    data_source: str = "",
    label_column: str = "target",
    # validation (every rule is hard: a broken one fails the run)
    expected_columns: str = "",
    min_rows: int = 100,
    max_missing_fraction: float = 0.05,
    max_duplicate_fraction: float = 0.05,
    max_outlier_fraction: float = 0.10,
    outlier_method: str = "iqr",
    outlier_k: float = 3.0,
    min_class_fraction: float = 0.05,
    # split and training
    test_size: float = 0.25,
    seed: int = 42,
    estimator: str = "logistic_regression",
    hyperparameters: str = "{}",
    # evaluation gate
    slice_feature: str = "",
    min_accuracy: float = 0.90,
    min_f1: float = 0.90,
    min_roc_auc: float = 0.95,
    baseline_card: str = "",
    max_regression: float = 0.01,
    # ONNX parity
    max_abs_prob_diff: float = 1e-4,
    min_label_agreement: float = 1.0,
    # package
    model_name: str = "breast-cancer",
    model_version: str = "1.0.0",
    # deploy and roll out (off by default; needs the Helm release, see pipelines/README.md)
    deploy: bool = False,
    deploy_namespace: str = "models",
    release_fullname: str = "",
    rollout_router: str = "gateway_api",
    rollout_steps: str = "10,25,50,100",
    rollout_interval_s: float = 60.0,
    rollout_watch_intervals: int = 0,
    prometheus_url: str = "http://prometheus.monitoring.svc.cluster.local:9090",
    max_drift: float = 0.15,
    compare_with_stable: bool = True,
    rollout_alpha: float = 0.01,
    max_error_increase: float = 0.005,
    latency_min_effect: float = 0.05,
    drift_min_effect: float = 0.1,
    accuracy_min_effect: float = 0.0,
) -> Model:
    """Train, gate, export, verify and package a classifier; with ``deploy``, roll it out.

    Args:
        data_source: A CSV/Parquet file: a path (local runs only: the step's container has no
            other files) or an https:// URL (any run, e.g. an object store's presigned URL); empty =
            sklearn's bundled breast_cancer data.
        label_column: Name of the label column.
        expected_columns: Comma-separated columns that must be present; empty = no such check.
        min_rows: Fewest rows the data may have.
        max_missing_fraction: Largest share of missing values in any one column.
        max_duplicate_fraction: Largest share of rows that repeat an earlier row.
        max_outlier_fraction: Largest share of outliers in any one column.
        outlier_method: ``iqr`` (Tukey fences) or ``robust_z`` (median/MAD).
        outlier_k: The IQR multiplier (``iqr``) or the z limit (``robust_z``).
        min_class_fraction: Smallest share the rarest class may have.
        test_size: Share of rows held out for evaluation and the ONNX parity check.
        seed: Seed of the split and of the estimator.
        estimator: A name from ``ESTIMATORS`` in ``pipelines/core/train.py`` (``logistic_regression``,
            ``random_forest``, ``hist_gradient_boosting``, ``extra_trees``, ``gradient_boosting``,
            ``decision_tree``); nothing is imported from this parameter.
        hyperparameters: JSON object of estimator parameters, e.g. ``{"C": 0.5}``.
        slice_feature: Feature to slice the evaluation on (at or below / above its median); empty =
            the first feature.
        min_accuracy: Evaluation gate: least held-out accuracy.
        min_f1: Evaluation gate: least held-out F1.
        min_roc_auc: Evaluation gate: least held-out ROC AUC.
        baseline_card: The serving model's card (JSON text, or a ``model-card.json``/package path in
            local runs); empty = no comparison.
        max_regression: Largest drop allowed against the baseline card (accuracy, F1, ROC AUC).
        max_abs_prob_diff: ONNX parity: largest absolute probability difference to sklearn.
        min_label_agreement: ONNX parity: least share of rows where ONNX and sklearn agree.
        model_name: Model name, a DNS-1123 label.
        model_version: Model version, a semantic version X.Y.Z.
        deploy: Roll the package out after packaging: progressive-rollout declares it on the release's
            ModelRollout and waits for the rollout operator's outcome.
        deploy_namespace: Namespace of the model's Helm release.
        release_fullname: The release's fullname, ``<release>-mlrollout-model`` (required with deploy).
        rollout_router: ``gateway_api`` (chart strategy ``canary``) or ``kserve_knative`` (strategy
            ``knativeCanary``).
        rollout_steps: Comma-separated canary weights in percent, e.g. ``10,25,50,100``.
        rollout_interval_s: Seconds between analyses (one per step, after the weight is set).
        rollout_watch_intervals: The watch after promotion: analyses of the new stable against the
            previous version's baseline after the promotion; a failure restores the previous model.
            0 = none (needs ``gateway_api``).
        prometheus_url: Prometheus the operator's gates query; empty = the ModelRollout's own
            ``spec.metrics`` (on create: the operator's ``--prometheus-url``).
        max_drift: Drift gate: largest Jensen-Shannon distance between canary and stable predictions.
        compare_with_stable: Judge the canary against stable with sequential tests at a stated
            false-rollback rate (error rate, latency histograms, drift test) beside the p99 limit
            (the default, as the CRD's); false: the absolute gates (the ModelRollout's
            ``compareWithStable``).
        rollout_alpha: The comparisons' false-rollback rate, split over them (0 < alpha <= 0.5).
        max_error_increase: Comparison: smallest error-rate increase worth catching (0.005 = 0.5 points).
        latency_min_effect: Comparison: smallest slowdown worth catching, P(canary slower) - 1/2.
        drift_min_effect: Comparison: smallest score-histogram change worth catching (Cohen's w).
        accuracy_min_effect: Comparison: smallest accuracy drop on labelled feedback worth catching
            (0.02 = 2 points); 0 = no accuracy comparison.

    Returns:
        The model package: ``<name>/1/model.onnx`` + ``<name>/model-card.json``.
    """
    data = load_data(
        source=data_source, label_column=label_column, model_name=model_name, model_version=model_version
    )

    checked = validate_data(
        dataset=data.outputs["dataset"],
        label_column=label_column,
        expected_columns=expected_columns,
        min_rows=min_rows,
        max_missing_fraction=max_missing_fraction,
        max_duplicate_fraction=max_duplicate_fraction,
        max_outlier_fraction=max_outlier_fraction,
        outlier_method=outlier_method,
        outlier_k=outlier_k,
        min_class_fraction=min_class_fraction,
    )

    parts = split(
        dataset=data.outputs["dataset"], label_column=label_column, test_size=test_size, seed=seed
    ).after(checked)

    fitted = train(
        train_data=parts.outputs["train_data"],
        label_column=label_column,
        estimator=estimator,
        hyperparameters=hyperparameters,
        seed=seed,
    )

    scored = evaluate(
        model=fitted.outputs["model"],
        test_data=parts.outputs["test_data"],
        label_column=label_column,
        slice_feature=slice_feature,
        min_accuracy=min_accuracy,
        min_f1=min_f1,
        min_roc_auc=min_roc_auc,
        max_regression=max_regression,
        baseline_card=baseline_card,
    )

    exported = export_onnx(
        model=fitted.outputs["model"], train_data=parts.outputs["train_data"], label_column=label_column
    ).after(scored)

    verified = verify_onnx(
        model=fitted.outputs["model"],
        onnx_model=exported.outputs["onnx_model"],
        test_data=parts.outputs["test_data"],
        label_column=label_column,
        max_abs_prob_diff=max_abs_prob_diff,
        min_label_agreement=min_label_agreement,
    )

    packaged = package_model(
        onnx_model=exported.outputs["onnx_model"],
        model=fitted.outputs["model"],
        dataset=data.outputs["dataset"],
        train_data=parts.outputs["train_data"],
        evaluation=scored.outputs["evaluation"],
        parity_report=verified.outputs["parity_report"],
        label_column=label_column,
        model_name=model_name,
        model_version=model_version,
        pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    )
    # deploy=True: progressive-rollout (the hand-off to the operator) inside one dsl.If; skipped otherwise
    rollout.rollout_steps(
        package=packaged.outputs["package"],
        enabled=deploy,
        namespace=deploy_namespace,
        release_fullname=release_fullname,
        router=rollout_router,
        model_name=model_name,
        steps=rollout_steps,
        interval_s=rollout_interval_s,
        post_promotion_intervals=rollout_watch_intervals,
        prometheus_url=prometheus_url,
        max_drift=max_drift,
        compare_with_stable=compare_with_stable,
        alpha=rollout_alpha,
        max_error_increase=max_error_increase,
        latency_min_effect=latency_min_effect,
        drift_min_effect=drift_min_effect,
        accuracy_min_effect=accuracy_min_effect,
    )
    return packaged.outputs["package"]
