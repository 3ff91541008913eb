"""--resume from the sweep's own records (sweeps/search.py), the one-driver lease (sweeps/lease.py) and
the object store's retries (trainers/common/storage.py), without Ray: the study is a real Optuna
study, the records real files in a sweep folder's layout, the lease a real file renewed by its thread."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import optuna
import pytest

from sweeps import lease as lease_module
from sweeps.lease import Lease, check_free
from sweeps.presets import SweepConfig
from sweeps.search import AskSpace, StoreJournal, reconcile, study_exists, study_storage
from sweeps.spool import spool
from trainers.common import layout, storage
from trainers.common.errors import UnreadableFileError
from trainers.common.errors import ConfigError

optuna.logging.set_verbosity(optuna.logging.WARNING)
AXES = {"fid": "min", "heldout_quality": "max"}
SPACE = {"objective.anchor.weight": {"loguniform": [1.0, 100.0]}, "train.steps": {"randint": [2, 8], "step": 2},
         "model.finetune": {"choice": ["full", "lora"]}}


def sweep_config(name="s", **kw) -> SweepConfig:
    return SweepConfig(name=name, space=SPACE, **kw)


def new_study(sweep, directory):
    return optuna.create_study(study_name=sweep.name, storage=study_storage(sweep, directory), load_if_exists=True,
                               directions=["minimize", "maximize"])


def ask(study, sweep) -> tuple[optuna.trial.Trial, dict]:
    trial = study.ask()
    return trial, AskSpace(sweep)(trial)


def finished_records(directory, key, fid, quality, status="FINISHED"):
    """What sweeps/trial.py leaves of a trial: an evaluated checkpoint's figures and a spool ending `status`."""
    storage.write_text(storage.join(layout.trial_checkpoints(directory, key), "step_000002", "metrics.json"),
                       json.dumps({"step": 2, "fid": fid, "heldout_quality": quality}))
    spool(layout.trial_spool(directory, key), {"op": "start", "params": {}})
    if status:
        spool(layout.trial_spool(directory, key), {"op": "end", "status": status})


def test_the_journal_on_the_storage_layer_keeps_the_study_across_drivers(tmp_path):
    location = str(tmp_path / "sweep" / layout.OPTUNA_JOURNAL)
    study = optuna.create_study(study_name="j", storage=optuna.storages.JournalStorage(StoreJournal(location)),
                                directions=["minimize", "maximize"])
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    study.tell(trial, [1.0, 2.0])
    running = study.ask()
    running.set_user_attr(layout.TRIAL_KEY, "trial_0001")
    # a second driver (a new process: a new backend) reads the same study from the written objects
    again = optuna.load_study(study_name="j", storage=optuna.storages.JournalStorage(StoreJournal(location)))
    assert [t.state for t in again.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING]
    assert again.trials[0].values == [1.0, 2.0] and again.trials[1].user_attrs[layout.TRIAL_KEY] == "trial_0001"
    objects = sorted(os.listdir(location))
    assert objects and all(name.endswith(".json") for name in objects)  # write-once objects, no pickle
    with open(os.path.join(location, objects[-1]), "w") as f:
        f.write("{not json")  # a corrupt object: one line naming it
    with pytest.raises(UnreadableFileError, match=objects[-1]):
        optuna.load_study(study_name="j", storage=optuna.storages.JournalStorage(StoreJournal(location)))
    os.remove(os.path.join(location, objects[1]))  # a gap: never read past silently
    with pytest.raises(UnreadableFileError, match="gap"):
        optuna.load_study(study_name="j", storage=optuna.storages.JournalStorage(StoreJournal(location)))


def test_a_local_folder_keeps_its_study_in_sqlite_and_a_bucket_in_the_journal(tmp_path, monkeypatch):
    sweep = sweep_config()
    assert not study_exists(sweep, str(tmp_path))  # read only: nothing created
    assert not (tmp_path / layout.OPTUNA_DB).exists()
    assert "sqlite" in str(study_storage(sweep, str(tmp_path)).engine.url)
    monkeypatch.setattr(StoreJournal, "read_logs", lambda self, start: [])  # no bucket to read here
    journal = study_storage(sweep, "s3://bucket/s")
    assert isinstance(journal, optuna.storages.JournalStorage) and journal._backend.location == "s3://bucket/s/optuna-journal"


def test_resume_tells_finished_trials_and_asks_interrupted_ones_again_with_their_key(tmp_path):
    directory, sweep = str(tmp_path), sweep_config()
    study = new_study(sweep, directory)
    done, _ = ask(study, sweep)                     # trial_0000: complete, told by Tune's searcher
    study.tell(done, [10.0, 0.5])
    told, _ = ask(study, sweep)                     # trial_0001: finished, but the driver died before the tell
    finished_records(directory, "trial_0001", 12.0, 0.6)
    interrupted, params = ask(study, sweep)         # trial_0002: interrupted mid-training
    finished_records(directory, "trial_0002", 13.0, 0.7, status=None)
    failed, _ = ask(study, sweep)                   # trial_0003: failed (an outage)
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    never, _ = ask(study, sweep)                    # trial_0004: asked, never started
    assert params[layout.TRIAL_KEY] == "trial_0002"

    lost_end, _ = ask(study, sweep)                 # trial_0005: finished, its tell failed, marked failed after the Tuner
    finished_records(directory, "trial_0005", 14.0, 0.8)
    study.tell(lost_end, state=optuna.trial.TrialState.FAIL)

    counts = reconcile(new_study(sweep, directory), directory, AXES)  # a new driver: the study from its storage
    assert counts == {"done": 3, "told": 2, "again": 3}
    study = new_study(sweep, directory)
    by_number = {t.number: t for t in study.trials}
    assert by_number[1].state == optuna.trial.TrialState.COMPLETE and by_number[1].values == [12.0, 0.6]
    assert by_number[2].state == by_number[4].state == optuna.trial.TrialState.FAIL
    recorded = [t for t in study.trials if t.user_attrs.get(layout.TRIAL_KEY) == "trial_0005" and t.state == optuna.trial.TrialState.COMPLETE]
    assert len(recorded) == 1 and recorded[0].values == [14.0, 0.8] and recorded[0].params == lost_end.params
    # Optuna's next asks are the unfinished keys, in order, with their own parameters
    again = [ask(study, sweep) for _ in range(3)]
    assert [p[layout.TRIAL_KEY] for _, p in again] == ["trial_0002", "trial_0003", "trial_0004"]
    assert again[0][0].params == interrupted.params
    fresh, params = ask(study, sweep)
    assert params[layout.TRIAL_KEY] == f"trial_{fresh.number:04d}"  # then new trials, named after their number
    # a second resume (the first was killed before its re-asked trials ran) enqueues nothing twice
    for trial, _ in [*again, (fresh, None)]:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert reconcile(new_study(sweep, directory), directory, AXES)["again"] == 4
    assert reconcile(new_study(sweep, directory), directory, AXES) == {"done": 3, "told": 0, "again": 4}
    waiting = new_study(sweep, directory).get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert sorted(t.user_attrs[layout.TRIAL_KEY] for t in waiting) == ["trial_0002", "trial_0003", "trial_0004", f"trial_{fresh.number:04d}"]


# ---------------------------------------------------------------------------------------------- the lease


def test_a_live_driver_is_never_displaced(tmp_path):
    first = Lease(str(tmp_path), beat_s=0.1, stale_s=0.5, confirm_s=0.05).acquire()
    try:
        time.sleep(1.5)  # three times the stale age: its beats keep it fresh
        with pytest.raises(ConfigError, match=f"driver pid {os.getpid()} on {socket.gethostname()}"):
            Lease(str(tmp_path), stale_s=0.5, confirm_s=0.05).acquire()
        with pytest.raises(ConfigError, match="--resume refused"):
            check_free(str(tmp_path))
        assert not first.lost
        # a driver alive on this machine holds its lease however old its heartbeat (a store outage held its beats)
        alive = {**json.loads(storage.read_text(layout.lease_file(str(tmp_path)))), "heartbeat": time.time() - 10_000}
        first.stop.set()
        first.thread.join()
        storage.write_text(layout.lease_file(str(tmp_path)), json.dumps(alive))
        with pytest.raises(ConfigError, match="being driven by"):
            Lease(str(tmp_path), stale_s=0.5, confirm_s=0.05).acquire()
    finally:
        first.release()
    assert not os.path.exists(layout.lease_file(str(tmp_path)))  # given back
    Lease(str(tmp_path), confirm_s=0.05).acquire().release()


def test_a_killed_drivers_lease_is_taken_at_once_on_its_machine(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = {"host": socket.gethostname(), "machine": lease_module.machine(), "pid": dead.pid, "started": time.time() - 5, "token": "x",
              "heartbeat": time.time()}
    storage.write_text(layout.lease_file(str(tmp_path)), json.dumps(holder))
    check_free(str(tmp_path))  # a dead process holds nothing
    Lease(str(tmp_path), confirm_s=0.05).acquire().release()
    assert f"its process {dead.pid} on this machine has ended" in capsys.readouterr().out


ELSEWHERE = {"host": "another-node", "machine": "another-node/boot/ns", "pid": 1, "started": 0, "token": "theirs"}


@pytest.fixture
def quick_lease(monkeypatch):
    """The lease's times shrunk: the rule under test is the same at 90 s."""
    monkeypatch.setattr(lease_module, "STALE_S", 0.6)
    monkeypatch.setattr(lease_module, "BEAT_S", 0.1)


@pytest.mark.parametrize("skew_s", [10_000, -10_000])
def test_another_machines_lease_that_keeps_changing_is_never_taken_whatever_its_clock(tmp_path, quick_lease, skew_s):
    location, stop = layout.lease_file(str(tmp_path)), threading.Event()

    def beat():  # a live driver on a machine whose clock is hours off ours
        beats = 0
        while not stop.wait(0.05):
            beats += 1
            storage.write_text(location, json.dumps({**ELSEWHERE, "beat": beats, "heartbeat": time.time() + skew_s}))

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    try:
        time.sleep(0.2)
        watched = time.monotonic()
        while time.monotonic() - watched < 2 * lease_module.STALE_S:
            with pytest.raises(ConfigError, match="being driven by driver pid 1 on another-node"):
                check_free(str(tmp_path))
        with pytest.raises(ConfigError, match="this driver refused"):
            Lease(str(tmp_path), confirm_s=0.05).acquire()
    finally:
        stop.set()
        beating.join()
    assert json.loads(storage.read_text(location))["token"] == "theirs"


@pytest.mark.parametrize("skew_s", [10_000, -10_000])
def test_another_machines_lease_that_stops_changing_is_taken_after_stale_s_of_the_readers_clock(tmp_path, quick_lease, capsys, skew_s):
    storage.write_text(layout.lease_file(str(tmp_path)), json.dumps({**ELSEWHERE, "beat": 7, "heartbeat": time.time() + skew_s}))
    watched = time.monotonic()
    assert check_free(str(tmp_path))["token"] == "theirs"  # the preflight: waits, then finds it gone
    assert time.monotonic() - watched >= lease_module.STALE_S  # never at once, however old its heartbeat says it is
    assert capsys.readouterr().out.count("waiting up to") == 1
    watched = time.monotonic()
    Lease(str(tmp_path), confirm_s=0.05).acquire().release()  # the driver's own acquire: what the preflight saw still holds
    assert time.monotonic() - watched < lease_module.STALE_S
    assert "its lease has not changed for" in capsys.readouterr().out


def test_a_driver_that_finds_its_lease_taken_stops(tmp_path, monkeypatch):
    interrupted = []
    monkeypatch.setattr(lease_module._thread, "interrupt_main", lambda: interrupted.append(True))
    held = Lease(str(tmp_path), beat_s=0.1, confirm_s=0.05).acquire()
    storage.write_text(layout.lease_file(str(tmp_path)), json.dumps({"host": "other", "pid": 1, "started": 0, "token": "theirs",
                                                                      "heartbeat": time.time()}))
    time.sleep(0.5)
    held.release()
    assert held.lost and interrupted == [True]
    with pytest.raises(lease_module.LeaseLost, match="taken over by driver pid 1 on other"):
        held.check()  # what the driver asks after the Tuner, whose SIGINT handler swallows interrupt_main
    assert json.loads(storage.read_text(layout.lease_file(str(tmp_path))))["token"] == "theirs"  # theirs is left alone


# ---------------------------------------------------------------------------------------------- the object store's retries


def test_an_unanswering_store_is_retried_and_an_answer_is_not(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    calls = []

    @storage.retried
    def put(location):
        calls.append(location)
        if len(calls) < 3:
            raise OSError("When uploading ...: AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Could not connect")
        return "ok"

    assert put("s3://bucket/key") == "ok" and len(calls) == 3

    @storage.retried
    def denied(location):
        calls.append(location)
        raise OSError(f"When uploading key '{location}': AWS Error ACCESS_DENIED during PutObject operation: Access Denied")

    calls.clear()
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        denied("s3://bucket/trials/trial_0503/step_000503")  # "503" in a key is not a 503 answer
    assert len(calls) == 1
    monkeypatch.setenv("ACPO_STORE_RETRY_S", "0")
    calls.clear()
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        put("s3://bucket/key")  # past the deadline: raised, naming what failed


def test_a_sweep_whose_trials_have_no_key_is_refused_in_one_line(tmp_path):
    directory, sweep = str(tmp_path), sweep_config()
    study = new_study(sweep, directory)
    trial = study.ask()  # asked by the earlier version: no key
    trial.suggest_float("objective.anchor.weight", 1.0, 100.0, log=True)
    study.tell(trial, [10.0, 0.5])
    with pytest.raises(ConfigError, match="--resume: .* earlier version .* cannot be resumed"):
        reconcile(new_study(sweep, directory), directory, AXES)
    bucket = tmp_path / "bucket-sweep"  # an earlier version's sweep in a bucket kept its study in Tune's pickle: none here
    (bucket / layout.WORK / "run_trial_abc_00000").mkdir(parents=True)
    empty = optuna.create_study(study_name="b", storage=study_storage(sweep, str(bucket)), directions=["minimize", "maximize"])
    with pytest.raises(ConfigError, match="earlier version"):
        reconcile(empty, str(bucket), AXES)


def test_a_bad_retry_time_is_one_line(monkeypatch):
    monkeypatch.setenv("ACPO_STORE_RETRY_S", "soon")
    with pytest.raises(ConfigError, match="ACPO_STORE_RETRY_S"):
        storage.retry_seconds()
    with storage.retrying_for(0):
        assert storage.retry_seconds() == 0  # the preflight's probe: not retried
