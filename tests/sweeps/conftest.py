"""Fixtures of the sweep tests."""

import pytest

from tests import servers


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real MLflow server on SQLite and loopback, one per test module; yields its URI."""
    folder = tmp_path_factory.mktemp("mlflow")
    with servers.mlflow_server(f"sqlite:///{folder}/mlflow.db", folder / "artifacts") as uri:
        yield uri
