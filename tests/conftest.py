from __future__ import annotations

import pytest

from tests.modelfactory import build_package


@pytest.fixture(scope="session")
def model_package(tmp_path_factory):
    """A real packaged logistic-regression model: returns the ``<root>/<name>`` folder."""
    model_dir, _ = build_package(tmp_path_factory.mktemp("models"))
    return model_dir
