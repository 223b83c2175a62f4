"""The batch scoring pipeline: a packaged model + a table -> predictions (offline inference).

Upload ``pipelines/compiled/batch_scoring_pipeline.yaml`` in the Kubeflow dashboard and give it
two URIs the KFP launcher can read: ``model_uri``, a model package folder (for example the
``package`` output of a training-pipeline run, ``minio://mlpipeline/v2/artifacts/...``), and
``dataset_uri``, one CSV or Parquet file. The step writes the predictions (id, ``prediction``,
``prob_<class>``) as a Dataset artifact, plus Metrics and a Markdown report for the run page.
"""

from kfp import dsl
from kfp.dsl import Dataset, Model

from pipelines.components._env import pipeline
from pipelines.components.batch import batch_score

PIPELINE_NAME = "batch-scoring-pipeline"


def import_inputs(model_uri: str, dataset_uri: str):
    """The two importer tasks every batch pipeline starts with: the model package and the input table."""
    model = dsl.importer(artifact_uri=model_uri, artifact_class=Model, reimport=False)
    model.set_display_name("model package")
    # a table path is often rewritten in place (e.g. a daily export): re-import it and never serve
    # cached predictions for a URI whose content may have changed
    data = dsl.importer(artifact_uri=dataset_uri, artifact_class=Dataset, reimport=True)
    data.set_display_name("input table")
    return model, data


@pipeline(
    name=PIPELINE_NAME,
    description="Score a CSV/Parquet table with a packaged ONNX model (sha256-checked, schema-checked, "
    "streamed through onnxruntime) and store the predictions as a Dataset artifact.",
)
def batch_scoring_pipeline(
    model_uri: str,
    dataset_uri: str,
    id_column: str = "",
    chunk_rows: int = 0,
    input_format: str = "auto",
    output_format: str = "parquet",
) -> Dataset:
    """Score one table with one model package into a predictions Dataset.

    Args:
        model_uri: URI of a model package folder the KFP launcher can read, e.g. the ``package``
            output of a training-pipeline run (``minio://mlpipeline/v2/artifacts/...``).
        dataset_uri: URI of one CSV or Parquet file; re-imported on every run (never cached).
        id_column: Input column copied to the output as the row id; empty = ``id`` if the input has
            one, else row numbers (``row_number`` from 0).
        chunk_rows: Rows per chunk; 0 = automatic (about 2 MB of float32 features per chunk).
        input_format: ``auto`` (by extension, else the Parquet magic bytes), ``csv`` or ``parquet``.
        output_format: ``parquet`` or ``csv``.

    Returns:
        The predictions: the id column, ``prediction`` and one ``prob_<class>`` column per class.
    """
    model, data = import_inputs(model_uri, dataset_uri)
    scored = batch_score(
        model=model.output,
        dataset=data.output,
        id_column=id_column,
        chunk_rows=chunk_rows,
        input_format=input_format,
        output_format=output_format,
    )
    scored.set_display_name("batch score")
    scored.set_caching_options(False)
    return scored.outputs["predictions"]
