"""Where a rollout's state lives, so a restarted controller resumes where it stopped.

* :class:`FileStateStore`: a JSON file (local stack, tests); updates hold an ``flock`` and
  replace the file atomically, so the CLI (``pause``, ``abort``, ...) and a running controller
  never lose each other's writes.
* :class:`ConfigMapStore`: the key ``state`` of a ConfigMap (``<fullname>-rollout`` for a chart
  release) owned by the stable InferenceService, so ``helm uninstall`` garbage-collects it. Not an
  InferenceService annotation: KServe copies every InferenceService annotation into the predictor's
  pod template (components/predictor.go), so each state write would restart the stable pods (and, in
  Knative mode, create a revision). Updates carry ``metadata.resourceVersion`` (optimistic
  concurrency: a 409 means someone else wrote first, so re-read and re-apply).

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

from serving.rollout import kube

STATE_KEY = "state"
# A ConfigMap holds at most 1 MiB (data and metadata together); stay well under it
STATE_BUDGET = 512_000

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


def _trim(record: Record, budget: int = STATE_BUDGET) -> str:
    """The record as compact JSON, dropping the oldest decisions until it fits ``budget`` bytes."""
    rec = json.loads(json.dumps(record))
    text = json.dumps(rec, separators=(",", ":"), sort_keys=True, allow_nan=False)
    hist = (rec.get("state") or {}).get("history", [])
    while len(text) > budget and len(hist) > 1:
        del hist[: max(1, len(hist) // 4)]  # keep the most recent decisions
        rec["timeline"] = rec.get("timeline", [])[-len(hist) :]
        text = json.dumps(rec, separators=(",", ":"), sort_keys=True, allow_nan=False)
    return text


class ConfigMapStore:
    """The key ``state`` of ConfigMap ``name``, created on first write, owned by ``owner_isvc``."""

    def __init__(
        self,
        name: str,
        namespace: str,
        owner_isvc: str = "",
        api: Any = None,
        kubeconfig: str | None = None,
    ):
        self.name, self.namespace, self.owner_isvc, self.kubeconfig = name, namespace, owner_isvc, kubeconfig
        self.api = api or kube.custom_api(kubeconfig)
        self.core = kube.core_api(self.api)

    def describe(self) -> dict[str, Any]:
        return {
            "store": "configmap",
            "name": self.name,
            "namespace": self.namespace,
            "owner_isvc": self.owner_isvc,
            "kubeconfig": self.kubeconfig,
        }

    def _get(self):
        try:
            return self.core.read_namespaced_config_map(self.name, self.namespace)
        except Exception as e:
            if kube.is_not_found(e):
                return None
            raise

    @staticmethod
    def _parse(cm) -> Record | None:
        raw = (cm.data or {}).get(STATE_KEY) if cm is not None else None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise StoreError(
                f"ConfigMap {cm.metadata.namespace}/{cm.metadata.name} key {STATE_KEY} is not JSON ({e})"
            ) from e

    def load(self) -> Record | None:
        return self._parse(self._get())

    def _owner(self) -> list[dict]:
        if not self.owner_isvc:
            return []
        isvc = kube.get(self.api, kube.ISVC, self.namespace, self.owner_isvc)
        if isvc is None:
            raise StoreError(
                f"InferenceService {self.namespace}/{self.owner_isvc} (the state's owner) does not exist"
            )
        g, v, _ = kube.ISVC
        return [
            {
                "apiVersion": f"{g}/{v}",
                "kind": "InferenceService",
                "name": self.owner_isvc,
                "uid": isvc["metadata"]["uid"],
            }
        ]

    def update(self, fn: Callable[[Record | None], Record]) -> Record:
        def attempt() -> Record:
            cm = self._get()
            new = fn(self._parse(cm))
            data = {STATE_KEY: _trim(new)}
            if cm is None:
                body = {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {
                        "name": self.name,
                        "namespace": self.namespace,
                        "labels": {"app.kubernetes.io/managed-by": kube.FIELD_MANAGER},
                        "ownerReferences": self._owner(),
                    },
                    "data": data,
                }
                self.core.create_namespaced_config_map(self.namespace, body, field_manager=kube.FIELD_MANAGER)
            else:
                body = {"metadata": {"resourceVersion": cm.metadata.resource_version}, "data": data}
                self.core.patch_namespaced_config_map(
                    self.name, self.namespace, body, field_manager=kube.FIELD_MANAGER
                )
            return new

        try:
            return kube.retry_on_conflict(attempt, f"ConfigMap {self.namespace}/{self.name}")
        except kube.KubeError as e:
            raise StoreError(str(e)) from e
