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
from pipelines.components import runtime
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
    assert "./pipelines/core/data.py" in members and "./pipelines/core/modelcard.py" in members
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


def test_training_pipeline_interface():
    doc = pcompile.load(pcompile.COMPILED_DIR / "training_pipeline.yaml")[0]
    params = doc["root"]["inputDefinitions"]["parameters"]
    assert params["estimator"]["defaultValue"] == "logistic_regression"
    assert params["model_name"]["defaultValue"] == "breast-cancer"
    assert params["model_version"]["defaultValue"] == "1.0.0"
    assert params["max_abs_prob_diff"]["defaultValue"] == 1e-4
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
    ):
        assert params[name]["isOptional"], name
    tasks = doc["root"]["dag"]["tasks"]
    assert set(tasks) == {
        "load-data",
        "validate-data",
        "split",
        "train",
        "evaluate",
        "export-onnx",
        "verify-onnx",
        "package-model",
    }
    assert "validate-data" in tasks["split"]["dependentTasks"]
    outputs = doc["components"]["comp-evaluate"]["outputDefinitions"]["artifacts"]
    assert outputs["classification_metrics"]["artifactType"]["schemaTitle"] == "system.ClassificationMetrics"
    assert outputs["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.HTML"


def _training_executors():
    doc = pcompile.load(pcompile.COMPILED_DIR / "training_pipeline.yaml")[0]
    return doc["deploymentSpec"]["executors"].items()


def test_executors_use_explicit_image_and_lock_pins():
    lock = runtime.pins()
    for name, ex in _training_executors():
        c = ex["container"]
        assert c["image"] == runtime.BASE_IMAGE, name
        install = c["command"][2]
        pinned = [tok.strip("'") for tok in install.split() if "==" in tok]
        assert any(p.startswith("scikit-learn==") for p in pinned), name
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


def test_embedded_code_imports_only_what_the_step_installs():
    """A local run proves nothing about self-containment (the repo is importable there): check that
    every import in a step's source and its embedded files is the stdlib, kfp, the embedded
    ``pipelines`` package, or a module of a distribution the step pip-installs."""
    dist_of = metadata.packages_distributions()
    for name, ex in _training_executors():
        command = ex["container"]["command"]
        installed = {runtime._norm(t.strip("'").split("==")[0]) for t in command[2].split() if "==" in t}
        source = command[-1]
        (b64,) = pcompile._ARCHIVE_RE.findall(source)
        files = pcompile.archive_members(b64)
        assert set(files) >= {"./pipelines/__init__.py", "./pipelines/core/__init__.py"}
        embedded_core = {Path(f).stem for f in files}
        for origin, text in [("step source", source)] + [(f, c.decode()) for f, c in files.items()]:
            for top in _imports(text):
                if top in sys.stdlib_module_names or top in ("kfp", "pipelines"):
                    continue
                dists = {runtime._norm(d) for d in dist_of.get(top, [])}
                assert dists & installed, f"{name}: {origin} imports {top!r}, which the step does not install"
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.ImportFrom) and node.module == "pipelines.core":
                    missing = {a.name for a in node.names} - embedded_core
                    assert not missing, (
                        f"{name}: {origin} imports pipelines.core.{missing} which is not embedded"
                    )


def test_core_closure_follows_imports():
    assert runtime.core_closure("package") == ["export", "modelcard", "package"]
    assert "modelcard" in runtime.core_closure("evaluate")  # imported inside load_baseline()
    with pytest.raises(ValueError, match="no module 'nope'"):
        runtime.core_closure("nope")


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
        if isinstance(default, float):
            assert float(shown) == default, name
        else:
            assert shown == str(default), name
