"""A realistic bad canary for tests and the demo: the same model with its classes swapped.

The failure it stands for is a label-encoding bug (classes mapped in the wrong order at training
or export time): the model loads, answers fast and without errors, so health checks, success
rate and latency all pass. Only its predictions are wrong, which the drift gate sees as a
mirrored score distribution. It is built by editing the ONNX graph of a real package: the
``probabilities`` columns are reversed and ``label`` is re-derived from them.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from serving.contract import modelcard


def swap_classes(model: onnx.ModelProto, n_classes: int, classes: list[int]) -> onnx.ModelProto:
    m = copy.deepcopy(model)
    g = m.graph
    outs = {o.name for o in g.output}
    if not {"label", "probabilities"} <= outs:
        raise ValueError(
            f"expected outputs 'label' and 'probabilities' (the package contract), got {sorted(outs)}"
        )
    for node in g.node:
        node.output[:] = [
            {"label": "label_orig", "probabilities": "probabilities_orig"}.get(o, o) for o in node.output
        ]
    g.initializer.extend(
        [
            numpy_helper.from_array(np.arange(n_classes - 1, -1, -1, dtype=np.int64), "swap_order"),
            numpy_helper.from_array(np.asarray(classes, dtype=np.int64), "swap_classes"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("Gather", ["probabilities_orig", "swap_order"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["probabilities"], ["swap_argmax"], axis=1, keepdims=0),
            helper.make_node("Gather", ["swap_classes", "swap_argmax"], ["label"], axis=0),
        ]
    )
    onnx.checker.check_model(m)
    return m


def build_swapped_package(src_pkg: str | os.PathLike, out_root: str | os.PathLike, version: str) -> Path:
    """Write ``<out_root>/<name>`` holding ``src_pkg``'s model with its classes swapped, at ``version``."""
    src = modelcard.find_package(src_pkg)
    card = modelcard.verify_package(src)
    model = onnx.load(str(modelcard.onnx_path(src)))
    classes = [int(c) for c in card["classes"]]
    swapped = swap_classes(model, len(classes), classes)
    new_card = {k: v for k, v in card.items() if k != "sha256"}
    new_card["version"] = modelcard.check_version(version)
    new_card["estimator"] = f"{card.get('estimator', 'model')} (classes swapped: a deliberately bad canary)"
    return modelcard.write_package(out_root, new_card, swapped.SerializeToString())


def with_version(
    src_pkg: str | os.PathLike, out_root: str | os.PathLike, version: str, note: str = ""
) -> Path:
    """The same model re-packaged under another version (e.g. a canary that gets injected faults)."""
    src = modelcard.find_package(src_pkg)
    card = modelcard.verify_package(src)
    new_card = {k: v for k, v in card.items() if k != "sha256"}
    new_card["version"] = modelcard.check_version(version)
    if note:
        new_card["estimator"] = f"{card.get('estimator', 'model')} ({note})"
    return modelcard.write_package(out_root, new_card, modelcard.onnx_path(src).read_bytes())
