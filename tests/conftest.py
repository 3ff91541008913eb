"""Tests run offline: hub libraries are told so, and any non-loopback connection fails loudly.

The guard is installed at import time, before any test module imports a library that might try to
download at import. Loopback stays open for the local Ray and MLflow servers that tests start.
"""

import os

import pytest

for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[var] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # no network; and see sweeps/tracking.py for the race it causes
# Reference-feature cache of this test session only (never the user's ~/.cache).
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

_SESSION_FOLDERS = [tempfile.mkdtemp(prefix="acpo-fidelity-cache-"), tempfile.mkdtemp(prefix="acpo-mlflow-default-"),
                    tempfile.mkdtemp(prefix="acpo-rehearsal-cache-")]


@atexit.register
def _remove_session_folders():  # one set per test session, not left behind in the temporary folder
    for folder in _SESSION_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


os.environ["ACPO_FIDELITY_CACHE"] = _SESSION_FOLDERS[0]
# The rehearsal's random-weight stand-ins (trainers/rehearsal.py), shared by the session's rehearsals (GBs: removed at exit).
os.environ["ACPO_REHEARSAL_CACHE"] = _SESSION_FOLDERS[2]
# Tests name their MLflow server explicitly; anything that falls back to MLflow's default store (a
# sqlite file in the working directory) writes here instead of into the checkout.
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_FOLDERS[1]}/mlflow.db"

from tests.offline_guard import install_offline_guard  # noqa: E402

install_offline_guard()


@pytest.fixture(scope="session")
def digits_assets():
    """The committed digits assets (assets/digits), with a clear failure if they are missing."""
    from trainers.config import PROJECT_ROOT

    root = PROJECT_ROOT / "assets" / "digits"
    missing = [name for name in ("classifier.safetensors", "quality_cnniqa.safetensors", "heldout_iqa.safetensors", "base/model_index.json") if not (root / name).exists()]
    if missing:
        pytest.fail(f"committed digits assets missing under {root}: {missing}; re-create them with `acpo assets build`")
    return root


@pytest.fixture(scope="module")
def s3():
    """An S3-compatible server on 127.0.0.1 (moto's) with a bucket; yields `s3://<bucket>`."""
    from tests.servers import s3_server

    with s3_server() as root:
        yield root
