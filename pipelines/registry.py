"""Every pipeline this project compiles: ``pipelines/compiled/<stem>.yaml`` <- pipeline function.

``python -m pipelines compile`` compiles each entry; the staleness and strict-parse tests iterate
over this dict, so a new pipeline needs only a new entry here. The entries are deferred
(``components._env.pipeline``): importing this module builds and stages nothing; compiling does.
"""

from pipelines.batch_pipeline import batch_scoring_pipeline
from pipelines.batch_sharded_pipeline import batch_scoring_sharded_pipeline
from pipelines.training_pipeline import training_pipeline

PIPELINES = {
    "training_pipeline": training_pipeline,
    "batch_scoring_pipeline": batch_scoring_pipeline,
    "batch_scoring_sharded_pipeline": batch_scoring_sharded_pipeline,
}
