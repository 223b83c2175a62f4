"""The model package contract: ``<root>/<name>/1/model.onnx`` + ``<root>/<name>/model-card.json``.

The same layout is a valid Triton model repository, so KServe's built-in ``kserve-tritonserver``
can serve it as well as this project's runtime. Everything that reads a package (the serving
runtime, batch scoring, the rollout controller, the Helm test) goes through this module.

Model card fields (JSON):

    name, version (semver), sha256 (of 1/model.onnx), format ("onnx"), opset {domain: version},
    task ("binary_classification" | "multiclass_classification"), classes [labels], class_names,
    inputs  [{name, datatype (V2: FP32), shape [-1, n], features [names]}],
    outputs [{name: "label", datatype: INT64, shape: [-1]},
             {name: "probabilities", datatype: FP32, shape: [-1, n_classes]}],
    training_data {fingerprint, rows, columns, source}, metrics {...}, estimator, hyperparameters,
    library_versions {...}, created_at (ISO 8601 UTC), pipeline_run_id
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from serving.contract.errors import MlrolloutError

MODEL_CARD_FILE = "model-card.json"
ONNX_FILE = "model.onnx"
VERSION_DIR = "1"
SEMVER_RE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # a DNS-1123 label: also a valid ISVC name

# ONNX tensor element type -> Open Inference Protocol (V2) datatype
ONNX_TO_V2 = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(string)": "BYTES",
    "tensor(bool)": "BOOL",
}


class ModelPackageError(MlrolloutError, ValueError):
    """A model package is missing, malformed or does not match its card."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or len(name) > 45:
        raise ModelPackageError(
            f"model name {name!r} is not a DNS-1123 label (lowercase letters, digits and '-', "
            "at most 45 characters); it becomes part of Kubernetes object names"
        )
    return name


def check_version(version: str) -> str:
    if not SEMVER_RE.match(version):
        raise ModelPackageError(f"model version {version!r} is not semantic (MAJOR.MINOR.PATCH, e.g. 1.2.0)")
    return version


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp creates 0600; a package is read by other UIDs (the runtime image runs as 10001)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_package(out_root: str | os.PathLike, card: dict[str, Any], onnx_bytes: bytes) -> Path:
    """Write ``<out_root>/<name>/1/model.onnx`` and the card (with its sha256 filled in).

    Returns the model folder ``<out_root>/<name>``.
    """
    name = check_name(card["name"])
    check_version(card["version"])
    model_dir = Path(out_root) / name
    _atomic_write_bytes(model_dir / VERSION_DIR / ONNX_FILE, onnx_bytes)
    card = dict(card, sha256=hashlib.sha256(onnx_bytes).hexdigest())
    text = json.dumps(card, indent=2, sort_keys=True) + "\n"
    _atomic_write_bytes(model_dir / MODEL_CARD_FILE, text.encode())
    return model_dir


def find_package(path: str | os.PathLike) -> Path:
    """Resolve a repository root holding one ``<name>/``, the ``<name>/`` folder, or its version folder.

    Returns the ``<name>/`` folder (the one holding ``model-card.json``).
    """
    p = Path(path)
    if not p.exists():
        raise ModelPackageError(f"model directory {str(p)!r} does not exist")
    if (p / MODEL_CARD_FILE).is_file():
        return p
    if (p / ONNX_FILE).is_file() and (p.parent / MODEL_CARD_FILE).is_file():
        return p.parent
    candidates = sorted(c.parent for c in p.glob(f"*/{MODEL_CARD_FILE}"))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        raise ModelPackageError(f"{str(p)!r} holds several model packages ({names}); point at one of them")
    raise ModelPackageError(
        f"no {MODEL_CARD_FILE} in {str(p)!r}, its parent or its subfolders: expected the layout "
        f"<root>/<name>/{VERSION_DIR}/{ONNX_FILE} + <root>/<name>/{MODEL_CARD_FILE}"
    )


def load_card(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / MODEL_CARD_FILE
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelPackageError(f"cannot read model card {str(path)!r}: {e}") from e
    missing = [k for k in ("name", "version", "sha256", "inputs", "outputs") if k not in card]
    if missing:
        raise ModelPackageError(f"model card {str(path)!r} lacks required field(s): {', '.join(missing)}")
    return card


def onnx_path(model_dir: str | os.PathLike) -> Path:
    return Path(model_dir) / VERSION_DIR / ONNX_FILE


def verify_package(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Load the card and check that ``1/model.onnx`` has the sha256 it records. Returns the card."""
    card = load_card(model_dir)
    path = onnx_path(model_dir)
    if not path.is_file():
        raise ModelPackageError(f"model file {str(path)!r} is missing")
    actual = sha256_file(path)
    if actual != card["sha256"]:
        raise ModelPackageError(
            f"sha256 mismatch for {str(path)!r}: model card says {card['sha256']}, file has {actual}; "
            "the model file was changed or corrupted after packaging: re-run the pipeline or restore the file"
        )
    return card
