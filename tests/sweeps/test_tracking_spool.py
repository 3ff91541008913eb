"""The tracking spool: trials append, the driver replays into MLflow in order; a replay after a crash
adds nothing twice, and an unreachable server leaves every record spooled. MLflow's SQLite store in
this process (no server)."""

import json

import pytest

from sweeps.tracking import SENT, SPOOL, SpoolReplayer, SweepTracking, pending_records, spool, spool_unreported


def spooled_trial(directory, trial="t1", steps=(2, 4, 6)):
    path = directory / "work" / trial / SPOOL
    path.parent.mkdir(parents=True)
    spool(path, {"op": "start", "params": {"train.learning_rate": 1e-4}})
    for step in steps:
        spool(path, {"op": "metrics", "step": step, "time": 1_700_000_000_000 + step, "metrics": {"fid": 100.0 - step}})
    spool(path, {"op": "end", "status": "FINISHED"})
    return path


@pytest.fixture
def tracking(tmp_path):
    return SweepTracking(f"sqlite:///{tmp_path / 'mlflow.db'}", "s", sweep_id="id-1")


def test_a_replay_logs_in_order_and_a_second_replay_adds_nothing(tmp_path, tracking):
    path = spooled_trial(tmp_path)
    parent = tracking.run("sweep", "s")
    replayer = SpoolReplayer(tracking, tmp_path, parent)
    assert replayer.replay_once() and pending_records(tmp_path) == {}
    run = tracking.client.get_run(tracking.run("trial", "trial-t1", parent, trial="t1"))
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
    assert pending_records(tmp_path) == {"t1": 4}  # the start went through, the first metrics record did not
    assert replayer.finish(timeout=5) == {}


def test_evaluations_on_disk_missing_from_the_spool_are_added_once(tmp_path):
    path = spooled_trial(tmp_path, steps=(4,))
    checkpoints = tmp_path / "trials" / "t1"
    for step in (2, 4):
        (checkpoints / f"step_{step:06d}").mkdir(parents=True)
        (checkpoints / f"step_{step:06d}" / "metrics.json").write_text(json.dumps({"step": step, "fid": 90.0}))
    assert spool_unreported(path, checkpoints) == 1  # step 2: reported before a kill, never spooled
    assert spool_unreported(path, checkpoints) == 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if '"metrics"' in line]
    assert sorted(steps) == [2, 4]


def test_two_sweeps_of_one_name_are_told_apart_by_their_folder_id(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = SweepTracking(uri, "same", sweep_id="folder-a")
    first.client.set_tag(first.run("sweep", "same"), "acpo.folder", "/a/same")
    second = SweepTracking(uri, "same", sweep_id="folder-b")
    assert second.other_sweep() == "/a/same"
    assert first.other_sweep() is None
    assert second.run("sweep", "same") != first.run("sweep", "same")
