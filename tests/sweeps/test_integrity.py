"""What a user stored stays as stored, and secrets stay secret (unit tier, no Ray, no MLflow server):
one redaction rule for credentials in URIs; the Optuna storage pickled without its password; trial
keys checked before they become paths; private scratch folders; writes flushed before their rename; a
cut-short record read as absent; a champion replaced by upload-then-switch; an unreadable optuna.db
rebuilt from the trials' records."""

import http.server
import json
import os
import stat
import tempfile
import threading
from types import SimpleNamespace

import optuna
import pytest

from sweeps.presets import SweepConfig
from sweeps.search import AskSpace, open_study, rebuild, reconcile, study_storage
from sweeps.spool import recorded_trials, spool
from trainers.common import layout, storage
from trainers.common.credentials import has_credentials, redact, redacted
from trainers.common.errors import ConfigError

optuna.logging.set_verbosity(optuna.logging.WARNING)
SENTINEL = "s3ntinel-Pa55"
AXES = {"fid": "min", "heldout_quality": "max"}
SPACE = {"objective.anchor.weight": {"loguniform": [1.0, 100.0]}, "train.steps": {"randint": [2, 8], "step": 2}}
DIRECTIONS = ["minimize", "maximize"]


def test_one_rule_redacts_every_kind_of_credential_in_a_uri():
    cases = {
        f"postgresql://optuna:{SENTINEL}@10.0.0.1:5432/optuna": "postgresql://optuna:***@10.0.0.1:5432/optuna",
        f"http://admin:{SENTINEL}@mlflow:5000": "http://admin:***@mlflow:5000",
        f"s3://AKIA:{SENTINEL}@bucket/sweeps": "s3://AKIA:***@bucket/sweeps",
        f"redis://:{SENTINEL}@host:6379": "redis://:***@host:6379",
        f"https://b.s3.amazonaws.com/k?X-Amz-Credential=a&X-Amz-Signature={SENTINEL}": "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***",
        f"mysql://u@h/db?password={SENTINEL}&ssl=1": "mysql://u@h/db?password=***&ssl=1",
        f"http://u:p@{SENTINEL}@h:5000/x": "http://u:***@h:5000/x",  # an unencoded @ in the password
        f"s3://AKIA:ab/{SENTINEL}@bucket/sweeps": "s3://AKIA:***@bucket/sweeps",  # a secret key with a /
    }
    for uri, expected in cases.items():
        assert redact(uri) == expected and has_credentials(uri)
        assert redact(f"no server answers at {uri} (refused)") == f"no server answers at {expected} (refused)"  # inside a message
    for clean in ("sqlite:////tmp/optuna.db", "http://127.0.0.1:5000", "s3://bucket/sweeps", "runs/sweeps", "a=b, c=d"):
        assert redact(clean) == clean and not has_credentials(clean)
    assert redacted({"a": [f"http://u:{SENTINEL}@h"], "n": 3}) == {"a": ["http://u:***@h"], "n": 3}


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # an MLflow server's /health, as far as the preflight asks
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_dry_run_and_errors_print_no_password(tmp_path, capsys, health_server, monkeypatch):
    from sweeps.acpo_sweep import main

    monkeypatch.setenv("ACPO_OPTUNA_STORAGE", f"postgresql://optuna:{SENTINEL}@127.0.0.1:9/optuna")
    common = ["--set", f"sweep.storage_dir={tmp_path}", "--set", f"sweep.optuna_storage=postgresql://optuna:{SENTINEL}@127.0.0.1:9/optuna"]
    # the server answers (the probe sends no user-info, which urllib would refuse): the resolved config is printed
    assert main([*common, "--set", f"sweep.tracking_uri=http://admin:{SENTINEL}@{health_server}", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    printed = json.loads(out)
    assert printed["sweep"]["optuna_storage"] == "postgresql://optuna:***@127.0.0.1:9/optuna"
    assert printed["sweep"]["tracking_uri"] == f"http://admin:***@{health_server}"
    assert SENTINEL not in out + err
    # nothing answers: the one-line error names the server, not its password
    assert main([*common, "--set", f"sweep.tracking_uri=http://admin:{SENTINEL}@127.0.0.1:9", "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert "no MLflow server answers at http://admin:***@127.0.0.1:9" in err and SENTINEL not in out + err
    # a value refused by the schema is echoed redacted; a storage location with credentials in it is refused
    assert main(["--set", f"sweep.tracking_uri=[http://admin:{SENTINEL}@h]", "--dry-run"]) == 2
    assert main(["--set", f"sweep.storage_dir=s3://AKIA:{SENTINEL}@bucket/sweeps", "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert "sweep.storage_dir: s3://AKIA:***@bucket/sweeps carries credentials" in err and SENTINEL not in out + err


def test_the_study_database_pickles_without_its_password(tmp_path, monkeypatch):
    """Ray Tune pickles OptunaSearch, the study's storage inside it, into the sweep's tune/ folder."""
    from ray.tune.search.optuna import OptunaSearch

    sweep = SweepConfig(name="s", space=SPACE)
    monkeypatch.setenv("ACPO_OPTUNA_STORAGE", f"sqlite:///{tmp_path}/optuna.db")  # the environment's URL is used
    store = study_storage(sweep, str(tmp_path / "s"))
    assert store.url == f"sqlite:///{tmp_path}/optuna.db"
    search = OptunaSearch(space=AskSpace(sweep), metric=list(AXES), mode=list(AXES.values()), study_name="s", storage=store)
    search._setup_study(list(AXES.values()))  # what Tune does before its first suggestion
    store.url = f"postgresql://optuna:{SENTINEL}@db:5432/optuna"  # what a cluster's URL looks like (no server here)
    search.save(str(tmp_path / "searcher-state.pkl"))
    saved = (tmp_path / "searcher-state.pkl").read_bytes()
    assert SENTINEL.encode() not in saved and b"optuna:***@db" in saved
    from optuna.storages import RDBStorage

    assert SENTINEL in RDBStorage.__getstate__(store)["url"]  # Optuna's own storage would have pickled it


def records(directory, key, params, finished=None):
    """What sweeps/trial.py leaves of a trial: its parameters, a spool, and when `finished` (fid, quality), an evaluated checkpoint."""
    storage.write_text(layout.params_file(directory, key), json.dumps(params))
    spool(layout.trial_spool(directory, key), {"op": "start", "params": params})
    if finished:
        storage.write_text(storage.join(layout.trial_checkpoints(directory, key), "step_000002", "metrics.json"),
                           json.dumps({"step": 2, "fid": finished[0], "heldout_quality": finished[1]}))
        spool(layout.trial_spool(directory, key), {"op": "end", "status": "FINISHED"})


def test_trial_keys_are_checked_before_they_become_paths(tmp_path):
    directory = str(tmp_path / "sweep")
    for bad in ("/tmp/x", "../x", "trial_0001/../../x", "..", "", None):
        with pytest.raises(ConfigError, match="not a trial's folder name"):
            layout.trial_records(directory, bad)
        with pytest.raises(ConfigError, match="not a trial's key"):
            layout.trial_key(bad)
    assert layout.params_file(directory, "trial_0003").endswith("work/trial_0003/params.json")
    assert layout.trial_checkpoints(directory, "run_trial_3ad7f_00000")  # an earlier version's folder, still selectable
    # planted in the Optuna study: --resume refuses in one line, and writes nothing anywhere
    sweep = SweepConfig(name="s", space=SPACE)
    for planted in ("/tmp/x", "../x"):
        study = optuna.create_study(directions=DIRECTIONS)
        trial = study.ask()
        trial.set_user_attr(layout.TRIAL_KEY, planted)
        with pytest.raises(ConfigError, match=r"Optuna trial 0 of the study: acpo.trial: .* is not a trial's key") as raised:
            reconcile(study, directory, AXES)
        assert len(str(raised.value).splitlines()) == 1
        # an enqueued trial with that key is refused when asked, before the trial runs
        study.enqueue_trial({}, user_attrs={layout.TRIAL_KEY: planted})
        with pytest.raises(ConfigError, match="not a trial's key"):
            AskSpace(sweep)(study.ask())
    assert not os.path.exists(directory) and not os.path.exists(tmp_path / "x")


def test_each_worker_stages_checkpoints_in_a_private_folder_removed_at_its_end(monkeypatch):
    from sweeps.presets import load
    from trainers import ray_train

    config, _ = load("digits", ["train.output_dir=''"])
    seen = []

    def run_worker(config):
        folder = config.train.output_dir
        seen.append((folder, stat.S_IMODE(os.stat(folder).st_mode)))

    monkeypatch.setattr(ray_train, "run_worker", run_worker)
    orphan = tempfile.mkdtemp(prefix=f"acpo-scratch-{2**22 + 7}-")  # a killed worker's (no such process)
    alive = tempfile.mkdtemp(prefix=f"acpo-scratch-{os.getpid()}-")  # a running one's
    ray_train.train_worker(config.to_dict())
    ray_train.train_worker(config.to_dict())  # a second sweep of the same name on the same node
    (first, mode), (second, _) = seen
    assert mode == 0o700 and first != second and not os.path.exists(first) and not os.path.exists(second)
    assert not os.path.exists(orphan) and os.path.isdir(alive)
    os.rmdir(alive)


def test_a_write_is_flushed_to_the_disk_before_and_after_its_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    target = tmp_path / "records" / "selection.json"
    storage.write_text(target, "{}\n")
    assert target.read_text() == "{}\n"
    assert synced[0].startswith(str(target.parent)) and synced[0].endswith(".tmp")  # the new file's bytes, before the rename
    assert synced[-1] == str(target.parent)  # the rename itself
    assert [p.name for p in target.parent.iterdir()] == ["selection.json"]


def test_a_record_cut_short_is_read_as_absent_and_said_so(tmp_path, capsys, monkeypatch):
    from sweeps import study as study_module

    noise_file = tmp_path / "base_noise.json"
    noise_file.write_text('{"fid": {"mean": 81.')  # a kill mid-write by an older version, or a copy cut short
    assert storage.read_json(noise_file, "the base model's noise") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "base_noise.json: unreadable as the base model's noise" in err[0] and "computed again" in err[0]
    assert storage.read_json(tmp_path / "missing.json", "x") is None and capsys.readouterr().err == ""
    # the study measures it again instead of dying on it
    measured = {"fid": {"mean": 80.0, "std": 1.0}}
    monkeypatch.setattr("eval.evaluate.sampling_noise", lambda evaluator, model, seeds: measured)
    monkeypatch.setattr("eval.evaluate.Evaluator.from_config", lambda config: None)
    monkeypatch.setattr("trainers.models.load_base_model", lambda *a, **kw: None)
    assert study_module.measure_noise(SimpleNamespace(model=SimpleNamespace(base="b", weights_dtype="fp32")), tmp_path, 3) == measured
    assert json.loads(noise_file.read_text()) == measured


def test_a_champion_is_replaced_by_upload_then_switch(tmp_path, monkeypatch):
    from sweeps import champion as champion_module

    directory = str(tmp_path / "sweep")

    def export(text):
        folder = tmp_path / f"export-{text}"
        (folder / "unet").mkdir(parents=True)
        (folder / "unet" / "weights.bin").write_text(text)
        (folder / "model_index.json").write_text("{}")
        return folder

    (tmp_path / "sweep" / "champion").mkdir(parents=True)  # an earlier version's one export, replaced in place
    first = champion_module.store_champion(export("one"), directory, "20261207-000000-aaaaaa", {"trial": "trial_0000", "step": 2, "checkpoint": "c0"})
    pointer = json.loads(storage.read_text(layout.champion_pointer(directory)))
    assert not (tmp_path / "sweep" / "champion").exists()
    assert pointer["folder"] == "champions/20261207-000000-aaaaaa" and (tmp_path / "sweep" / pointer["folder"] / "unet" / "weights.bin").read_text() == "one"

    # the next export fails half-way (a killed driver, a store gone): the first stays named and whole
    def broken_copy(source, target, **kw):
        os.makedirs(target)
        (tmp_path / "half").write_text("x")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("shutil.copytree", broken_copy)
    with pytest.raises(OSError):
        champion_module.store_champion(export("two"), directory, "20261207-000100-bbbbbb", {"trial": "trial_0001", "step": 4, "checkpoint": "c1"})
    assert json.loads(storage.read_text(layout.champion_pointer(directory))) == pointer
    assert (tmp_path / "sweep" / pointer["folder"] / "unet" / "weights.bin").read_text() == "one"
    monkeypatch.undo()

    second = champion_module.store_champion(export("two-again"), directory, "20261207-000200-cccccc", {"trial": "trial_0001", "step": 4, "checkpoint": "c1"})
    assert second != first and json.loads(storage.read_text(layout.champion_pointer(directory)))["folder"] == "champions/20261207-000200-cccccc"
    assert os.listdir(layout.champions_dir(directory)) == ["20261207-000200-cccccc"]  # older exports and the half one removed after the switch
    assert (tmp_path / "sweep" / "champions" / "20261207-000200-cccccc" / "unet" / "weights.bin").read_text() == "two-again"


def test_an_unreadable_optuna_db_is_rebuilt_from_the_trials_records(tmp_path, capsys):
    sweep = SweepConfig(name="s", space=SPACE)
    directory = str(tmp_path / "s")
    os.makedirs(directory)
    study, _ = open_study(sweep, directory, DIRECTIONS, resume=False)
    asked = []
    for _ in range(4):
        trial = study.ask()
        asked.append((trial, AskSpace(sweep)(trial)[layout.TRIAL_KEY]))
    params = {key: trial.params for trial, key in asked}
    records(directory, "trial_0000", params["trial_0000"], finished=(50.0, 0.6))  # finished, told
    study.tell(asked[0][0], [50.0, 0.6])
    records(directory, "trial_0001", params["trial_0001"], finished=(48.0, 0.7))  # finished, its tell lost with the driver
    records(directory, "trial_0003", params["trial_0003"])  # interrupted mid-training; trial_0002 was asked and never started
    records(directory, "trial_0004", {**params["trial_0003"], "train.steps": 1000})  # not of this space: not rebuilt
    records(directory, "trial_999999999", params["trial_0003"])  # numbered past any sweep: not rebuilt (nor 10^9 placeholders)
    (tmp_path / "s" / "optuna.db").write_bytes(b"this is not a database" * 100)

    with pytest.raises(Exception, match="optuna.db: the Optuna study cannot be opened"):  # a new sweep: refused, nothing rebuilt
        open_study(sweep, directory, DIRECTIONS, resume=False)
    study, store = open_study(sweep, directory, DIRECTIONS, resume=True)
    err = capsys.readouterr().err
    assert "the Optuna study cannot be opened" in err and "rebuilt from the trials' records" in err
    assert [p.name for p in (tmp_path / "s").glob("optuna.db.unreadable-*")]  # set aside, not deleted
    assert not study.trials and recorded_trials(directory) == ["trial_0000", "trial_0001", "trial_0003", "trial_0004", "trial_999999999"]
    assert rebuild(study, sweep, directory) == 3 and len(study.trials) == 5
    err = capsys.readouterr().err
    assert "trial_0004/params.json: not this sweep's parameters" in err and "trial_999999999: numbered past any sweep's trials" in err
    counts = reconcile(study, directory, AXES)
    assert counts == {"done": 2, "told": 2, "again": 1}
    complete = {t.user_attrs[layout.TRIAL_KEY]: t.values for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert complete == {"trial_0000": [50.0, 0.6], "trial_0001": [48.0, 0.7]}
    again = study.ask()
    assert AskSpace(sweep)(again)[layout.TRIAL_KEY] == "trial_0003" and again.params == params["trial_0003"]
    new = study.ask()
    assert AskSpace(sweep)(new)[layout.TRIAL_KEY] not in {"trial_0000", "trial_0001", "trial_0002", "trial_0003", "trial_0004"}  # never a recorded key


def test_a_study_that_cannot_be_opened_for_another_reason_is_left_as_it_is(tmp_path):
    sweep = SweepConfig(name="s", space=SPACE)
    (tmp_path / "s" / "optuna.db").mkdir(parents=True)  # SQLite cannot open it (as a lock or a permission would fail): not corrupt
    with pytest.raises(Exception, match="optuna.db: the Optuna study cannot be opened") as raised:
        open_study(sweep, str(tmp_path / "s"), DIRECTIONS, resume=True)
    assert len(str(raised.value).splitlines()) == 1 and (tmp_path / "s" / "optuna.db").is_dir()
    assert not list((tmp_path / "s").glob("optuna.db.unreadable-*"))


def test_sweeps_of_one_name_sharing_a_database_keep_their_own_studies(tmp_path, monkeypatch):
    monkeypatch.setenv("ACPO_OPTUNA_STORAGE", f"sqlite:///{tmp_path}/shared.db")  # a cluster's database, every sweep's
    sweep = SweepConfig(name="acpo-seed0", space=SPACE)
    studies = []
    for study in ("study-a", "study-b"):  # two studies' sweeps of one name
        directory = tmp_path / study / "acpo-seed0"
        storage.write_text(layout.sweep_id_file(directory), f"{study}-id\n")
        opened, _ = open_study(sweep, str(directory), DIRECTIONS, resume=False)
        opened.enqueue_trial({"objective.anchor.weight": 2.0, "train.steps": 4})
        studies.append(opened.study_name)
    assert studies == ["acpo-seed0-study-a-id", "acpo-seed0-study-b-id"]
    assert [len(optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/shared.db").trials) for name in studies] == [1, 1]
