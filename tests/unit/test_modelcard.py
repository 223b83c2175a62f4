import json

import pytest

from serving.contract import modelcard


def test_package_layout_and_sha(model_package):
    card = modelcard.verify_package(model_package)
    assert (model_package / "1" / "model.onnx").is_file()
    assert card["sha256"] == modelcard.sha256_file(model_package / "1" / "model.onnx")


@pytest.mark.parametrize("where", ["root", "name", "version"])
def test_find_package_accepts_three_levels(model_package, where):
    path = {"root": model_package.parent, "name": model_package, "version": model_package / "1"}[where]
    assert modelcard.find_package(path) == model_package


def test_tampered_model_is_refused(tmp_path, model_package):
    import shutil

    copy = shutil.copytree(model_package, tmp_path / model_package.name)
    (copy / "1" / "model.onnx").write_bytes(b"not the model")
    with pytest.raises(modelcard.ModelPackageError, match="sha256 mismatch"):
        modelcard.verify_package(copy)


def test_bad_name_and_version_rejected(tmp_path, model_package):
    card = json.loads((model_package / "model-card.json").read_text())
    with pytest.raises(modelcard.ModelPackageError, match="DNS-1123"):
        modelcard.write_package(tmp_path, dict(card, name="Bad_Name"), b"x")
    with pytest.raises(modelcard.ModelPackageError, match="semantic"):
        modelcard.write_package(tmp_path, dict(card, version="v1"), b"x")


def test_find_package_errors_name_the_problem(tmp_path):
    with pytest.raises(modelcard.ModelPackageError, match="does not exist"):
        modelcard.find_package(tmp_path / "nope")
    with pytest.raises(modelcard.ModelPackageError, match=r"no model-card\.json"):
        modelcard.find_package(tmp_path)
