"""In-process cost of the runtime's request path against the onnxruntime floor.

``python -m serving.bench.runtime [--model_dir DIR] [--calls N] [--rounds R]`` (``make bench-runtime``)

No HTTP here (``make bench-serving`` measures the servers over loopback with wrk): this isolates
what the runtime adds around one ``InferenceSession.run`` at batch 1, so a regression in parsing,
validation or encoding shows up as a ratio against the floor measured in the same run:

  ort-default     ``session.run`` with onnxruntime's default SessionOptions (what a naive model does)
  ort-runtime     ``session.run`` with the runtime's options (1 thread, no spinning, sequential)
  v1-handler      orjson.loads -> core.parse_v1 -> run -> core.v1_response -> orjson.dumps
  v2-handler      orjson.loads -> core.parse_v2 -> run -> core.v2_response -> orjson.dumps

Rounds interleave the four, so machine noise hits all of them; each figure is the median of all calls.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson

from serving.contract import modelcard
from serving.runtime import core
from serving.runtime.model import OnnxModel


def _time(fn, calls: int) -> list[float]:
    out = []
    perf = time.perf_counter
    for _ in range(calls):
        t0 = perf()
        fn()
        out.append(perf() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.bench.runtime", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model_dir", help="a model package (default: build the test logistic model in a temp dir)"
    )
    ap.add_argument("--calls", type=int, default=3000, help="calls per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from tests.modelfactory import build_package  # dev-only default

            model_dir, _ = build_package(Path(tmp))
        model = OnnxModel(model_dir)
        model.load()
        spec = model.spec
        naive = ort.InferenceSession(
            str(modelcard.onnx_path(model.package_dir)), providers=["CPUExecutionProvider"]
        )
        rng = np.random.default_rng(0)
        row = rng.normal(size=(1, spec.n_features)).astype(np.float32)
        v1_body = orjson.dumps({"instances": row.tolist()})
        v2_body = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": spec.input_name,
                        "shape": [1, spec.n_features],
                        "datatype": "FP32",
                        "data": row.ravel().tolist(),
                    }
                ]
            }
        )
        feeds = {spec.input_name: row}
        names = ["label", "probabilities"]

        def v1():
            x, want = core.parse_v1(orjson.loads(v1_body), spec, 1024, maybe_bool=False)
            labels, proba = model.run(x)
            return orjson.dumps(core.v1_response(labels, proba, want, spec.class_names))

        def v2():
            req = core.parse_v2(orjson.loads(v2_body), spec, 1024, maybe_bool=False)
            labels, proba = model.run(req.x)
            return orjson.dumps(core.v2_response(spec, req, core.output_arrays(labels, proba))[0])

        variants = {
            "ort-default": lambda: naive.run(names, feeds),
            "ort-runtime": lambda: model.run(row),
            "v1-handler": v1,
            "v2-handler": v2,
        }
        samples: dict[str, list[float]] = {k: [] for k in variants}
        print(
            f"model {spec.name} {spec.version}: {args.rounds} rounds x {args.calls} calls per variant, "
            "batch 1"
        )
        for r in range(args.rounds):
            for name, fn in variants.items():
                _time(fn, 200)  # warm
                samples[name] += _time(fn, args.calls)
            print(f"  round {r + 1}/{args.rounds} done", flush=True)

    med = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
    p99 = {k: float(np.percentile(v, 99)) * 1e6 for k, v in samples.items()}
    floor = med["ort-runtime"]
    print(f"\n{'variant':<14}{'p50 µs':>10}{'p99 µs':>10}{'÷ ort-runtime':>16}")
    for k in variants:
        print(f"{k:<14}{med[k]:>10.1f}{p99[k]:>10.1f}{med[k] / floor:>16.2f}")
    print(
        f"\nruntime handler overhead over the ORT call: V1 +{med['v1-handler'] - floor:.1f} µs, "
        f"V2 +{med['v2-handler'] - floor:.1f} µs; ORT default options ÷ runtime options: "
        f"{med['ort-default'] / floor:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
