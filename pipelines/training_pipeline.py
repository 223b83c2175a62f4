"""The training pipeline: data -> validated -> split -> trained -> evaluated (gated) -> ONNX ->
parity-verified -> packaged model (``<name>/1/model.onnx`` + ``model-card.json``), and with
``deploy=True`` -> canary -> progressive rollout on measured gates (``components/rollout.py``).

Every threshold is a pipeline parameter, so the Kubeflow dashboard shows and overrides them.
"""

from kfp import dsl
from kfp.dsl import Model

from pipelines.components import rollout
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


@dsl.pipeline(
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
    stable_version: str = "",
    rollout_steps: str = "10,25,50,100",
    rollout_interval_s: float = 60.0,
    prometheus_url: str = "http://prometheus.monitoring.svc.cluster.local:9090",
    max_drift: float = 0.15,
) -> Model:
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
    # deploy=True: deploy-canary -> progressive-rollout inside one dsl.If; skipped otherwise
    rollout.rollout_steps(
        packaged.outputs["package"],
        deploy,
        deploy_namespace,
        release_fullname,
        rollout_router,
        model_name,
        stable_version,
        rollout_steps,
        rollout_interval_s,
        prometheus_url,
        max_drift,
    )
    return packaged.outputs["package"]
