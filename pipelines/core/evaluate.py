"""Evaluate a fitted classifier on held-out data, gate it, and draw the plots people look at."""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from serving.contract.errors import MlrolloutError

GATED_METRICS = ("accuracy", "f1", "roc_auc")


class GateError(MlrolloutError, ValueError):
    """The model is below the quality thresholds or worse than the baseline (the model now serving)."""


@dataclass(frozen=True)
class GateThresholds:
    min_accuracy: float = 0.90
    min_f1: float = 0.90
    min_roc_auc: float = 0.95
    max_regression: float = 0.01  # allowed drop vs the baseline for accuracy, f1 and roc_auc


def _scores(y: np.ndarray, proba: np.ndarray, pred: np.ndarray, n_classes: int) -> dict[str, float]:
    from sklearn import metrics as m

    binary = n_classes == 2
    avg = "binary" if binary else "macro"
    out = {
        "accuracy": m.accuracy_score(y, pred),
        "precision": m.precision_score(y, pred, average=avg, zero_division=0),
        "recall": m.recall_score(y, pred, average=avg, zero_division=0),
        "f1": m.f1_score(y, pred, average=avg, zero_division=0),
        "log_loss": m.log_loss(y, proba, labels=list(range(n_classes))),
    }
    try:
        out["roc_auc"] = (
            m.roc_auc_score(y, proba[:, 1])
            if binary
            else m.roc_auc_score(y, proba, multi_class="ovr", labels=list(range(n_classes)))
        )
    except ValueError:  # one class only in this slice
        out["roc_auc"] = float("nan")
    return {k: float(v) for k, v in out.items()}


def evaluate(
    model: Any,
    X: np.ndarray,
    y: np.ndarray,
    class_names: list[str],
    feature_names: list[str],
    slice_feature: str = "",
) -> dict[str, Any]:
    """Headline metrics, per-class metrics, the confusion matrix, the ROC curve (binary or
    positive-vs-rest) and metrics on two slices of the data (``slice_feature`` <= / > its median)."""
    from sklearn import metrics as m

    n_classes = len(class_names)
    proba = model.predict_proba(X)
    bad = ~np.isfinite(proba).all(axis=1)
    if bad.any():
        raise ValueError(
            f"the model returned non-finite probabilities for {int(bad.sum())} of {len(X)} held-out rows: "
            "choose another estimator or hyperparameters"
        )
    pred = np.asarray(model.classes_)[np.argmax(proba, axis=1)]
    result: dict[str, Any] = {"metrics": _scores(y, proba, pred, n_classes), "rows": len(y)}

    p, r, f, s = m.precision_recall_fscore_support(y, pred, labels=list(range(n_classes)), zero_division=0)
    result["per_class"] = {
        class_names[i]: {
            "precision": float(p[i]),
            "recall": float(r[i]),
            "f1": float(f[i]),
            "support": int(s[i]),
        }
        for i in range(n_classes)
    }
    result["confusion_matrix"] = {
        "labels": list(class_names),
        "matrix": m.confusion_matrix(y, pred, labels=list(range(n_classes))).tolist(),
    }
    pos = n_classes - 1 if n_classes == 2 else int(np.argmax(np.bincount(y, minlength=n_classes)))
    fpr, tpr, thr = m.roc_curve(y == pos, proba[:, pos])
    thr = np.where(np.isfinite(thr), thr, 1.0)
    result["roc_curve"] = {
        "positive_class": class_names[pos],
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
        "thresholds": thr.tolist(),
    }

    feature = slice_feature or feature_names[0]
    if feature not in feature_names:
        raise ValueError(
            f"slice feature {feature!r} is not a feature (features: {', '.join(feature_names[:8])} ...)"
        )
    col = X[:, feature_names.index(feature)]
    cut = float(np.nanmedian(col))
    result["slices"] = {}
    for name, mask in ((f"{feature} <= {cut:.4g}", col <= cut), (f"{feature} > {cut:.4g}", col > cut)):
        if mask.sum() == 0:
            continue
        sm = _scores(y[mask], proba[mask], pred[mask], n_classes)
        result["slices"][name] = {"rows": int(mask.sum()), "accuracy": sm["accuracy"], "f1": sm["f1"]}
    return result


def gate(
    metrics: dict[str, float],
    thresholds: GateThresholds | None = None,
    baseline_card: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Absolute thresholds, then (with a baseline card) no metric worse than baseline - max_regression."""
    t = thresholds or GateThresholds()
    checks = []
    for name, floor in (("accuracy", t.min_accuracy), ("f1", t.min_f1), ("roc_auc", t.min_roc_auc)):
        v = metrics[name]
        checks.append(
            {"check": f"{name} >= {floor}", "passed": bool(v >= floor), "value": v, "threshold": floor}
        )
    baseline_ref = None
    if baseline_card:
        bm = baseline_card.get("metrics") or {}
        baseline_ref = f"{baseline_card.get('name', '?')}@{baseline_card.get('version', '?')}"
        for name in GATED_METRICS:
            b = bm.get(name)
            if not isinstance(b, int | float) or math.isnan(b):
                checks.append(
                    {
                        "check": f"{name} vs baseline {baseline_ref}",
                        "passed": True,
                        "value": metrics[name],
                        "threshold": None,
                        "note": "baseline card has no value: not compared",
                    }
                )
                continue
            floor = float(b) - t.max_regression
            checks.append(
                {
                    "check": f"{name} >= baseline {baseline_ref} {b:.4f} - {t.max_regression}",
                    "passed": bool(metrics[name] >= floor),
                    "value": metrics[name],
                    "threshold": floor,
                }
            )
    return {
        "passed": all(c["passed"] for c in checks),
        "checks": checks,
        "baseline": baseline_ref,
        "thresholds": asdict(t),
    }


def raise_for_gate(result: dict[str, Any]) -> None:
    failed = [c for c in result["checks"] if not c["passed"]]
    if failed:
        detail = "; ".join(f"{c['check']} failed (got {c['value']:.4f})" for c in failed)
        raise GateError(f"evaluation gate failed: {detail}")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def plots(result: dict[str, Any]) -> dict[str, bytes]:
    """Confusion matrix and ROC curve as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.array(result["confusion_matrix"]["matrix"])
    labels = result["confusion_matrix"]["labels"]
    fig, ax = plt.subplots(figsize=(4, 3.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                color="white" if cm[i, j] > cm.max() / 2 else "black",
            )
    ax.set_title("Confusion matrix (held-out)")
    cm_png = _png(fig)
    plt.close(fig)

    roc = result["roc_curve"]
    fig, ax = plt.subplots(figsize=(4, 3.5))
    ax.plot(roc["fpr"], roc["tpr"], label=f"AUC {result['metrics']['roc_auc']:.4f}")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC ({roc['positive_class']})")
    ax.legend(loc="lower right")
    roc_png = _png(fig)
    plt.close(fig)
    return {"confusion_matrix.png": cm_png, "roc_curve.png": roc_png}


def report_html(result: dict[str, Any], gate_result: dict[str, Any], pngs: dict[str, bytes]) -> str:
    # class, slice and check names come from the user's data (label values, column names): escaped, so
    # "mean radius <= 13.59" is valid HTML and a column named "<script>" stays text in the KFP UI
    esc = html.escape
    rows = "".join(f"<tr><td>{esc(k)}</td><td>{v:.4f}</td></tr>" for k, v in result["metrics"].items())
    per_class = "".join(
        f"<tr><td>{esc(str(c))}</td><td>{v['precision']:.4f}</td><td>{v['recall']:.4f}</td><td>{v['f1']:.4f}</td>"
        f"<td>{v['support']}</td></tr>"
        for c, v in result["per_class"].items()
    )
    slices = "".join(
        f"<tr><td>{esc(k)}</td><td>{v['rows']}</td><td>{v['accuracy']:.4f}</td><td>{v['f1']:.4f}</td></tr>"
        for k, v in result["slices"].items()
    )
    checks = "".join(
        f"<li>{'PASS' if c['passed'] else 'FAIL'}: {esc(c['check'])} (got {c['value']:.4f})</li>"
        for c in gate_result["checks"]
    )
    imgs = "".join(
        f'<img alt="{n}" src="data:image/png;base64,{base64.b64encode(b).decode()}"/>'
        for n, b in pngs.items()
    )
    return (
        "<html><head><meta charset='utf-8'><title>Evaluation</title></head><body>"
        f"<h2>Evaluation on {result['rows']} held-out rows: "
        f"gate {'PASSED' if gate_result['passed'] else 'FAILED'}</h2>"
        f"<table border='1'><tr><th>metric</th><th>value</th></tr>{rows}</table>"
        f"<h3>Per class</h3><table border='1'><tr><th>class</th><th>precision</th><th>recall</th><th>f1</th>"
        f"<th>support</th></tr>{per_class}</table>"
        f"<h3>Slices</h3><table border='1'><tr><th>slice</th><th>rows</th><th>accuracy</th><th>f1</th></tr>"
        f"{slices}</table><h3>Gate</h3><ul>{checks}</ul>{imgs}</body></html>"
    )


def load_baseline(baseline: str) -> dict[str, Any] | None:
    """The baseline model card from a JSON string, a ``model-card.json`` path or a package folder;
    ``None`` for an empty string."""
    import json
    from pathlib import Path

    from serving.contract import modelcard

    baseline = (baseline or "").strip()
    if not baseline:
        return None
    if baseline.startswith("{"):
        try:
            card = json.loads(baseline)
        except json.JSONDecodeError as e:
            raise ValueError(f"baseline card is not valid JSON: {e}") from e
        if not isinstance(card, dict):
            raise ValueError("baseline card must be a JSON object (a model card)")
        return card
    path = Path(baseline)
    if path.is_file():
        return (
            modelcard.load_card(path.parent)
            if path.name == modelcard.MODEL_CARD_FILE
            else json.loads(path.read_text())
        )
    if path.is_dir():
        return modelcard.load_card(modelcard.find_package(path))
    raise ValueError(
        f"baseline card {baseline!r} is neither a JSON object nor an existing model-card.json "
        "or package folder"
    )
