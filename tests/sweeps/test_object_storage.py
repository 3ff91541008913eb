"""A sweep whose storage is object storage: an S3-compatible server on 127.0.0.1 (moto's, started by the
test; clients find it through the standard AWS_* variables), the MLflow server's artifacts in the same
bucket. The driver is killed mid-sweep and the sweep resumed from the bucket: every trial completes
once, the champion is registered as an MLflow model stored in the bucket and loads from the registry,
and nothing is written to a local sweep folder (integration tier)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from trainers.common import storage
from tests import servers
from tests.sweeps.tiny_sweep import runs_of, sweep_args
from trainers.config import PROJECT_ROOT

pytestmark = pytest.mark.integration


def test_a_sweep_on_s3_resumes_after_a_driver_kill_and_writes_nothing_locally(tmp_path, s3, digits_assets, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    folder = f"{s3}/sweeps"
    with servers.mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", f"{s3}/mlflow") as uri:
        client = MlflowClient(uri)
        work = tmp_path / "cwd"  # the driver's working directory: a relative storage_dir would land here
        work.mkdir()
        env = {**os.environ, "RAY_ADDRESS": "local"}  # its own Ray; AWS_* from the s3 fixture
        command = [sys.executable, str(PROJECT_ROOT / "sweeps" / "acpo_sweep.py"), *sweep_args("ons3", folder, uri, samples=4),
                   "--set", "sweep.max_concurrent=1", "--set", f"eval.cache_dir={s3}/cache"]
        driver = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline:  # kill once one trial has finished and another has started
            time.sleep(1)
            if client.get_experiment_by_name("ons3") is None:
                continue
            trials = [r for r in runs_of(client, "ons3") if r.data.tags.get("acpo.role") == "trial"]
            if len(trials) >= 2 and any(r.info.status == "FINISHED" for r in trials):
                break
        assert driver.poll() is None, "the sweep ended before the kill"
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
        resumed = subprocess.run([*command, "--resume"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]

        runs = [r for r in runs_of(client, "ons3") if r.data.tags.get("acpo.role") == "trial"]
        finished = [r for r in runs if r.info.status == "FINISHED"]
        assert len(finished) == 4 and len({r.data.tags["acpo.trial"] for r in runs}) == len(runs)  # every trial once
        assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
        selection = json.loads(storage.read_text(f"{folder}/ons3/selection.json"))
        champion = selection["champion"]
        assert champion["checkpoint"].startswith(f"{folder}/ons3/trials/") and selection["registered"]["version"]
        version = client.get_model_version_by_alias("ons3", "champion")
        parent = client.get_run(selection["mlflow"]["parent_run_id"])
        assert version.source == f"{parent.info.artifact_uri}/champion/{selection['export']['id']}"  # the bucket, a path of its own
        stored = servers.s3_keys(f"mlflow/{parent.info.experiment_id}/{parent.info.run_id}/artifacts/champion/")
        assert any(key.endswith("/MLmodel") for key in stored) and any(key.endswith(".safetensors") for key in stored)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
        images = mlflow.pyfunc.load_model("models:/ons3@champion").predict(pd.DataFrame({"num_images": [2], "steps": [2], "seed": [0]}))
        assert images.shape[0] == 2

    keys = servers.s3_keys("sweeps/ons3/")
    export = json.loads(storage.read_text(f"{folder}/ons3/champion.json"))["folder"]  # named after it was uploaded whole
    assert {"sweeps/ons3/base_metrics.json", "sweeps/ons3/pareto.html", f"sweeps/ons3/{export}/model_index.json"} <= set(keys)
    assert sum(key.endswith("/metrics.json") and "/trials/" in key for key in keys) >= 4
    assert any(key.startswith("sweeps/ons3/optuna-journal/") for key in keys)  # the study, resumed from the bucket's journal
    assert any(key.startswith("cache/") for key in servers.s3_keys("cache/"))  # the reference features, cached in the bucket
    assert list(work.iterdir()) == []  # nothing in a local sweep folder
    assert not [name for name in os.listdir(tempfile.gettempdir()) if name.startswith("acpo-scratch-")]  # each worker's, removed
