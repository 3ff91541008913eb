"""Tests run offline: hub libraries are told so, and any non-loopback connection fails loudly.

The guard is installed at import time, before any test module imports a library that might try to
download at import. Loopback stays open for the local Ray and MLflow servers that tests start.
"""

import os
import socket

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

_LOCAL_HOSTS = {"localhost", "::1", "0.0.0.0", ""}


class NetworkAccessInTests(RuntimeError):
    pass


def _is_local(host) -> bool:
    host = str(host)
    return host in _LOCAL_HOSTS or host.startswith("127.") or host.startswith("/")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _guard(address):
    if isinstance(address, tuple) and not _is_local(address[0]):
        raise NetworkAccessInTests(f"a test tried to reach {address[0]}:{address[1]}; tests must run offline")


def _guarded_connect(self, address):
    _guard(address)
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    _guard(address)
    return _connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host is not None and not _is_local(host if isinstance(host, str) else host.decode()):
        raise NetworkAccessInTests(f"a test tried to resolve {host!r}; tests must run offline")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.getaddrinfo = _guarded_getaddrinfo


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
