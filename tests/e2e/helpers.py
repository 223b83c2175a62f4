"""Traffic and object-store helpers for the e2e suite: real HTTP through the Gateway, real uploads to
KFP's SeaweedFS (its filer HTTP API, reached through a port-forward)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from sklearn.datasets import load_breast_cancer

ROOT = Path(__file__).resolve().parents[2]
COMPILED = ROOT / "pipelines" / "compiled" / "training_pipeline.yaml"
ROWS = load_breast_cancer().data.astype(float)  # the pipeline's default training data (bundled, offline)


def predict(client: httpx.Client, gateway_url: str, host: str, model: str, i: int) -> tuple[int, str]:
    row = ROWS[i % len(ROWS)].tolist()
    try:
        r = client.post(
            f"{gateway_url}/v1/models/{model}:predict",
            json={"instances": [row]},
            headers={"Host": host},
            timeout=15,
        )
    except httpx.HTTPError as e:
        return 599, type(e).__name__
    return r.status_code, r.headers.get("x-model-version", "")


def predict_many(gateway_url: str, host: str, model: str, n: int, workers: int = 8) -> list[tuple[int, str]]:
    with httpx.Client() as client, ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda i: predict(client, gateway_url, host, model, i), range(n)))


def versions_seen(results: list[tuple[int, str]]) -> Counter:
    bad = [r for r in results if r[0] != 200]
    assert not bad, f"{len(bad)}/{len(results)} requests failed, e.g. {bad[:5]}"
    return Counter(v for _, v in results)


def assert_share(results: list[tuple[int, str]], version: str, expected: float, sigmas: float = 4.5) -> float:
    """Binomial check of the observed share of `version` (KServe's raw-canary e2e style)."""
    seen = versions_seen(results)
    n = sum(seen.values())
    share = seen[version] / n
    tol = sigmas * float(np.sqrt(max(expected * (1 - expected), 0.01) / n))
    assert abs(share - expected) <= tol, (
        f"{version}: observed {share:.3f} of {n}, expected {expected} +- {tol:.3f} ({seen})"
    )
    return share


@dataclass
class Load:
    """Steady background traffic through the Gateway, recording (t, status, version) for every answer."""

    gateway_url: str
    host: str
    model: str
    rps: float = 20.0
    log: list[tuple[float, int, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Load:
        def loop() -> None:
            i = 0
            with httpx.Client() as client:
                while not self._stop.is_set():
                    status, version = predict(client, self.gateway_url, self.host, self.model, i)
                    self.log.append((time.monotonic(), status, version))
                    i += 1
                    self._stop.wait(1.0 / self.rps)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=30)


# --------------------------------------------------------------------------- SeaweedFS filer

BUCKET_ROOT = "/buckets/mlpipeline"


def is_dir(entry: dict) -> bool:
    return bool(entry.get("Mode", 0) & (1 << 31))  # Go's os.ModeDir in the filer's JSON listing


def filer_list(filer_url: str, path: str) -> list[dict]:
    r = httpx.get(
        f"{filer_url}{path.rstrip('/')}/",
        headers={"Accept": "application/json"},
        params={"limit": 1000},
        timeout=30,
    )
    r.raise_for_status()
    return r.json().get("Entries") or []


def filer_find(filer_url: str, path: str, filename: str, depth: int = 6) -> list[str]:
    """Full paths of every `filename` under `path` (breadth-first, bounded depth)."""
    found, level = [], [path]
    for _ in range(depth):
        nxt = []
        for d in level:
            for e in filer_list(filer_url, d):
                full = e["FullPath"]
                if full.rsplit("/", 1)[-1] == filename:
                    found.append(full)
                elif is_dir(e):
                    nxt.append(full)
        level = nxt
        if found or not level:
            break
    return found


def filer_download_tree(filer_url: str, path: str, dest: Path) -> None:
    for e in filer_list(filer_url, path):
        full = e["FullPath"]
        name = full.rsplit("/", 1)[-1]
        if is_dir(e):
            filer_download_tree(filer_url, full, dest / name)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            r = httpx.get(f"{filer_url}{full}", timeout=60)
            r.raise_for_status()
            (dest / name).write_bytes(r.content)


def filer_upload_tree(filer_url: str, src: Path, path: str) -> None:
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src).as_posix()
        r = httpx.post(
            f"{filer_url}{path.rstrip('/')}/{rel}", files={"file": (f.name, f.read_bytes())}, timeout=60
        )
        r.raise_for_status()


def s3_uri(filer_path: str) -> str:
    assert filer_path.startswith(BUCKET_ROOT + "/"), filer_path
    return "s3://mlpipeline/" + filer_path[len(BUCKET_ROOT) + 1 :]


# ------------------------------------------------------------------------- chart releases the suite installs


def chart_sets(
    release: str, strategy: str, uris: dict[str, str], versions: dict[str, str], canary: str = "v2"
) -> list[str]:
    """`helm --set` values of one e2e release (tests/unit/test_infra_e2e_contract.py renders them offline).

    uris/versions: {"v1": ..., "v2": ..., "bad": ...}; `canary` picks the canary/green model."""
    sets = [
        f"fullnameOverride={release}",
        f"model.name={release}",  # also the runtime's `model` metric label: one per release, no mixing
        "storage.existingSecret=kfp-s3-credentials",
        f"strategy.type={strategy}",
        f"model.storageUri={uris['v1']}",
        f"model.version={versions['v1']}",
    ]
    if strategy == "canary":
        sets += [
            f"strategy.canary.storageUri={uris[canary]}",
            f"strategy.canary.version={versions[canary]}",
            "strategy.canary.weight=0",
        ]
    elif strategy == "blueGreen":
        sets += [
            f"strategy.blueGreen.blue.storageUri={uris['v1']}",
            f"strategy.blueGreen.blue.version={versions['v1']}",
            f"strategy.blueGreen.green.storageUri={uris[canary]}",
            f"strategy.blueGreen.green.version={versions[canary]}",
            "strategy.blueGreen.blue.active=true",
            "strategy.blueGreen.green.active=false",
        ]
    return sets


def release_names(release: str, namespace: str) -> dict[str, str]:
    """Names the chart gives a canary release (its README "For the rollout controller" contract)."""
    return {
        "route": release,
        "host": f"{release}-{namespace}.example.com",
        "stable_backend": f"{release}-stable-predictor",
        "canary_backend": f"{release}-canary-predictor",
        "stable_isvc": f"{release}-stable",
        "canary_isvc": f"{release}-canary",
    }


def model_versions() -> dict[str, str]:
    """v1 = the compiled pipeline's default `model_version`; v2 and the bad canary are the next major."""
    import yaml

    spec = next(iter(yaml.safe_load_all(COMPILED.read_text())))
    v1 = spec["root"]["inputDefinitions"]["parameters"]["model_version"]["defaultValue"]
    major = int(v1.split(".")[0]) + 1
    return {"v1": v1, "v2": f"{major}.0.0", "bad": f"{major}.0.1"}
