"""The sweep end to end on a local Ray instance and a real MLflow server (SQLite, loopback), tiny:
3 trials of a few steps; and a sweep whose driver is killed, then resumed (integration tier). Bad
presets and --dry-run need neither (unit tier)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.sweeps.tiny_sweep import TINY, runs_of, sweep_args
from trainers.config import PROJECT_ROOT


@pytest.mark.integration
def test_tiny_sweep_tracks_selects_and_registers(tmp_path, mlflow_server, digits_assets, monkeypatch):
    import mlflow
    import ray
    from mlflow.tracking import MlflowClient

    from sweeps.acpo_sweep import main
    from trainers.models import load_base_model

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        assert main(sweep_args("e2e", tmp_path, mlflow_server)) == 0
    finally:
        ray.shutdown()
    client = MlflowClient(mlflow_server)
    assert client.get_experiment_by_name("e2e").tags["mlflow.experimentKind"] == "custom_model_development"
    runs = runs_of(client, "e2e")
    parents = [r for r in runs if r.data.tags.get("acpo.role") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("acpo.role") == "trial"]
    assert len(parents) == 1 and len(trials) == 3
    parent = parents[0].info.run_id
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in runs if r.info.run_id != parent)
    assert any(r.data.tags.get("acpo.role") == "base" for r in runs)
    for trial in trials:
        assert {"fid", "heldout_quality", "loss", "loss/nr_iqa"} <= set(trial.data.metrics)
        assert {"objective.anchor.weight", "objective.nr_iqa.weight"} <= set(trial.data.params)
        history = client.get_metric_history(trial.info.run_id, "fid")
        assert [m.step for m in history] == sorted(m.step for m in history) and history[0].step == 2
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(trial.data.metrics)
        images = [a.path for a in client.list_artifacts(trial.info.run_id, "images") if a.path.endswith(".png")]
        steps = sorted(int(path.split("+")[2]) for path in images)  # images/samples+step+S+timestamp+T+uuid.png
        assert steps == [0] + [m.step for m in history]  # the base model's grid at step 0, then one per evaluation at its step
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"pareto.png", "pareto.html", "pareto_front.json", "selection.json", "champion"} <= artifacts
    selection = json.loads((tmp_path / "e2e" / "selection.json").read_text())
    winner = selection["champion"]
    assert selection["mlflow"]["url"].endswith(f"/#/experiments/{selection['mlflow']['experiment_id']}?workflowType=machine_learning")
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert note.startswith(f"**Champion: trial [{winner['trial']}]")
    assert f"**champion**: trial [{winner['trial']}](#/experiments/" in note and f"{winner['fid']:.3f}" in note
    version = client.get_model_version_by_alias("e2e", "champion")
    assert version.tags["trial"] == winner["trial"] and version.tags["step"] == str(winner["step"])
    assert float(version.tags["fid"]) == pytest.approx(winner["fid"], abs=1e-4) and "objective.anchor.weight" in str(version.tags)
    assert winner["trial"] in version.description
    first_files = artifact_hashes(version.source, tmp_path / "v1-before", mlflow_server)  # what version 1 holds as registered
    import pandas as pd

    with monkeypatch.context() as env:  # as a user would: the server in the environment, models:/ through its registry
        env.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        env.setenv("MLFLOW_REGISTRY_URI", mlflow_server)
        model = mlflow.pyfunc.load_model("models:/e2e@champion")
    images = model.predict(pd.DataFrame({"num_images": [4], "steps": [2], "seed": [0]}))
    assert images.shape == (4, 16, 16, 1) and images.dtype.name == "uint8" and 0 < images.mean() < 255
    local = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp_path / "download"), tracking_uri=mlflow_server)
    champion = load_base_model(Path(local) / "artifacts" / "champion")  # the plain diffusers folder inside the MLflow model
    with torch.no_grad():
        out = champion.denoiser(torch.randn(2, 1, 16, 16), torch.tensor([10, 500])).sample
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    assert selection["evaluated"] >= 3  # every trial's checkpoints at steps 2 and (some) 4
    within = [r for r in selection["front"] if r["fid"] <= selection["base"]["fid"] * 1.1]
    if within:  # the tolerance rule: the best held-out quality among them
        assert selection["rule"].startswith("highest held-out quality")
        assert selection["champion"]["heldout_quality"] == max(r["heldout_quality"] for r in within)
    else:
        assert selection["rule"].startswith("knee") and selection["champion"] in selection["front"]
    assert selection["rule"].endswith("not confirmed on fresh samples") and version.tags["confirmed"].startswith("no")
    assert selection["screening"]["bank"] == {"seed": 0, "samples": 16}
    assert all({"fid_ratio", "heldout_quality_diff"} <= set(r["intervals"]) for r in selection["front"])  # paired with the base

    # The same sweep selected again with its confirmation on (`acpo select`): the front's top 2 and the
    # base on a fresh seed bank; nothing is trained again.
    from sweeps.cli import main as acpo

    assert acpo(["select", "--sweep", "e2e", "--set", f"sweep.storage_dir={tmp_path}", "--set", f"sweep.tracking_uri={mlflow_server}",
                 *sum((["--set", item] for item in TINY), []), "--set", "sweep.confirm.top_k=2", "--set", "sweep.confirm.seed=7"]) == 0
    confirmed = json.loads((tmp_path / "e2e" / "selection.json").read_text())
    confirmation = confirmed["confirmation"]
    assert confirmation["bank"] == {"seed": 7, "samples": 16, "steps": 2}
    assert len(confirmation["candidates"]) == min(2, len(confirmed["front"])) >= 1
    for candidate in confirmation["candidates"]:
        figures = candidate["confirmation"]
        assert figures["samples"] == 16 and figures["fid_ratio"]["low"] < figures["fid_ratio"]["high"]
        assert candidate["screening"]["intervals"]["samples"] == 16 and 0 < candidate["p_holm"] <= 1
    assert [path.name for path in (tmp_path / "e2e" / "confirmation").glob("seed7-n16-steps2-*/base.safetensors")] == ["base.safetensors"]
    parent_run = client.get_run(parent)
    assert "### Confirmation (fresh seed bank: seed 7, 16 samples)" in parent_run.data.tags["mlflow.note.content"]
    assert parent_run.data.metrics["confirmed_candidates"] == len(confirmation["candidates"])
    if confirmed["champion"] is None:  # 16 samples rarely prove a gain: then nothing is registered
        assert confirmed["rule"].startswith("no checkpoint beat the base model with 95% confidence")
        assert parent_run.data.metrics["champion_found"] == 0 and "registered" not in confirmed
        assert confirmed["alias_removed"] == {"model": "e2e", "version": version.version}  # the screening's champion, unaliased
        with pytest.raises(mlflow.exceptions.MlflowException):
            client.get_model_version_by_alias("e2e", "champion")
    else:
        again = client.get_model_version_by_alias("e2e", "champion")
        assert again.version != version.version and again.tags["confirmed"] == "yes: seed 7, 16 samples"
        assert "[" in again.tags["confirmed_heldout_gain"] and "confirmed_fid_ratio" in again.tags

    # Selected once more under another rule (any FID): a new version with a source of its own, and version 1's
    # files byte for byte as registered (its MLmodel alone differs on every save, so a rewrite would show).
    assert acpo(["select", "--sweep", "e2e", "--set", f"sweep.storage_dir={tmp_path}", "--set", f"sweep.tracking_uri={mlflow_server}",
                 *sum((["--set", item] for item in TINY), []), "--set", "sweep.fid_tolerance=100"]) == 0
    latest = client.get_model_version_by_alias("e2e", "champion")
    assert int(latest.version) > int(version.version) and latest.source != version.source
    assert artifact_hashes(version.source, tmp_path / "v1-after", mlflow_server) == first_files
    assert artifact_hashes(latest.source, tmp_path / "latest", mlflow_server)["MLmodel"] != first_files["MLmodel"]
    pointer = json.loads((tmp_path / "e2e" / "champion.json").read_text())
    assert [p.name for p in (tmp_path / "e2e" / "champions").iterdir()] == [pointer["folder"].split("/")[1]]  # the sweep's own copy: the latest


def artifact_hashes(source: str, folder: Path, uri: str) -> dict[str, str]:
    """A registered version's files as downloaded, each by its sha256."""
    import hashlib

    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(folder), tracking_uri=uri))
    return {str(p.relative_to(local)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(local.rglob("*")) if p.is_file()}


@pytest.mark.integration
def test_a_cas_dm_champion_samples_with_its_head_from_the_registry(tmp_path, mlflow_server, digits_assets):
    """The registered champion of a Cas-DM sweep, downloaded from models:/NAME@champion, loads with its
    cascaded head (the head is part of the model, not of the loss). The sweep runs on the KID axis
    (`sweep.fidelity: kid`): Optuna's first objective, the front, the note and the version's tags are KID's."""
    import mlflow
    import ray
    from mlflow.tracking import MlflowClient

    from trainers.denoiser.cascade import CascadedDenoiser
    from sweeps.acpo_sweep import main
    from trainers.models import load_base_model

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        args = sweep_args("casdm", tmp_path, mlflow_server, samples=2)
        assert main(["--preset", "digits-cas-dm", *args, "--set", "sweep.model_name=casdm-model",
                     "--set", "sweep.fidelity=kid", "--set", "sweep.kid_tolerance=50"]) == 0
    finally:
        ray.shutdown()
    selection = json.loads((tmp_path / "casdm" / "selection.json").read_text())
    assert selection["fidelity"] == {"axis": "kid", "tolerance": 50.0, "kind": "absolute"} and "kid" in selection["base"]
    assert "KID <= " in selection["rule"] and all("kid" in row for row in selection["front"])
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("casdm-model", "champion")
    assert float(version.tags["kid"]) == pytest.approx(selection["champion"]["kid"], abs=1e-4) and "fid" not in version.tags
    note = client.get_run(selection["mlflow"]["parent_run_id"]).data.tags["mlflow.note.content"]
    assert "| | KID (lower is better) |" in note
    mlflow.set_registry_uri(mlflow_server)  # models:/ URIs resolve through the registry URI, not the tracking URI
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri="models:/casdm-model@champion", dst_path=str(tmp_path / "download"),
                                                    tracking_uri=mlflow_server)
    finally:
        mlflow.set_registry_uri(None)
        os.environ.pop("MLFLOW_REGISTRY_URI", None)  # set_registry_uri(None) leaves the variable it set
    champion = load_base_model(Path(local) / "artifacts" / "champion")
    assert isinstance(champion.denoiser, CascadedDenoiser)
    with torch.no_grad():
        out = champion.denoiser(torch.randn(2, 1, 16, 16), torch.tensor([10, 500])).sample
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()


@pytest.mark.integration
def test_a_digits_flow_sweep_registers_a_champion_that_samples_and_exports_as_sd3(tmp_path, mlflow_server, digits_assets, monkeypatch):
    """The flow-matching stand-in through the whole sweep: its registered champion samples through
    mlflow.pyfunc as the evaluation does, and the pipeline folder inside the MLflow model loads with
    diffusers' StableDiffusion3Pipeline (T5 absent, as saved) and samples."""
    import mlflow
    import pandas as pd
    import ray
    from diffusers import StableDiffusion3Pipeline
    from mlflow.tracking import MlflowClient

    from sweeps.acpo_sweep import main

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["--preset", "digits-flow", *sweep_args("flow", tmp_path, mlflow_server, samples=2),
                     "--set", "sweep.model_name=flow-model"]) == 0
    finally:
        ray.shutdown()
    selection = json.loads((tmp_path / "flow" / "selection.json").read_text())
    version = MlflowClient(mlflow_server).get_model_version_by_alias("flow-model", "champion")
    assert version.tags["trial"] == selection["champion"]["trial"]
    with monkeypatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        env.setenv("MLFLOW_REGISTRY_URI", mlflow_server)
        model = mlflow.pyfunc.load_model("models:/flow-model@champion")
    images = model.predict(pd.DataFrame({"num_images": [3], "steps": [4], "seed": [0], "prompt": ["a handwritten 7"]}))
    assert images.shape == (3, 16, 16, 1) and images.dtype.name == "uint8" and 0 < images.mean() < 255
    local = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(tmp_path / "download"), tracking_uri=mlflow_server)
    pipe = StableDiffusion3Pipeline.from_pretrained(Path(local) / "artifacts" / "champion", text_encoder_3=None, tokenizer_3=None)
    out = pipe("a handwritten 7", num_inference_steps=4, height=16, width=16, guidance_scale=3.0, max_sequence_length=0, output_type="pt")
    assert out.images.shape == (1, 1, 16, 16) and torch.isfinite(out.images).all()


@pytest.mark.integration
def test_a_killed_driver_resumes_without_duplicates(tmp_path, mlflow_server, digits_assets):
    import optuna
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own Ray, never a cluster the user has running
    command = [sys.executable, str(PROJECT_ROOT / "sweeps" / "acpo_sweep.py"), *sweep_args("killed", tmp_path, mlflow_server, samples=4),
               "--set", "sweep.max_concurrent=1"]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    storage = f"sqlite:///{tmp_path / 'killed' / 'optuna.db'}"
    client = MlflowClient(mlflow_server)  # polled, not the Optuna database: opening that would create it under the driver
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:  # kill once one trial has finished and another has started
        time.sleep(1)
        if client.get_experiment_by_name("killed") is None:  # the sweep has not started tracking yet
            continue
        trials = [r for r in runs_of(client, "killed") if r.data.tags.get("acpo.role") == "trial"]
        if len(trials) >= 2 and any(r.info.status == "FINISHED" for r in trials):
            break
    assert driver.poll() is None, "the sweep ended before the kill"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    driver.wait()
    # Whoever can write the sweep folder plants pickles where Tune keeps its state: --resume never loads them.
    marker = tmp_path / "unpickled"
    planted = pickle.dumps(Plant(marker))
    tune_dir = tmp_path / "killed" / "tune"
    for target in [*tune_dir.rglob("*.pkl"), tune_dir / "tuner.pkl", tune_dir / "searcher-state-planted.pkl"]:
        target.write_bytes(planted)
    # The study's database is junk now and the base model's figures were cut short: --resume sets the first
    # aside and rebuilds the study from the trials' records, and measures the base again; nothing is lost.
    (tmp_path / "killed" / "optuna.db").write_bytes(b"not a database" * 1000)
    base_file = tmp_path / "killed" / "base_metrics.json"
    base_file.write_text(base_file.read_text()[:20])
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not marker.exists()
    assert "the Optuna study cannot be opened" in resumed.stderr and "from the trials' records (work/<trial>/params.json)" in resumed.stdout
    assert "base_metrics.json: unreadable as the base model's figures" in resumed.stderr and json.loads(base_file.read_text())["fid"] > 0
    assert list((tmp_path / "killed").glob("optuna.db.unreadable-*"))
    # the killed driver's lease is free at once on its machine (its process is gone), and the resume says what it found
    assert f"taking over the sweep from driver pid {driver.pid}" in resumed.stdout and "has ended" in resumed.stdout
    assert "resuming from the sweep's records" in resumed.stdout
    assert not (tmp_path / "killed" / "driver.lease").exists()  # given back at the end
    trials = optuna.load_study(study_name="killed", storage=storage).trials
    states = [t.state for t in trials]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    # Every requested trial completed once; one the kill interrupted before Tune recorded it may be
    # left over, and is then marked failed (Tune ran a fresh trial in its place), never left running.
    assert len(complete) == 4, states
    assert set(states) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL}, states
    runs = [r for r in runs_of(client, "killed") if r.data.tags.get("acpo.role") == "trial"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 4 and len({r.data.tags["acpo.trial"] for r in runs}) == len(runs)  # no trial logged twice
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    assert len(runs) - len(finished) <= states.count(optuna.trial.TrialState.FAIL)  # killed before or after its run began


class Plant:
    """A pickle whose loading writes `marker` (what a hostile pickle could do instead)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (Path(self.marker), "unpickled")


def test_bad_presets_fail_before_ray_starts(capsys):
    from sweeps.acpo_sweep import main

    cases = [(["--set", "train.nosuch=1"], "unknown key 'train.nosuch'"),
             (["--set", "sweep.space.train.warmup={randint: [1, 5]}"], "sweep.space.train.warmup: no such config key"),
             (["--set", "sweep.space.objective.anchor.weight={loguniform: [10, 1]}"], "low (10) must be below high (1)"),
             (["--set", "sweep.algorithm=grid"], "sweep.algorithm: Input should be 'tpe' or 'nsga2'")]
    for args, message in cases:
        assert main([*args, "--dry-run"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    import ray

    assert not ray.is_initialized()


def test_dry_run_prints_config_and_space(capsys):
    from sweeps.acpo_sweep import main

    assert main(["--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    space = printed["sweep"]["space"]
    low, high = space["objective.anchor.weight"]["loguniform"]
    assert high / low >= 100  # two decades, as measured necessary on digits
    low, high = space["objective.nr_iqa.weight"]["loguniform"]
    assert high / low >= 100


@pytest.mark.integration
def test_storage_and_tracking_defaults_for_a_plain_ray_job(tmp_path, monkeypatch, mlflow_server):
    import sweeps.driver as driver
    from sweeps.presets import SweepConfig
    from trainers.common.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep = SweepConfig(name="s", storage_dir="runs/sweeps")
    assert driver.sweep_dir(sweep) == str(tmp_path / "runs" / "sweeps" / "s")
    # Under `ray job submit --working-dir`, the working directory is a temporary copy: not there.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    assert driver.sweep_dir(sweep) == str(tmp_path / "home" / "acpo" / "runs" / "sweeps" / "s")
    assert driver.sweep_dir(SweepConfig(name="s", storage_dir="/shared/sweeps")) == "/shared/sweeps/s"
    assert driver.sweep_dir(SweepConfig(name="s", storage_dir="file:///shared/sweeps")) == "/shared/sweeps/s"
    assert driver.sweep_dir(SweepConfig(name="s", storage_dir="s3://bucket/sweeps/")) == "s3://bucket/sweeps/s"  # not resolved locally

    monkeypatch.setattr(driver, "LOCAL_MLFLOW", mlflow_server)  # a server answering on this machine
    assert driver.tracking_uri(sweep) == mlflow_server
    monkeypatch.setattr(driver, "LOCAL_MLFLOW", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(ConfigError, match="sweep.tracking_uri: not set"):
        driver.tracking_uri(sweep)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert driver.tracking_uri(sweep) == "http://example.invalid:5000"
