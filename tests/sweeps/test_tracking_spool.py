"""The tracking spool: trials append, the driver replays into MLflow in order; a replay after a crash
adds nothing twice, and an unreachable server leaves every record spooled. MLflow's SQLite store in
this process (no server)."""

import json

import pytest

from sweeps.replay import SpoolReplayer
from sweeps.spool import SENT, SPOOL, pending_records, read_records, record_names, spool, spool_unreported
from sweeps.tracking import SweepTracking


def spooled_trial(directory, trial="trial_0001", steps=(2, 4, 6)):
    path = directory / "work" / trial / SPOOL
    path.parent.mkdir(parents=True)
    spool(path, {"op": "start", "params": {"train.learning_rate": 1e-4}})
    for step in steps:
        spool(path, {"op": "metrics", "step": step, "time": 1_700_000_000_000 + step, "metrics": {"fid": 100.0 - step}})
    spool(path, {"op": "end", "status": "FINISHED"})
    return path


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a SQLite store's artifacts go to ./mlruns: here, not into the checkout
    return SweepTracking(f"sqlite:///{tmp_path / 'mlflow.db'}", "s", sweep_id="id-1")


def test_a_replay_logs_in_order_and_a_second_replay_adds_nothing(tmp_path, tracking):
    path = spooled_trial(tmp_path)
    parent = tracking.run("sweep", "s")
    replayer = SpoolReplayer(tracking, tmp_path, parent)
    assert replayer.replay_once() and pending_records(tmp_path) == {}
    run = tracking.client.get_run(tracking.run("trial", "trial-trial_0001", parent, trial="trial_0001"))
    assert run.info.status == "FINISHED" and run.data.params["train.learning_rate"] == "0.0001"
    assert run.data.tags["acpo.sweep_id"] == "id-1"
    history = lambda: [(m.step, m.value) for m in tracking.client.get_metric_history(run.info.run_id, "fid")]  # noqa: E731
    assert history() == [(2, 98.0), (4, 96.0), (6, 94.0)]
    path.with_name(SENT).unlink()  # a driver killed before it recorded its place: everything is replayed again
    assert SpoolReplayer(tracking, tmp_path, parent).replay_once()
    assert history() == [(2, 98.0), (4, 96.0), (6, 94.0)]


def test_an_unreachable_server_keeps_every_record_until_it_answers(tmp_path, tracking, monkeypatch):
    spooled_trial(tmp_path)
    parent = tracking.run("sweep", "s")
    replayer = SpoolReplayer(tracking, tmp_path, parent)

    def down(*args, **kwargs):
        raise ConnectionError("connection refused")

    with monkeypatch.context() as patch:
        patch.setattr(tracking.client, "log_batch", down)
        assert not replayer.replay_once()
    assert pending_records(tmp_path) == {"trial_0001": 5}  # nothing went through: parameters and metrics both go in batches
    assert replayer.finish(timeout=5) == {}


def test_evaluations_on_disk_missing_from_the_spool_are_added_once(tmp_path):
    path = spooled_trial(tmp_path, steps=(4,))
    checkpoints = tmp_path / "trials" / "trial_0001"
    for step in (2, 4):
        (checkpoints / f"step_{step:06d}").mkdir(parents=True)
        (checkpoints / f"step_{step:06d}" / "metrics.json").write_text(json.dumps({"step": step, "fid": 90.0}))
    assert spool_unreported(path, checkpoints) == 1  # step 2: reported before a kill, never spooled
    assert spool_unreported(path, checkpoints) == 0
    steps = [json.loads(text)["step"] for text in read_records(path, record_names(path)) if '"metrics"' in text]
    assert sorted(steps) == [2, 4]


def test_two_sweeps_of_one_name_are_told_apart_by_their_folder_id(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = SweepTracking(uri, "same", sweep_id="folder-a")
    first.client.set_tag(first.run("sweep", "same"), "acpo.folder", "/a/same")
    second = SweepTracking(uri, "same", sweep_id="folder-b")
    assert second.other_sweep() == "/a/same"
    assert first.other_sweep() is None
    assert second.run("sweep", "same") != first.run("sweep", "same")


def test_the_experiment_opens_on_training_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    made = SweepTracking(uri, "new", sweep_id="x")
    assert made.client.get_experiment(made.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).create_experiment("by-hand")  # an experiment made before: MLflow infers its kind (GenAI, with no runs)
    found = SweepTracking(uri, "by-hand", sweep_id="y")
    assert found.client.get_experiment(found.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_sample_grids_become_step_indexed_readable_images_once(tmp_path, tracking):
    from PIL import Image

    path = spooled_trial(tmp_path, steps=())
    for step in (2, 4):
        grid = tmp_path / f"grid{step}.png"
        Image.new("L", (136, 69), color=step * 40).save(grid)
        spool(path, {"op": "image", "file": str(grid), "step": step, "time": 1_700_000_000_000 + step})
    parent = tracking.run("sweep", "s")
    assert SpoolReplayer(tracking, tmp_path, parent).replay_once()
    run = tracking.run("trial", "trial-trial_0001", parent, trial="trial_0001")

    def images():
        return sorted(a.path for a in tracking.client.list_artifacts(run, "images") if a.path.endswith(".png"))

    assert [p.split("+")[2] for p in images()] == ["2", "4"]  # images/samples+step+2+timestamp+...png
    local = tracking.client.download_artifacts(run, images()[0], str(tmp_path))
    with Image.open(local) as shown:
        assert shown.size == (136 * 4, 69 * 4)  # nearest x4: at least 512 px wide
    path.with_name(SENT).unlink()  # a replay from the start adds no second image
    assert SpoolReplayer(tracking, tmp_path, parent).replay_once()
    assert len(images()) == 2


def test_metrics_and_params_go_in_one_request(tracking, monkeypatch):
    run = tracking.run("base", "base")
    calls = []
    original = tracking.client.log_batch
    monkeypatch.setattr(tracking.client, "log_batch", lambda *a, **k: calls.append(k) or original(*a, **k))
    tracking.log_metrics(run, {"fid": 80.0, "heldout_quality": 0.9, "kid": 0.01, "skipped": float("nan")})
    tracking.log_params(run, {f"p{i}": i for i in range(150)})
    assert [len(c.get("metrics", [])) for c in calls] == [3, 0, 0] and [len(c.get("params", [])) for c in calls] == [0, 100, 50]
    assert tracking.client.get_run(run).data.metrics == {"fid": 80.0, "heldout_quality": 0.9, "kid": 0.01}


def test_a_spool_in_object_storage_is_replayed_in_order_with_its_images(s3, tracking):
    import io
    import uuid

    from PIL import Image

    from trainers.common import storage

    directory = f"{s3}/{uuid.uuid4().hex[:8]}"
    location = storage.join(directory, "work", "trial_0001", SPOOL)
    spool(location, {"op": "start", "params": {"train.steps": 4}})
    png = io.BytesIO()
    Image.new("L", (136, 69), color=80).save(png, format="png")
    grid = storage.join(directory, "trials", "trial_0001", "step_000004", "samples.png")
    storage.write_bytes(grid, png.getvalue())
    for step in (2, 4):
        spool(location, {"op": "metrics", "step": step, "time": 1_700_000_000_000 + step, "metrics": {"fid": 100.0 - step}})
    spool(location, {"op": "image", "file": grid, "step": 4, "time": 1_700_000_000_004})
    spool(location, {"op": "end", "status": "FINISHED"})
    assert pending_records(directory) == {"trial_0001": 5}
    parent = tracking.run("sweep", "s")
    assert SpoolReplayer(tracking, directory, parent).replay_once() and pending_records(directory) == {}
    run = tracking.client.get_run(tracking.run("trial", "trial-trial_0001", parent, trial="trial_0001"))
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in tracking.client.get_metric_history(run.info.run_id, "fid")] == [(2, 98.0), (4, 96.0)]
    assert [a.path.split("+")[2] for a in tracking.client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")] == ["4"]


def test_a_malformed_record_is_skipped_once_with_a_warning_and_the_replay_goes_on(tmp_path, tracking, capsys):
    path = spooled_trial(tmp_path, steps=(2,))
    bad = {"metrics-less": {"op": "metrics", "step": 4, "time": 1}, "list": [1, 2], "bogus": {"op": "bogus"},
           "nan-step": {"op": "metrics", "step": float("nan"), "time": 1, "metrics": {"fid": 1.0}}}
    for record in bad.values():
        spool(path, record)
    spool(path, {"op": "metrics", "step": 8, "time": 1_700_000_000_008, "metrics": {"fid": 92.0}})  # after them: still replayed
    names = record_names(path)
    parent = tracking.run("sweep", "s")
    assert SpoolReplayer(tracking, tmp_path, parent).replay_once() and pending_records(tmp_path) == {}
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 4 and all(w.startswith("[tracking] skipped the spooled record") for w in warnings)
    assert names[3] in warnings[0] and "op 'metrics' without metrics" in warnings[0]
    assert "a JSON list" in warnings[1] and "unknown op 'bogus'" in warnings[2] and "bad step" in warnings[3]
    run = tracking.run("trial", "trial-trial_0001", parent, trial="trial_0001")
    assert [(m.step, m.value) for m in tracking.client.get_metric_history(run, "fid")] == [(2, 98.0), (8, 92.0)]
    assert SpoolReplayer(tracking, tmp_path, parent).replay_once()  # a new driver, from the kept place
    assert capsys.readouterr().err == ""  # warned about once


def test_an_image_from_outside_the_sweeps_folder_is_never_uploaded(tmp_path, tracking, capsys):
    from PIL import Image

    directory = tmp_path / "sweep"
    path = spooled_trial(directory, steps=())
    secret = tmp_path / "secret.png"  # any file the driver can read: /etc/passwd, a key
    Image.new("L", (8, 8), color=200).save(secret)
    inner = directory / "trials" / "trial_0001" / "step_000008" / "samples.png"
    inner.parent.mkdir(parents=True)
    Image.new("L", (8, 8), color=40).save(inner)
    (directory / "trials" / "link.png").symlink_to(secret)
    planted = [secret, directory / "trials" / ".." / ".." / "secret.png", directory / "trials" / "link.png"]
    for step, file in enumerate([*planted, inner], start=2):
        spool(path, {"op": "image", "file": str(file), "step": step, "time": 1_700_000_000_000 + step})
    parent = tracking.run("sweep", "s")
    assert SpoolReplayer(tracking, directory, parent).replay_once() and pending_records(directory) == {}
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 3 and all("lies outside the sweep's folder" in w for w in warnings)
    run = tracking.run("trial", "trial-trial_0001", parent, trial="trial_0001")
    assert [a.path.split("+")[2] for a in tracking.client.list_artifacts(run, "images") if a.path.endswith(".png")] == ["5"]


def test_an_image_in_object_storage_must_be_under_the_sweeps_prefix():
    from sweeps.replay import inside

    assert inside("s3://bucket/sweep/", "s3://bucket/sweep/trials/trial_0001/step_000002/samples.png")
    assert not inside("s3://bucket/sweep", "s3://bucket/sweep-2/trials/trial_0001/samples.png")  # a sibling sharing its prefix
    assert not inside("s3://bucket/sweep", "s3://bucket/sweep/trials/../../other/key.png")
    assert not inside("s3://bucket/sweep", "s3://other/sweep/trials/samples.png")
    assert not inside("s3://bucket/sweep", "/etc/passwd") and not inside("/srv/sweep", "s3://bucket/srv/sweep/x.png")
