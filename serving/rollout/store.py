"""Where a rollout's state lives, so a restarted controller resumes where it stopped.

* :class:`FileStateStore`: a JSON file (local stack, tests); updates hold an ``flock`` and
  replace the file atomically, so the CLI (``pause``, ``abort``, ...) and a running controller
  never lose each other's writes.
* :class:`IsvcAnnotationStore`: the annotation ``rollout.mlrollout.io/state`` on the stable
  InferenceService; updates carry ``metadata.resourceVersion`` (optimistic concurrency: a 409
  means someone else wrote first, so re-read and re-apply).

Both offer ``load()`` and ``update(fn)`` where ``fn(record_or_None) -> record``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from serving.rollout.routers import FIELD_MANAGER

STATE_ANNOTATION = "rollout.mlrollout.io/state"
ANNOTATION_BUDGET = 200_000  # Kubernetes caps all annotations of an object at 256 KiB together

Record = dict[str, Any]


class StoreError(RuntimeError):
    pass


class StateStore(Protocol):
    def load(self) -> Record | None: ...

    def update(self, fn: Callable[[Record | None], Record]) -> Record: ...

    def describe(self) -> dict[str, Any]: ...


class FileStateStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def describe(self) -> dict[str, Any]:
        return {"store": "file", "path": str(self.path)}

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> Record | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as e:
            raise StoreError(f"rollout state file {self.path} is not valid JSON ({e}); move it away") from e

    def load(self) -> Record | None:
        with self._locked():
            return self._read()

    def update(self, fn: Callable[[Record | None], Record]) -> Record:
        with self._locked():
            new = fn(self._read())
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(new, f, indent=1, sort_keys=True, allow_nan=False)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return new


def _trim_for_annotation(record: Record) -> str:
    rec = json.loads(json.dumps(record))
    text = json.dumps(rec, separators=(",", ":"), sort_keys=True, allow_nan=False)
    hist = (rec.get("state") or {}).get("history", [])
    while len(text) > ANNOTATION_BUDGET and len(hist) > 1:
        del hist[: max(1, len(hist) // 4)]  # keep the most recent decisions
        rec["timeline"] = rec.get("timeline", [])[-len(hist) :]
        text = json.dumps(rec, separators=(",", ":"), sort_keys=True, allow_nan=False)
    return text


class IsvcAnnotationStore:
    """The annotation ``rollout.mlrollout.io/state`` on the stable InferenceService."""

    def __init__(self, isvc: str, namespace: str, api: Any = None, kubeconfig: str | None = None):
        from serving.rollout.routers import _k8s_custom_api

        self.isvc, self.namespace, self.kubeconfig = isvc, namespace, kubeconfig
        self.api = api or _k8s_custom_api(kubeconfig)

    def describe(self) -> dict[str, Any]:
        return {
            "store": "isvc",
            "isvc": self.isvc,
            "namespace": self.namespace,
            "kubeconfig": self.kubeconfig,
        }

    def _get(self) -> dict:
        return self.api.get_namespaced_custom_object(
            "serving.kserve.io", "v1beta1", self.namespace, "inferenceservices", self.isvc
        )

    @staticmethod
    def _parse(obj: dict) -> Record | None:
        raw = (obj.get("metadata", {}).get("annotations") or {}).get(STATE_ANNOTATION)
        return json.loads(raw) if raw else None

    def load(self) -> Record | None:
        return self._parse(self._get())

    def update(self, fn: Callable[[Record | None], Record]) -> Record:
        for _ in range(10):
            obj = self._get()
            new = fn(self._parse(obj))
            body = {
                "metadata": {
                    "resourceVersion": obj["metadata"]["resourceVersion"],
                    "annotations": {STATE_ANNOTATION: _trim_for_annotation(new)},
                }
            }
            try:
                self.api.patch_namespaced_custom_object(
                    "serving.kserve.io",
                    "v1beta1",
                    self.namespace,
                    "inferenceservices",
                    self.isvc,
                    body,
                    field_manager=FIELD_MANAGER,
                )
                return new
            except Exception as e:
                if getattr(e, "status", None) != 409:
                    raise
        raise StoreError(f"InferenceService {self.namespace}/{self.isvc} kept changing (10 write conflicts)")


def build_store(cfg: dict[str, Any], api: Any = None) -> StateStore:
    cfg = dict(cfg)
    kind = cfg.pop("store")
    if kind == "file":
        return FileStateStore(cfg["path"])
    if kind == "isvc":
        return IsvcAnnotationStore(**cfg, api=api)
    raise ValueError(f"unknown state store {kind!r}")
