"""The sharded batch scoring pipeline: one table split into shards scored side by side, then one commit.

For tables larger than one pod's time budget. Upload
``pipelines/compiled/batch_scoring_sharded_pipeline.yaml`` and give it ``model_uri``, ``dataset_uri``
and ``shards``. ``plan-batch-shards`` cuts the table (Parquet: row ranges on row-group boundaries when
there are enough groups; CSV: byte ranges at line starts), a ``dsl.ParallelFor`` runs one
``score-batch-shard`` step per shard (at most ``PARALLELISM`` at a time), and ``commit-batch-shards``,
which KFP starts only when every shard step succeeded, renames the parts into one output folder with
a manifest. A failed shard fails the run: the commit step never runs and no predictions are committed.

KFP v2 fixes a loop's parallelism when the pipeline is compiled (the IR's ``parallelismLimit`` is a
number, not a parameter), so the run-time knob is ``shards``: how many steps score the table (with
``shards`` at or under ``PARALLELISM`` they all run at once). Compile with another limit through
``sharded_pipeline(parallelism)``.
"""

from kfp import dsl
from kfp.dsl import Dataset

from pipelines.batch_pipeline import import_inputs
from pipelines.components._env import pipeline
from pipelines.components.batch import commit_batch_shards, plan_batch_shards, score_batch_shard

PIPELINE_NAME = "batch-scoring-sharded-pipeline"
PARALLELISM = 8  # shard steps running at once, at most (cluster capacity, not the table, sets it)


def sharded_pipeline(parallelism: int = PARALLELISM):
    """The pipeline with ``parallelism`` shard steps at most at once (0: no limit)."""

    @pipeline(
        name=PIPELINE_NAME,
        description="Score a CSV/Parquet table with a packaged ONNX model in parallel shards "
        "(dsl.ParallelFor), committing one output folder with a manifest only when every shard succeeded.",
    )
    def batch_scoring_sharded_pipeline(
        model_uri: str,
        dataset_uri: str,
        shards: int = 4,
        id_column: str = "",
        chunk_rows: int = 0,
        input_format: str = "auto",
        output_format: str = "parquet",
    ) -> Dataset:
        """Score one table in ``shards`` parallel steps into one committed predictions folder.

        Args:
            model_uri: URI of a model package folder the KFP launcher can read, e.g. the ``package``
                output of a training-pipeline run (``minio://mlpipeline/v2/artifacts/...``).
            dataset_uri: URI of one CSV or Parquet file; re-imported on every run (never cached).
            shards: How many shard steps score the table (fewer when it has fewer rows).
            id_column: Input column copied to the output as the row id; empty = ``id`` if the input
                has one, else row numbers (``row_number`` from 0, counted in the whole table).
            chunk_rows: Rows per chunk; 0 = automatic (about 2 MB of float32 features per chunk).
            input_format: ``auto`` (by extension, else the Parquet magic bytes), ``csv`` or ``parquet``.
            output_format: ``parquet`` or ``csv``.

        Returns:
            A folder of parts (``part-00000.<format>``, ... in row order) and ``_manifest.json``.
        """
        model, data = import_inputs(model_uri, dataset_uri)
        plan = plan_batch_shards(dataset=data.output, shards=shards, input_format=input_format)
        plan.set_display_name("plan shards")
        plan.set_caching_options(False)  # same URI, possibly new content
        with dsl.ParallelFor(plan.output, parallelism=parallelism) as shard:
            scored = score_batch_shard(
                model=model.output,
                dataset=data.output,
                shard=shard,
                id_column=id_column,
                chunk_rows=chunk_rows,
                input_format=input_format,
                output_format=output_format,
            )
            scored.set_display_name("score shard")
            scored.set_caching_options(False)
        commit = commit_batch_shards(parts=dsl.Collected(scored.outputs["part"]))
        commit.set_display_name("commit")
        commit.set_caching_options(False)
        return commit.outputs["predictions"]

    return batch_scoring_sharded_pipeline


batch_scoring_sharded_pipeline = sharded_pipeline()
