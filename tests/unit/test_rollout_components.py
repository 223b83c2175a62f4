"""The KFP rollout components compile, pin their packages, and carry a self-sufficient controller."""

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
    from pipelines.components.rollout import deploy_canary, progressive_rollout

    out = {}
    for comp in (deploy_canary, progressive_rollout):
        path = tmp_path_factory.mktemp("kfp") / f"{comp.name}.yaml"
        compiler.Compiler().compile(built(comp), str(path))
        out[comp.name] = yaml.safe_load(path.read_text())
    return out


def _executor(spec):
    (executor,) = spec["deploymentSpec"]["executors"].values()
    return executor["container"]


def test_components_have_the_documented_interface(compiled):
    dc = compiled["deploy-canary"]["root"]["inputDefinitions"]
    assert set(dc["parameters"]) == {"namespace", "release_fullname", "router", "ready_timeout_s"}
    assert dc["artifacts"]["model"]["artifactType"]["schemaTitle"] == "system.Model"
    pr = compiled["progressive-rollout"]["root"]
    assert {"steps", "interval_s", "prometheus_url", "max_drift", "fail_on_rollback"} <= set(
        pr["inputDefinitions"]["parameters"]
    )
    assert pr["outputDefinitions"]["artifacts"]["report"]["artifactType"]["schemaTitle"] == "system.Markdown"
    assert pr["outputDefinitions"]["parameters"]["Output"]["parameterType"] == "STRING"


def test_components_pin_their_packages_and_image(compiled):
    for spec in compiled.values():
        c = _executor(spec)
        assert c["image"] == "python:3.11-slim"
        script = " ".join(c["command"])
        for pin in ("kubernetes==30.1.0", "httpx==0.28.1", "prometheus-client==0.26.0", "matplotlib==3.11.2"):
            assert pin in script
        assert not re.search(r"'kubernetes'(?!=)", script)  # nothing unpinned


def test_embedded_controller_imports_on_its_own(compiled, tmp_path):
    """Extract the archive kfp embeds and import the cluster path from it alone (no repo on sys.path)."""
    script = " ".join(_executor(compiled["progressive-rollout"])["command"])
    b64 = re.search(r"__KFP_EMBEDDED_ARCHIVE_B64 = '([^']+)'", script).group(1)
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(b64)), mode="r:gz") as tar:
        names = tar.getnames()
        tar.extractall(tmp_path, filter="data")
    assert any(n.endswith("serving/rollout/cluster.py") for n in names)
    assert not any("localstack" in n or "runtime" in n for n in names)
    root = next(p.parents[2] for p in tmp_path.rglob("serving/rollout/cluster.py"))
    code = (
        "import sys, serving.rollout.cluster as c, serving.rollout.report as r; "
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
    """What the training pipeline gets: both steps under one condition on a boolean parameter (off)."""
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
        stable_version: str = "1.0.0",
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
            stable_version=stable_version,
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
    assert set(inner) == {"deploy-canary", "progressive-rollout"}
    pr = inner["progressive-rollout"]["inputs"]["parameters"]["canary_version"]
    assert pr["taskOutputParameter"]["producerTask"] == "deploy-canary"


def test_progressive_rollout_step_refuses_knative_without_prometheus():
    """Knative revisions share one Service: there is nothing per version to scrape (no API call is made)."""
    from serving.rollout import cluster

    with pytest.raises(ValueError, match="prometheus_url"):
        cluster.progressive_rollout(
            object(),
            namespace="models",
            fullname="kn",
            model="m",
            stable_version="1.0.0",
            canary_version="2.0.0",
            router="kserve_knative",
        )


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"min_success_rate": 2.0}, "min-success-rate"),
        ({"min_success_rate": -1.0}, "min-success-rate"),
        ({"max_p99_ms": -5.0}, "max-p99-ms"),
        ({"min_predictions": -1}, "min-predictions"),
        ({"min_predictions": 0}, "min-predictions"),
        ({"max_drift": 0.0}, "max-drift"),
        ({"min_accuracy": 1.5}, "min-accuracy"),
        ({"steps": "10,5"}, "strictly increasing"),
        ({"interval_s": 0.0}, "interval"),
        ({"canary_version": "1.0.0"}, "also the stable version"),
    ],
)
def test_progressive_rollout_step_refuses_nonsense_values_before_any_api_call(kw, message):
    """The KFP step gets the CLI's refusals, as a ValueError, before it touches the cluster (api=object())."""
    from serving.rollout import cluster

    args = {
        "namespace": "models",
        "fullname": "m",
        "model": "m",
        "stable_version": "1.0.0",
        "canary_version": "2.0.0",
        "prometheus_url": "http://prometheus:9090",
        **kw,
    }
    with pytest.raises(ValueError, match=message):
        cluster.progressive_rollout(object(), **args)
