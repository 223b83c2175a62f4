"""One staging mechanism (``pipelines/components/_env.py``): it runs when a pipeline is compiled,
never on import, and each step embeds exactly the project modules its function imports,
transitively (parent packages included), as the checked-in YAML shows."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines import compile as pcompile
from pipelines.components import _env, batch, rollout, training

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = {
    c.name: c
    for module in (training, batch, rollout)
    for c in vars(module).values()
    if isinstance(c, _env.Component)
}


def _fresh_python(code: str, tmpdir: Path) -> str:
    env = {"PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir), "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_importing_pipelines_and_components_creates_no_temporary_folder(tmp_path):
    """A fresh interpreter with an empty TMPDIR imports every pipeline module (and builds nothing)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = _fresh_python(
        """
        import os, tempfile
        import pipelines.registry, pipelines.training_pipeline, pipelines.batch_pipeline
        import pipelines.components.training, pipelines.components.batch, pipelines.components.rollout
        print(tempfile.gettempdir(), os.listdir(tempfile.gettempdir()))
        """,
        scratch,
    )
    assert out.strip() == f"{scratch} []"


def test_staging_happens_at_compile_time_and_leaves_nothing(tmp_path, monkeypatch):
    import tempfile

    from pipelines.registry import PIPELINES

    made = []
    real = tempfile.TemporaryDirectory

    def spy(*a, **kw):
        d = real(*a, **kw)
        made.append(Path(d.name))
        return d

    monkeypatch.setattr(tempfile, "TemporaryDirectory", spy)
    fresh = _env.Pipeline(
        PIPELINES["batch_scoring_pipeline"].python_func, **PIPELINES["batch_scoring_pipeline"].options
    )
    monkeypatch.setattr(batch.batch_score, "_built", None)
    assert made == []
    pcompile.compile_one(fresh, tmp_path / "b.yaml")
    assert [p.name.startswith("mlrollout-kfp-") for p in made] == [True]
    assert not made[0].exists()


def _archive(component_name: str) -> dict[str, bytes]:
    for path in sorted(pcompile.COMPILED_DIR.glob("*.yaml")):
        executors = pcompile.load(path)[0]["deploymentSpec"]["executors"]
        ex = executors.get(f"exec-{component_name}")
        if ex is not None:
            (b64,) = pcompile._ARCHIVE_RE.findall(ex["container"]["command"][-1])
            return pcompile.archive_members(b64)
    raise AssertionError(f"{component_name} is in no compiled pipeline")


def _as_module(member: str) -> str:
    dotted = member.removeprefix("./").removesuffix(".py").replace("/", ".")
    return dotted.removesuffix(".__init__")


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_each_step_embeds_exactly_what_its_function_imports_transitively(name, tmp_path):
    comp = COMPONENTS[name]
    staged = {_as_module(m) for m in _archive(name)}
    assert staged == set(comp.modules), "the compiled YAML is stale: run `python -m pipelines compile`"
    # nothing missing: what Python really loads for the function's imports is all embedded
    body = [
        ast.unparse(n)
        for n in ast.walk(ast.parse(textwrap.dedent(__import__("inspect").getsource(comp.python_func))))
        if isinstance(n, (ast.Import, ast.ImportFrom))
    ]
    code = "import json, sys\n" + "\n".join(body) + "\n"
    code += (
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {_env.PROJECT_PACKAGES!r})))"
    )
    loaded = set(json.loads(_fresh_python(code, tmp_path).strip().splitlines()[-1]))
    assert loaded <= staged, f"{name} imports {sorted(loaded - staged)} at run time, not embedded"
    # nothing extra: each embedded module is an entry point, a package above one, or imported by one
    reachable = set(_env.entry_modules(comp.python_func))
    for mod in staged:
        path = _env.module_file(mod)
        reachable |= _env.imported_modules(path.read_text(), mod, path.name == "__init__.py")
        reachable |= {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
    assert staged <= reachable, f"{name} embeds {sorted(staged - reachable)}, which nothing imports"


def test_the_batch_step_embeds_the_engine_and_not_the_command():
    modules = set(COMPONENTS["batch-score"].modules)
    assert {
        f"serving.batch.{m}" for m in ("engine", "source", "sink", "report", "model", "errors")
    } <= modules
    assert not {"serving.batch.cli", "serving.batch.bench", "serving.rollout"} & modules
