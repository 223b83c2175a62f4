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


@pytest.fixture(scope="session")
def model_package(tmp_path_factory):
    """A real packaged logistic-regression model: returns the ``<root>/<name>`` folder."""
    model_dir, _ = build_package(tmp_path_factory.mktemp("models"))
    return model_dir
