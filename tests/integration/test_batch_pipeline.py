"""The batch scoring pipeline under ``kfp.local`` (real executor, real artifacts), from Python and
from the compiled YAML that users upload (its static checks: tests/unit/test_batch_pipeline_yaml.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serving.contract import modelcard
from tests.modelfactory import breast_cancer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Task 'batch-score'.*no effect in the current local runner"),
]
ROOT = Path(__file__).resolve().parents[2]
COMPILED = ROOT / "pipelines" / "compiled" / "batch_scoring_pipeline.yaml"


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    X, _, features, _ = breast_cancer()
    path = tmp_path_factory.mktemp("batch-pipe") / "customers.parquet"
    cols = {"customer": [f"c{i}" for i in range(len(X))]} | {str(f): X[:, j] for j, f in enumerate(features)}
    pq.write_table(pa.table(cols), path)
    return path, X


def _expected(model_package, X):
    sess = ort.InferenceSession(str(modelcard.onnx_path(model_package)), providers=["CPUExecutionProvider"])
    return sess.run(["label", "probabilities"], {"input": np.ascontiguousarray(X, np.float32)})


def _run(pipeline, tmp_path, **args):
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    return pipeline(**args)


def _check_outputs(run_dir: Path, predictions_path: str, model_package, X):
    got = pq.read_table(predictions_path)  # written as Parquet although the artifact path has no suffix
    label, proba = _expected(model_package, X)
    assert got.column_names == ["customer", "prediction", "prob_malignant", "prob_benign"]
    assert got.column("customer").to_pylist() == [f"c{i}" for i in range(len(X))]
    np.testing.assert_array_equal(got.column("prediction").to_numpy(), label)
    np.testing.assert_array_equal(got.column("prob_malignant").to_numpy(), proba[:, 0])
    task_dir = next(p for p in run_dir.rglob("executor_output.json") if "batch-score" in str(p)).parent
    report = (task_dir / "report").read_text()
    assert f"rows scored: **{len(X):,}**" in report
    assert (task_dir / "score_plot").read_text().count("<rect ") == 20
    out = json.loads((task_dir / "executor_output.json").read_text())
    metrics = out["artifacts"]["summary"]["artifacts"][0]["metadata"]
    assert metrics["rows"] == len(X)
    assert metrics["predicted_benign"] == int((label == 1).sum())


def test_pipeline_scores_a_table_locally(tmp_path, model_package, table_file):
    from pipelines.batch_pipeline import batch_scoring_pipeline

    path, X = table_file
    run = _run(
        batch_scoring_pipeline, tmp_path,
        model_uri=str(model_package), dataset_uri=str(path), id_column="customer", chunk_rows=100,
    )  # fmt: skip
    _check_outputs(tmp_path / "root", run.output.path, model_package, X)
    assert run.output.metadata["rows"] == len(X)


def test_compiled_yaml_runs_and_fails_cleanly_on_a_bad_table(tmp_path, model_package, table_file, capfd):
    """The checked-in YAML is what users upload: run it, then give it a table missing a column."""
    from kfp import components

    pipeline = components.load_component_from_file(str(COMPILED))
    path, X = table_file
    run = _run(pipeline, tmp_path, model_uri=str(model_package), dataset_uri=str(path), id_column="customer")
    _check_outputs(tmp_path / "root", run.output.path, model_package, X)

    bad = tmp_path / "bad.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["mean radius"]), bad)
    with pytest.raises(RuntimeError):
        _run(pipeline, tmp_path / "bad", model_uri=str(model_package), dataset_uri=str(bad))
    log = capfd.readouterr()
    assert "lacks 1 column(s) the model needs: 'mean radius'" in log.out + log.err  # the step's log says why
    assert not [p for p in (tmp_path / "bad").rglob("predictions") if p.is_file()]


def test_sharded_yaml_scores_in_two_shards_like_one_step(tmp_path, model_package, table_file):
    """The compiled sharded pipeline under kfp.local: plan, a ParallelFor of 2 shard steps, the commit
    (2, not more: each step is a new process; 7.6-10.7 s at load average 5, 55 s at 9-15)."""
    from kfp import components

    from serving.batch import sharded

    pipeline = components.load_component_from_file(
        str(COMPILED.with_name("batch_scoring_sharded_pipeline.yaml"))
    )
    path, X = table_file
    args = {"model_uri": str(model_package), "dataset_uri": str(path), "id_column": "customer"}
    run = _run(pipeline, tmp_path, **args, shards=2, chunk_rows=100)
    parts = sharded.read_output(run.output.path)
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet"]
    got = pa.concat_tables([pq.read_table(p) for p in parts])
    label, proba = _expected(model_package, X)
    assert got.column("customer").to_pylist() == [f"c{i}" for i in range(len(X))]
    np.testing.assert_array_equal(got.column("prediction").to_numpy(), label)
    np.testing.assert_array_equal(got.column("prob_malignant").to_numpy(), proba[:, 0])
    manifest = json.loads((Path(run.output.path) / "_manifest.json").read_text())
    assert manifest["rows"] == len(X) and manifest["shards"] == 2
