"""Assemble the model card and write the model package (see ``modelcard`` for the contract)."""

from __future__ import annotations

import datetime as dt
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from pipelines.core import export
from serving.contract import modelcard

LIBRARIES = ("scikit-learn", "skl2onnx", "onnx", "onnxruntime", "numpy", "pandas")


def library_versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            continue
    return out


def build_card(
    *,
    name: str,
    version: str,
    onnx_bytes: bytes,
    feature_names: list[str],
    class_names: list[str],
    training_data: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    estimator: str = "",
    hyperparameters: dict[str, Any] | None = None,
    pipeline_run_id: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The card for ``onnx_bytes``; ``write_package`` fills in ``sha256``."""
    modelcard.check_name(name)
    modelcard.check_version(version)
    schema = export.io_schema(onnx_bytes)
    n_classes = len(class_names)
    inputs = [
        {
            "name": i["name"],
            "datatype": modelcard.ONNX_TO_V2.get(i["type"], i["type"]),
            "shape": [-1, len(feature_names)],
            "features": list(feature_names),
        }
        for i in schema["inputs"]
    ]
    shapes = {"label": [-1], "probabilities": [-1, n_classes]}
    outputs = [
        {
            "name": o["name"],
            "datatype": modelcard.ONNX_TO_V2.get(o["type"], o["type"]),
            "shape": shapes.get(o["name"], [-1]),
        }
        for o in schema["outputs"]
    ]
    card: dict[str, Any] = {
        "name": name,
        "version": version,
        "format": "onnx",
        "opset": export.opset(onnx_bytes),
        "task": "binary_classification" if n_classes == 2 else "multiclass_classification",
        "classes": list(range(n_classes)),
        "class_names": list(class_names),
        "inputs": inputs,
        "outputs": outputs,
        "training_data": dict(training_data),
        "metrics": dict(metrics or {}),
        "estimator": estimator,
        "hyperparameters": dict(hyperparameters or {}),
        "library_versions": library_versions(),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "pipeline_run_id": pipeline_run_id or "local",
    }
    card.update(extra or {})
    return card


def package(out_root: str | os.PathLike, card: dict[str, Any], onnx_bytes: bytes) -> Path:
    """Write ``<out_root>/<name>/1/model.onnx`` + ``model-card.json``; returns ``<out_root>/<name>``."""
    model_dir = modelcard.write_package(out_root, card, onnx_bytes)
    modelcard.verify_package(model_dir)
    return model_dir


def summary(card: dict[str, Any]) -> str:
    m = card.get("metrics") or {}
    p = card.get("parity") or {}
    metrics = ", ".join(f"{k} {m[k]:.4f}" for k in ("accuracy", "f1", "roc_auc", "log_loss") if k in m)
    td = card["training_data"]
    inp = card["inputs"][0]
    lines = [
        f"model      {card['name']} {card['version']} ({card.get('estimator')}, {card.get('task')})",
        f"sha256     {card['sha256']}",
        f"input      {inp['name']} {inp['datatype']} {inp['shape']}",
        "outputs    " + ", ".join(f"{o['name']} {o['datatype']} {o['shape']}" for o in card["outputs"]),
        f"classes    {', '.join(card.get('class_names', []))}",
        f"data       {td.get('source', '?')} rows={td.get('rows', '?')} {td.get('fingerprint', '')[:23]}",
        f"metrics    {metrics}",
    ]
    if p:
        lines.append(
            f"parity     max|dp| {p['max_abs_prob_diff']:.2e}, label agreement {p['label_agreement']:.4f} "
            f"on {p['rows']} held-out rows"
        )
    lines.append(f"run        {card.get('pipeline_run_id', '')}  created {card.get('created_at', '')}")
    return "\n".join(lines)
