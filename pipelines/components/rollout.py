"""The KFP v2 component that ends a training run by handing its model to the rollout operator:
``progressive_rollout``, a thin, hermetic wrapper over ``serving.rollout.cluster``.

The step declares the trained package on the release's ModelRollout (``spec.model``: storageUri and
version; ``spec.strategy`` from its parameters) and waits for the operator (serving/rollout/operator.py)
to end the rollout, then reports the evidence from the object's status. It moves no traffic and touches
no InferenceService: the operator deploys the canary, runs the state machine, promotes or rolls back.
So KFP's ``pipeline-runner`` needs only get/create/patch/list/watch on modelrollouts in the model
namespace (the Helm chart's ``<fullname>-pipeline`` Role).

The code reaches the cluster embedded in the compiled YAML (``_env.component``: the ``serving.rollout``
modules the step imports and what those import: the hand-off, the spec and gate checks, no controller,
no local stack); the step installs only the pinned kubernetes client.
"""

from kfp import dsl
from kfp.dsl import Input, Markdown, Metrics, Model, Output

from pipelines.components._env import component
from serving.rollout.gates import DEFAULTS as GATE_DEFAULTS


@component("kubernetes")
def progressive_rollout(
    model: Input[Model],
    namespace: str,
    release_fullname: str,
    router: str,
    model_name: str,
    steps: str,
    interval_s: float,
    threshold: int,
    post_promotion_intervals: int,
    prometheus_url: str,
    min_success_rate: float,
    max_p99_ms: float,
    max_drift: float,
    compare_with_stable: bool,
    alpha: float,
    max_error_increase: float,
    latency_min_effect: float,
    drift_min_effect: float,
    accuracy_min_effect: float,
    timeout_s: float,
    fail_on_rollback: bool,
    report: Output[Markdown],
    metrics: Output[Metrics],
    rollout: dsl.EmbeddedInput[dsl.Dataset],
) -> str:
    """Hand the package to the rollout operator (the release's ModelRollout) and wait for the outcome.

    Creates or patches the ModelRollout ``<release_fullname>`` in ``namespace`` with this package as the
    desired model and the strategy below, watches it until the operator shows Promoted, RolledBack or
    Aborted for this version, and reports each analysis's evidence (gate, value, threshold, n,
    verdict) and the history.

    Args:
        model: The model package (``<name>/1/model.onnx`` + ``<name>/model-card.json``); its version is
            the card's.
        namespace: Namespace of the model's Helm release (and of its ModelRollout).
        release_fullname: The Helm release's fullname (``<release>-mlrollout-model``): the rollout's
            target and the ModelRollout's name.
        router: ``gateway_api`` (chart strategy ``canary``) or ``kserve_knative`` (``knativeCanary``).
        model_name: The model's name (the metrics' ``model`` label).
        steps: Comma-separated canary weights in percent, the last 100, e.g. ``10,25,50,100``.
        interval_s: Seconds between analyses (one per step, after the weight is set).
        threshold: Failed analyses (over the rollout) that roll the canary back.
        post_promotion_intervals: The watch after promotion: analyses of the new stable against the
            previous version's baseline after the promotion (a failure restores the previous model);
            0 = none. Needs ``gateway_api``.
        prometheus_url: Prometheus the operator's gates query; empty = the ModelRollout's own
            ``spec.metrics``, or on create the operator's ``--prometheus-url``.
        min_success_rate: Success-rate gate: least share of non-5xx canary responses.
        max_p99_ms: Latency gate: largest canary p99 in milliseconds.
        max_drift: Drift gate: largest Jensen-Shannon distance between canary and stable predictions.
        compare_with_stable: Judge canary vs stable with sequential tests at a stated false-rollback
            rate (error rate, latency histograms, drift test; accuracy with ``accuracy_min_effect``)
            beside the ``max_p99_ms`` limit, instead of the absolute gates (CRD ``compareWithStable``).
        alpha: The rollout's false-rollback rate, split over the comparisons (0 < alpha <= 0.5).
        max_error_increase: Smallest error-rate increase worth catching, as a share (0.005 = 0.5
            points).
        latency_min_effect: Smallest slowdown worth catching: P(canary slower than stable) - 1/2.
        drift_min_effect: Smallest score-histogram change worth catching (Cohen's w).
        accuracy_min_effect: Smallest accuracy drop worth catching on labelled feedback (0.02 = 2
            points); 0 = no accuracy comparison.
        timeout_s: Seconds the step waits for the end (then it fails; the operator carries on).
        fail_on_rollback: Fail the run when the canary is rolled back or aborted.
        report: Markdown: the outcome, the last analysis per gate, the history of decisions.
        metrics: The outcome (``promoted`` 1/0), final weight and step, analyses by verdict, each
            gate's last value and sample count.

    Returns:
        The final phase: Promoted, or RolledBack/Aborted when ``fail_on_rollback`` is off.
    """
    from serving.rollout import cluster, kube

    return cluster.progressive_rollout(
        kube.custom_api(),  # in-cluster: the pod's pipeline-runner token
        package_dir=model.path,
        package_uri=model.uri,
        namespace=namespace,
        fullname=release_fullname,
        model_name=model_name,
        router=router,
        steps=steps,
        interval_s=interval_s,
        threshold=threshold,
        post_promotion_intervals=post_promotion_intervals,
        prometheus_url=prometheus_url,
        min_success_rate=min_success_rate,
        max_p99_ms=max_p99_ms,
        max_drift=max_drift,
        compare_with_stable=compare_with_stable,
        alpha=alpha,
        max_error_increase=max_error_increase,
        latency_min_effect=latency_min_effect,
        drift_min_effect=drift_min_effect,
        accuracy_min_effect=accuracy_min_effect,
        timeout_s=timeout_s,
        fail_on_rollback=fail_on_rollback,
        report_path=report.path,
        log_metric=metrics.log_metric,
    )


def rollout_steps(
    *,
    package,
    enabled,
    namespace,
    release_fullname,
    router,
    model_name,
    steps,
    interval_s,
    prometheus_url,
    max_drift,
    min_success_rate=GATE_DEFAULTS["min_success_rate"],
    max_p99_ms=GATE_DEFAULTS["max_p99_ms"],
    compare_with_stable=True,  # the CRD's default: the comparisons with stable
    alpha=GATE_DEFAULTS["alpha"],
    max_error_increase=GATE_DEFAULTS["max_error_increase"],
    latency_min_effect=GATE_DEFAULTS["latency_min_effect"],
    drift_min_effect=GATE_DEFAULTS["drift_min_effect"],
    accuracy_min_effect=0.0,
    threshold=2,
    post_promotion_intervals=0,
    timeout_s=3600.0,
    fail_on_rollback=True,
):
    """Append ``progressive_rollout`` to a pipeline, only when ``enabled`` is true.

    Call it inside a ``@dsl.pipeline`` function with the packaged model and pipeline parameters::

        rollout_steps(package=packaged.outputs["package"], enabled=deploy, namespace=namespace,
                      release_fullname=release_fullname, router=rollout_router, model_name=model_name,
                      steps=rollout_steps_csv, interval_s=rollout_interval_s,
                      prometheus_url=prometheus_url, max_drift=max_drift)

    Every argument is keyword-only (22 of them: a positional call would mix them up silently). The
    comparison settings default to the CRD's (``tests/unit/test_rollout_components.py`` reads them from
    the CRD); ``accuracy_min_effect`` 0 is the CRD's absent field (no accuracy comparison).

    Returns the ``progressive_rollout`` task (its output is the final phase).
    """
    with dsl.If(enabled == True, name="rollout-enabled"):  # noqa: E712 (a KFP condition, not a Python bool)
        return progressive_rollout(
            model=package,
            namespace=namespace,
            release_fullname=release_fullname,
            router=router,
            model_name=model_name,
            steps=steps,
            interval_s=interval_s,
            threshold=threshold,
            post_promotion_intervals=post_promotion_intervals,
            prometheus_url=prometheus_url,
            min_success_rate=min_success_rate,
            max_p99_ms=max_p99_ms,
            max_drift=max_drift,
            compare_with_stable=compare_with_stable,
            alpha=alpha,
            max_error_increase=max_error_increase,
            latency_min_effect=latency_min_effect,
            drift_min_effect=drift_min_effect,
            accuracy_min_effect=accuracy_min_effect,
            timeout_s=timeout_s,
            fail_on_rollback=fail_on_rollback,
        )
