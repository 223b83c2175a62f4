"""KFP v2 components for offline (batch) scoring: thin, hermetic wrappers over ``serving.batch``.

``batch_score`` scores a whole table in one step; ``plan_batch_shards``, ``score_batch_shard`` and
``commit_batch_shards`` are the steps of the sharded pipeline (``pipelines/batch_sharded_pipeline.py``).

The same engine as ``python -m serving.batch`` reaches the cluster embedded in the compiled YAML
(``_env.component``: ``serving.batch.engine`` and what it imports); each step installs the pinned
onnxruntime/pyarrow/numpy/polars the engine imports. The ``core`` parameter is that embedded tree:
kfp injects it at run time and it is not part of the component's interface.
"""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output

from pipelines.components._env import component


@component("onnxruntime", "pyarrow", "numpy", "polars")
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
    from serving.batch import engine
    from serving.batch import report as batch_report
    from serving.batch.sharded import table_path

    src = table_path(dataset.path)  # the file, or the one file of a folder artifact
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
    for name, value in batch_report.run_metrics(result).items():
        summary.log_metric(name, value)
    batch_report.write_pages(result, report.path, score_plot.path)
    print(result.line())


@component("onnxruntime", "pyarrow", "numpy", "polars")
def plan_batch_shards(
    dataset: Input[Dataset],
    shards: int,
    input_format: str,
    core: dsl.EmbeddedInput[dsl.Dataset],
) -> list:
    """Split the table into at most ``shards`` slices that separate steps can score.

    Args:
        dataset: One CSV or Parquet file (or a folder artifact holding exactly one).
        shards: How many slices (Parquet: row ranges, on row-group boundaries when there are enough
            groups; CSV: byte ranges cut at line starts); fewer when the table has fewer rows.
        input_format: ``auto`` (by extension, else the Parquet magic bytes), ``csv`` or ``parquet``.

    Returns:
        One JSON object per shard (``serving.batch.shard.Shard``), in row order.
    """
    from serving.batch.shard import plan_shards
    from serving.batch.sharded import table_path

    plan = plan_shards(table_path(dataset.path), shards, input_format or "auto")
    for s in plan:
        print(f"shard {s.index}: {s.format} [{s.start}, {s.stop}), {s.rows} rows from row {s.first_row}")
    return [s.to_dict() for s in plan]


@component("onnxruntime", "pyarrow", "numpy", "polars")
def score_batch_shard(
    model: Input[Model],
    dataset: Input[Dataset],
    shard: dict,
    id_column: str,
    chunk_rows: int,
    input_format: str,
    output_format: str,
    part: Output[Dataset],
    core: dsl.EmbeddedInput[dsl.Dataset],
):
    """Score one shard of the table into ``part`` (a folder: ``part.<format>`` and ``shard.json``).

    Args:
        model: A model package folder, e.g. the training pipeline's ``package`` output.
        dataset: The table the shard was planned on.
        shard: One of ``plan-batch-shards``' shards.
        id_column: Input column copied to the output as the row id; "" = ``id`` if the input has
            one, else row numbers (``row_number``, counted in the whole table).
        chunk_rows: Rows per chunk; 0 = automatic (about 2 MB of float32 features per chunk).
        input_format: ``auto``, ``csv`` or ``parquet``.
        output_format: ``parquet`` or ``csv``; "" = ``parquet``.
        part: The shard's predictions and its summary, committed by ``commit-batch-shards``.
    """
    from serving.batch.shard import Shard
    from serving.batch.sharded import score_shard, table_path

    s = Shard.from_dict(shard)
    result = score_shard(
        model.path,
        table_path(dataset.path),
        s,
        part.path,
        output_fmt=output_format or "parquet",
        chunk_rows=chunk_rows or None,
        id_column=id_column or None,
        input_fmt=input_format or "auto",
    )
    part.metadata.update({"shard": s.index, "rows": result.rows})
    print(f"shard {s.index}/{s.count}: {result.line()}")


@component("onnxruntime", "pyarrow", "numpy", "polars")
def commit_batch_shards(
    parts: Input[list[Dataset]],
    predictions: Output[Dataset],
    summary: Output[Metrics],
    report: Output[Markdown],
    score_plot: Output[HTML],
    core: dsl.EmbeddedInput[dsl.Dataset],
):
    """Commit every shard's part as one output folder with a manifest, in one rename.

    Runs only after every shard step succeeded (it consumes all their parts); it refuses a set that
    is not exactly shards 0..n-1 of one plan.

    Args:
        parts: The ``part`` output of every ``score-batch-shard`` step (``dsl.Collected``).
        predictions: A folder: ``part-00000.<format>`` ... in row order and ``_manifest.json``.
        summary: Rows, seconds (the slowest shard), rows per second and the count of each predicted class.
        report: A Markdown summary for the run page (volume, speed, class shares, score bins).
        score_plot: The score distribution as an HTML page (inline SVG).
    """
    from serving.batch import report as batch_report
    from serving.batch.sharded import commit_parts

    manifest, result = commit_parts([p.path for p in parts], predictions.path)
    predictions.metadata.update(
        {
            "rows": result.rows,
            "format": manifest["format"],
            "model": result.model,
            "id_column": result.id_column,
            "shards": manifest["shards"],
        }
    )
    for name, value in {"shards": manifest["shards"], **batch_report.run_metrics(result)}.items():
        summary.log_metric(name, value)
    batch_report.write_pages(result, report.path, score_plot.path)
    print(f"committed {manifest['shards']} shards: {result.line()}")
