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

Both offer ``load()`` and ``update(fn)`` where ``fn(record_or_None) -> record`` (``None`` removes the
record), and ``update_with(fn)`` where ``fn(record_or_None) -> (record, result)`` and which returns
``(record, result)``. ``load()`` is read-only: it creates no folder, no lock file, no ConfigMap.

Records are :class:`~serving.rollout.record.RolloutRecord` objects; this module is the only place they
become JSON or come back from it. Every record read is checked by
:func:`~serving.rollout.record.validate_record` on its JSON first (:class:`CorruptRecord` naming the
field when it fails; ``corrupt_ok=True`` treats such a record as absent, for ``start --force``).

Both also offer exclusive controller ownership, ``acquire(holder) / release()``, held for a controller's
lifetime (operator commands do not take it: they only update the record, under the per-update lock):

* :class:`FileStateStore`: ``fcntl.flock(LOCK_EX | LOCK_NB)`` on a separate lock file
  ``<state file>.owner`` that holds the owner's PID. The kernel drops the lock when the process
  dies, even by SIGKILL, so a new controller can take over at once.
* :class:`ConfigMapStore`: an owner annotation on the ConfigMap (holder id, PID, host, heartbeat time),
  renewed by :meth:`ConfigMapStore.heartbeat`. Another holder is refused while the heartbeat is
  fresh: younger than 3 analysis intervals, and at least 30 s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from serving.contract.errors import MlrolloutError
from serving.rollout import kube
from serving.rollout.record import RecordError, RolloutRecord

STATE_KEY = "state"
# A ConfigMap holds at most 1 MiB (data and metadata together); stay well under it
STATE_BUDGET = 512_000
# the ConfigMap annotation that records which controller owns the rollout
OWNER_ANNOTATION = "mlrollout.io/rollout-owner"
# a ConfigMap owner's heartbeat is fresh for max(OWNER_TTL_INTERVALS x interval, MIN_OWNER_TTL_S)
OWNER_TTL_INTERVALS = 3
MIN_OWNER_TTL_S = 30.0

Record = RolloutRecord
R = TypeVar("R")
DEFAULT_HINT = "move it away or fix it"


class StoreError(MlrolloutError, RuntimeError):
    pass


class OwnershipError(StoreError):
    """Another controller owns this rollout (or took it over from us)."""


class CorruptRecord(StoreError):
    """The stored JSON is not a valid rollout record; the message names the place and the field."""

    def __init__(self, where: str, problem: RecordError, hint: str = DEFAULT_HINT):
        super().__init__(f"corrupt rollout record in {where}: {problem}; {hint}")
        self.where, self.problem = where, problem

    def hinted(self, hint: str) -> CorruptRecord:
        """The same error, ending with another hint."""
        return CorruptRecord(self.where, self.problem, hint)


def decode(obj: Any, where: str, corrupt_ok: bool = False) -> Record | None:
    """The record of decoded JSON ``obj`` (None for none), checked by ``validate_record`` first."""
    if obj is None:
        return None
    try:
        return RolloutRecord.from_dict(obj, owned=True)
    except RecordError as e:
        if corrupt_ok:
            return None
        raise CorruptRecord(where, e) from None


def _encode(rec: Any) -> dict[str, Any]:
    if not isinstance(rec, RolloutRecord):
        raise TypeError(f"a store holds RolloutRecord objects, not {type(rec).__name__}")
    return rec.to_dict(copied=False)


class StateStore(Protocol):
    held: bool  # this store object holds the controller ownership

    def load(self, *, corrupt_ok: bool = False) -> Record | None: ...

    def update(
        self, fn: Callable[[Record | None], Record | None], *, corrupt_ok: bool = False
    ) -> Record | None: ...

    def update_with(
        self, fn: Callable[[Record | None], tuple[Record | None, R]], *, corrupt_ok: bool = False
    ) -> tuple[Record | None, R]:
        """Like ``update``, for an ``fn`` that also computes a result: returns ``(record, result)``."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def where(self) -> str:
        """The state's location in words, for messages."""
        ...

    def acquire(self, holder: str, interval_s: float = 30.0) -> None:
        """Become the rollout's only controller, or raise :class:`OwnershipError` naming the holder."""
        ...

    def heartbeat(self) -> None:
        """Renew the ownership (raises :class:`OwnershipError` if another holder took it)."""
        ...

    def release(self) -> None: ...

    def owner(self) -> dict[str, Any] | None:
        """The live owner (pid, host, holder, ...) or None; read-only."""
        ...


def owner_ttl(interval_s: float) -> float:
    return max(OWNER_TTL_INTERVALS * float(interval_s), MIN_OWNER_TTL_S)


def _owner_info(holder: str, now: float) -> dict[str, Any]:
    return {"holder": holder, "pid": os.getpid(), "host": socket.gethostname(), "since": now}


def _held_by(info: dict[str, Any] | None) -> str:
    if not info:
        return "another controller (PID unknown)"
    since = info.get("since")
    when = ""
    if isinstance(since, int | float):
        when = ", since " + dt.datetime.fromtimestamp(since, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"controller PID {info.get('pid', '?')} (host {info.get('host', '?')}{when})"


class UpdateViaUpdateWith:
    """``update`` for every store, in terms of the store's own ``update_with``."""

    def update(
        self, fn: Callable[[Record | None], Record | None], *, corrupt_ok: bool = False
    ) -> Record | None:
        return self.update_with(lambda rec: (fn(rec), None), corrupt_ok=corrupt_ok)[0]


class FileStateStore(UpdateViaUpdateWith):
    held = False

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise StoreError(
                f"state file {self.path} is a directory; name a file in it, e.g. {self.path / 'rollout.json'}"
            )
        self._owner_fd: int | None = None

    def describe(self) -> dict[str, Any]:
        return {"store": "file", "path": str(self.path)}

    def where(self) -> str:
        return str(self.path)

    @property
    def owner_path(self) -> Path:
        return self.path.with_name(self.path.name + ".owner")

    @contextlib.contextmanager
    def _locked(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(self.path.with_name(self.path.name + ".lock"), "a")  # noqa: SIM115 (closed below)
        except OSError as e:
            raise StoreError(f"cannot write the state file {self.path}: {e.strerror or e}") from e
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self, corrupt_ok: bool = False) -> Record | None:
        return decode(self._read_json(), self.where(), corrupt_ok)

    def _read_json(self) -> Any:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None  # a parent is a file: there is no such state file
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"rollout state file {self.path} is not valid JSON ({e}); move it away") from e
        except OSError as e:  # a directory, no permission, ...
            raise StoreError(f"cannot read the state file {self.path}: {e.strerror or e}") from e

    def load(self, *, corrupt_ok: bool = False) -> Record | None:
        """The record, or None. Read-only: writers replace the file atomically, so no lock is needed
        (and none is created, nor any folder)."""
        return self._read(corrupt_ok)

    def update_with(
        self, fn: Callable[[Record | None], tuple[Record | None, R]], *, corrupt_ok: bool = False
    ) -> tuple[Record | None, R]:
        with self._locked():
            new, result = fn(self._read(corrupt_ok))
            if new is None:
                self.path.unlink(missing_ok=True)
                return None, result
            data = _encode(new)
            try:
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            except OSError as e:
                raise StoreError(f"cannot write the state file {self.path}: {e.strerror or e}") from e
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1, sort_keys=True, allow_nan=False)
                os.replace(tmp, self.path)
            except IsADirectoryError as e:
                Path(tmp).unlink(missing_ok=True)
                raise StoreError(f"state file {self.path} is a directory") from e
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return new, result

    # ------------------------------------------------------------------ ownership
    def acquire(self, holder: str, interval_s: float = 30.0) -> None:
        """Hold ``<state file>.owner`` with ``flock(LOCK_EX | LOCK_NB)`` until :meth:`release` (or death)."""
        if self._owner_fd is not None:
            return
        path = self.owner_path
        for _ in range(10):
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise StoreError(f"cannot create the lock file {path}: {e.strerror or e}") from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self._read_owner(fd)
                os.close(fd)
                raise OwnershipError(
                    f"{_held_by(info)} holds the rollout in {self.path}; stop it first "
                    "(pause, resume, promote and abort work while it runs)"
                ) from None
            # a releasing owner unlinks the file while it holds the lock: make sure ours is still the file
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise OwnershipError(f"the lock file {path} keeps changing; is another controller starting?")
        data = json.dumps(_owner_info(holder, time.time())).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data + b"\n", 0)
        self._owner_fd, self.held = fd, True

    @staticmethod
    def _read_owner(fd: int) -> dict[str, Any] | None:
        for _ in range(20):  # the new owner writes its PID right after it takes the lock
            try:
                info = json.loads(os.pread(fd, 4096, 0) or b"null")
            except ValueError:
                info = None
            if isinstance(info, dict):
                return info
            time.sleep(0.01)
        return None

    def heartbeat(self) -> None:
        """Nothing to renew: the kernel holds the lock for as long as this process lives."""

    def release(self) -> None:
        fd, self._owner_fd, self.held = self._owner_fd, None, False
        if fd is None:
            return
        with contextlib.suppress(OSError):
            self.owner_path.unlink()  # while still locked: see the samestat check in acquire
        os.close(fd)  # drops the lock

    def owner(self) -> dict[str, Any] | None:
        """The live owner from ``<state file>.owner``, or None; creates nothing."""
        try:
            fd = os.open(self.owner_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._read_owner(fd) or {}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None  # a stale file: nobody holds it
        finally:
            os.close(fd)


def _trim(record: dict[str, Any], budget: int = STATE_BUDGET) -> str:
    """The record's JSON object as compact JSON, dropping the oldest decisions until it fits ``budget``
    bytes."""
    rec = json.loads(json.dumps(record))
    text = json.dumps(rec, separators=(",", ":"), sort_keys=True, allow_nan=False)
    hist = (rec.get("state") or {}).get("history", [])
    while len(text) > budget and len(hist) > 1:
        del hist[: max(1, len(hist) // 4)]  # keep the most recent decisions
        rec["timeline"] = rec.get("timeline", [])[-len(hist) :]
        text = json.dumps(rec, separators=(",", ":"), sort_keys=True, allow_nan=False)
    return text


class ConfigMapStore(UpdateViaUpdateWith):
    """The key ``state`` of ConfigMap ``name``, created on first write, owned by ``owner_isvc``.

    ``core``: a CoreV1Api (default: one on ``api``'s connection); ``clock``: wall-clock seconds for the
    owner's heartbeat (compared across hosts, so never a monotonic clock).
    """

    held = False

    def __init__(
        self,
        name: str,
        namespace: str,
        owner_isvc: str = "",
        api: Any = None,
        kubeconfig: str | None = None,
        core: Any = None,
        clock: Callable[[], float] = time.time,
    ):
        self.name, self.namespace, self.owner_isvc, self.kubeconfig = name, namespace, owner_isvc, kubeconfig
        if core is None:
            self.api = api or kube.custom_api(kubeconfig)
            self.core = kube.core_api(self.api)
        else:
            self.api, self.core = api, core
        self.clock = clock
        self._holder: str | None = None
        self._ttl = MIN_OWNER_TTL_S
        self._since = 0.0

    def describe(self) -> dict[str, Any]:
        return {
            "store": "configmap",
            "name": self.name,
            "namespace": self.namespace,
            "owner_isvc": self.owner_isvc,
            "kubeconfig": self.kubeconfig,
        }

    def where(self) -> str:
        return f"ConfigMap {self.namespace}/{self.name}"

    def _get(self):
        try:
            return self.core.read_namespaced_config_map(self.name, self.namespace)
        except Exception as e:
            if kube.is_not_found(e):
                return None
            raise

    def _parse(self, cm, corrupt_ok: bool = False) -> Record | None:
        raw = (cm.data or {}).get(STATE_KEY) if cm is not None else None
        if not raw:
            return None
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise StoreError(
                f"ConfigMap {cm.metadata.namespace}/{cm.metadata.name} key {STATE_KEY} is not JSON ({e})"
            ) from e
        return decode(obj, self.where(), corrupt_ok)

    def load(self, *, corrupt_ok: bool = False) -> Record | None:
        return self._parse(self._get(), corrupt_ok)

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

    def _write(self, cm, data: dict[str, Any], annotations: dict[str, Any] | None = None) -> None:
        """Create the ConfigMap (with its ownerReference), or merge-patch ``data``/``annotations`` into it
        carrying its resourceVersion (a 409 when someone wrote in between: the caller re-reads)."""
        if cm is None:
            meta: dict[str, Any] = {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/managed-by": kube.FIELD_MANAGER},
                "ownerReferences": self._owner(),
            }
            if annotations:
                meta["annotations"] = {k: v for k, v in annotations.items() if v is not None}
            body = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": meta,
                "data": {k: v for k, v in data.items() if v is not None},
            }
            self.core.create_namespaced_config_map(self.namespace, body, field_manager=kube.FIELD_MANAGER)
            return
        body: dict[str, Any] = {"metadata": {"resourceVersion": cm.metadata.resource_version}}
        if data:
            body["data"] = data
        if annotations:
            body["metadata"]["annotations"] = annotations
        self.core.patch_namespaced_config_map(
            self.name, self.namespace, body, field_manager=kube.FIELD_MANAGER
        )

    def update_with(
        self, fn: Callable[[Record | None], tuple[Record | None, R]], *, corrupt_ok: bool = False
    ) -> tuple[Record | None, R]:
        def attempt() -> tuple[Record | None, R]:
            cm = self._get()
            new, result = fn(self._parse(cm, corrupt_ok))
            if new is None:
                if cm is not None and STATE_KEY in (cm.data or {}):
                    self._write(cm, {STATE_KEY: None})  # a merge patch with null removes the key
                return None, result
            self._write(cm, {STATE_KEY: _trim(_encode(new))})
            return new, result

        return self._retry(attempt)

    def _retry(self, attempt: Callable[[], Any]) -> Any:
        try:
            return kube.retry_on_conflict(attempt, f"ConfigMap {self.namespace}/{self.name}")
        except kube.KubeError as e:
            raise StoreError(str(e)) from e

    # ------------------------------------------------------------------ ownership
    @staticmethod
    def _owner_of(cm) -> dict[str, Any] | None:
        """The owner annotation, or None when absent or unreadable (then anyone may take it)."""
        if cm is None:
            return None
        raw = (getattr(cm.metadata, "annotations", None) or {}).get(OWNER_ANNOTATION)
        try:
            info = json.loads(raw) if raw else None
        except ValueError:
            return None
        if not isinstance(info, dict) or not isinstance(info.get("holder"), str):
            return None
        hb, ttl = info.get("heartbeat"), info.get("ttl_s")
        if isinstance(hb, bool) or not isinstance(hb, int | float):
            return None
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
            info["ttl_s"] = MIN_OWNER_TTL_S
        return info

    def _fresh(self, info: dict[str, Any]) -> bool:
        return self.clock() - float(info["heartbeat"]) < float(info["ttl_s"])

    def _annotation(self) -> dict[str, str]:
        info = {
            **_owner_info(self._holder or "", self._since),
            "heartbeat": self.clock(),
            "ttl_s": self._ttl,
        }
        return {OWNER_ANNOTATION: json.dumps(info, sort_keys=True)}

    def acquire(self, holder: str, interval_s: float = 30.0) -> None:
        """Record ``holder`` as the owner unless another holder's heartbeat is still fresh."""
        ttl = owner_ttl(interval_s)

        def attempt() -> None:
            cm = self._get()
            cur = self._owner_of(cm)
            if cur and cur["holder"] != holder and self._fresh(cur):
                age = self.clock() - float(cur["heartbeat"])
                raise OwnershipError(
                    f"{_held_by(cur)} holds the rollout in {self.where()} (heartbeat {age:.0f}s ago, "
                    f"taken over after {float(cur['ttl_s']):.0f}s without one); stop it first "
                    "(pause, resume, promote and abort work while it runs)"
                )
            self._holder, self._ttl, self._since = holder, ttl, self.clock()
            self._write(cm, {}, self._annotation())

        try:
            self._retry(attempt)
        except BaseException:
            self._holder = None
            raise
        self.held = True

    def heartbeat(self) -> None:
        """Renew our heartbeat; :class:`OwnershipError` if another holder has taken the rollout over."""
        if self._holder is None:
            return

        def attempt() -> None:
            cm = self._get()
            if cm is None:
                raise OwnershipError(f"{self.where()} is gone (deleted with its release?)")
            cur = self._owner_of(cm)
            if cur and cur["holder"] != self._holder:
                raise OwnershipError(
                    f"{_held_by(cur)} took over the rollout in {self.where()} (our heartbeat was late)"
                )
            self._write(cm, {}, self._annotation())

        self._retry(attempt)

    def release(self) -> None:
        """Remove our owner annotation (best effort: a heartbeat that stops goes stale anyway)."""
        holder, self._holder, self.held = self._holder, None, False
        if holder is None:
            return

        def attempt() -> None:
            cm = self._get()
            cur = self._owner_of(cm)
            if cur and cur["holder"] == holder:
                self._write(cm, {}, {OWNER_ANNOTATION: None})

        with contextlib.suppress(Exception):  # e.g. the API server is unreachable: the lease expires
            self._retry(attempt)

    def owner(self) -> dict[str, Any] | None:
        cur = self._owner_of(self._get())
        return cur if cur and self._fresh(cur) else None
