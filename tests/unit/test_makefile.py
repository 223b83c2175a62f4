"""`make help` lists every documented target, and `make e2e` fails without a cluster unless told not to."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make on PATH")


def _make(*args: str) -> str:
    return subprocess.run(["make", "-s", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_help_lists_every_documented_target():
    documented = re.findall(r"^([^\s:#]+):[^\n]*## ", (ROOT / "Makefile").read_text(), re.M)
    listed = [line.split()[0] for line in _make("help").splitlines() if line.strip()]
    assert "e2e" in documented and listed == documented


def test_e2e_requires_a_cluster_unless_skips_are_allowed():
    assert "MLROLLOUT_E2E_REQUIRED=1 " in _make("-n", "e2e")
    assert "MLROLLOUT_E2E_REQUIRED=0 " in _make("-n", "e2e", "E2E_SKIP_OK=1")
