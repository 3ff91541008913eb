"""The fault suite of tests/faults/ as tests. Every bad input a hostile-but-fair user tried
fails in one line before Ray starts, leaving nothing behind (integration tier, ~2 minutes); every
injected fault is survived with nothing lost (`-m slow`: real sweeps, MLflow down for 5 minutes, the
S3 store refusing connections for 60 s, a second driver, a full disk; ~17 minutes, run by CI after `make test`)."""

import os

import pytest

from tests.faults.catalogue import run_bad_inputs, run_faults
from tests.faults.harness import MlflowServer, report, totals

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("faults-mlflow")).start()
    yield server
    server.stop()


def test_every_bad_input_fails_in_one_line_before_ray_and_leaves_nothing(tmp_path, server, digits_assets):
    import ray

    outcomes = run_bad_inputs(tmp_path, server.uri)
    unclean = [(o.name, o.detail) for o in outcomes if not o.ok]
    assert len(outcomes) >= 37 and not unclean, unclean
    assert not ray.is_initialized()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the read-only and full-disk cases mount a tmpfs")
def test_every_fault_is_survived_with_nothing_lost(tmp_path, server, digits_assets):
    outcomes = run_faults(tmp_path, server, outage=300)
    report(outcomes)  # shown with `pytest -s` (make test-faults): the suite's table
    print(totals([], outcomes))
    failed = [(o.name, o.detail) for o in outcomes if not o.ok]
    assert len(outcomes) == 8 and not failed, failed
    assert sum(o.lost_trials + o.lost_metrics + o.lost_checkpoints for o in outcomes) == 0
