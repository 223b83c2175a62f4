"""Benchmarks, printed as ratios measured side by side in one run (``make bench``).

1. Orchestration cost: the training pipeline run locally with kfp.local (one subprocess per step,
   artifacts through files) vs the same steps called as plain functions in this process, writing
   the same artifacts.
2. Serving cost per estimator: onnxruntime (1 intra-op thread) vs sklearn ``predict_proba`` on the
   same fitted pipeline: median latency at batch 1 and throughput at batch 1000, measured
   interleaved (sklearn and ORT back to back in each round) so machine noise hits both sides.
3. Parity of each exported model (and, for reference, HistGradientBoosting behind a StandardScaler,
   the combination the default pipeline avoids).

    python -m serving.bench.pipeline [--rounds 5] [--skip-pipeline] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

LABEL = "target"


def plain_run(workdir: Path, estimator: str = "logistic_regression") -> Path:
    """The training pipeline's steps as plain function calls, writing the same artifacts."""
    import joblib

    from pipelines.core import data, evaluate, export, package, train, validate

    workdir.mkdir(parents=True, exist_ok=True)
    df = data.load_dataset("", LABEL)
    data.write_dataset(df, workdir / "dataset")
    df = data.read_dataset(workdir / "dataset")
    report = validate.validate(df, LABEL)
    (workdir / "report.json").write_text(json.dumps(report))
    (workdir / "report.md").write_text(validate.report_markdown(report))
    validate.raise_for_report(report)
    tr, te = data.split_dataset(df, LABEL, 0.25, 42)
    data.write_dataset(tr, workdir / "train")
    data.write_dataset(te, workdir / "test")
    tr, te = data.read_dataset(workdir / "train"), data.read_dataset(workdir / "test")
    X, y, features = data.xy(tr, LABEL)
    pipe = train.train(X, y, estimator, {}, 42)
    export.check_convertible(pipe, X.shape[1])
    joblib.dump(pipe, workdir / "model")
    pipe = joblib.load(workdir / "model")
    Xt, yt, _ = data.xy(te, LABEL)
    result = evaluate.evaluate(pipe, Xt, yt, list(tr.attrs["class_names"]), features)
    gate = evaluate.gate(result["metrics"])
    (workdir / "report.html").write_text(evaluate.report_html(result, gate, evaluate.plots(result)))
    evaluate.raise_for_gate(gate)
    blob = export.to_onnx(pipe, len(features))
    (workdir / "model.onnx").write_bytes(blob)
    par = export.parity(pipe, blob, Xt)
    export.raise_for_parity(par)
    card = package.build_card(
        name="breast-cancer",
        version="1.0.0",
        onnx_bytes=blob,
        feature_names=features,
        class_names=list(tr.attrs["class_names"]),
        training_data={"fingerprint": data.fingerprint(df)},
        metrics=result["metrics"],
        estimator=estimator,
        extra={"parity": par},
    )
    return package.package(workdir / "package", card, blob)


def bench_pipeline() -> dict[str, float]:
    from pipelines.local import run_local
    from pipelines.training_pipeline import training_pipeline

    with tempfile.TemporaryDirectory(prefix="mlrollout-bench-") as tmp:
        plain = []
        for i in range(2):  # plain run before and after the kfp run: drift on a shared box hits both sides
            t0 = time.perf_counter()
            plain_run(Path(tmp) / f"plain{i}")
            plain.append(time.perf_counter() - t0)
            if i == 0:
                t0 = time.perf_counter()
                run_local(training_pipeline, {}, Path(tmp) / "kfp", emit=lambda line: None)
                kfp = time.perf_counter() - t0
    mean_plain = sum(plain) / len(plain)
    return {"kfp_local_s": kfp, "plain_functions_s": mean_plain, "ratio": kfp / mean_plain}


def _median_call(fn: Any, x: np.ndarray, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
    return out


def bench_predict(rounds: int = 5) -> dict[str, dict[str, float]]:
    from threadpoolctl import threadpool_limits

    from pipelines.core import data, export, train

    df = data.load_dataset("", LABEL)
    X, y, _ = data.xy(df, LABEL)
    rng = np.random.default_rng(0)
    x1 = X[:1]
    x1000 = X[rng.integers(0, len(X), 1000)]
    results = {}
    for est in train.ESTIMATORS:
        pipe = train.train(X, y, est, {}, 0)
        sess = export.session(export.to_onnx(pipe, X.shape[1]), threads=1)

        def ort_fn(x, sess=sess):
            return sess.run(None, {"input": x.astype(np.float32)})

        forest = est in ("random_forest", "extra_trees")  # 100 trees each: fewer calls per round
        n1 = 40 if forest else 200
        n1000 = 5 if forest else 15
        sk1, or1, sk1000, or1000 = [], [], [], []
        with threadpool_limits(1):  # both sides on one thread: a like-for-like per-core comparison
            for fn in (pipe.predict_proba, ort_fn):  # warm-up
                fn(x1)
                fn(x1000)
            for _ in range(rounds):
                sk1 += _median_call(pipe.predict_proba, x1, n1)
                or1 += _median_call(ort_fn, x1, n1)
                sk1000 += _median_call(pipe.predict_proba, x1000, n1000)
                or1000 += _median_call(ort_fn, x1000, n1000)
        m = {
            k: statistics.median(v)
            for k, v in {"sk1": sk1, "or1": or1, "sk1000": sk1000, "or1000": or1000}.items()
        }
        results[est] = {
            "sklearn_b1_us": m["sk1"] * 1e6,
            "ort_b1_us": m["or1"] * 1e6,
            "b1_speedup": m["sk1"] / m["or1"],
            "sklearn_b1000_rows_s": 1000 / m["sk1000"],
            "ort_b1000_rows_s": 1000 / m["or1000"],
            "b1000_speedup": m["sk1000"] / m["or1000"],
        }
    return results


def bench_parity() -> dict[str, float]:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from pipelines.core import data, export, train

    df = data.load_dataset("", LABEL)
    tr, te = data.split_dataset(df, LABEL, 0.25, 42)
    X, y, _ = data.xy(tr, LABEL)
    Xt, _, _ = data.xy(te, LABEL)
    out = {}
    for est in train.ESTIMATORS:
        pipe = train.train(X, y, est, {}, 42)
        out[est] = export.parity(pipe, export.to_onnx(pipe, X.shape[1]), Xt)["max_abs_prob_diff"]
    scaled = Pipeline(
        [
            ("impute", SimpleImputer(strategy="median")),
            ("scale", StandardScaler()),
            ("model", HistGradientBoostingClassifier(random_state=42)),
        ]
    ).fit(X, y)
    out["hist_gradient_boosting + StandardScaler (not used)"] = export.parity(
        scaled, export.to_onnx(scaled, X.shape[1]), Xt
    )["max_abs_prob_diff"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m serving.bench.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per estimator (default 5)")
    ap.add_argument("--skip-pipeline", action="store_true", help="only the predict benchmark")
    ap.add_argument("--json", help="also write the figures to this file")
    ns = ap.parse_args(argv)

    print(
        f"mlrollout pipeline benchmarks: {os.cpu_count()} CPUs, load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    report: dict[str, Any] = {}
    if not ns.skip_pipeline:
        print(
            "\n[1] training pipeline: kfp.local (SubprocessRunner, 8 steps) vs plain functions in one process"
        )
        p = bench_pipeline()
        report["pipeline"] = p
        print(f"    kfp.local   {p['kfp_local_s']:7.1f} s")
        print(f"    plain       {p['plain_functions_s']:7.1f} s  (mean of one run before and one after)")
        print(f"    ratio       {p['ratio']:7.1f}x  (per step: a process, its imports and artifact I/O)")

    print(
        f"\n[2] predict: onnxruntime (1 thread) vs sklearn predict_proba (1 thread), median of {ns.rounds} "
        "interleaved rounds"
    )
    r = bench_predict(ns.rounds)
    report["predict"] = r
    print(
        f"    {'estimator':<24}{'sklearn b1':>12}{'ORT b1':>10}{'b1 ratio':>10}"
        f"{'sklearn b1000':>16}{'ORT b1000':>14}{'b1000 ratio':>13}"
    )
    for est, v in r.items():
        print(
            f"    {est:<24}{v['sklearn_b1_us']:>10.0f}us{v['ort_b1_us']:>8.1f}us{v['b1_speedup']:>9.1f}x"
            f"{v['sklearn_b1000_rows_s'] / 1e3:>11.0f}k r/s{v['ort_b1000_rows_s'] / 1e3:>9.0f}k r/s"
            f"{v['b1000_speedup']:>12.1f}x"
        )

    print("\n[3] ONNX parity on the 143 held-out rows (max |p_sklearn - p_onnx|, float32 graph)")
    par = bench_parity()
    report["parity"] = par
    for name, diff in par.items():
        print(f"    {name:<52}{diff:.2e}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
