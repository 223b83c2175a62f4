"""The training pipeline run for real with kfp.local: the CLI end to end, the compiled YAML round trip,
each bad-data case failing with its own message, and the embedded code running without the repo."""

from __future__ import annotations

import glob
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import joblib
import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import yaml

from pipelines import compile as pcompile
from pipelines.cli import main
from pipelines.core import data, train
from pipelines.local import PipelineRunError, run_local
from serving.contract import modelcard

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
COMPILED = REPO / "pipelines" / "compiled" / "training_pipeline.yaml"


def _run_dir(root: Path) -> Path:
    (run,) = glob.glob(str(root / "training-pipeline-*"))
    return Path(run)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One real `python -m pipelines run --output DIR` (a subprocess), shared by the tests below.

    It runs the checked-in compiled YAML (``--compiled``): the round trip of the very file users
    upload. ``test_pipeline_compiled`` proves that file is what the pipeline function compiles to,
    and the bad-input tests below run the pipeline function itself."""
    tmp = tmp_path_factory.mktemp("cli-run")
    baseline = tmp / "serving" / "model-card.json"  # the model now serving: the challenger must not be worse
    baseline.parent.mkdir()
    baseline.write_text(
        json.dumps(
            {
                "name": "breast-cancer",
                "version": "0.9.0",
                "sha256": "x",
                "inputs": [],
                "outputs": [],
                "metrics": {"accuracy": 0.95, "f1": 0.95, "roc_auc": 0.99},
            }
        )
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines",
            "run",
            "--output",
            str(tmp / "models"),
            "--pipeline-root",
            str(tmp / "root"),
            "--model-name",
            "bc-test",
            "--compiled",
            str(COMPILED),
            "--version",
            "1.2.3",
            "--baseline-card",
            str(baseline),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {
        "stdout": proc.stdout,
        "stderr": proc.stderr,
        "model_dir": tmp / "models" / "bc-test",
        "run_dir": _run_dir(tmp / "root"),
    }


def test_cli_shows_each_step_and_the_card(cli_run):
    out = cli_run["stdout"]
    for step in (
        "load-data",
        "validate-data",
        "split",
        "train",
        "evaluate",
        "export-onnx",
        "verify-onnx",
        "package-model",
    ):
        assert f"  ok   {step}" in out, out
    assert f"model package: {cli_run['model_dir']}" in out
    assert "model      bc-test 1.2.3 (logistic_regression, binary_classification)" in out
    assert "KFP Executor" not in out  # kfp.local's noise went to the log file, not the terminal


def test_packaged_model_matches_its_card(cli_run):
    model_dir = cli_run["model_dir"]
    card = modelcard.verify_package(model_dir)  # raises on a sha256 mismatch
    assert card["sha256"] == modelcard.sha256_file(model_dir / "1" / "model.onnx")
    assert (card["name"], card["version"]) == ("bc-test", "1.2.3")
    assert card["training_data"]["fingerprint"] == data.fingerprint(data.load_dataset())
    assert card["training_data"]["rows"] == 569 and card["training_data"]["train_rows"] == 426
    assert card["pipeline_run_id"] not in ("", "local")
    assert card["inputs"][0]["features"] == list(data.load_dataset().columns[:-1])
    assert card["metrics"]["accuracy"] > 0.9 and set(card["metrics"]) >= {"precision", "recall", "log_loss"}
    assert card["estimator"] == "logistic_regression" and card["hyperparameters"]["max_iter"] == 5000
    gate = card["gate"]
    assert gate["passed"] and gate["baseline"] == "breast-cancer@0.9.0"
    assert [c["check"] for c in gate["checks"]][3:] == [
        "accuracy >= baseline breast-cancer@0.9.0 0.9500 - 0.01",
        "f1 >= baseline breast-cancer@0.9.0 0.9500 - 0.01",
        "roc_auc >= baseline breast-cancer@0.9.0 0.9900 - 0.01",
    ]


def test_package_files_are_readable_by_other_uids(cli_run):
    """0644, not mkstemp's 0600: the runtime image (UID 10001) reads a bind-mounted package."""
    model_dir = cli_run["model_dir"]
    for path in (model_dir / "1" / "model.onnx", model_dir / "model-card.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_onnx_outputs_are_plain_tensors(cli_run):
    path = cli_run["model_dir"] / "1" / "model.onnx"
    graph = onnx.load(path).graph
    assert "ZipMap" not in {n.op_type for n in graph.node}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, i.shape[1]) for i in sess.get_inputs()] == [("input", "tensor(float)", 30)]
    label, proba = sess.run(None, {"input": np.zeros((3, 30), np.float32)})
    assert label.dtype == np.int64 and label.shape == (3,)
    assert proba.dtype == np.float32 and proba.shape == (3, 2)


def test_held_out_parity_recomputed_independently(cli_run):
    """sklearn model and test split from the run's own artifacts vs the packaged ONNX."""
    run_dir = cli_run["run_dir"]
    pipe = joblib.load(run_dir / "train" / "model")
    test = pd.read_parquet(run_dir / "split" / "test_data")
    X = test.drop(columns=["target"]).to_numpy(np.float64)
    sess = ort.InferenceSession(
        str(cli_run["model_dir"] / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    label, proba = sess.run(["label", "probabilities"], {"input": X.astype(np.float32)})
    assert len(X) == 143
    assert np.abs(proba - pipe.predict_proba(X)).max() < 1e-4
    assert (label == pipe.predict(X)).all()
    card = modelcard.load_card(cli_run["model_dir"])
    assert card["parity"]["label_agreement"] == 1.0 and card["parity"]["max_abs_prob_diff"] < 1e-4


def test_ui_artifacts(cli_run):
    run_dir = cli_run["run_dir"]
    ev = json.loads((run_dir / "evaluate" / "executor_output.json").read_text())
    cm = ev["artifacts"]["classification_metrics"]["artifacts"][0]["metadata"]
    assert [a["displayName"] for a in cm["confusionMatrix"]["annotationSpecs"]] == ["malignant", "benign"]
    assert sum(sum(r["row"]) for r in cm["confusionMatrix"]["rows"]) == 143
    assert len(cm["confidenceMetrics"]) > 2
    html = (run_dir / "evaluate" / "report").read_text()
    assert html.count("data:image/png;base64,") == 2 and "gate PASSED" in html
    report = json.loads((run_dir / "validate-data" / "report").read_text())
    assert report["passed"] and {r["rule"] for r in report["rules"]} >= {
        "min_rows",
        "duplicate_rows",
        "outliers",
    }
    assert (run_dir / "validate-data" / "report_md").read_text().startswith("# Data validation: PASSED")


TRAINING_STEPS = {
    "load-data",
    "validate-data",
    "split",
    "train",
    "evaluate",
    "export-onnx",
    "verify-onnx",
    "package-model",
}


def test_default_run_skips_the_deploy_branch(cli_run):
    """deploy defaults to false: the run (of the YAML that contains the rollout branch) ran exactly the
    training steps; progressive-rollout neither ran nor left outputs."""
    assert "rollout-enabled" in COMPILED.read_text()  # the branch is in the file that was run
    shown = {line.split()[1] for line in cli_run["stdout"].splitlines() if line.startswith("  ok   ")}
    assert shown == TRAINING_STEPS, cli_run["stdout"]
    assert {p.name for p in cli_run["run_dir"].iterdir()} == TRAINING_STEPS
    log = Path(cli_run["stdout"].split("(log: ", 1)[1].split(")", 1)[0]).read_text()
    step = "progressive-rollout"
    assert step not in cli_run["stdout"] and f"'{step}'" not in log, step
    assert "finished with status" in log and "FAILURE" not in log


def test_deploy_parameter_decides_the_branch_for_kfp_local():
    """The compiled condition, evaluated by kfp.local's own evaluator: true takes the branch, the
    default (false) skips it. With the test above this shows the skip comes from `deploy`."""
    from kfp.local import io as kfp_io
    from kfp.local.orchestrator.enhanced_dag_orchestrator import ConditionEvaluator

    doc = yaml.safe_load(COMPILED.read_text())
    params = doc["root"]["inputDefinitions"]["parameters"]
    condition = doc["root"]["dag"]["tasks"]["condition-1"]["triggerPolicy"]["condition"]
    taken = {}
    for deploy in (params["deploy"]["defaultValue"], True):
        store = kfp_io.IOStore()
        store.put_parent_input("deploy", deploy)
        taken[deploy] = ConditionEvaluator.evaluate_condition(condition, store)
    assert taken == {False: False, True: True}


# ---------------------------------------------------------------- each bad case fails with its own message


def _bad(tmp_path: Path, kind: str) -> tuple[list[str], str]:
    df = data.load_dataset()
    args: list[str] = []
    if kind == "missing_column":
        args = ["-p", "expected_columns=mean radius,mean texture"]
        df = df.drop(columns=["mean texture"])
        match = "required_columns: missing column(s): mean texture"
    elif kind == "nans":
        df.loc[df.index[:100], "mean area"] = np.nan
        match = "missing_values: missing values over 0.050 in 1 column(s): mean area=0.176"
    elif kind == "single_class":
        df = df[df["target"] == 1]
        match = "class_count: a single class (1) in label column 'target'"
    elif kind == "too_few_rows":
        df = df.head(60)
        match = "min_rows: 60 rows, fewer than the minimum 100"
    elif kind == "duplicates":
        df = pd.concat([df, df.head(120)], ignore_index=True)
        match = "duplicate_rows: 120 duplicate rows (0.174 of 689), over 0.050"
    elif kind == "infinite":  # one +inf cell: sklearn would fail at train, a rule names it first
        df.loc[df.index[7], "mean smoothness"] = np.inf
        match = "finite_values: 1 infinite value(s) (+inf/-inf) in 1 feature column(s): mean smoothness=1"
    elif kind == "duplicate_columns":  # 30 columns all named x: pandas alone reads x, x.1, ..., x.29
        path = tmp_path / f"{kind}.csv"
        df.iloc[:, :30].assign(target=df["target"]).to_csv(path, index=False, header=["x"] * 30 + ["target"])
        return ["--data", str(path)], "DataError: data file "
    path = tmp_path / f"{kind}.csv"
    df.to_csv(path, index=False)
    return ["--data", str(path), *args], match


@pytest.mark.parametrize(
    "kind",
    ["missing_column", "nans", "single_class", "too_few_rows", "duplicates", "infinite", "duplicate_columns"],
)
def test_bad_input_fails_the_run_with_its_own_message(tmp_path, capsys, kind):
    args, match = _bad(tmp_path, kind)
    rc = main(["run", "--output", str(tmp_path / "models"), "--pipeline-root", str(tmp_path / "root"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: step ") and match in err, err
    step = "load-data" if kind == "duplicate_columns" else "validate-data"
    assert f"step {step} failed" in err
    if kind == "duplicate_columns":
        assert "has duplicate column names: 'x' (30 times); give every column a unique name" in err
    assert not (tmp_path / "models").exists()  # nothing packaged


def test_estimator_outside_the_registry_is_refused_before_the_run(tmp_path, capsys):
    """A class path, even of a real sklearn classifier, is not a registered name: one line, exit 2,
    before kfp.local starts (the unconvertible-estimator path is tested on export itself)."""
    path = tmp_path / "d.csv"
    data.load_dataset().to_csv(path, index=False)
    argv = ["--data", str(path), "--estimator", "sklearn.semi_supervised.LabelSpreading"]
    rc = main(["run", "--output", str(tmp_path / "models"), "--pipeline-root", str(tmp_path / "root"), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err == (
        "error: unknown estimator 'sklearn.semi_supervised.LabelSpreading': "
        f"use one of {', '.join(train.ESTIMATORS)}\n"
    )
    assert not (tmp_path / "root").exists() and not (tmp_path / "models").exists()


def test_estimator_parameter_is_refused_by_the_train_step(tmp_path, monkeypatch):
    """The KFP `estimator` parameter, bypassing the CLI's precheck (as a dashboard run does): the
    train step refuses the name; `sklearn.datasets.clear_data_home` is not called (its folder stays)."""
    from pipelines.training_pipeline import training_pipeline

    home = tmp_path / "scikit_learn_data"
    (home / "keep").mkdir(parents=True)
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(home))  # inherited by kfp.local's step subprocesses
    with pytest.raises(PipelineRunError) as e:
        run_local(
            training_pipeline,
            {"estimator": "sklearn.datasets.clear_data_home"},
            tmp_path / "root",
            emit=lambda line: None,
        )
    assert e.value.step == "train"
    assert (
        "TrainError: unknown estimator 'sklearn.datasets.clear_data_home': "
        f"use one of {', '.join(train.ESTIMATORS)}"
    ) in str(e.value)
    assert (home / "keep").is_dir()
    assert not list((tmp_path / "root").rglob("model.onnx"))  # stopped at train


# ---------------------------------------------------------------- hermetic: embedded code without the repo

_GUARD = r"""
import runpy, sys
repo = sys.argv.pop(1)
# forget the repo checkout and its editable install: only the embedded archive can provide `pipelines`
sys.path[:] = [p for p in sys.path if p not in ("", ".", repo) and "__editable__" not in p]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path_importer_cache.clear()
sys.argv[0] = "executor_main"
runpy.run_module("kfp.dsl.executor_main", run_name="__main__")
import pipelines.core.data as d
print("EMBEDDED_FROM", d.__file__)
"""


def test_compiled_step_runs_from_its_embedded_code_alone(tmp_path):
    doc = yaml.safe_load(COMPILED.read_text())
    container = doc["deploymentSpec"]["executors"]["exec-load-data"]["container"]
    (tmp_path / "ephemeral_component.py").write_text(container["command"][-1])
    out = tmp_path / "dataset"
    executor_input = {
        "inputs": {
            "parameterValues": {
                "source": "",
                "label_column": "target",
                "model_name": "m",
                "model_version": "1.0.0",
            }
        },
        "outputs": {
            "artifacts": {
                "dataset": {
                    "artifacts": [
                        {
                            "name": "dataset",
                            "type": {"schemaTitle": "system.Dataset"},
                            "uri": str(out),
                            "metadata": {},
                        }
                    ]
                }
            },
            "outputFile": str(tmp_path / "executor_output.json"),
        },
    }
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"_KFP_RUNTIME": "true"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _GUARD,
            str(REPO),
            "--component_module_path",
            str(tmp_path / "ephemeral_component.py"),
            "--executor_input",
            json.dumps(executor_input),
            "--function_to_execute",
            "load_data",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin = proc.stdout.split("EMBEDDED_FROM", 1)[1].strip()
    assert not origin.startswith(str(REPO)) and origin.endswith("pipelines/core/data.py")
    assert len(pd.read_parquet(out)) == 569
    meta = json.loads((tmp_path / "executor_output.json").read_text())
    assert meta["artifacts"]["dataset"]["artifacts"][0]["metadata"]["fingerprint"].startswith("sha256:")


def test_archive_in_yaml_matches_the_core_sources():
    doc = yaml.safe_load(COMPILED.read_text())
    source = doc["deploymentSpec"]["executors"]["exec-package-model"]["container"]["command"][-1]
    (b64,) = pcompile._ARCHIVE_RE.findall(source)
    for name, content in pcompile.archive_members(b64).items():
        if name.startswith("./pipelines/core/"):
            assert content == (REPO / name[2:]).read_bytes(), f"{name} differs from the repo: recompile"
