"""Upload a pipeline to a Kubeflow Pipelines API (v2beta1) and start a run or a recurring run."""

from __future__ import annotations

import datetime as dt
import re
import tempfile
from pathlib import Path
from typing import Any

from serving.contract.errors import MlrolloutError

CRON_RE = re.compile(r"^\S+(\s+\S+){5}$")


class SubmitError(MlrolloutError, RuntimeError):
    """The KFP API is unreachable or refused a request; one line that says what to do."""


def check_cron(cron: str) -> str:
    if not CRON_RE.match(cron.strip()):
        raise SubmitError(
            f"--recurring {cron!r} is not a 6-field cron expression (KFP counts seconds first), "
            "e.g. '0 0 3 * * *' for 03:00 UTC daily"
        )
    return cron.strip()


def check_reachable(host: str, timeout: float) -> None:
    """Fail fast with one line when the API does not answer (kfp.Client would retry for ~25 s)."""
    import httpx

    url = host.rstrip("/") + "/apis/v2beta1/healthz"
    try:
        r = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as e:
        raise SubmitError(
            f"cannot reach the KFP API at {host} ({type(e).__name__}: {e}); start a port-forward "
            "(kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8888:80) or fix --host"
        ) from e
    if r.status_code >= 400:
        raise SubmitError(
            f"the KFP API at {host} answered {r.status_code} on {url}: is this a KFP v2 endpoint?"
        )


def _api_error(what: str, e: Exception) -> SubmitError:
    status = getattr(e, "status", None)
    body = (getattr(e, "body", None) or str(e)).strip().replace("\n", " ")[:300]
    return SubmitError(f"{what} failed{f' (HTTP {status})' if status else ''}: {body}")


def submit(
    pipeline_func: Any,
    *,
    host: str,
    pipeline_name: str,
    experiment: str = "mlrollout",
    arguments: dict[str, Any] | None = None,
    recurring: str | None = None,
    run_name: str | None = None,
    namespace: str = "kubeflow",
    service_account: str | None = None,
    version_name: str | None = None,
    timeout: float = 30.0,
) -> dict[str, str]:
    """Compile, upload (a new version when ``pipeline_name`` exists), ensure the experiment, then
    create a run, or a recurring run when ``recurring`` (6-field cron) is given. Returns the ids."""
    import kfp
    from kfp import compiler

    from pipelines.components._env import built

    cron = check_cron(recurring) if recurring else None
    check_reachable(host, min(timeout, 10.0))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    version_name = version_name or f"{pipeline_name}-{stamp}"
    run_name = run_name or f"{pipeline_name} {stamp}"
    with tempfile.TemporaryDirectory() as tmp:
        package = str(Path(tmp) / "pipeline.yaml")
        compiler.Compiler().compile(built(pipeline_func), package)
        try:
            client = kfp.Client(host=host, namespace=namespace)
        except Exception as e:
            raise _api_error(f"connecting to {host}", e) from e
        out: dict[str, str] = {"host": host}
        try:
            pipeline_id = client.get_pipeline_id(pipeline_name)
            if pipeline_id is None:
                p = client.upload_pipeline(
                    package,
                    pipeline_name=pipeline_name,
                    description=getattr(pipeline_func, "description", None),
                )
                pipeline_id = p.pipeline_id
                versions = client.list_pipeline_versions(pipeline_id, sort_by="created_at desc", page_size=1)
                version_id = versions.pipeline_versions[0].pipeline_version_id
                out["uploaded"] = f"new pipeline {pipeline_name!r}"
            else:
                v = client.upload_pipeline_version(
                    package, pipeline_version_name=version_name, pipeline_id=pipeline_id
                )
                version_id = v.pipeline_version_id
                out["uploaded"] = f"new version {version_name!r} of {pipeline_name!r}"
        except Exception as e:
            raise _api_error(f"uploading pipeline {pipeline_name!r}", e) from e
        out.update(pipeline_id=pipeline_id, version_id=version_id)
        try:
            exp = client.create_experiment(experiment, namespace=namespace)
            out["experiment_id"] = exp.experiment_id
            if cron:
                job = client.create_recurring_run(
                    experiment_id=exp.experiment_id,
                    job_name=run_name,
                    params=arguments or {},
                    pipeline_id=pipeline_id,
                    version_id=version_id,
                    cron_expression=cron,
                    max_concurrency=1,
                    no_catchup=True,
                    enabled=True,
                    service_account=service_account,
                )
                out["recurring_run"] = job.recurring_run_id
                out["schedule"] = f"{cron} (UTC)"
            else:
                run = client.run_pipeline(
                    experiment_id=exp.experiment_id,
                    job_name=run_name,
                    params=arguments or {},
                    pipeline_id=pipeline_id,
                    version_id=version_id,
                    service_account=service_account,
                )
                out["run_id"] = run.run_id
                out["run_url"] = f"{host.rstrip('/')}/#/runs/details/{run.run_id}"
        except Exception as e:
            raise _api_error("starting the run", e) from e
    return out
