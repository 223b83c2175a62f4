"""Regenerate serving/requirements-runtime.lock: what serving/Dockerfile installs, with hashes.

``python serving/lock_runtime.py`` (or ``make lock-runtime``), from the repository root, needs python3.11 and
PyPI. Run it whenever serving/requirements-runtime.txt or requirements.lock changes.

1. resolve: a scratch python3.11 venv installs requirements-runtime.txt constrained by requirements.lock (its
   ``-e`` lines dropped), wheels only; ``pip freeze`` of it is the runtime set with its transitive
   dependencies, each at requirements.lock's version (checked here);
2. download: ``pip download --only-binary=:all: --no-deps --python-version 3.11 --implementation cp
   --abi cp311`` of every pin, once for linux x86_64 and once for linux aarch64 (Docker on Apple
   Silicon), with every manylinux tag that the image's glibc (Debian bookworm, 2.36) accepts, newest
   first: the order the image's pip ranks them in, so the wheel downloaded per architecture is the
   one the image installs (a pin with no wheel for aarch64 is named in the lock's header);
3. hash: ``pip hash`` of each wheel; a pure-Python wheel (``py3-none-any``) is the same file on both
   architectures and gets one hash.

The image then runs ``pip install --require-hashes --no-deps -r requirements-runtime.lock`` and ``pip check``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_TXT = ROOT / "serving" / "requirements-runtime.txt"
LOCK = ROOT / "requirements.lock"
OUTPUT = ROOT / "serving" / "requirements-runtime.lock"
ARCHES = ("x86_64", "aarch64")
GLIBC_MINOR = 36  # python:3.11.7-slim-bookworm ships glibc 2.36
# `pip freeze` (and so `make lock`'s requirements.lock) leaves these out; the venv's own pip stays as
# it is, but setuptools is a runtime dependency (grpcio-tools needs setuptools>=77, the venv comes with
# 65.5.0), so it is locked at the version the scratch venv resolves.
NOT_IN_REQUIREMENTS_LOCK = {"setuptools"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def platforms(arch: str) -> list[str]:
    """Every manylinux tag a glibc-2.36 system of ``arch`` accepts, most specific first."""
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC_MINOR, 16, -1)]
    tags.append(f"manylinux2014_{arch}")
    if arch == "x86_64":
        tags += [f"manylinux_2_12_{arch}", f"manylinux2010_{arch}"]
        tags += [f"manylinux_2_5_{arch}", f"manylinux1_{arch}"]
    return tags


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd[:8]), "..." if len(cmd) > 8 else "", file=sys.stderr)
    return subprocess.run(cmd, check=True, text=True, **kw)


def lock_versions() -> dict[str, str]:
    versions = {}
    for line in LOCK.read_text().splitlines():
        if "==" in line and not line.startswith(("#", "-e")):
            name, version = line.split("==", 1)
            versions[normalize(name.split("[")[0])] = version.strip()
    return versions


def resolve(python: str, work: Path) -> tuple[str, list[tuple[str, str]]]:
    """The scratch venv's pip (python 3.11's bundled one, as in the image) and the runtime set with its
    transitive dependencies, as its ``pip freeze`` names them."""
    venv = work / "venv"
    constraints = work / "constraints.txt"
    lines = [line for line in LOCK.read_text().splitlines() if not line.startswith("-e")]
    constraints.write_text("".join(f"{line}\n" for line in lines))
    run([python, "-m", "venv", str(venv)])
    pip = str(venv / "bin" / "pip")
    run([pip, "install", "--quiet", "--only-binary=:all:", "-r", str(RUNTIME_TXT), "-c", str(constraints)])
    run([pip, "check"])
    freeze = [pip, "freeze", "--all", "--exclude-editable", "--exclude", "pip"]
    frozen = run(freeze, capture_output=True).stdout
    pins = []
    locked = lock_versions()
    for line in frozen.splitlines():
        name, _, version = line.partition("==")
        if not version:
            sys.exit(f"unexpected `pip freeze` line: {line!r}")
        if normalize(name) not in NOT_IN_REQUIREMENTS_LOCK and locked.get(normalize(name)) != version:
            sys.exit(f"{name}=={version} resolved, but requirements.lock has {locked.get(normalize(name))}")
        pins.append((name, version))
    return pip, sorted(pins, key=lambda p: normalize(p[0]))


def download(pip: str, pins: list[tuple[str, str]], arch: str, dest: Path) -> None:
    """The wheel of each pin for ``arch``; pins with none are skipped (``hash_wheels`` reports them)."""
    cmd = [pip, "download", "--quiet", "--no-cache-dir", "--only-binary=:all:", "--no-deps"]
    cmd += ["--dest", str(dest), "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    for tag in platforms(arch):
        cmd += ["--platform", tag]
    try:
        run([*cmd, *(f"{name}=={version}" for name, version in pins)])
    except subprocess.CalledProcessError:  # some pin has no wheel for arch: find which, one pin at a time
        for name, version in pins:
            try:
                run([*cmd, f"{name}=={version}"], capture_output=True)
            except subprocess.CalledProcessError:
                print(f"  {arch}: no cp311 manylinux wheel of {name}=={version}", file=sys.stderr)


def hash_wheels(pip: str, pins: list[tuple[str, str]], work: Path) -> dict[str, dict[str, tuple[str, str]]]:
    """{normalized name: {arch: (wheel file name, sha256)}}; an arch missing means no wheel for it."""
    wheels: dict[str, dict[str, tuple[str, str]]] = defaultdict(dict)
    for arch in ARCHES:
        dest = work / arch
        download(pip, pins, arch, dest)
        files = sorted(dest.glob("*.whl"))
        hashed = run([pip, "hash", *map(str, files)], capture_output=True).stdout
        found = re.findall(r"^(.+\.whl):\n--hash=sha256:([0-9a-f]{64})$", hashed, re.M)
        if len(found) != len(files):
            sys.exit(f"{arch}: `pip hash` gave {len(found)} hashes for {len(files)} wheels")
        for path, digest in found:
            filename = Path(path).name
            wheels[normalize(filename.split("-", 1)[0])][arch] = (filename, digest)
    names = {normalize(n) for n, _ in pins}
    if unknown := set(wheels) - names:
        sys.exit(f"wheels that match no pin by name: {sorted(unknown)}")
    if no_x86 := sorted(n for n in names if "x86_64" not in wheels[n]):
        sys.exit(f"no linux x86_64 wheel for: {no_x86}")
    return wheels


def render(pins: list[tuple[str, str]], wheels: dict[str, dict[str, tuple[str, str]]]) -> str:
    out = [
        "# GENERATED by serving/lock_runtime.py (`make lock-runtime`): do not edit. Edit",
        "# requirements-runtime.txt (and requirements.lock) and regenerate. Every package serving/Dockerfile",
        "# installs, transitive ones included, at requirements.lock's version, with the sha256 of its cp311",
        "# manylinux wheel for linux x86_64 and aarch64 (one hash when it is the same pure-Python wheel).",
        "# The image installs it with `pip install --require-hashes --no-deps`, then runs `pip check`;",
        "# tests/unit/test_serving_dockerfile.py checks it.",
    ]
    unlocked = [f"{n}=={v}" for n, v in pins if normalize(n) in NOT_IN_REQUIREMENTS_LOCK]
    if unlocked:
        out += [
            f"# {', '.join(unlocked)}: not in requirements.lock (`pip freeze` leaves it out), locked here",
            "# at the version the scratch venv resolved (grpcio-tools needs setuptools>=77).",
        ]
    missing = [f"{n}=={v}" for n, v in pins if len(wheels[normalize(n)]) < len(ARCHES)]
    if missing:
        out += [
            f"# NO aarch64 WHEEL on PyPI for: {', '.join(missing)}. So a native linux/arm64 build (Docker on",
            "# Apple Silicon) stops at it (the image installs wheels only and has no compiler); build with",
            "# `docker build --platform linux/amd64` there until a version with an aarch64 wheel is locked.",
        ]
    for name, version in pins:
        by_arch = wheels[normalize(name)]
        out.append("#   " + "  ".join(dict.fromkeys(f for f, _ in by_arch.values())))
        hashes = dict.fromkeys(h for _, h in by_arch.values())
        out.append(" \\\n".join([f"{name}=={version}", *(f"    --hash=sha256:{h}" for h in hashes)]))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=shutil.which("python3.11") or "python3.11", help="a python3.11")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mlrollout-lock-runtime-") as tmp:
        work = Path(tmp)
        pip, pins = resolve(args.python, work)
        wheels = hash_wheels(pip, pins, work)
        args.output.write_text(render(pins, wheels))
    print(f"wrote {args.output} ({len(pins)} packages)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
