"""Load, fingerprint, split and (de)serialise tabular training data.

A dataset is a pandas DataFrame of numeric feature columns plus one label column. Facts that must
travel with it between pipeline steps (label column, class names, source) live in ``df.attrs``,
which pandas stores in the Parquet file's metadata.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from serving.contract.errors import MlrolloutError

BUNDLED = "sklearn:breast_cancer"
DEFAULT_LABEL = "target"


class DataError(MlrolloutError, ValueError):
    """The data cannot be read or does not have the shape a step needs."""


def load_dataset(source: str = "", label_column: str = DEFAULT_LABEL) -> pd.DataFrame:
    """Load sklearn's bundled breast_cancer data (``source`` empty or ``sklearn:breast_cancer``)
    or a CSV / Parquet file by path. The label column must be present."""
    source = source.strip()
    if source in ("", BUNDLED):
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer(as_frame=True)
        df = bunch.frame.rename(columns={"target": label_column})
        class_names = [str(n) for n in bunch.target_names]
        source = BUNDLED
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"data file {source!r} does not exist (give a CSV or Parquet path)")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            df = pd.read_csv(path)
            # pandas renames repeated header names (x, x.1, x.2, ...): check the header as written
            header = pd.read_csv(path, header=None, nrows=1, dtype=str, na_filter=False)
            _refuse_duplicate_columns(header.iloc[0].tolist() if len(header) else [], source)
        elif suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            # pyarrow allows repeated field names; pandas then fails with a multi-line ArrowInvalid
            _refuse_duplicate_columns(pq.read_schema(path).names, source)
            df = pd.read_parquet(path)
        else:
            raise DataError(f"data file {source!r}: unsupported format {suffix!r} (use .csv or .parquet)")
        class_names = []
    _refuse_duplicate_columns([str(c) for c in df.columns], source)
    if label_column not in df.columns:
        raise DataError(
            f"label column {label_column!r} is not in the data "
            f"(columns: {', '.join(map(str, df.columns[:12]))}{' ...' if len(df.columns) > 12 else ''}); "
            "set the label column parameter"
        )
    df.columns = [str(c) for c in df.columns]
    df.attrs = {"source": source, "label_column": label_column, "class_names": class_names}
    return df


def _refuse_duplicate_columns(names: Iterable[str], source: str) -> None:
    """One line naming every column name that appears more than once (empty names are left to
    pandas, which calls them ``Unnamed: <i>``)."""
    counts = Counter(n for n in names if n != "")
    dups = [(n, c) for n, c in counts.items() if c > 1]
    if dups:
        shown = ", ".join(f"{n!r} ({c} times)" for n, c in dups[:10])
        more = f" and {len(dups) - 10} more" if len(dups) > 10 else ""
        raise DataError(
            f"data file {source!r} has duplicate column names: {shown}{more}; "
            "give every column a unique name (the names become the model's feature names)"
        )


def feature_columns(df: pd.DataFrame, label_column: str) -> list[str]:
    return [c for c in df.columns if c != label_column]


def fingerprint(df: pd.DataFrame) -> str:
    """sha256 over column names, dtypes and values: the same data gives the same fingerprint
    regardless of the file format it came from."""
    h = hashlib.sha256()
    h.update("\x1f".join(f"{c}:{t}" for c, t in zip(df.columns, df.dtypes.astype(str), strict=True)).encode())
    h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return "sha256:" + h.hexdigest()


def write_dataset(df: pd.DataFrame, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    df.to_parquet(path, index=False)


def read_dataset(path: str | os.PathLike) -> pd.DataFrame:
    return pd.read_parquet(path)


def encode_labels(df: pd.DataFrame, label_column: str) -> tuple[pd.DataFrame, list[str]]:
    """Map the label to int64 codes 0..k-1 (the ONNX ``label`` output is INT64).

    Integer labels that already are 0..k-1 keep their values. Returns (frame, class names)."""
    y = df[label_column]
    known = list(df.attrs.get("class_names") or [])
    values = sorted(pd.unique(y.dropna()).tolist(), key=lambda v: (str(type(v)), v))
    is_int = pd.api.types.is_integer_dtype(y) or pd.api.types.is_bool_dtype(y)
    if is_int and [int(v) for v in values] == list(range(len(values))):
        codes = y.astype(np.int64)
        names = known if len(known) == len(values) else [str(v) for v in values]
    else:
        mapping = {v: i for i, v in enumerate(values)}
        codes = y.map(mapping).astype(np.int64)
        names = [str(v) for v in values]
    out = df.copy()
    out[label_column] = codes
    out.attrs = dict(df.attrs, class_names=names, label_column=label_column)
    return out, names


def split_dataset(
    df: pd.DataFrame, label_column: str, test_size: float = 0.25, seed: int = 42
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Stratified, seeded train/test split; labels encoded to 0..k-1."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_size < 1.0:
        raise DataError(f"test size {test_size} must be between 0 and 1 (a fraction of the rows)")
    encoded, names = encode_labels(df, label_column)
    counts = encoded[label_column].value_counts()
    if len(counts) < 2 or counts.min() < 2:
        raise DataError(
            f"cannot stratify: every class needs at least 2 rows, got {counts.to_dict()}; add data"
        )
    train, test = train_test_split(
        encoded, test_size=test_size, random_state=seed, stratify=encoded[label_column]
    )
    for part in (train, test):
        part.attrs = dict(encoded.attrs, class_names=names)
    return train.reset_index(drop=True), test.reset_index(drop=True)


def xy(df: pd.DataFrame, label_column: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features as float64 (what sklearn sees in production), labels as int64, feature names."""
    features = feature_columns(df, label_column)
    return df[features].to_numpy(dtype=np.float64), df[label_column].to_numpy(dtype=np.int64), features
