"""`python -m pipelines run` refuses bad input in one line before any pipeline work starts."""

from __future__ import annotations

import json

import pytest

from pipelines.cli import main, pipeline_arguments
from pipelines.registry import PIPELINES

VALID_ESTIMATORS = ", ".join(
    (
        "logistic_regression",
        "random_forest",
        "hist_gradient_boosting",
        "extra_trees",
        "gradient_boosting",
        "decision_tree",
    )
)


@pytest.mark.parametrize(
    ("argv", "rc", "message"),
    [
        (["--estimator", "svm"], 2, "error: unknown estimator 'svm': use one of logistic_regression"),
        (
            ["--estimator", "sklearn.semi_supervised.LabelSpreading"],
            2,
            "error: unknown estimator 'sklearn.semi_supervised.LabelSpreading': "
            f"use one of {VALID_ESTIMATORS}\n",
        ),
        (
            ["--estimator", "random_forest", "--hyperparameters", '{"n_trees": 3}'],
            2,
            "error: unknown hyperparameter(s) for random_forest: n_trees (valid: bootstrap",
        ),
        (["--hyperparameters", "[1, 2]"], 2, "error: --hyperparameters must be a JSON object"),
        (["--hyperparameters", "{C: 1}"], 2, "error: --hyperparameters is not JSON"),
        (
            ["--baseline-card", "/no/such/card.json"],
            2,
            "error: --baseline-card '/no/such/card.json' does not exist",
        ),
        (["--data", "/no/such.csv"], 2, "error: --data '/no/such.csv' does not exist"),
        (["--version", "v1"], 1, "error: model version 'v1' is not semantic"),
        (["--model-name", "Bad_Name"], 1, "error: model name 'Bad_Name' is not a DNS-1123 label"),
        (["-p", "min_rows"], 2, "error: -p 'min_rows': expected NAME=VALUE"),
        (["-p", "nope=1"], 2, "error: -p nope: the pipeline has no such parameter"),
        (["-p", "test_size=a quarter"], 2, "error: parameter test_size='a quarter' must be of type Float"),
        (["--compiled", "/no/such.yaml"], 2, "error: --compiled '/no/such.yaml' does not exist"),
        (["-p", "deploy=true"], 2, "error: -p deploy=true rolls the model out on a cluster"),
        (["-p", "deploy=maybe"], 2, "error: parameter deploy='maybe' must be of type Boolean"),
    ],
)
def test_run_refuses_bad_input_in_one_line(tmp_path, capsys, argv, rc, message):
    assert main(["run", "--output", str(tmp_path / "m"), "--pipeline-root", str(tmp_path / "r"), *argv]) == rc
    out = capsys.readouterr()
    assert out.err.startswith(message), out.err
    assert len(out.err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()  # refused before kfp.local started


def test_run_refuses_to_replace_the_same_name_and_version_unless_forced(tmp_path, capsys):
    from pipelines.cli import _precheck_overwrite

    pkg = tmp_path / "m" / "breast-cancer"
    pkg.mkdir(parents=True)
    card = {"name": "breast-cancer", "version": "1.0.0", "sha256": "x", "inputs": [], "outputs": []}
    (pkg / "model-card.json").write_text(json.dumps(card))
    argv = [
        "run",
        "--output",
        str(tmp_path / "m"),
        "--pipeline-root",
        str(tmp_path / "r"),
        "--version",
        "1.0.0",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {pkg} already holds breast-cancer 1.0.0: pass --version") and "--force" in err
    )
    assert not (tmp_path / "r").exists()  # refused before kfp.local started
    pipeline = PIPELINES["training_pipeline"]
    _precheck_overwrite(pipeline, {"model_version": "1.0.0"}, tmp_path / "m", force=True)
    _precheck_overwrite(pipeline, {"model_version": "1.1.0"}, tmp_path / "m", force=False)  # a new version


@pytest.mark.parametrize("command", ["run", "submit"])
def test_estimator_path_is_refused_without_being_called(tmp_path, capsys, monkeypatch, command):
    """Hardening S9: `--estimator sklearn.datasets.clear_data_home` used to import and call it (deleting
    $SCIKIT_LEARN_DATA) and then die with a traceback. Now: one line listing the names, exit 2, the
    folder intact, and no pipeline work (run) or API call (submit: nothing listens on port 9)."""
    home = tmp_path / "scikit_learn_data"
    (home / "keep").mkdir(parents=True)
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(home))
    where = (
        ["--output", str(tmp_path / "m"), "--pipeline-root", str(tmp_path / "r")]
        if command == "run"
        else ["--host", "http://127.0.0.1:9"]
    )
    assert main([command, *where, "--estimator", "sklearn.datasets.clear_data_home"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: unknown estimator 'sklearn.datasets.clear_data_home': use one of {VALID_ESTIMATORS}\n"
    )
    assert (home / "keep").is_dir()
    assert not (tmp_path / "r").exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("command", ["run", "submit"])
def test_help_lists_exactly_the_registered_estimators(capsys, command):
    from pipelines.core import train

    assert ", ".join(train.ESTIMATORS) == VALID_ESTIMATORS
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--estimator ESTIMATOR a registered classifier: " + " | ".join(train.ESTIMATORS) in text
    assert "sklearn." not in text


def test_pipeline_arguments_are_typed_from_the_pipeline_interface():
    args = pipeline_arguments(
        PIPELINES["training_pipeline"],
        ["min_rows=200", "test_size=0.3", "max-regression=0.02", "expected_columns=a,b"],
        {"model_name": "m", "seed": 7, "estimator": None},
    )
    assert args == {
        "min_rows": 200,
        "test_size": 0.3,
        "max_regression": 0.02,
        "expected_columns": "a,b",
        "model_name": "m",
        "seed": 7,
    }


def test_submit_needs_a_host(capsys, monkeypatch):
    monkeypatch.delenv("KF_PIPELINES_ENDPOINT", raising=False)
    assert main(["submit"]) == 2
    assert "no KFP API host: pass --host" in capsys.readouterr().err


def test_submit_with_deploy_needs_the_release(capsys):
    """Refused before the host is contacted (nothing listens on port 9 of 127.0.0.1)."""
    argv = ["submit", "--host", "http://127.0.0.1:9", "-p", "deploy=true", "-p", "rollout_steps=50,100"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: -p deploy=true needs -p release_fullname=... (e.g."), err
    assert len(err.strip().splitlines()) == 1
