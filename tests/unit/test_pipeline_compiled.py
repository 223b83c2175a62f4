"""The checked-in compiled YAML: not stale, strictly valid, hermetic and pinned."""

from __future__ import annotations

import ast
import sys
from importlib import metadata
from pathlib import Path

import pytest
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from pipelines import compile as pcompile
from pipelines.components import _env as runtime
from pipelines.registry import PIPELINES

STEMS = sorted(PIPELINES)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """Every registered pipeline compiled now, into a temp dir: {stem: [yaml docs]}."""
    out = tmp_path_factory.mktemp("compiled")
    docs = {}
    for stem in STEMS:
        pcompile.compile_one(PIPELINES[stem], out / f"{stem}.yaml")
        docs[stem] = pcompile.load(out / f"{stem}.yaml")
    return docs


@pytest.mark.parametrize("stem", STEMS)
def test_checked_in_yaml_is_not_stale(fresh, stem):
    path = pcompile.COMPILED_DIR / f"{stem}.yaml"
    assert path.is_file(), f"{path} missing: run `python -m pipelines compile`"
    assert pcompile.normalize(pcompile.load(path)) == pcompile.normalize(fresh[stem]), (
        f"{path.name} is stale: run `python -m pipelines compile` and commit the result"
    )


def test_normalize_still_sees_a_change_in_embedded_code(fresh):
    """Only archive metadata is ignored: a changed byte in an embedded file makes the YAML differ."""
    import base64
    import gzip
    import io
    import tarfile

    doc = fresh["training_pipeline"][0]
    source = doc["deploymentSpec"]["executors"]["exec-load-data"]["container"]["command"][-1]
    (b64,) = pcompile._ARCHIVE_RE.findall(source)
    members = pcompile.archive_members(b64)
    assert "./pipelines/core/data.py" in members and "./serving/contract/modelcard.py" in members
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in members.items():
            if name.endswith("data.py"):
                content += b"\n# changed\n"
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    changed = base64.b64encode(gzip.compress(buf.getvalue())).decode()
    tampered = source.replace(b64, changed)
    assert pcompile.normalize(tampered) != pcompile.normalize(source)
    # same files, different tar/gzip metadata: equal
    rebuilt = io.BytesIO()
    with tarfile.open(fileobj=rebuilt, mode="w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.uid, info.uname, info.mtime = len(content), 4242, "someone", 1
            tar.addfile(info, io.BytesIO(content))
    same = source.replace(b64, base64.b64encode(gzip.compress(rebuilt.getvalue(), mtime=7)).decode())
    assert pcompile.normalize(same) == pcompile.normalize(source)


@pytest.mark.parametrize("stem", STEMS)
def test_strict_parse_with_pipeline_spec_proto(stem):
    docs = pcompile.load(pcompile.COMPILED_DIR / f"{stem}.yaml")
    spec = json_format.ParseDict(docs[0], pipeline_spec_pb2.PipelineSpec())  # rejects unknown fields
    assert spec.schema_version == "2.1.0" and spec.sdk_version == "kfp-2.17.0"
    assert spec.deployment_spec  # executors present
    for extra in docs[1:]:
        json_format.ParseDict(extra["platforms"], pipeline_spec_pb2.PlatformSpec())


TRAINING_TASKS = {
    "load-data",
    "validate-data",
    "split",
    "train",
    "evaluate",
    "export-onnx",
    "verify-onnx",
    "package-model",
}
ROLLOUT_TASKS = {"progressive-rollout"}


def test_training_pipeline_interface():
    doc = pcompile.load(pcompile.COMPILED_DIR / "training_pipeline.yaml")[0]
    params = doc["root"]["inputDefinitions"]["parameters"]
    assert params["estimator"]["defaultValue"] == "logistic_regression"
    assert params["model_name"]["defaultValue"] == "breast-cancer"
    assert params["model_version"]["defaultValue"] == "1.0.0"
    assert params["max_abs_prob_diff"]["defaultValue"] == 1e-4
    deploy = {k: v for k, v in params["deploy"].items() if k != "description"}
    assert deploy == {"defaultValue": False, "isOptional": True, "parameterType": "BOOLEAN"}
    for name in (
        "min_rows",
        "max_missing_fraction",
        "max_duplicate_fraction",
        "min_class_fraction",
        "min_accuracy",
        "min_roc_auc",
        "baseline_card",
        "max_regression",
        "seed",
        "test_size",
        "data_source",
        "label_column",
        "hyperparameters",
        "min_label_agreement",
        "deploy_namespace",
        "release_fullname",
        "rollout_router",
        "rollout_steps",
        "rollout_interval_s",
        "prometheus_url",
        "max_drift",
        "compare_with_stable",
        "rollout_alpha",
        "max_error_increase",
        "latency_min_effect",
        "drift_min_effect",
        "accuracy_min_effect",
    ):
        assert params[name]["isOptional"], name
    tasks = doc["root"]["dag"]["tasks"]
    # the training steps at the top level; the rollout steps only inside the condition on `deploy`
    assert set(tasks) == TRAINING_TASKS | {"condition-1"}
    assert "validate-data" in tasks["split"]["dependentTasks"]
    cond = tasks["condition-1"]
    assert cond["taskInfo"]["name"] == "rollout-enabled"
    assert cond["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--deploy'] == true"
    assert cond["dependentTasks"] == ["package-model"]
    assert cond["inputs"]["parameters"]["pipelinechannel--deploy"] == {"componentInputParameter": "deploy"}
    branch = doc["components"][cond["componentRef"]["name"]]["dag"]["tasks"]
    assert set(branch) == ROLLOUT_TASKS
    # the model handed to the operator is the package this run built (its card gives the version)
    model_in = branch["progressive-rollout"]["inputs"]["artifacts"]["model"]["componentInputArtifact"]
    assert cond["inputs"]["artifacts"][model_in]["taskOutputArtifact"] == {
        "outputArtifactKey": "package",
        "producerTask": "package-model",
    }
    rollout_in = branch["progressive-rollout"]["inputs"]["parameters"]
    # each step input comes from the pipeline parameter of that meaning
    wiring = {
        "namespace": "deploy_namespace",
        "release_fullname": "release_fullname",
        "router": "rollout_router",
        "model_name": "model_name",
        "steps": "rollout_steps",
        "interval_s": "rollout_interval_s",
        "prometheus_url": "prometheus_url",
        "max_drift": "max_drift",
        "compare_with_stable": "compare_with_stable",
        "alpha": "rollout_alpha",
        "max_error_increase": "max_error_increase",
        "latency_min_effect": "latency_min_effect",
        "drift_min_effect": "drift_min_effect",
        "accuracy_min_effect": "accuracy_min_effect",
    }
    for arg, param in wiring.items():
        channel = rollout_in[arg]["componentInputParameter"]
        assert cond["inputs"]["parameters"][channel] == {"componentInputParameter": param}, arg
    outputs = doc["components"]["comp-evaluate"]["outputDefinitions"]["artifacts"]
    assert outputs["classification_metrics"]["artifactType"]["schemaTitle"] == "system.ClassificationMetrics"
    assert outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.HTML"
    assert doc["root"]["outputDefinitions"]["artifacts"]["Output"]["artifactType"]["schemaTitle"] == (
        "system.Model"
    )


def _training_executors():
    doc = pcompile.load(pcompile.COMPILED_DIR / "training_pipeline.yaml")[0]
    executors = doc["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{t}" for t in TRAINING_TASKS | ROLLOUT_TASKS}
    return executors.items()


# a distribution each kind of step must install (pinned): the rollout steps the Kubernetes client
_ANCHOR = {f"exec-{t}": "kubernetes" for t in ROLLOUT_TASKS}
_PROJECT = set(runtime.PROJECT_PACKAGES)


def test_executors_use_explicit_image_and_lock_pins():
    lock = runtime.pins()
    for name, ex in _training_executors():
        c = ex["container"]
        assert c["image"] == runtime.BASE_IMAGE, name
        install = c["command"][2]
        pinned = [tok.strip("'") for tok in install.split() if "==" in tok]
        anchor = _ANCHOR.get(name, "scikit-learn")
        assert any(p.startswith(f"{anchor}==") for p in pinned), name
        for pin in pinned:
            dist, version = pin.split("==")
            if dist == "kfp":
                assert version == metadata.version("kfp")
                continue
            assert lock[runtime._norm(dist)] == version, f"{name}: {pin} is not the locked version"
            assert metadata.version(dist) == version, f"{name}: {pin} differs from the tested install"


def _imports(source: str) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            tops.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops


def _unresolved(text: str, top: str, files: dict[str, bytes]) -> list[str]:
    """Imports of the embedded package ``top`` in ``text`` that the archive ``files`` cannot satisfy."""

    def path(module: str) -> str:
        return "./" + module.replace(".", "/")

    def exists(module: str) -> bool:
        return f"{path(module)}.py" in files or f"{path(module)}/__init__.py" in files

    def defines(init: bytes, name: str) -> bool:
        for node in ast.parse(init).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
                return True
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == name for t in node.targets):
                return True
            if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (a.asname or a.name.split(".")[0]) == name for a in node.names
            ):
                return True
        return False

    bad = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            bad += [a.name for a in node.names if a.name.split(".")[0] == top and not exists(a.name)]
        elif (
            isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == top
        ):
            if not exists(node.module):
                bad.append(node.module)
                continue
            init = files.get(f"{path(node.module)}/__init__.py")
            if init is not None:  # a package: each name is a submodule or defined in its __init__
                bad += [
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if not exists(f"{node.module}.{a.name}") and not defines(init, a.name)
                ]
    return bad


def test_embedded_code_imports_only_what_the_step_installs():
    """A local run proves nothing about self-containment (the repo is importable there): check that
    every import in each step's source and embedded files is the stdlib, kfp, a module of the
    step's embedded archive, or a module of a distribution the step pip-installs; and that the
    rollout steps carry no local stack, runtime or CLI."""
    dist_of = metadata.packages_distributions()
    for name, ex in _training_executors():
        command = ex["container"]["command"]
        installed = {runtime._norm(t.strip("'").split("==")[0]) for t in command[2].split() if "==" in t}
        source = command[-1]
        (b64,) = pcompile._ARCHIVE_RE.findall(source)
        files = pcompile.archive_members(b64)
        assert {f.split("/")[1] for f in files} <= _PROJECT, f"{name} embeds {sorted(files)}"
        if name in _ANCHOR:
            assert "./serving/rollout/cluster.py" in files, name
            assert not any(k in f for f in files for k in ("localstack", "runtime", "cli", "pipelines/")), (
                name
            )
        else:
            assert "./pipelines/core/data.py" in files and not any("serving/rollout" in f for f in files), (
                name
            )
        for origin, text in [("step source", source)] + [(f, c.decode()) for f, c in files.items()]:
            for mod in _imports(text):
                if mod in sys.stdlib_module_names or mod == "kfp" or mod in _PROJECT:
                    continue
                dists = {runtime._norm(d) for d in dist_of.get(mod, [])}
                assert dists & installed, f"{name}: {origin} imports {mod!r}, which the step does not install"
            for top in _PROJECT:
                missing = _unresolved(text, top, files)
                assert not missing, f"{name}: {origin} imports {missing}, which the step does not embed"


def test_unresolved_embedded_imports_are_caught():
    """The check above can fail: a module or name missing from the archive is reported."""
    files = {
        "./serving/__init__.py": b"",
        "./serving/rollout/__init__.py": b"X = 1\n",
        "./serving/rollout/cluster.py": b"",
    }
    ok = "from serving.rollout import cluster, X\nimport serving.rollout.cluster\n"
    assert _unresolved(ok, "serving", files) == []
    bad = (
        "from serving.rollout import localstack\nimport serving.runtime\n"
        "from serving.rollout.cli import main\n"
    )
    assert _unresolved(bad, "serving", files) == [
        "serving.rollout.localstack",
        "serving.runtime",
        "serving.rollout.cli",
    ]


def test_closure_follows_imports():
    core = ["pipelines", "pipelines.core"]
    contract = [
        "serving",
        "serving.contract",
        *(f"serving.contract.{m}" for m in ("errors", "modelcard", "session")),
    ]
    assert runtime.closure("pipelines.core.package") == sorted(
        [*core, *contract, "pipelines.core.export", "pipelines.core.package", "pipelines.core.train"]
    )
    assert "serving.contract.modelcard" in runtime.closure("pipelines.core.evaluate")  # in load_baseline()
    batch = runtime.closure("serving.batch.engine")
    assert {"serving", "serving.batch", "serving.batch.source", "serving.batch.sink"} <= set(batch)
    assert "serving.batch.cli" not in batch and "serving.batch.bench" not in batch
    with pytest.raises(ValueError, match=r"'pipelines\.core\.nope' is not a module of this project"):
        runtime.closure("pipelines.core.nope")


def test_every_parameter_of_every_compiled_pipeline_and_component_is_described():
    """KFP copies the ``Args:`` docstrings into ``inputDefinitions``: the dashboard shows them."""
    for path in sorted(pcompile.COMPILED_DIR.glob("*.yaml")):
        doc = pcompile.load(path)[0]
        specs = {"(pipeline)": doc["root"], **doc["components"]}
        for comp, spec in specs.items():
            if "executorLabel" not in spec and comp != "(pipeline)":
                continue  # a condition's sub-DAG: its inputs are pipeline channels
            for kind in ("parameters", "artifacts"):
                for param, d in spec.get("inputDefinitions", {}).get(kind, {}).items():
                    if comp.startswith("comp-importer"):
                        continue  # kfp's own importer step
                    assert (d.get("description") or "").strip(), f"{path.name} {comp}: {param} undescribed"


def test_readme_documents_every_parameter_with_its_default():
    readme = (Path(pcompile.__file__).parent / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[1].startswith("`"):
            rows[cells[0].strip("`")] = cells[1].strip("`")
    doc = pcompile.load(pcompile.COMPILED_DIR / "training_pipeline.yaml")[0]
    params = doc["root"]["inputDefinitions"]["parameters"]
    assert set(params) <= set(rows), f"undocumented: {set(params) - set(rows)}"
    for name, p in params.items():
        default = p["defaultValue"]
        shown = rows[name].strip('"')
        if isinstance(default, bool):
            assert shown == str(default).lower(), name
        elif isinstance(default, float):
            assert float(shown) == default, name
        else:
            assert shown == str(default), name
