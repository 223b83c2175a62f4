"""KFP v2 components that end a training run by rolling its model out: ``deploy_canary`` then
``progressive_rollout``. Thin, hermetic wrappers over ``serving.rollout.cluster``.

The rollout controller's code reaches the cluster embedded in the compiled YAML (kfp's
``embedded_artifact_path``: a scratch ``serving/rollout`` tree with only the modules the cluster
path imports); the step installs the pinned kubernetes/httpx/prometheus-client/matplotlib it
needs. Both steps talk to the Kubernetes API with the pod's in-cluster config, as the Helm
chart's ``<fullname>-deployer`` Role allows (InferenceServices and HTTPRoutes in one namespace, the
predictor Deployments read-only, the rollout's state ConfigMap).
"""

import os
import shutil
import tempfile
from pathlib import Path

from kfp import dsl
from kfp.dsl import Input, Markdown, Model, Output

from pipelines.components.runtime import BASE_IMAGE, requirements

_ROLLOUT_DIR = Path(__file__).resolve().parents[2] / "serving" / "rollout"
# what the cluster path imports (no local stack, no runtime, no CLI)
_EMBEDDED = (
    "__init__",
    "machine",
    "gates",
    "stats",
    "metrics",
    "kube",
    "targets",
    "routers",
    "store",
    "controller",
    "cluster",
    "report",
)
_FIXED_MTIME = 315532800


def stage_rollout() -> tempfile.TemporaryDirectory:
    """A scratch ``serving/rollout`` tree for ``embedded_artifact_path`` (only .py, fixed mtimes)."""
    tmp = tempfile.TemporaryDirectory(prefix="mlrollout-rollout-")
    pkg = Path(tmp.name) / "serving"
    (pkg / "rollout").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""Embedded copy of mlrollout\'s rollout controller."""\n')
    for name in _EMBEDDED:
        shutil.copyfile(_ROLLOUT_DIR / f"{name}.py", pkg / "rollout" / f"{name}.py")
    for p in sorted(Path(tmp.name).rglob("*")):
        os.utime(p, (_FIXED_MTIME, _FIXED_MTIME))
    return tmp


_staged = stage_rollout()
_PACKAGES = requirements("kubernetes", "httpx", "prometheus-client", "matplotlib")


@dsl.component(base_image=BASE_IMAGE, packages_to_install=_PACKAGES, embedded_artifact_path=_staged.name)
def deploy_canary(
    model: Input[Model],
    namespace: str,
    release_fullname: str,
    router: str,
    ready_timeout_s: int,
    rollout: dsl.EmbeddedInput[dsl.Dataset],
) -> str:
    """Serve the trained package as the canary (no traffic yet) and wait until its pods serve it.

    ``release_fullname``: the Helm release's fullname (``<release>-mlrollout-model``).
    ``router``: ``gateway_api`` (chart strategy ``canary``: patches ``<fullname>-canary``) or
    ``kserve_knative`` (chart strategy ``knativeCanary``: a new revision at 0%).
    Returns the canary's model version (from the package's model card).
    """
    import json
    import os

    from kubernetes import client, config

    from serving.rollout import cluster

    cards = [
        os.path.join(root, f)
        for root, _, files in os.walk(model.path)
        for f in files
        if f == "model-card.json"
    ]
    if len(cards) != 1:
        raise ValueError(f"expected one model-card.json under the model artifact, found {len(cards)}")
    with open(cards[0]) as f:
        version = json.load(f)["version"]
    config.load_incluster_config()
    out = cluster.deploy_canary(
        client.CustomObjectsApi(),
        namespace=namespace,
        fullname=release_fullname,
        storage_uri=cluster.to_storage_uri(model.uri),
        version=version,
        router=router,
        ready_timeout_s=ready_timeout_s,
    )
    print(f"canary {out['isvc']} serves {out['storage_uri']} (version {version}) at {out['url']}")
    return version


@dsl.component(base_image=BASE_IMAGE, packages_to_install=_PACKAGES, embedded_artifact_path=_staged.name)
def progressive_rollout(
    namespace: str,
    release_fullname: str,
    router: str,
    model_name: str,
    stable_version: str,
    canary_version: str,
    steps: str,
    interval_s: float,
    threshold: int,
    prometheus_url: str,
    min_success_rate: float,
    max_p99_ms: float,
    max_drift: float,
    max_seconds: float,
    fail_on_rollback: bool,
    report: Output[Markdown],
    rollout: dsl.EmbeddedInput[dsl.Dataset],
) -> str:
    """Shift traffic step by step on measured gates (success rate, p99, prediction drift); returns
    the final phase (Promoted, RolledBack, Aborted, or the phase when ``max_seconds`` ran out).

    State persists in the ConfigMap ``<release_fullname>-rollout``, so a retried step resumes the
    same rollout. With ``fail_on_rollback`` a rollback fails the run.
    """
    import base64
    import tempfile

    from kubernetes import client, config

    from serving.rollout import cluster
    from serving.rollout.report import plot_timeline, text_report

    config.load_incluster_config()
    rec = cluster.progressive_rollout(
        client.CustomObjectsApi(),
        namespace=namespace,
        fullname=release_fullname,
        model=model_name,
        stable_version=stable_version,
        canary_version=canary_version,
        router=router,
        steps=steps,
        interval_s=interval_s,
        threshold=threshold,
        prometheus_url=prometheus_url,
        min_success_rate=min_success_rate,
        max_p99_ms=max_p99_ms,
        max_drift=max_drift,
        max_seconds=max_seconds,
    )
    text = text_report(rec)
    png = plot_timeline(rec, os.path.join(tempfile.mkdtemp(), "timeline.png"))
    img = base64.b64encode(png.read_bytes()).decode()
    with open(report.path, "w") as f:
        f.write(f"# Rollout {canary_version}\n\n![timeline](data:image/png;base64,{img})\n\n```\n{text}```\n")
    phase = rec["state"]["phase"]
    print(text)
    if fail_on_rollback and phase in ("RolledBack", "Aborted"):
        raise RuntimeError(f"canary {canary_version} {phase}: {rec['state']['reason']}")
    return phase


def rollout_steps(
    package,
    enabled,
    namespace,
    release_fullname,
    router,
    model_name,
    stable_version,
    steps,
    interval_s,
    prometheus_url,
    max_drift,
    min_success_rate=0.99,
    max_p99_ms=500.0,
    threshold=2,
    max_seconds=3600.0,
    fail_on_rollback=True,
    ready_timeout_s=600,
):
    """Append ``deploy_canary`` -> ``progressive_rollout`` to a pipeline, only when ``enabled`` is true.

    Call it inside a ``@dsl.pipeline`` function with the packaged model and pipeline parameters::

        rollout_steps(packaged.outputs["package"], deploy, namespace, release_fullname, rollout_router,
                      model_name, stable_version, rollout_steps_csv, rollout_interval_s, prometheus_url,
                      max_drift)

    Returns the ``progressive_rollout`` task (its output is the final phase).
    """
    with dsl.If(enabled == True, name="rollout-enabled"):  # noqa: E712 (a KFP condition, not a Python bool)
        dep = deploy_canary(
            model=package,
            namespace=namespace,
            release_fullname=release_fullname,
            router=router,
            ready_timeout_s=ready_timeout_s,
        )
        return progressive_rollout(
            namespace=namespace,
            release_fullname=release_fullname,
            router=router,
            model_name=model_name,
            stable_version=stable_version,
            canary_version=dep.output,
            steps=steps,
            interval_s=interval_s,
            threshold=threshold,
            prometheus_url=prometheus_url,
            min_success_rate=min_success_rate,
            max_p99_ms=max_p99_ms,
            max_drift=max_drift,
            max_seconds=max_seconds,
            fail_on_rollback=fail_on_rollback,
        )
