"""``python -m pipelines run | compile | submit``.

run      train locally with kfp.local, copy the packaged model to --output, print the card summary
compile  compile every registered pipeline into pipelines/compiled/
submit   upload to a Kubeflow Pipelines API (a new version when the pipeline exists) and start a
         run, or a recurring run with --recurring CRON (continuous training)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from serving.contract.errors import MlrolloutError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "models"
DEFAULT_PIPELINE_ROOT = REPO_ROOT / "local_outputs"
DEFAULT_PIPELINE = "training_pipeline"


class UsageError(MlrolloutError, ValueError):
    """Bad command-line input: one line that says what is wrong and how to fix it."""


def _pipeline(stem: str) -> Any:
    from pipelines.registry import PIPELINES

    if stem not in PIPELINES:
        raise UsageError(f"unknown pipeline {stem!r}: choose one of {', '.join(PIPELINES)}")
    return PIPELINES[stem]


def _coerce(name: str, value: str, kfp_type: str) -> Any:
    try:
        if kfp_type == "Integer":
            return int(value)
        if kfp_type == "Float":
            return float(value)
        if kfp_type == "Boolean":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
    except ValueError:
        raise UsageError(f"parameter {name}={value!r} must be of type {kfp_type}") from None
    return value


def pipeline_arguments(pipeline: Any, params: list[str], named: dict[str, Any]) -> dict[str, Any]:
    """Arguments for ``pipeline`` from ``-p key=value`` strings and named options (``None`` = unset)."""
    inputs = pipeline.component_spec.inputs or {}
    args: dict[str, Any] = {}
    for item in params:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise UsageError(f"-p {item!r}: expected NAME=VALUE, e.g. -p min_rows=200")
        if key not in inputs:
            raise UsageError(
                f"-p {key}: the pipeline has no such parameter (parameters: {', '.join(inputs)})"
            )
        args[key] = _coerce(key, value, inputs[key].type)
    for key, value in named.items():
        if value is not None and key in inputs:
            args[key] = _coerce(key, str(value), inputs[key].type) if not isinstance(value, str) else value
    return args


def _precheck_training(args: dict[str, Any]) -> None:
    """Refuse an unknown estimator or hyperparameter before minutes of pipeline work (the train
    step refuses them too: only names in ``train.ESTIMATORS`` are accepted, nothing is imported)."""
    if "estimator" not in args and "hyperparameters" not in args:
        return
    from pipelines.core import train

    try:
        params = json.loads(args.get("hyperparameters") or "{}")
    except json.JSONDecodeError as e:
        raise UsageError(f"--hyperparameters is not JSON ({e}): e.g. '{{\"C\": 0.5}}'") from None
    if not isinstance(params, dict):
        raise UsageError("--hyperparameters must be a JSON object, e.g. '{\"n_estimators\": 200}'")
    try:
        train.build_pipeline(args.get("estimator", "logistic_regression"), params)
    except train.TrainError as e:
        raise UsageError(str(e)) from None


def _precheck_deploy(args: dict[str, Any], local: bool) -> None:
    """``deploy=true`` rolls out to a cluster: refuse it locally, and refuse it without its release."""
    if not args.get("deploy"):
        return
    if local:
        raise UsageError(
            "-p deploy=true rolls the model out on a cluster (in-cluster credentials): a local run "
            "cannot; use `python -m pipelines submit ... -p deploy=true` or leave deploy off"
        )
    if not args.get("release_fullname"):
        raise UsageError(
            "-p deploy=true needs -p release_fullname=... (e.g. -p release_fullname=bc-mlrollout-model)"
        )


def _precheck_overwrite(pipeline: Any, args: dict[str, Any], output: Path, force: bool) -> None:
    """Two different models must not share a name and version: refuse to replace one already in
    ``output`` (before the run, not after it) unless ``--force``."""
    inputs = pipeline.component_spec.inputs or {}

    def value(key: str) -> str:
        return str(args.get(key) or (inputs[key].default if key in inputs else "") or "")

    name, version = value("model_name"), value("model_version")
    dest = output / name
    if force or not name or not (dest / "model-card.json").is_file():
        return
    from serving.contract import modelcard

    try:
        existing = modelcard.load_card(dest)
    except (modelcard.ModelPackageError, ValueError):
        return  # not a readable package: replaced as before
    if str(existing.get("version")) == version:
        raise UsageError(
            f"{dest} already holds {name} {version}: pass --version X.Y.Z for a new version, "
            "--model-name NAME for another model, --output DIR for another place, or --force to replace it"
        )


def cmd_run(ns: argparse.Namespace) -> int:
    from pipelines.core import package
    from pipelines.local import run_local
    from serving.contract import modelcard

    if ns.compiled:
        from kfp.components import load_component_from_file

        if not Path(ns.compiled).is_file():
            raise UsageError(f"--compiled {ns.compiled!r} does not exist: give a compiled pipeline YAML")
        pipeline = load_component_from_file(ns.compiled)
    else:
        pipeline = _pipeline(ns.pipeline)
    args = pipeline_arguments(
        pipeline,
        ns.param,
        {
            "model_name": ns.model_name,
            "model_version": ns.version,
            "data_source": ns.data,
            "label_column": ns.label_column,
            "estimator": ns.estimator,
            "hyperparameters": ns.hyperparameters,
            "seed": ns.seed,
            "baseline_card": ns.baseline_card,
        },
    )
    if "model_name" in args:
        modelcard.check_name(args["model_name"])
    if "model_version" in args:
        modelcard.check_version(args["model_version"])
    source = args.get("data_source") or ""
    if source and "://" not in source:  # a URL is fetched (and checked) by the load-data step
        if not Path(source).is_file():
            raise UsageError(
                f"--data {source!r} does not exist: give a CSV or Parquet file or an https:// URL"
            )
        args["data_source"] = str(Path(source).resolve())
    baseline = (args.get("baseline_card") or "").strip()
    if baseline and not baseline.startswith("{"):
        if not Path(baseline).exists():
            raise UsageError(
                f"--baseline-card {baseline!r} does not exist: give a model-card.json or package folder"
            )
        args["baseline_card"] = str(Path(baseline).resolve())
    _precheck_training(args)
    _precheck_deploy(args, local=True)
    _precheck_overwrite(pipeline, args, Path(ns.output), ns.force)

    print(f"running {ns.pipeline} locally (kfp.local, SubprocessRunner); artifacts under {ns.pipeline_root}")
    result = run_local(pipeline, args, ns.pipeline_root, verbose=ns.verbose)
    print(f"pipeline finished in {result.seconds:.1f} s (log: {result.log_path})")

    src = modelcard.find_package(result.output.path)
    out_root = Path(ns.output).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    dest = out_root / src.name
    staging = Path(tempfile.mkdtemp(prefix=f".{src.name}.", dir=out_root))
    try:
        shutil.copytree(src, staging / src.name)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging / src.name, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    card = modelcard.verify_package(dest)
    print(f"model package: {dest}")
    print(package.summary(card))
    return 0


def cmd_compile(ns: argparse.Namespace) -> int:
    from pipelines.compile import COMPILED_DIR, compile_all

    for stem, status in compile_all(Path(ns.out_dir) if ns.out_dir else COMPILED_DIR).items():
        print(f"{status:9} {Path(ns.out_dir or COMPILED_DIR) / (stem + '.yaml')}")
    return 0


def cmd_submit(ns: argparse.Namespace) -> int:
    from pipelines.submit import submit

    pipeline = _pipeline(ns.pipeline)
    host = ns.host or os.environ.get("KF_PIPELINES_ENDPOINT", "")
    if not host:
        raise UsageError(
            "no KFP API host: pass --host http://127.0.0.1:8888 (after `kubectl -n kubeflow "
            "port-forward svc/ml-pipeline-ui 8888:80`) or set KF_PIPELINES_ENDPOINT"
        )
    args = pipeline_arguments(
        pipeline,
        ns.param,
        {"model_name": ns.model_name, "model_version": ns.version, "estimator": ns.estimator},
    )
    _precheck_training(args)
    _precheck_deploy(args, local=False)
    out = submit(
        pipeline,
        host=host,
        pipeline_name=ns.pipeline_name or pipeline.name,
        experiment=ns.experiment,
        arguments=args,
        recurring=ns.recurring,
        run_name=ns.run_name,
        namespace=ns.namespace,
        service_account=ns.service_account,
        version_name=ns.version_name,
        timeout=ns.timeout,
    )
    for key, value in out.items():
        print(f"{key:14} {value}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    from pipelines.core.train import ESTIMATORS  # names only: sklearn is imported when one is built

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--pipeline", default=DEFAULT_PIPELINE, help="registered pipeline (pipelines/registry.py)"
        )
        sp.add_argument("--model-name", help="model name, a DNS-1123 label (default: breast-cancer)")
        sp.add_argument("--version", help="semantic version X.Y.Z (default: 1.0.0)")
        sp.add_argument(
            "--estimator",
            help=f"a registered classifier: {' | '.join(ESTIMATORS)} "
            "(pipelines/core/train.py ESTIMATORS; default: logistic_regression)",
        )
        sp.add_argument(
            "-p",
            "--param",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="any pipeline parameter, e.g. -p min_rows=200 -p test_size=0.3 (repeatable)",
        )

    r = sub.add_parser("run", help="run the pipeline locally and copy the packaged model to --output")
    common(r)
    r.add_argument(
        "--output", default=str(DEFAULT_OUTPUT), help="where the model package goes (default: models/)"
    )
    r.add_argument(
        "--data",
        help="CSV or Parquet file, or an https:// URL of one (default: sklearn's bundled breast_cancer)",
    )
    r.add_argument("--label-column", help="label column of --data (default: target)")
    r.add_argument("--hyperparameters", help="estimator hyperparameters as JSON, e.g. '{\"C\": 0.5}'")
    r.add_argument("--seed", type=int)
    r.add_argument("--baseline-card", help="model-card.json (or package folder) of the model now serving")
    r.add_argument(
        "--compiled",
        metavar="YAML",
        help="run this compiled pipeline YAML (e.g. pipelines/compiled/training_pipeline.yaml) instead",
    )
    r.add_argument(
        "--pipeline-root",
        default=str(DEFAULT_PIPELINE_ROOT),
        help="where kfp.local writes step artifacts and the run log (default: local_outputs/)",
    )
    r.add_argument("-v", "--verbose", action="store_true", help="show kfp.local's full output")
    r.add_argument(
        "--force",
        action="store_true",
        help="replace a package of the same model name and version already in --output",
    )
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("compile", help="compile every registered pipeline into pipelines/compiled/")
    c.add_argument("--out-dir", help="write the YAML files here instead")
    c.set_defaults(func=cmd_compile)

    s = sub.add_parser("submit", help="upload to a KFP API and start a run or a recurring run")
    common(s)
    s.add_argument("--host", help="KFP API endpoint, e.g. http://127.0.0.1:8888 (or KF_PIPELINES_ENDPOINT)")
    s.add_argument("--experiment", default="mlrollout", help="experiment name (created when missing)")
    s.add_argument(
        "--recurring",
        metavar="CRON",
        help="6-field cron, seconds first, e.g. '0 0 3 * * *' (daily 03:00 UTC): continuous training",
    )
    s.add_argument("--pipeline-name", help="pipeline name in KFP (default: the pipeline's own name)")
    s.add_argument(
        "--version-name", help="name of the uploaded pipeline version (default: <name>-<UTC time>)"
    )
    s.add_argument("--run-name", help="run / recurring run name (default: <name> <UTC time>)")
    s.add_argument("--namespace", default="kubeflow", help="KFP namespace (multi-user deployments)")
    s.add_argument("--service-account", help="Kubernetes service account for the run (default: the server's)")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds per API call (default 30)")
    s.set_defaults(func=cmd_submit)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    try:
        return ns.func(ns)
    except MlrolloutError as e:  # UsageError, PipelineRunError, SubmitError, ModelPackageError, DataError...
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
