"""Compile every pipeline in ``registry.PIPELINES`` to ``pipelines/compiled/<stem>.yaml``.

The embedded core archive (kfp ``embedded_artifact_path``) is a gzip'd tar whose bytes carry
file owners and the gzip time stamp, so two compiles of the same code differ byte-wise there and
nowhere else. :func:`normalize` swaps each archive for a digest of its members' names and
contents; a compiled file is rewritten only when that normalised form changed, so compiling twice
leaves git clean and a staleness check still sees every change to the embedded code.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import yaml

COMPILED_DIR = Path(__file__).resolve().parent / "compiled"
_ARCHIVE_RE = re.compile(r"__KFP_EMBEDDED_ARCHIVE_B64 = '([A-Za-z0-9+/=]+)'")


def archive_members(b64: str) -> dict[str, bytes]:
    """``{member name: content}`` of one embedded archive (regular files only)."""
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(base64.b64decode(b64))), mode="r:") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def embedded_archives(doc: Any) -> list[str]:
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            found.extend(_ARCHIVE_RE.findall(node))

    walk(doc)
    return found


def _digest(b64: str) -> str:
    h = hashlib.sha256()
    for name, content in sorted(archive_members(b64).items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return h.hexdigest()


def normalize(doc: Any) -> Any:
    """The document with each embedded archive replaced by a digest of its files."""
    if isinstance(doc, dict):
        return {k: normalize(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [normalize(v) for v in doc]
    if isinstance(doc, str) and "__KFP_EMBEDDED_ARCHIVE_B64" in doc:
        return _ARCHIVE_RE.sub(lambda m: f"__KFP_EMBEDDED_ARCHIVE_B64 = '<files:{_digest(m.group(1))}>'", doc)
    return doc


def load(path: str | Path) -> list[Any]:
    return list(yaml.safe_load_all(Path(path).read_text()))


def compile_one(pipeline_func: Any, path: str | Path) -> None:
    """Compile one pipeline (or component); a deferred one (``components._env``) is built, and its
    components' code staged, here."""
    from kfp import compiler

    from pipelines.components._env import built

    compiler.Compiler().compile(built(pipeline_func), str(path))


def compile_all(out_dir: Path = COMPILED_DIR) -> dict[str, str]:
    """Compile every registered pipeline; returns ``{stem: 'updated' | 'unchanged'}``."""
    from pipelines.registry import PIPELINES

    out_dir.mkdir(parents=True, exist_ok=True)
    status = {}
    for stem, func in PIPELINES.items():
        target = out_dir / f"{stem}.yaml"
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / f"{stem}.yaml"
            compile_one(func, fresh)
            if target.is_file() and normalize(load(target)) == normalize(load(fresh)):
                status[stem] = "unchanged"
                continue
            target.write_text(fresh.read_text())
            status[stem] = "updated"
    return status
