"""Data validation: named rules with measured values and thresholds, a JSON + Markdown report.

Every rule is hard: when one breaks, :func:`raise_for_report` raises :class:`DataValidationError`
whose message names each broken rule with its numbers, so a pipeline run fails loudly instead of
training on bad data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from serving.contract.errors import MlrolloutError


class DataValidationError(MlrolloutError, ValueError):
    """One or more hard data-validation rules broke."""


@dataclass(frozen=True)
class Thresholds:
    min_rows: int = 100
    max_missing_fraction: float = 0.05  # per column
    max_duplicate_fraction: float = 0.05  # share of rows that repeat an earlier row
    max_outlier_fraction: float = 0.10  # per column, share of values outside the fences
    outlier_method: str = "iqr"  # "iqr" (Tukey fences, k * IQR) or "robust_z" (median/MAD z-score)
    outlier_k: float = 3.0  # IQR multiplier, or robust z-score limit
    min_class_fraction: float = 0.05  # the rarest class must hold at least this share of rows
    expected_columns: list[str] = field(default_factory=list)  # empty: no column-set check


def _rule(name: str, passed: bool, value: Any, threshold: Any, message: str) -> dict[str, Any]:
    return {"rule": name, "passed": bool(passed), "value": value, "threshold": threshold, "message": message}


def outlier_fractions(X: pd.DataFrame, method: str = "iqr", k: float = 3.0) -> dict[str, float]:
    """Per-column share of values outside Tukey fences (``q1 - k*IQR``, ``q3 + k*IQR``) or with a
    robust z-score ``0.6745 * |x - median| / MAD`` above ``k``. Columns with zero spread are skipped."""
    out: dict[str, float] = {}
    for col in X.columns:
        v = X[col].to_numpy(dtype=np.float64, na_value=np.nan)
        v = v[np.isfinite(v)]  # NaN is missing_values' business, +inf/-inf finite_values'
        if v.size == 0:
            continue
        if method == "iqr":
            q1, q3 = np.percentile(v, [25, 75])
            spread = q3 - q1
            if spread == 0:
                continue
            frac = float(np.mean((v < q1 - k * spread) | (v > q3 + k * spread)))
        elif method == "robust_z":
            med = np.median(v)
            mad = np.median(np.abs(v - med))
            if mad == 0:
                continue
            frac = float(np.mean(np.abs(0.6745 * (v - med) / mad) > k))
        else:
            raise ValueError(f"unknown outlier method {method!r}: use 'iqr' or 'robust_z'")
        out[str(col)] = frac
    return out


def _worst(d: dict[str, float], n: int = 3) -> str:
    items = sorted(d.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{k}={v:.3f}" for k, v in items)


def validate(df: pd.DataFrame, label_column: str, thresholds: Thresholds | None = None) -> dict[str, Any]:
    """Check the data against every rule; returns the report (never raises for rule failures)."""
    t = thresholds or Thresholds()
    rules: list[dict[str, Any]] = []
    rows = len(df)
    features = [c for c in df.columns if c != label_column]

    missing_cols = [c for c in t.expected_columns if c not in df.columns]
    if label_column not in df.columns:
        missing_cols.append(label_column)
    rules.append(
        _rule(
            "required_columns",
            not missing_cols,
            missing_cols,
            "none missing",
            f"missing column(s): {', '.join(missing_cols)}"
            if missing_cols
            else "all expected columns present",
        )
    )

    non_numeric = [
        f"{c} ({df[c].dtype})"
        for c in features
        if not (pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_complex_dtype(df[c]))
    ]
    rules.append(
        _rule(
            "numeric_features",
            not non_numeric,
            non_numeric,
            "numeric dtypes",
            f"non-numeric feature column(s): {', '.join(non_numeric)}"
            if non_numeric
            else f"{len(features)} numeric feature columns",
        )
    )

    rules.append(
        _rule(
            "min_rows",
            rows >= t.min_rows,
            rows,
            t.min_rows,
            f"{rows} rows, fewer than the minimum {t.min_rows}" if rows < t.min_rows else f"{rows} rows",
        )
    )

    present = [c for c in df.columns if c in features or c == label_column]
    missing = {str(c): float(df[c].isna().mean()) for c in present} if rows else {}
    over = {c: f for c, f in missing.items() if f > t.max_missing_fraction}
    label_missing = int(df[label_column].isna().sum()) if label_column in df.columns else 0
    rules.append(
        _rule(
            "missing_values",
            not over and label_missing == 0,
            {"max_fraction": max(missing.values(), default=0.0), "label_missing": label_missing},
            t.max_missing_fraction,
            (
                f"missing values over {t.max_missing_fraction:.3f} in {len(over)} column(s): {_worst(over)}"
                if over
                else f"{label_missing} row(s) without a label"
                if label_missing
                else f"missing values at most {max(missing.values(), default=0.0):.3f} per column"
            ),
        )
    )

    numeric = [c for c in features if c in df.columns and pd.api.types.is_numeric_dtype(df[c])]
    infinite: dict[str, int] = {}  # sklearn refuses +inf/-inf at fit time; the imputer fills only NaN
    for c in numeric:
        if pd.api.types.is_complex_dtype(df[c]):
            continue  # numeric_features already refuses it
        n = int(np.isinf(df[c].to_numpy(dtype=np.float64, na_value=np.nan)).sum())
        if n:
            infinite[str(c)] = n
    n_inf = sum(infinite.values())
    rules.append(
        _rule(
            "finite_values",
            not infinite,
            {"cells": n_inf, "columns": infinite},
            0,
            (
                f"{n_inf} infinite value(s) (+inf/-inf) in {len(infinite)} feature column(s): "
                + ", ".join(f"{c}={n}" for c, n in sorted(infinite.items(), key=lambda kv: -kv[1])[:3])
                + (" ..." if len(infinite) > 3 else "")
                + "; replace them with a finite value or leave the cell empty (imputed)"
            )
            if infinite
            else "no infinite feature values",
        )
    )

    dup = float(df.duplicated().mean()) if rows else 0.0
    rules.append(
        _rule(
            "duplicate_rows",
            dup <= t.max_duplicate_fraction,
            dup,
            t.max_duplicate_fraction,
            f"{int(df.duplicated().sum())} duplicate rows ({dup:.3f} of {rows}), "
            f"over {t.max_duplicate_fraction:.3f}"
            if dup > t.max_duplicate_fraction
            else f"duplicate rows {dup:.3f}",
        )
    )

    fractions = outlier_fractions(df[numeric], t.outlier_method, t.outlier_k) if numeric and rows else {}
    out_over = {c: f for c, f in fractions.items() if f > t.max_outlier_fraction}
    rules.append(
        _rule(
            "outliers",
            not out_over,
            {"max_fraction": max(fractions.values(), default=0.0)},
            {"max_fraction": t.max_outlier_fraction, "method": t.outlier_method, "k": t.outlier_k},
            (
                f"outliers ({t.outlier_method}, k={t.outlier_k}) over {t.max_outlier_fraction:.3f} in "
                f"{len(out_over)} column(s): {_worst(out_over)}"
            )
            if out_over
            else f"outliers at most {max(fractions.values(), default=0.0):.3f} per column",
        )
    )

    counts = (
        df[label_column].value_counts(dropna=True) if label_column in df.columns else pd.Series(dtype=int)
    )
    n_classes = len(counts)
    rules.append(
        _rule(
            "class_count",
            n_classes >= 2,
            n_classes,
            2,
            f"a single class ({counts.index[0]}) in label column {label_column!r}: "
            "a classifier needs 2 or more"
            if n_classes == 1
            else f"no labels in column {label_column!r}"
            if n_classes == 0
            else f"{n_classes} classes",
        )
    )
    shares = {str(k): float(v) / max(int(counts.sum()), 1) for k, v in counts.items()}
    minority = min(shares.values(), default=0.0)
    rules.append(
        _rule(
            "label_balance",
            n_classes < 2 or minority >= t.min_class_fraction,
            shares,
            t.min_class_fraction,
            f"rarest class holds {minority:.3f} of rows, under {t.min_class_fraction:.3f} ({shares})"
            if n_classes >= 2 and minority < t.min_class_fraction
            else f"class shares {shares}",
        )
    )

    failed = [r for r in rules if not r["passed"]]
    return {
        "passed": not failed,
        "rows": rows,
        "columns": len(df.columns),
        "label_column": label_column,
        "thresholds": asdict(t),
        "rules": rules,
        "failed": [r["rule"] for r in failed],
    }


def raise_for_report(report: dict[str, Any]) -> None:
    failed = [r for r in report["rules"] if not r["passed"]]
    if failed:
        detail = "; ".join(f"{r['rule']}: {r['message']}" for r in failed)
        raise DataValidationError(f"data validation failed ({len(failed)} rule(s)): {detail}")


def report_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Data validation: {'PASSED' if report['passed'] else 'FAILED'}",
        "",
        f"{report['rows']} rows, {report['columns']} columns, label `{report['label_column']}`.",
        "",
        "| rule | result | detail |",
        "| --- | --- | --- |",
    ]
    for r in report["rules"]:
        lines.append(f"| {r['rule']} | {'pass' if r['passed'] else '**FAIL**'} | {r['message']} |")
    return "\n".join(lines) + "\n"
