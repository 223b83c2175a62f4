"""Request checking and response building for the ONNX runtime: plain numpy, no KServe, no I/O.

Every check raises :class:`InputError` with a message that names the problem; the HTTP and gRPC
edges turn it into 400 / INVALID_ARGUMENT. Both the REST fast path (``serving.runtime.asgi``) and the
KServe path (``serving.runtime.model``: gRPC) go through the same functions here, so a request is
validated exactly once and the same way on every protocol.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.contract.errors import MlrolloutError

# V2 datatypes the single float input accepts; FP64 is cast to the model's FP32 (numpy's default
# float type is float64, so many clients send FP64). Integers, booleans and strings are refused.
ACCEPTED_INPUT_DATATYPES = {"FP32": np.float32, "FP64": np.float64}
V2_TO_NUMPY = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64}


class InputError(MlrolloutError, ValueError):
    """A request the model cannot accept: answered with ``status`` (400 unless stated) and the message."""

    status = 400

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class ModelSpec:
    """What a request must look like, taken from the model card (and checked against the ONNX graph)."""

    name: str
    version: str
    input_name: str
    input_datatype: str
    n_features: int
    feature_names: tuple[str, ...]
    outputs: tuple[dict, ...]  # [{name, datatype, shape}] as in the card
    classes: tuple[Any, ...]
    task: str
    class_names: tuple[str, ...] = ()  # what each class index means, e.g. ("malignant", "benign")
    feature_index: dict[str, int] = field(default_factory=dict, compare=False)

    @classmethod
    def from_card(cls, card: dict, name: str | None = None) -> ModelSpec:
        (inp,) = card["inputs"]
        n = int(inp["shape"][-1])
        features = tuple(inp.get("features") or [f"f{i}" for i in range(n)])
        if len(features) != n:
            raise ValueError(f"model card lists {len(features)} feature names for {n} input columns")
        return cls(
            name=name or card["name"],
            version=str(card["version"]),
            input_name=inp["name"],
            input_datatype=inp.get("datatype", "FP32"),
            n_features=n,
            feature_names=features,
            outputs=tuple({k: o[k] for k in ("name", "datatype", "shape")} for o in card["outputs"]),
            classes=tuple(card.get("classes") or ()),
            task=card.get("task", "binary_classification"),
            class_names=tuple(str(c) for c in card.get("class_names") or card.get("classes") or ()),
            feature_index={f: i for i, f in enumerate(features)},
        )

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o["name"] for o in self.outputs)

    def features_hint(self) -> str:
        names = ", ".join(repr(f) for f in self.feature_names[:3])
        more = f", ... ({self.n_features} in all)" if self.n_features > 3 else ""
        return f"{names}{more}"


# ---------------------------------------------------------------------------------------------------------
# turning JSON values into a float32 matrix, refusing anything that is not a finite number


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"{str(v).lower()} (a boolean)"
    if isinstance(v, str):
        return f"{v[:40]!r} (a string)"
    if isinstance(v, (list, dict)):
        return f"a {'list' if isinstance(v, list) else 'object'}"
    if isinstance(v, int):
        return f"{v} (out of range)"
    return repr(v)


def _first_bad_value(rows: list, spec: ModelSpec, what: str) -> str | None:
    """Slow path, only on error: locate the first non-number for a helpful message."""
    for i, row in enumerate(rows):
        values = row if isinstance(row, list) else [row]
        for j, v in enumerate(values):
            ok = (isinstance(v, float) and math.isfinite(v)) or (
                isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**63
            )
            if not ok:
                feat = (
                    f" ({spec.feature_names[j]!r})" if isinstance(row, list) and j < spec.n_features else ""
                )
                where = f"{what} {i}, value {j}{feat}" if isinstance(row, list) else f"{what} value {i}"
                return f"{where} is {_describe(v)}: every feature value must be a finite number"
    return None


def _has_bool(rows: list) -> bool:
    for row in rows:
        if isinstance(row, list):
            for v in row:
                if v is True or v is False:
                    return True
        elif row is True or row is False:
            return True
    return False


def numbers_to_array(data: list, spec: ModelSpec, what: str, maybe_bool: bool = True) -> np.ndarray:
    """``data`` (nested lists from JSON) -> numeric ndarray, refusing strings, null, booleans, ragged rows.

    ``maybe_bool=False`` skips the boolean scan when the caller knows the body holds no ``true``/``false``.
    """
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise InputError(
            f"{what}s have different lengths: every {what} needs exactly {spec.n_features} values"
        ) from None
    if arr.dtype.kind not in "iuf" or (maybe_bool and _has_bool(data)):
        if arr.dtype.kind == "b" or _has_bool(data):
            raise InputError(f"wrong datatype: booleans are not feature values; send numbers ({what}s)")
        msg = _first_bad_value(data, spec, what)
        raise InputError(msg or f"wrong datatype: {what}s must hold numbers only, got {arr.dtype}")
    return arr


def to_float32(arr: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(arr, dtype=np.float32)


def check_matrix(x: np.ndarray, spec: ModelSpec, max_batch: int, what: str = "instance") -> np.ndarray:
    """Shape, batch size and finiteness checks on the float32 matrix the model will see."""
    if x.ndim == 1 and x.size == spec.n_features and what == "instance":
        raise InputError(
            f"'instances' must be a list of rows, each a list of {spec.n_features} numbers: "
            "got one flat list; wrap it as [[...]]"
        )
    if x.ndim != 2:
        raise InputError(
            f"expected a 2-D batch [rows, {spec.n_features}], got {x.ndim}-D shape {list(x.shape)}"
        )
    rows, cols = x.shape
    if rows == 0:
        raise InputError("empty batch: send at least one row")
    if rows > max_batch:
        raise InputError(f"batch of {rows} rows is over the maximum of {max_batch} (--max_batch_size)")
    if cols != spec.n_features:
        raise InputError(
            f"wrong feature count: got {cols} values per {what}, the model expects {spec.n_features} "
            f"({spec.features_hint()})"
        )
    finite = np.isfinite(x)
    if not finite.all():
        i, j = (int(v) for v in np.argwhere(~finite)[0])
        raise InputError(
            f"{what} {i}, value {j} ({spec.feature_names[j]!r}) is not finite after conversion to float32 "
            "(NaN, Infinity or beyond +-3.4e38)"
        )
    return x


# ---------------------------------------------------------------------------------------------------------
# V1: {"instances": [[...], ...]} or {"instances": [{"feature": value, ...}, ...]}


@dataclass(frozen=True)
class V1Options:
    """What a V1 request asked for beyond the predicted class indices (its ``parameters``)."""

    probabilities: bool = False
    class_names: bool = False


V1_PARAMETERS = tuple(f.name for f in dataclasses.fields(V1Options))


def parse_v1(
    body: Any, spec: ModelSpec, max_batch: int, maybe_bool: bool = True
) -> tuple[np.ndarray, V1Options]:
    """Returns (float32 matrix, the extra outputs the request asked for)."""
    if not isinstance(body, dict):
        raise InputError('V1 request body must be a JSON object: {"instances": [[...numbers...], ...]}')
    instances = body.get("instances")
    if instances is None:
        extra = " ('inputs' is not supported, use 'instances')" if "inputs" in body else ""
        raise InputError(f"V1 request body has no 'instances' list{extra}")
    if not isinstance(instances, list):
        raise InputError(f"'instances' must be a list of rows, got {type(instances).__name__}")
    want = _v1_options(body)
    if not instances:
        raise InputError("empty batch: 'instances' holds no rows")
    if len(instances) > max_batch:
        raise InputError(
            f"batch of {len(instances)} rows is over the maximum of {max_batch} (--max_batch_size)"
        )
    if isinstance(instances[0], dict):
        instances = _named_rows(instances, spec)
    elif isinstance(instances[0], (int, float)) and not isinstance(instances[0], bool):
        raise InputError(
            f"'instances' must be a list of rows, each a list of {spec.n_features} numbers: "
            "got one flat list; wrap it as [[...]]"
        )
    elif not isinstance(instances[0], list):
        raise InputError(
            f"each instance must be a list of {spec.n_features} numbers or an object keyed by feature name, "
            f"got {_describe(instances[0])}"
        )
    arr = numbers_to_array(instances, spec, "instance", maybe_bool)
    return check_matrix(to_float32(arr), spec, max_batch), want


def _v1_options(body: dict) -> V1Options:
    params = body.get("parameters")
    if params is None:
        return V1Options()
    if not isinstance(params, dict):
        raise InputError("'parameters' must be an object, e.g. {\"probabilities\": true}")
    unknown = sorted(set(params) - set(V1_PARAMETERS))
    if unknown:
        raise InputError(
            f"unknown V1 parameter(s) {unknown}: supported are "
            + ", ".join(f"'{p}'" for p in V1_PARAMETERS)
            + " (true/false)"
        )
    for name in V1_PARAMETERS:
        if not isinstance(params.get(name, False), bool):
            raise InputError(f"parameter '{name}' must be true or false")
    return V1Options(**{k: params[k] for k in V1_PARAMETERS if k in params})


def _named_rows(instances: list, spec: ModelSpec) -> list[list]:
    expected = spec.feature_index
    rows = []
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise InputError(f"instance {i} is not an object: do not mix named and positional instances")
        if len(inst) != spec.n_features or any(k not in expected for k in inst):
            missing = [f for f in spec.feature_names if f not in inst]
            unknown = [k for k in inst if k not in expected]
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} feature(s): {', '.join(map(repr, missing[:5]))}")
            if unknown:
                parts.append(f"unknown feature name(s): {', '.join(map(repr, unknown[:5]))}")
            raise InputError(f"instance {i} has wrong feature names: {'; '.join(parts)}")
        rows.append([inst[f] for f in spec.feature_names])
    return rows


def v1_response(
    labels: np.ndarray, proba: np.ndarray, want: V1Options, class_names: tuple[str, ...] = ()
) -> dict:
    """``predictions`` are class indices (KServe's V1 shape); the names are opt-in so the default answer
    stays what every V1 client expects."""
    out: dict[str, Any] = {"predictions": labels.tolist()}
    if want.probabilities:
        out["probabilities"] = proba.tolist()
    if want.class_names:
        names = class_names or tuple(str(i) for i in range(proba.shape[-1]))
        out["class_names"] = [names[i] for i in out["predictions"]]
    return out


def model_metadata(spec: ModelSpec) -> dict:
    """The V2 model metadata answer, with what a client needs to read an answer: the class names behind
    the label indices and the feature names behind the input columns (in ``parameters``, which the Open
    Inference Protocol leaves to the server)."""
    return {
        "name": spec.name,
        "versions": [spec.version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": spec.input_name, "datatype": spec.input_datatype, "shape": [-1, spec.n_features]}
        ],
        "outputs": [dict(o) for o in spec.outputs],
        "parameters": {
            "classes": list(spec.classes),
            "class_names": list(spec.class_names),
            "features": list(spec.feature_names),
        },
    }


# ---------------------------------------------------------------------------------------------------------
# V2 (Open Inference Protocol), JSON or the binary-tensor extension


@dataclass
class V2Request:
    x: np.ndarray
    id: str | None  # the request's id (optional in V2 answers: omitted when the request has none)
    outputs: list[tuple[str, bool]]  # (name, binary) in the order requested; all outputs when none asked


def _check_tensor_header(inp: Any, spec: ModelSpec) -> tuple[str, list[int]]:
    if not isinstance(inp, dict):
        raise InputError("each entry of 'inputs' must be an object with name, shape, datatype and data")
    name = inp.get("name")
    if name != spec.input_name:
        raise InputError(
            f"unknown input {name!r}: this model has one input {spec.input_name!r} "
            f"({spec.input_datatype} [-1, {spec.n_features}])"
        )
    datatype = inp.get("datatype")
    if not isinstance(datatype, str):  # a list or object here once reached a dict lookup: a 500
        raise InputError(
            f"'datatype' of input {name!r} must be a string such as \"FP32\", got {_describe(datatype)}"
        )
    if datatype not in ACCEPTED_INPUT_DATATYPES:
        raise InputError(
            f"wrong datatype {datatype!r} for input {name!r}: the model takes {spec.input_datatype} "
            f"(FP64 is accepted and cast)"
        )
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InputError(f"'shape' of input {name!r} must be a list of integers, got {shape!r}")
    if any(d < 0 for d in shape):
        raise InputError(f"'shape' of input {name!r} has a negative dimension: {shape}")
    if len(shape) != 2:
        raise InputError(f"'shape' of input {name!r} must be [batch, {spec.n_features}], got {shape}")
    return datatype, shape


def _requested_outputs(outputs: Any, spec: ModelSpec, binary_default: bool) -> list[tuple[str, bool]]:
    if outputs is None:
        return [(n, binary_default) for n in spec.output_names]
    if not isinstance(outputs, list):
        raise InputError("'outputs' must be a list of {\"name\": ...} objects")
    result = []
    for o in outputs:
        name = o.get("name") if isinstance(o, dict) else None
        if name not in spec.output_names:
            raise InputError(
                f"unknown requested output {name!r}: this model's outputs are {', '.join(spec.output_names)}"
            )
        params = o.get("parameters") or {}
        binary = params.get("binary_data", binary_default) if isinstance(params, dict) else binary_default
        result.append((name, bool(binary)))
    return result


def parse_v2(
    body: Any,
    spec: ModelSpec,
    max_batch: int,
    raw: bytes | None = None,
    maybe_bool: bool = True,
) -> V2Request:
    """``body`` is the decoded JSON (the JSON part only, for the binary extension; ``raw`` holds the rest)."""
    if not isinstance(body, dict):
        raise InputError(
            'V2 request body must be a JSON object: {"inputs": [{"name", "shape", "datatype", "data"}]}'
        )
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InputError(f"V2 request needs a non-empty 'inputs' list (one input named {spec.input_name!r})")
    if len(inputs) != 1:
        raise InputError(
            f"this model has one input {spec.input_name!r}, the request has {len(inputs)} inputs"
        )
    inp = inputs[0]
    datatype, shape = _check_tensor_header(inp, spec)
    count = shape[0] * shape[1]
    if shape[0] > max_batch:
        raise InputError(f"batch of {shape[0]} rows is over the maximum of {max_batch} (--max_batch_size)")
    params = inp.get("parameters") or {}
    if "data" in inp:
        data = inp["data"]
        if not isinstance(data, list):
            raise InputError(f"'data' of input {spec.input_name!r} must be a list of numbers")
        arr = numbers_to_array(data, spec, "row", maybe_bool)
        if arr.size != count:
            raise InputError(f"shape {shape} needs {count} values but 'data' holds {arr.size}")
    elif raw is not None and isinstance(params, dict) and "binary_data_size" in params:
        size = params["binary_data_size"]
        itemsize = np.dtype(ACCEPTED_INPUT_DATATYPES[datatype]).itemsize
        if not isinstance(size, int) or size != len(raw):
            raise InputError(
                f"binary_data_size {size!r} does not match the {len(raw)} bytes after the JSON header"
            )
        if size != count * itemsize:
            raise InputError(
                f"shape {shape} of {datatype} needs {count * itemsize} bytes but binary_data_size is {size}"
            )
        arr = np.frombuffer(raw, dtype=ACCEPTED_INPUT_DATATYPES[datatype])
    else:
        raise InputError(f"input {spec.input_name!r} has no 'data' (nor binary data with binary_data_size)")
    x = check_matrix(to_float32(arr.reshape(shape)), spec, max_batch, what="row")
    req_params = body.get("parameters") or {}
    binary_default = (
        bool(req_params.get("binary_data_output", False)) if isinstance(req_params, dict) else False
    )
    if raw is None and binary_default:
        binary_default = False
    rid = body.get("id")
    return V2Request(
        x=x,
        id=None if rid is None else str(rid),
        outputs=_requested_outputs(body.get("outputs"), spec, binary_default),
    )


def output_arrays(labels: np.ndarray, proba: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "label": labels.astype(np.int64, copy=False),
        "probabilities": proba.astype(np.float32, copy=False),
    }


def v2_response(spec: ModelSpec, req: V2Request, arrays: dict[str, np.ndarray]) -> tuple[dict, list[bytes]]:
    """The V2 response dict and the raw output buffers (non-empty only for binary outputs)."""
    outs, raws = [], []
    dtypes = {o["name"]: o["datatype"] for o in spec.outputs}
    for name, binary in req.outputs:
        a = arrays[name]
        entry: dict[str, Any] = {"name": name, "datatype": dtypes[name], "shape": list(a.shape)}
        if binary:
            buf = a.tobytes()
            entry["parameters"] = {"binary_data_size": len(buf)}
            raws.append(buf)
        else:
            entry["data"] = a.ravel().tolist()
        outs.append(entry)
    response: dict[str, Any] = {"model_name": spec.name, "model_version": spec.version}
    if req.id is not None:
        response["id"] = req.id
    response["outputs"] = outs
    return response, raws
