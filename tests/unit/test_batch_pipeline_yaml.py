"""The checked-in batch_scoring_pipeline.yaml is what a pod runs: no checkout, only the YAML.

Its step must carry the current scoring code, import nothing it does not install, and install
exactly the versions the tests ran with. (The local runs are in tests/integration.)"""

from __future__ import annotations

import ast
import sys
from importlib import metadata
from pathlib import Path

from pipelines import compile as pcompile
from pipelines.components import _env as runtime

ROOT = Path(__file__).resolve().parents[2]
COMPILED = ROOT / "pipelines" / "compiled" / "batch_scoring_pipeline.yaml"
SHARDED = ROOT / "pipelines" / "compiled" / "batch_scoring_sharded_pipeline.yaml"


def _executor():
    doc = pcompile.load(COMPILED)[0]
    executors = doc["deploymentSpec"]["executors"]
    assert set(executors) == {"exec-batch-score", "exec-importer", "exec-importer-2"}
    imported = {e["importer"]["typeSchema"]["schemaTitle"] for k, e in executors.items() if "importer" in k}
    assert imported == {"system.Model", "system.Dataset"}
    return doc, executors["exec-batch-score"]["container"]


def test_interface_and_outputs():
    doc, _ = _executor()
    params = doc["root"]["inputDefinitions"]["parameters"]
    assert not params["model_uri"].get("isOptional") and not params["dataset_uri"].get("isOptional")
    assert params["output_format"]["defaultValue"] == "parquet" and params["chunk_rows"]["defaultValue"] == 0
    task = doc["root"]["dag"]["tasks"]["batch-score"]
    assert task["cachingOptions"].get("enableCache", False) is False  # same URI, possibly new data
    executors = doc["deploymentSpec"]["executors"]
    reimports = {k: e["importer"].get("reimport", False) for k, e in executors.items() if "importer" in e}
    assert sorted(reimports.values()) == [False, True]  # the table is re-imported, the model is not
    outputs = doc["components"]["comp-batch-score"]["outputDefinitions"]["artifacts"]
    kinds = {k: v["artifactType"]["schemaTitle"] for k, v in outputs.items()}
    assert kinds == {
        "predictions": "system.Dataset",
        "summary": "system.Metrics",
        "report": "system.Markdown",
        "score_plot": "system.HTML",
    }


def test_step_embeds_the_current_batch_engine():
    _, container = _executor()
    (b64,) = pcompile._ARCHIVE_RE.findall(container["command"][-1])
    members = pcompile.archive_members(b64)
    assert "./serving/batch/engine.py" in members and "./serving/batch/cli.py" not in members
    assert not any("bench" in name for name in members)
    for name, embedded in members.items():
        assert embedded == (ROOT / name).read_bytes(), (
            f"{name} in the YAML is stale: run `python -m pipelines compile`"
        )


def test_step_imports_only_what_it_installs_at_the_locked_versions():
    _, container = _executor()
    _check_installs(container)
    assert {"polars"} <= {runtime._norm(t.strip("'").split("==")[0]) for t in container["command"][2].split()}


def test_sharded_steps_import_only_what_they_install():
    executors = pcompile.load(SHARDED)[0]["deploymentSpec"]["executors"]
    steps = {k: e["container"] for k, e in executors.items() if "container" in e}
    assert set(steps) == {"exec-plan-batch-shards", "exec-score-batch-shard", "exec-commit-batch-shards"}
    for container in steps.values():
        _check_installs(container)


def _check_installs(container):
    assert container["image"] == runtime.BASE_IMAGE
    pins = [t.strip("'") for t in container["command"][2].split() if "==" in t]
    locked = runtime.pins()
    installed = set()
    for pin in pins:
        dist, version = pin.split("==")
        if dist != "kfp":
            assert locked[runtime._norm(dist)] == version == metadata.version(dist), pin
        installed.add(runtime._norm(dist))
    assert {"onnxruntime", "pyarrow", "numpy"} <= installed
    dist_of = metadata.packages_distributions()
    source = container["command"][-1]
    (b64,) = pcompile._ARCHIVE_RE.findall(source)
    texts = [("step", source)] + [(k, v.decode()) for k, v in pcompile.archive_members(b64).items()]
    for origin, text in texts:
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                tops = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops = {node.module.split(".")[0]}
            else:
                continue
            for top in tops - set(sys.stdlib_module_names) - {"kfp", *runtime.PROJECT_PACKAGES}:
                dists = {runtime._norm(d) for d in dist_of.get(top, [])}
                assert dists & installed, f"{origin} imports {top!r}, which the step does not install"


def test_sharded_dag_fans_out_with_parallel_for_and_commits_after_the_loop():
    from pipelines.batch_sharded_pipeline import PARALLELISM

    doc = pcompile.load(SHARDED)[0]
    tasks = doc["root"]["dag"]["tasks"]
    assert set(tasks) == {"importer", "importer-2", "plan-batch-shards", "for-loop-1", "commit-batch-shards"}
    params = doc["root"]["inputDefinitions"]["parameters"]
    assert params["shards"]["parameterType"] == "NUMBER_INTEGER" and params["shards"]["defaultValue"] == 4
    loop = tasks["for-loop-1"]
    # one iteration per planned shard, at most PARALLELISM at once
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--plan-batch-shards-Output"
    assert loop["iteratorPolicy"]["parallelismLimit"] == PARALLELISM > 1
    assert "plan-batch-shards" in loop["dependentTasks"]
    body = doc["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert list(body) == ["score-batch-shard"]
    # the commit runs after the whole loop and takes every shard's part (a collected artifact list)
    commit = tasks["commit-batch-shards"]
    assert commit["dependentTasks"] == ["for-loop-1"]
    parts = commit["inputs"]["artifacts"]["parts"]["taskOutputArtifact"]
    assert parts["producerTask"] == "for-loop-1"
    assert doc["components"]["comp-commit-batch-shards"]["inputDefinitions"]["artifacts"]["parts"][
        "isArtifactList"
    ]
    assert (
        doc["root"]["outputDefinitions"]["artifacts"]["Output"]["artifactType"]["schemaTitle"]
        == "system.Dataset"
    )
    for name in ("plan-batch-shards", "commit-batch-shards"):
        assert tasks[name]["cachingOptions"].get("enableCache", False) is False
    assert body["score-batch-shard"]["cachingOptions"].get("enableCache", False) is False
