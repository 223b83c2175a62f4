"""KFP v2 component for offline (batch) scoring: a thin, hermetic wrapper over ``serving.batch``.

The same engine as ``python -m serving.batch`` reaches the cluster embedded in the compiled YAML
(``_env.component``: ``serving.batch.engine`` and what it imports); the step installs the pinned
onnxruntime/pyarrow/numpy it imports at start-up. The ``core`` parameter is that embedded tree:
kfp injects it at run time and it is not part of the component's interface.
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from pipelines.components._env import component


@component("onnxruntime", "pyarrow", "numpy")
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

    Args:
        model: A model package folder (``<name>/1/model.onnx`` + ``<name>/model-card.json``), e.g.
            the training pipeline's ``package`` output.
        dataset: One CSV or Parquet file (or a folder artifact holding exactly one).
        id_column: Input column copied to the output as the row id; "" = ``id`` if the input has
            one, else row numbers (``row_number`` from 0).
        chunk_rows: Rows per chunk; 0 = automatic (about 2 MB of float32 features per chunk).
        input_format: ``auto`` (by extension, else the Parquet magic bytes), ``csv`` or ``parquet``.
        output_format: ``parquet`` or ``csv``; "" = ``parquet``.
        predictions: The id column, ``prediction`` and one ``prob_<class>`` column per class.
        summary: Rows, seconds, rows per second and the count of each predicted class.
        report: A Markdown summary for the run page (volume, speed, class shares, score bins).
        score_plot: The score distribution as an HTML page (inline SVG).
    """
    import os

    from serving.batch import engine
    from serving.batch import report as batch_report
    from serving.batch.errors import BatchScoringError

    src = dataset.path
    if os.path.isdir(src):  # a folder artifact holding exactly one table
        files = sorted(f for f in os.listdir(src) if not f.startswith("."))
        if len(files) != 1:
            raise BatchScoringError(
                f"dataset folder {src!r} holds {len(files)} files; point dataset_uri at one CSV/Parquet file"
            )
        src = os.path.join(src, files[0])
    fmt = output_format or "parquet"
    result = engine.score_file(
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
        f.write(batch_report.summary_markdown(result))
    with open(score_plot.path, "w") as f:
        f.write(batch_report.summary_html(result))
    print(result.line())
