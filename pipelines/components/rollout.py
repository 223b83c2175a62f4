"""KFP v2 components that end a training run by rolling its model out: ``deploy_canary`` then
``progressive_rollout``. Thin, hermetic wrappers over ``serving.rollout.cluster``.

The rollout controller's code reaches the cluster embedded in the compiled YAML (``_env.component``:
the ``serving.rollout`` modules the steps import, and what those import, nothing else: no local
stack, no runtime, no CLI); the step installs the pinned kubernetes/httpx/prometheus-client/matplotlib it
needs. Both steps talk to the Kubernetes API with the pod's in-cluster config, as the Helm
chart's ``<fullname>-deployer`` Role allows (InferenceServices and HTTPRoutes in one namespace, the
predictor Deployments read-only, the rollout's state ConfigMap).
"""

from kfp import dsl
from kfp.dsl import Input, Markdown, Model, Output

from pipelines.components._env import component
from serving.rollout.gates import DEFAULTS as GATE_DEFAULTS

_PACKAGES = ("kubernetes", "httpx", "prometheus-client", "matplotlib")


@component(*_PACKAGES)
def deploy_canary(
    model: Input[Model],
    namespace: str,
    release_fullname: str,
    router: str,
    ready_timeout_s: int,
    rollout: dsl.EmbeddedInput[dsl.Dataset],
) -> str:
    """Serve the trained package as the canary (no traffic yet) and wait until its pods serve it.

    Args:
        model: The model package (``<name>/1/model.onnx`` + ``<name>/model-card.json``).
        namespace: Namespace of the model's Helm release.
        release_fullname: The Helm release's fullname (``<release>-mlrollout-model``).
        router: ``gateway_api`` (chart strategy ``canary``: patches ``<fullname>-canary``) or
            ``kserve_knative`` (chart strategy ``knativeCanary``: a new revision at 0%).
        ready_timeout_s: Seconds to wait for the canary's pods to serve the new model.

    Returns:
        The canary's model version (from the package's model card).
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


@component(*_PACKAGES)
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
    """Shift traffic step by step on measured gates (success rate, p99, prediction drift).

    State persists in the ConfigMap ``<release_fullname>-rollout``, so a retried step resumes the
    same rollout.

    Args:
        namespace: Namespace of the model's Helm release.
        release_fullname: The Helm release's fullname (``<release>-mlrollout-model``).
        router: ``gateway_api`` or ``kserve_knative``, as for ``deploy_canary``.
        model_name: The model's name (the metrics' ``model`` label).
        stable_version: Version the stable side serves now.
        canary_version: Version the canary serves (``deploy_canary``'s output).
        steps: Comma-separated canary weights in percent, e.g. ``10,25,50,100``.
        interval_s: Seconds between analyses (one per step, after the weight is set).
        threshold: Failed analyses in a row that roll the canary back.
        prometheus_url: Prometheus the gates query; empty = scrape the predictors' ``/metrics``.
        min_success_rate: Success-rate gate: least share of non-5xx canary responses.
        max_p99_ms: Latency gate: largest canary p99 in milliseconds.
        max_drift: Drift gate: largest Jensen-Shannon distance between canary and stable predictions.
        max_seconds: Seconds after which the step stops waiting (the rollout keeps its state).
        fail_on_rollback: Fail the run when the canary is rolled back or aborted.
        report: The rollout's timeline plot and text report.

    Returns:
        The final phase: Promoted, RolledBack, Aborted, or the phase when ``max_seconds`` ran out.
    """
    import base64
    import os
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
    phase = rec.phase
    print(text)
    if fail_on_rollback and phase in ("RolledBack", "Aborted"):
        raise RuntimeError(f"canary {canary_version} {phase}: {rec.state['reason']}")
    return phase


def rollout_steps(
    *,
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
    min_success_rate=GATE_DEFAULTS["min_success_rate"],
    max_p99_ms=GATE_DEFAULTS["max_p99_ms"],
    threshold=2,
    max_seconds=3600.0,
    fail_on_rollback=True,
    ready_timeout_s=600,
):
    """Append ``deploy_canary`` -> ``progressive_rollout`` to a pipeline, only when ``enabled`` is true.

    Call it inside a ``@dsl.pipeline`` function with the packaged model and pipeline parameters::

        rollout_steps(package=packaged.outputs["package"], enabled=deploy, namespace=namespace,
                      release_fullname=release_fullname, router=rollout_router, model_name=model_name,
                      stable_version=stable_version, steps=rollout_steps_csv,
                      interval_s=rollout_interval_s, prometheus_url=prometheus_url, max_drift=max_drift)

    Every argument is keyword-only (17 of them: a positional call would mix them up silently).

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
