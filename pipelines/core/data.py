"""Load, fingerprint, split and (de)serialise tabular training data.

A dataset is a pandas DataFrame of numeric feature columns plus one label column. Facts that must
travel with it between pipeline steps (label column, class names, source) live in ``df.attrs``,
which pandas stores in the Parquet file's metadata.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from serving.contract.errors import MlrolloutError

BUNDLED = "sklearn:breast_cancer"
DEFAULT_LABEL = "target"
MAX_DOWNLOAD_BYTES = 2 << 30  # a data URL bigger than this is refused (the step's disk is not unbounded)


class DataError(MlrolloutError, ValueError):
    """The data cannot be read or does not have the shape a step needs."""


def load_dataset(source: str = "", label_column: str = DEFAULT_LABEL) -> pd.DataFrame:
    """Load sklearn's bundled breast_cancer data (``source`` empty or ``sklearn:breast_cancer``),
    a CSV / Parquet file by path, or one by ``https://`` URL (e.g. an object store's presigned URL).
    The label column must be present."""
    source = source.strip()
    if source in ("", BUNDLED):
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer(as_frame=True)
        df = bunch.frame.rename(columns={"target": label_column})
        class_names = [str(n) for n in bunch.target_names]
        source = BUNDLED
    elif is_url(source):
        with tempfile.TemporaryDirectory(prefix="mlrollout-data-") as tmp:
            df = _read_file(fetch(source, Path(tmp)), public_source(source))
        source = public_source(source)  # a presigned URL's query is a credential: never recorded
        class_names = []
    else:
        df = _read_file(Path(source), source)
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


def _read_file(path: Path, source: str) -> pd.DataFrame:
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
    return df


def is_url(source: str) -> bool:
    return "://" in source and not source.startswith("sklearn:")


def public_source(url: str) -> str:
    """The URL without user info, query or fragment: what may be printed and kept in a model card."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def fetch(url: str, dest_dir: Path, max_bytes: int = MAX_DOWNLOAD_BYTES, timeout_s: float = 60.0) -> Path:
    """Download ``url`` (https only) into ``dest_dir``; the format comes from the path's suffix."""
    shown = public_source(url)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https":
        raise DataError(
            f"data URL {shown!r}: only https:// URLs are fetched (an s3:// or minio:// URI needs credentials "
            "the step does not have; plain http can be altered on the way): give a presigned https URL "
            "(e.g. `mc share download` or `aws s3 presign`)"
        )
    suffix = Path(parts.path).suffix.lower()
    if suffix not in (".csv", ".parquet", ".pq"):
        raise DataError(
            f"data URL {shown!r}: the path must end in .csv or .parquet (the format is taken from it)"
        )
    dest = dest_dir / f"data{suffix}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r, open(dest, "wb") as f:
            got = 0
            while chunk := r.read(1 << 20):
                got += len(chunk)
                if got > max_bytes:
                    raise DataError(f"data URL {shown!r} is over {max_bytes >> 20} MiB: refused")
                f.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = (
            f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        )
        raise DataError(f"cannot download {shown!r}: {reason}") from None
    return dest


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
