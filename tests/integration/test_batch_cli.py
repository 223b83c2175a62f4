"""``python -m serving.batch`` as a real subprocess: end to end, and interrupted mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serving.contract import modelcard
from tests.modelfactory import breast_cancer

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    """300k rows: with 500-row chunks the command needs ~600 chunk round trips, time to interrupt it."""
    X, _, features, _ = breast_cancer()
    rng = np.random.default_rng(1)
    Xb = X[rng.integers(0, len(X), 300_000)]
    path = tmp_path_factory.mktemp("batch-in") / "big.parquet"
    cols = {"id": np.arange(len(Xb))} | {str(f): Xb[:, j] for j, f in enumerate(features)}
    pq.write_table(pa.table(cols), path, row_group_size=50_000)
    return path, Xb


def _cmd(model_dir, inp, out, *extra):
    return [sys.executable, "-m", "serving.batch", "--model_dir", str(model_dir), "--input", str(inp),
            "--output", str(out), *extra]  # fmt: skip


def test_subprocess_end_to_end(tmp_path, model_package, big_input):
    inp, Xb = big_input
    out = tmp_path / "scored.parquet"
    p = subprocess.run(_cmd(model_package, inp, out), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""  # stdout stays clean for pipes; progress and summary go to stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"scored {len(Xb):,} rows in ") and "rows/s" in last
    got = pq.read_table(out)
    sess = ort.InferenceSession(str(modelcard.onnx_path(model_package)), providers=["CPUExecutionProvider"])
    label, proba = sess.run(["label", "probabilities"], {"input": np.ascontiguousarray(Xb, np.float32)})
    assert got.column("id").to_pylist() == list(range(len(Xb)))
    np.testing.assert_array_equal(got.column("prediction").to_numpy(), label)
    np.testing.assert_array_equal(got.column("prob_benign").to_numpy(), proba[:, 1])


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_leaves_no_output(tmp_path, model_package, big_input, sig, code):
    inp, _ = big_input
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "scored.csv"
    proc = subprocess.Popen(
        # 50-row chunks: ~4 s of work, so the signal lands mid-run even on a loaded machine (with 500-row
        # chunks the whole run took 0.5 s and a busy test process could send its signal after the end)
        _cmd(model_package, inp, out, "--chunk-rows", "50", "--no-progress"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a test session started in the background (`make test &`) inherits SIGINT ignored, and Python then
        # installs no KeyboardInterrupt handler: give the command the disposition a terminal would
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        # wait until it is really writing: the temporary file exists and has grown past its header
        deadline = time.monotonic() + 60
        partial = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in out_dir.iterdir() if p.name.endswith(".partial")]
            if partial and partial[0].stat().st_size > 5_000:
                break
            time.sleep(0.005)
        assert partial and proc.poll() is None, "the command finished or never started writing"
        os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == code, err
    assert "no output written" in err.strip().splitlines()[-1]
    assert list(out_dir.iterdir()) == []  # neither the output nor the temporary file


def test_command_never_imports_pandas(tmp_path, model_package, big_input):
    """pyarrow's ``to_numpy``/``pa.array`` pull in pandas (~1 s of start-up); the command avoids both."""
    inp, _ = big_input
    code = (
        "import sys; from serving.batch import cli; "
        f"rc = cli.main(['--model_dir', {str(model_package)!r}, '--input', {str(inp)!r}, "
        f"'--output', {str(tmp_path / 'o.csv')!r}, '--no-progress']); "
        "print(rc, 'pandas' in sys.modules)"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["0", "False"], p.stderr


_DEFAULT_SIGINT = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731 - see the test above

# runs the command as ``python -m serving.batch`` does, but sends itself SIGINT when the command's first
# heavy import (onnxruntime) starts: the interrupt lands inside the start-up imports every time
_INTERRUPT_IN_IMPORT = """
import os, runpy, signal, sys

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.argv = ["serving.batch", *sys.argv[1:]]
sys.meta_path.insert(0, Interrupt())
runpy.run_module("serving.batch", run_name="__main__", alter_sys=True)
"""


def _wait_for_heavy_imports(pid: int, timeout_s: float = 30.0) -> None:
    """Until the command is inside its own start-up imports: a fixed 0.2 s sleep raced the interpreter's
    own start (on a loaded machine the signal landed in `site`, before any code of ours runs, where only
    Python's fatal-error path exists). numpy's extension is mapped only by `serving.batch.cli`'s imports,
    which begin after the command's SIGINT handler is installed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if "numpy" in Path(f"/proc/{pid}/maps").read_text():
                return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.005)
    raise AssertionError(f"the command did not reach its imports within {timeout_s:.0f} s")


@pytest.mark.parametrize("when", ["during-imports", "inside-import"])
def test_sigint_during_startup_imports_is_one_line(tmp_path, model_package, big_input, when):
    """hardening.md 6: SIGINT during the start-up imports (0.3 s after start; they take ~0.25 s) printed a
    45-line KeyboardInterrupt traceback; now it is the same one line and exit 130 as an interrupt mid-run."""
    inp, _ = big_input
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = _cmd(model_package, inp, out_dir / "scored.csv", "--chunk-rows", "50", "--no-progress")
    if when == "inside-import":
        cmd = [sys.executable, "-c", _INTERRUPT_IN_IMPORT, *cmd[3:]]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_DEFAULT_SIGINT
    )
    try:
        if when == "during-imports":
            _wait_for_heavy_imports(proc.pid)
            os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 130, err
    assert err.splitlines() == ["interrupted (SIGINT): no output written"]
    assert out == "" and list(out_dir.iterdir()) == []


def test_stale_partial_after_sigkill_is_removed_by_the_next_run(tmp_path, model_package, big_input):
    """hardening.md 6: SIGKILL cannot be caught, so the killed run's '.<name>.XXXXXXXX.partial' stays;
    the next successful run for the same output removes it (and leaves other files alone)."""
    inp, Xb = big_input
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "bigout.parquet"
    others = [out_dir / ".other.parquet.abcd1234.partial", out_dir / "notes.txt"]
    for p in others:
        p.write_text("not the command's")
    proc = subprocess.Popen(
        _cmd(model_package, inp, out, "--chunk-rows", "50", "--no-progress"),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        partial = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in out_dir.iterdir() if p.name.startswith(".bigout.parquet.")]
            if partial and partial[0].stat().st_size > 5_000:
                break
            time.sleep(0.005)
        assert partial and proc.poll() is None, "the command finished or never started writing"
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL and partial[0].exists()  # the reproduction: it is left
    p = subprocess.run(_cmd(model_package, inp, out, "--no-progress"), cwd=ROOT, capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert not partial[0].exists() and pq.read_metadata(out).num_rows == len(Xb)
    assert sorted(out_dir.iterdir()) == sorted([out, *others])
