"""The KFP rollout component compiles, pins its packages, and carries a self-sufficient hand-off."""

import base64
import io
import re
import subprocess
import sys
import tarfile

import pytest
import yaml
from kfp import compiler


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from pipelines.components._env import built
    from pipelines.components.rollout import progressive_rollout

    out = {}
    for comp in (progressive_rollout,):
        path = tmp_path_factory.mktemp("kfp") / f"{comp.name}.yaml"
        compiler.Compiler().compile(built(comp), str(path))
        out[comp.name] = yaml.safe_load(path.read_text())
    return out


def _executor(spec):
    (executor,) = spec["deploymentSpec"]["executors"].values()
    return executor["container"]


def test_components_have_the_documented_interface(compiled):
    pr = compiled["progressive-rollout"]["root"]
    assert set(pr["inputDefinitions"]["parameters"]) == {
        "namespace",
        "release_fullname",
        "router",
        "model_name",
        "steps",
        "interval_s",
        "threshold",
        "post_promotion_intervals",
        "prometheus_url",
        "min_success_rate",
        "max_p99_ms",
        "max_drift",
        "compare_with_stable",
        "alpha",
        "max_error_increase",
        "latency_min_effect",
        "drift_min_effect",
        "accuracy_min_effect",
        "timeout_s",
        "fail_on_rollback",
    }
    assert pr["inputDefinitions"]["artifacts"]["model"]["artifactType"]["schemaTitle"] == "system.Model"
    out = pr["outputDefinitions"]["artifacts"]
    assert out["report"]["artifactType"]["schemaTitle"] == "system.Markdown"
    assert out["metrics"]["artifactType"]["schemaTitle"] == "system.Metrics"
    assert pr["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "STRING"


# the step's comparison settings -> spec.strategy.gates fields of the CRD
COMPARISON_FIELDS = {
    "compare_with_stable": "compareWithStable",
    "alpha": "alpha",
    "max_error_increase": "maxErrorIncrease",
    "latency_min_effect": "latencyMinEffect",
    "drift_min_effect": "driftMinEffect",
    "accuracy_min_effect": "accuracyMinEffect",
}


def crd_gate_fields() -> dict:
    from pathlib import Path

    crd = Path(__file__).resolve().parents[2] / "helm/mlrollout-operator/crds/modelrollouts.mlrollout.io.yaml"
    doc = yaml.safe_load(crd.read_text())
    (version,) = doc["spec"]["versions"]
    strategy = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["strategy"]
    return strategy["properties"]["gates"]["properties"]


def test_the_steps_comparison_settings_default_to_the_crds():
    import inspect

    from pipelines.components.rollout import rollout_steps
    from pipelines.training_pipeline import training_pipeline

    fields = crd_gate_fields()
    step = inspect.signature(rollout_steps).parameters
    pipeline = inspect.signature(training_pipeline.python_func).parameters
    for arg, field in COMPARISON_FIELDS.items():
        if "default" in fields[field]:
            want = fields[field]["default"]
        else:  # absent in the CRD (no accuracy comparison): the step's 0, which the CRD itself refuses
            assert fields[field].get("exclusiveMinimum") and fields[field]["minimum"] == 0, field
            want = 0.0
        assert step[arg].default == want, arg
        assert pipeline[arg if arg != "alpha" else "rollout_alpha"].default == want, arg


def test_components_pin_their_packages_and_image(compiled):
    for spec in compiled.values():
        c = _executor(spec)
        assert c["image"] == "python:3.11-slim"
        script = " ".join(c["command"])
        assert "kubernetes==30.1.0" in script
        # the controller's metrics and plotting stay with the operator: the hand-off needs none of them
        for dist in ("httpx==", "prometheus-client==", "matplotlib=="):
            assert dist not in script
        assert not re.search(r"'kubernetes'(?!=)", script)  # nothing unpinned


def test_embedded_handoff_imports_on_its_own(compiled, tmp_path):
    """Extract the archive kfp embeds and import the hand-off from it alone (no repo on sys.path)."""
    script = " ".join(_executor(compiled["progressive-rollout"])["command"])
    b64 = re.search(r"__KFP_EMBEDDED_ARCHIVE_B64 = '([^']+)'", script).group(1)
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(b64)), mode="r:gz") as tar:
        names = tar.getnames()
        tar.extractall(tmp_path, filter="data")
    assert any(n.endswith("serving/rollout/cluster.py") for n in names)
    assert not any(k in n for n in names for k in ("localstack", "runtime", "controller", "operator"))
    root = next(p.parents[2] for p in tmp_path.rglob("serving/rollout/cluster.py"))
    code = (
        "import sys, serving.rollout.cluster as c, serving.rollout.handoff as h; "
        "assert c.__file__.startswith(sys.argv[1]), c.__file__; print('ok')"
    )
    # -S: no site processing, so neither the editable install's import hook nor .pth files apply;
    # site-packages is appended by hand for the third-party packages the step pip-installs
    site = next(p for p in sys.path if p.endswith("site-packages"))
    boot = f"import sys; sys.path.insert(0, {str(root)!r}); sys.path.append({site!r}); "
    res = subprocess.run(
        [sys.executable, "-I", "-S", "-c", boot + code, str(root)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_rollout_steps_wire_into_a_pipeline_behind_a_parameter(tmp_path):
    """What the training pipeline gets: the step under one condition on a boolean parameter (off), fed
    the package."""
    from kfp import dsl

    from pipelines.components.rollout import rollout_steps

    @dsl.component(base_image="python:3.11-slim")
    def make_package(package: dsl.Output[dsl.Model]):
        import os

        os.makedirs(package.path, exist_ok=True)

    @dsl.pipeline(name="wired")
    def wired(
        deploy: bool = False,
        namespace: str = "models",
        release_fullname: str = "m-mlrollout-model",
        prometheus_url: str = "",
    ):
        pkg = make_package()
        rollout_steps(
            package=pkg.outputs["package"],
            enabled=deploy,
            namespace=namespace,
            release_fullname=release_fullname,
            router="gateway_api",
            model_name="breast-cancer",
            steps="10,25,50,100",
            interval_s=60.0,
            prometheus_url=prometheus_url,
            max_drift=0.15,
        )

    path = tmp_path / "wired.yaml"
    compiler.Compiler().compile(wired, str(path))
    doc = yaml.safe_load(path.read_text())
    assert doc["root"]["inputDefinitions"]["parameters"]["deploy"]["defaultValue"] is False
    cond = doc["root"]["dag"]["tasks"]["condition-1"]
    assert "pipelinechannel--deploy" in cond["triggerPolicy"]["condition"]
    inner = doc["components"]["comp-condition-1"]["dag"]["tasks"]
    assert set(inner) == {"progressive-rollout"}
    art = inner["progressive-rollout"]["inputs"]["artifacts"]["model"]["componentInputArtifact"]
    assert cond["inputs"]["artifacts"][art]["taskOutputArtifact"]["producerTask"] == "make-package"


@pytest.mark.parametrize("phase", ["Promoted", "RolledBack"])
def test_the_component_body_runs_the_hand_off_and_fills_its_outputs(tmp_path, monkeypatch, phase):
    """The component's own function, called as kfp calls it (artifacts in, a Markdown and a Metrics out),
    against a fake API: it creates the ModelRollout from the package's card and URI, returns the phase
    the watch ends on (or fails with one line on a rollback), and fills both outputs either way."""
    import json

    from kfp import dsl
    from kubernetes import watch

    from pipelines.components.rollout import progressive_rollout
    from serving.rollout import kube

    created: list[dict] = []

    class FakeApi:
        def get_namespaced_custom_object(self, *a):
            if not created:
                raise type("NotFound", (Exception,), {"status": 404})()
            return {**created[0], "metadata": {**created[0]["metadata"], "resourceVersion": "1"}}

        def list_namespaced_custom_object(self, *a, **kw):
            raise AssertionError("only through the watch")

        def create_namespaced_custom_object(self, g, v, ns, plural, body, field_manager):
            created.append(body)
            return {**body, "metadata": {**body["metadata"], "generation": 1}}

    verdict = "pass" if phase == "Promoted" else "fail"
    status = {
        "phase": phase,
        "canaryVersion": "2.0.0",
        "stableVersion": "1.0.0",
        "step": 2,
        "canaryWeight": 100,
        "lastAnalysis": [
            {
                "gate": "success_rate",
                "value": 1.0,
                "threshold": 0.99,
                "op": ">=",
                "n": 500,
                "verdict": verdict,
            }
        ],
        "history": [],
        "message": f"{phase}: the reason",
    }

    def stream(self, fn, *a, **kw):
        yield {"type": "MODIFIED", "object": {**created[0], "status": status}}

    monkeypatch.setattr(kube, "custom_api", lambda *a, **kw: FakeApi())
    monkeypatch.setattr(watch.Watch, "stream", stream)
    card = tmp_path / "pkg" / "bc" / "model-card.json"
    card.parent.mkdir(parents=True)
    card.write_text(json.dumps({"version": "2.0.0"}))
    model = dsl.Model(uri="minio://mlpipeline/v2/artifacts/run/package")
    model.custom_path = str(tmp_path / "pkg")
    report = dsl.Markdown(uri=str(tmp_path / "report.md"))
    metrics = dsl.Metrics()
    args = dict(
        model=model,
        namespace="models",
        release_fullname="bc",
        router="gateway_api",
        model_name="bc",
        steps="50,100",
        interval_s=30.0,
        threshold=2,
        post_promotion_intervals=0,
        prometheus_url="http://prom:9090",
        min_success_rate=0.99,
        max_p99_ms=500.0,
        max_drift=0.15,
        compare_with_stable=True,
        alpha=0.02,
        max_error_increase=0.01,
        latency_min_effect=0.05,
        drift_min_effect=0.1,
        accuracy_min_effect=0.0,
        timeout_s=60.0,
        fail_on_rollback=True,
        report=report,
        metrics=metrics,
        rollout=None,
    )
    if phase == "RolledBack":
        with pytest.raises(RuntimeError) as err:
            progressive_rollout.python_func(**args)
        assert str(err.value) == (
            "canary 2.0.0 RolledBack on ModelRollout models/bc: RolledBack: the reason "
            "[failed gates: success_rate=1 (threshold >=0.99, n=500)]"
        )
        assert (tmp_path / "report.md").read_text().startswith("# Rollout of 2.0.0: RolledBack")
        assert metrics.metadata["promoted"] == 0.0
        return
    assert progressive_rollout.python_func(**args) == "Promoted"
    (obj,) = created
    assert obj["metadata"] == {"name": "bc", "namespace": "models"}
    assert obj["spec"]["model"] == {
        "name": "bc",
        "storageUri": "s3://mlpipeline/v2/artifacts/run/package",
        "version": "2.0.0",
    }
    assert obj["spec"]["metrics"] == {"provider": "prometheus", "url": "http://prom:9090"}
    # the comparison settings as the CRD's fields; accuracy_min_effect 0: no accuracy comparison
    assert obj["spec"]["strategy"]["gates"] == {
        "minSuccessRate": 0.99,
        "maxP99Ms": 500.0,
        "maxDrift": 0.15,
        "compareWithStable": True,
        "alpha": 0.02,
        "maxErrorIncrease": 0.01,
        "latencyMinEffect": 0.05,
        "driftMinEffect": 0.1,
    }
    assert (tmp_path / "report.md").read_text().startswith("# Rollout of 2.0.0: Promoted")
    assert metrics.metadata["promoted"] == 1.0 and metrics.metadata["success_rate_n"] == 500.0
