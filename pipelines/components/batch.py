"""KFP v2 component for offline (batch) scoring: a thin, hermetic wrapper over ``pipelines.core.scoring``.

The same scoring code as ``python -m serving.batch`` reaches the cluster embedded in the compiled
YAML (``embedded_artifact_path``, only ``scoring`` and the ``modelcard`` it imports); the step
installs the pinned onnxruntime/pyarrow/numpy it imports at start-up. The ``core`` parameter is
that embedded tree: kfp injects it at run time and it is not part of the component's interface.
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from pipelines.components.runtime import BASE_IMAGE, requirements, stage_core

_staged = stage_core("scoring")


@dsl.component(
    base_image=BASE_IMAGE,
    packages_to_install=requirements("onnxruntime", "pyarrow", "numpy"),
    embedded_artifact_path=_staged.name,
)
def batch_score(
    model: Input[Model],
    dataset: Input[Dataset],
    id_column: str,
    chunk_rows: int,
    input_format: str,
    output_format: str,
    predictions: Output[Dataset],
    summary: Output[Metrics],
    report: Output[Markdown],
    score_plot: Output[HTML],
    core: dsl.EmbeddedInput[dsl.Dataset],
):
    """Score a CSV/Parquet table with a packaged ONNX model (sha256-checked) into ``predictions``.

    ``model``: a package folder (``<name>/1/model.onnx`` + ``<name>/model-card.json``, e.g. the
    training pipeline's ``package`` output). ``id_column``: "" = ``id`` if present, else row numbers.
    ``chunk_rows``: 0 = automatic (about 2 MB of features per chunk).
    """
    import os

    from pipelines.core import scoring

    src = dataset.path
    if os.path.isdir(src):  # a folder artifact holding exactly one table
        files = sorted(f for f in os.listdir(src) if not f.startswith("."))
        if len(files) != 1:
            raise scoring.BatchScoringError(
                f"dataset folder {src!r} holds {len(files)} files; point dataset_uri at one CSV/Parquet file"
            )
        src = os.path.join(src, files[0])
    fmt = output_format or "parquet"
    result = scoring.score_file(
        model.path,
        src,
        predictions.path,
        chunk_rows=chunk_rows or None,
        id_column=id_column or None,
        input_fmt=input_format or "auto",
        output_fmt=fmt,
    )
    predictions.metadata.update(
        {
            "rows": result.rows,
            "format": fmt,
            "model": result.model,
            "id_column": result.id_column,
        }
    )
    summary.log_metric("rows", result.rows)
    summary.log_metric("seconds", round(result.seconds, 3))
    summary.log_metric("rows_per_second", round(result.rows_per_s, 1))
    for name, n in result.class_counts.items():
        summary.log_metric(f"predicted_{name}", n)
    with open(report.path, "w") as f:
        f.write(scoring.summary_markdown(result))
    with open(score_plot.path, "w") as f:
        f.write(scoring.summary_html(result))
    print(result.line())


_staged.cleanup()  # kfp archived the tree when the decorator ran
