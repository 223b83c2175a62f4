"""Pure checks of the runtime's request validation, response building, fault knobs and CLI."""

from __future__ import annotations

import numpy as np
import pytest

from serving.runtime import core
from serving.runtime.model import Faults, OnnxModel
from serving.runtime.server import build_parser

FEATURES = [f"f{i}" for i in range(4)]
CARD = {
    "name": "m",
    "version": "1.2.3",
    "classes": [0, 1],
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4], "features": FEATURES}],
    "outputs": [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
    ],
}
SPEC = core.ModelSpec.from_card(CARD)


def test_v1_positional_and_named_give_the_same_matrix():
    x1, p1 = core.parse_v1({"instances": [[1, 2.5, 3, 4]]}, SPEC, 10)
    x2, p2 = core.parse_v1(
        {"instances": [{"f3": 4, "f1": 2.5, "f0": 1, "f2": 3}], "parameters": {"probabilities": True}},
        SPEC,
        10,
    )
    assert x1.dtype == np.float32 and x1.tolist() == [[1, 2.5, 3, 4]]
    np.testing.assert_array_equal(x1, x2)
    assert (p1, p2) == (core.V1Options(), core.V1Options(probabilities=True))


def test_v1_class_names_are_opt_in_and_name_each_prediction():
    spec = core.ModelSpec.from_card({**CARD, "class_names": ["malignant", "benign"]})
    _, want = core.parse_v1({"instances": [[1, 2, 3, 4]], "parameters": {"class_names": True}}, spec, 10)
    labels, proba = np.array([1, 0]), np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)
    assert core.v1_response(labels, proba, core.V1Options(), spec.class_names) == {"predictions": [1, 0]}
    assert core.v1_response(labels, proba, want, spec.class_names) == {
        "predictions": [1, 0],
        "class_names": ["benign", "malignant"],
    }


def test_v2_metadata_names_the_classes_features_and_version():
    meta = core.model_metadata(core.ModelSpec.from_card({**CARD, "class_names": ["no", "yes"]}))
    assert meta["versions"] == ["1.2.3"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["parameters"] == {"classes": [0, 1], "class_names": ["no", "yes"], "features": FEATURES}
    # a card without class_names still says what the indices are
    assert core.model_metadata(SPEC)["parameters"]["class_names"] == ["0", "1"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"instances": [[1, 2, 3]]}, "got 3 values per instance, the model expects 4"),
        ({"instances": [[1, 2, 3, "4"]]}, "value 3 ('f3') is '4' (a string)"),
        ({"instances": [[1, 2, 3, False]]}, "booleans"),
        ({"instances": [[1.5, 2, 3, True]]}, "booleans"),
        ({"instances": [[1, 2, 3, 2**80]]}, "out of range"),
        ({"instances": [[1, 2, 3, 1e300]]}, "value 3 ('f3') is not finite"),
        (
            {"instances": [{"f0": 1, "f1": 2, "f2": 3, "x": 4}]},
            "missing 1 feature(s): 'f3'; unknown feature name(s): 'x'",
        ),
        ({"instances": [[1, 2, 3, 4], {"f0": 1}]}, "different lengths"),
        ({"instances": [[1, 2, 3, 4]] * 11}, "maximum of 10"),
        ({"instances": "1,2,3,4"}, "must be a list of rows"),
        ({"instances": [[1, 2, 3, 4]], "parameters": {"probabilities": "yes"}}, "true or false"),
        ({"instances": [[1, 2, 3, 4]], "parameters": {"names": True}}, "'probabilities', 'class_names'"),
        ({"inputs": [[1, 2, 3, 4]]}, "'inputs' is not supported"),
    ],
)
def test_v1_refusals_name_the_problem(body, message):
    with pytest.raises(core.InputError) as err:
        core.parse_v1(body, SPEC, 10)
    assert message in err.value.message and err.value.status == 400


def _v2(**inp):
    base = {"name": "input", "datatype": "FP32", "shape": [2, 4], "data": list(range(8))}
    return {"inputs": [{**base, **inp}]}


def test_v2_flat_nested_and_binary_data_agree():
    flat = core.parse_v2(_v2(), SPEC, 10)
    nested = core.parse_v2(_v2(data=[[0, 1, 2, 3], [4, 5, 6, 7]]), SPEC, 10)
    raw = np.arange(8, dtype=np.float64).tobytes()
    binary = core.parse_v2(
        {
            "inputs": [
                {"name": "input", "datatype": "FP64", "shape": [2, 4], "parameters": {"binary_data_size": 64}}
            ],
            "outputs": [{"name": "label", "parameters": {"binary_data": True}}],
            "id": "a",
        },
        SPEC,
        10,
        raw=raw,
    )
    for req in (nested, binary):
        np.testing.assert_array_equal(req.x, flat.x)
    assert flat.outputs == [("label", False), ("probabilities", False)]
    assert binary.outputs == [("label", True)] and binary.id == "a"
    assert flat.id is None  # and the answer then has no id (optional in V2)
    assert "id" not in core.v2_response(SPEC, flat, core.output_arrays(np.zeros(2), np.zeros((2, 2))))[0]


@pytest.mark.parametrize(
    ("inp", "raw", "message"),
    [
        ({"shape": [3, 4]}, None, "shape [3, 4] needs 12 values but 'data' holds 8"),
        ({"datatype": "INT32"}, None, "wrong datatype 'INT32'"),
        ({"datatype": "BYTES", "data": ["a"] * 8}, None, "wrong datatype 'BYTES'"),
        ({"shape": [2, "4"]}, None, "list of integers"),
        ({"shape": [-2, 4]}, None, "negative dimension"),
        ({"shape": [8]}, None, "must be [batch, 4]"),
        ({"name": "x"}, None, "unknown input 'x'"),
        ({"data": [None] * 8}, None, "is null"),
        ({"shape": [11, 4], "data": [0] * 44}, None, "maximum of 10"),
        ({"data": None, "parameters": {"binary_data_size": 10}}, b"\0" * 10, "needs 32 bytes"),
        ({"data": None, "parameters": {"binary_data_size": 64}}, b"\0" * 60, "does not match the 60 bytes"),
    ],
)
def test_v2_refusals_name_the_problem(inp, raw, message):
    body = _v2(**inp)
    if body["inputs"][0].get("data") is None:
        body["inputs"][0].pop("data")
    with pytest.raises(core.InputError) as err:
        core.parse_v2(body, SPEC, 10, raw=raw)
    assert message in err.value.message


def test_v2_unknown_requested_output_is_refused():
    with pytest.raises(core.InputError, match=r"unknown requested output 'scores'.*label, probabilities"):
        core.parse_v2({**_v2(), "outputs": [{"name": "scores"}]}, SPEC, 10)


def test_v2_response_json_and_binary():
    req = core.V2Request(
        x=np.zeros((2, 4), np.float32), id="r", outputs=[("probabilities", True), ("label", False)]
    )
    arrays = core.output_arrays(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]], np.float32))
    resp, raws = core.v2_response(SPEC, req, arrays)
    assert resp["model_version"] == "1.2.3" and resp["id"] == "r"
    assert resp["outputs"][0] == {
        "name": "probabilities",
        "datatype": "FP32",
        "shape": [2, 2],
        "parameters": {"binary_data_size": 16},
    }
    assert resp["outputs"][1]["data"] == [0, 1]
    np.testing.assert_array_equal(np.frombuffer(raws[0], np.float32).reshape(2, 2), arrays["probabilities"])


def test_fault_knobs_default_off_and_validate():
    assert not Faults.from_env({}).active
    f = Faults.from_env({"MLROLLOUT_FAULT_ERROR_RATE": "0.3", "MLROLLOUT_FAULT_LATENCY_MS": "250"})
    assert (f.error_rate, f.latency_ms, f.active) == (0.3, 250.0, True)
    with pytest.raises(ValueError, match=r"MLROLLOUT_FAULT_ERROR_RATE=.1\.5. is out of range"):
        Faults.from_env({"MLROLLOUT_FAULT_ERROR_RATE": "1.5"})
    with pytest.raises(ValueError, match="is not a number"):
        Faults.from_env({"MLROLLOUT_FAULT_LATENCY_MS": "fast"})


def test_cli_accepts_the_cluster_serving_runtime_args():
    """The ClusterServingRuntime passes exactly these; ports default to KServe's 8080/8081."""
    args = build_parser().parse_args(["--model_name=breast-cancer", "--model_dir=/mnt/models"])
    assert (args.model_name, args.model_dir, args.http_port, args.grpc_port) == (
        "breast-cancer",
        "/mnt/models",
        8080,
        8081,
    )
    defaults = build_parser().parse_args([])
    assert defaults.model_name is None and defaults.model_dir == "/mnt/models"
    assert defaults.workers == 1 and defaults.enable_latency_logging is False
    assert not hasattr(defaults, "fast_path"), "KServe's fast path bypassed the client-error handling (S3)"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--max_batch_size", "0"])


@pytest.mark.parametrize("level", ["root", "name", "version"])
def test_model_dir_may_be_root_name_or_version_folder(model_package, level):
    path = {"root": model_package.parent, "name": model_package, "version": model_package / "1"}[level]
    model = OnnxModel(path, max_batch_size=4)
    assert model.name == "breast-cancer" and model.package_dir == model_package
    model.load()
    assert model.ready and model.get_input_types() == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 30]}
    ]
    labels, proba = model.run(np.zeros((3, 30), np.float32))
    assert labels.shape == (3,) and proba.shape == (3, 2)
