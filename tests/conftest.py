from __future__ import annotations

import sys

import pytest

from tests.modelfactory import build_package

# `import kserve` parses sys.argv (kserve.model_server calls parse_known_args at import). Under pytest
# that is pytest's command line, and argparse reads prefixes as abbreviations: `pytest --co` becomes
# kserve's --configure_logging and exits 2. Import it once here with an empty command line.
_argv, sys.argv = sys.argv, sys.argv[:1]
try:
    import kserve  # noqa: F401
finally:
    sys.argv = _argv


CONTROLPLANE_TESTS = "tests/controlplane/"


def pytest_xdist_make_scheduler(config, log):
    """`make test` runs on pytest-xdist workers: every control-plane test goes to one worker, so the
    session starts one control plane (each worker would otherwise start its own: ~1 minute and a core).

    Not ``--dist loadgroup`` with ``xdist_group`` marks: pytest-xdist 3.8 tags a grouped test by
    assigning ``item._nodeid``, which pytest 9.2 no longer reads (nodes keep a ``NodeId`` in ``_id``),
    so the marks group nothing. ``_split_scope`` is what LoadGroupScheduling itself overrides: one scope
    for the control-plane tests, every other test its own scope (plain ``--dist load`` balancing)."""
    if config.getvalue("dist") != "load":
        return None  # an explicit --dist loadfile/loadscope/... keeps xdist's own scheduler
    from xdist.scheduler import LoadScopeScheduling

    class ControlPlaneOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return CONTROLPLANE_TESTS if nodeid.startswith(CONTROLPLANE_TESTS) else nodeid

    return ControlPlaneOnOneWorker(config, log)


@pytest.fixture(scope="session")
def model_package(tmp_path_factory):
    """A real packaged logistic-regression model: returns the ``<root>/<name>`` folder."""
    model_dir, _ = build_package(tmp_path_factory.mktemp("models"))
    return model_dir
