"""The sweep's search: the Optuna study, where it is stored, the space as Optuna asks it, and how a
resumed sweep picks the search up from the sweep's own records. Nothing here reads a pickle: Ray Tune
still writes its experiment state under tune/, but no driver ever loads it.

Where the study lives (`study_storage`):
- `sweep.optuna_storage`, else $ACPO_OPTUNA_STORAGE: any Optuna RDB URL (on a cluster, the head's
  PostgreSQL, its password in the environment rather than on a command line). Ray Tune pickles its
  searcher, and so this storage, into tune/: the URL goes in with its password redacted (`StudyDatabase`);
- a local sweep folder: SQLite, `optuna.db`;
- object storage: Optuna's journal storage on `StoreJournal`, one object per append under
  `optuna-journal/`. SQLite needs a file system with locks and writes in place, which a bucket does not
  have; Optuna's journal only ever appends, and an object written whole is an append that neither a
  full disk nor an outage can cut in half. It has one writer: the driver holding the sweep's lease
  (sweeps/lease.py).

Each Optuna trial names its trial's records: the user attribute `acpo.trial` (`trial_0003`, after the
number of the Optuna trial that first ran it) goes to the Tune trial with its parameters, and
sweeps/trial.py keeps its checkpoints in trials/<key>/ and its records in work/<key>/.

On --resume (`reconcile`, before the Tuner is built) the study is squared with those records:
- a COMPLETE trial is done, and is not run again;
- a RUNNING or FAILED trial whose records end FINISHED (the driver died between the trial's end and
  Optuna's tell, or the tell failed) is recorded COMPLETE with its final figures: its last evaluated
  checkpoint's metrics.json, what it reported;
- every other key without a COMPLETE trial (interrupted, failed, or asked and never started) is
  marked failed and enqueued again with the same parameters and key. Optuna's next asks return those
  first, and Ray Train picks each run up from its last checkpoint in trials/<key>/ (same run name).
The Tuner then runs `num_samples` minus the done trials. A sweep made before trials had keys (its
Optuna trials have none) is refused in one line: it can be selected from, not resumed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Iterable

from optuna.storages import RDBStorage
from optuna.storages.journal import BaseJournalBackend

from sweeps.spool import last_evaluation, record_names, recorded_trials
from trainers.common import layout, storage
from trainers.common.credentials import redact
from trainers.common.errors import ConfigError, UnreadableFileError, last_line

TRIAL_KEY = layout.TRIAL_KEY  # the name every layer uses for a trial's key
OPTUNA_URL_VARIABLE = "ACPO_OPTUNA_STORAGE"


def database_url(sweep) -> str:
    """The study's RDB URL: `sweep.optuna_storage`, else $ACPO_OPTUNA_STORAGE ("": none, the sweep's folder keeps it)."""
    return sweep.optuna_storage or os.environ.get(OPTUNA_URL_VARIABLE, "")


class StudyDatabase(RDBStorage):
    """Optuna's RDB storage, pickled without its password: Ray Tune pickles OptunaSearch (this storage
    inside its study) into the sweep's tune/ folder, which nothing reads back; a copy unpickled from
    there could not connect, and need not."""

    def __getstate__(self):
        state = super().__getstate__()
        state["url"] = redact(state["url"])
        return state


def study_name(sweep, directory: str) -> str:
    """The study's name in its storage: the sweep's name in the sweep's own folder; in a database that
    other sweeps share (a cluster's), the name and the sweep folder's id, so that two sweeps of one name
    (two studies' `acpo-seed0`) never load each other's trials."""
    if not database_url(sweep):
        return sweep.name
    sweep_id = storage.read_text(layout.sweep_id_file(directory)).strip() if storage.is_file(layout.sweep_id_file(directory)) else ""
    return f"{sweep.name}-{sweep_id}" if sweep_id else sweep.name


def study_storage(sweep, directory: str):
    """The sweep's Optuna storage (see the module's docstring), as OptunaSearch takes it."""
    from optuna.storages import JournalStorage

    if database_url(sweep):
        return StudyDatabase(database_url(sweep))
    if storage.is_remote(directory):
        return JournalStorage(StoreJournal(layout.optuna_journal(directory)))
    return StudyDatabase(f"sqlite:///{layout.optuna_db(directory)}")


def study_exists(sweep, directory: str) -> bool:
    """Whether the sweep's study was created (read only: nothing is created here)."""
    if database_url(sweep):
        import optuna

        return study_name(sweep, directory) in optuna.get_all_study_names(database_url(sweep))
    if storage.is_remote(directory):
        return bool(storage.listdir(layout.optuna_journal(directory)))
    return storage.is_file(layout.optuna_db(directory))


class StoreJournal(BaseJournalBackend):
    """Optuna's journal as write-once objects (or files) through trainers/common/storage.py: each
    `append_logs` is one object named by its first log's number (`000000000042.json`). The folder is
    listed once, to check that the journal has no gap; afterwards only the next name is read (one
    request per Optuna call, not a listing). Objects once read are kept in memory: they never change."""

    def __init__(self, location: str):
        self.location = location
        self.logs: list[dict[str, Any]] = []
        self.listed = False

    def _name(self) -> str:
        return storage.join(self.location, f"{len(self.logs):012d}.json")

    def _load(self) -> None:
        if not self.listed:
            names = [n for n in storage.listdir(self.location) if n.endswith(".json")]
            for name in names:
                if not name.removesuffix(".json").isdigit() or int(name.removesuffix(".json")) != len(self.logs):
                    raise UnreadableFileError(f"{self.location}/{name}: the Optuna journal has a gap before it (an object deleted?)")
                self.logs.extend(self._read(storage.join(self.location, name)))
            self.listed = True
        while True:  # appended since (by this process: the lease allows no other writer)
            try:
                self.logs.extend(self._read(self._name()))
            except FileNotFoundError:
                return

    @staticmethod
    def _read(location: str) -> list:
        try:
            entries = json.loads(storage.read_text(location))
        except (ValueError, UnicodeDecodeError) as error:
            raise UnreadableFileError(f"{location}: not an Optuna journal entry ({type(error).__name__}); the study cannot be read") from None
        if not isinstance(entries, list):
            raise UnreadableFileError(f"{location}: not an Optuna journal entry (a list of logs)")
        return entries

    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        self._load()
        return self.logs[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self._load()
        storage.write_text(self._name(), json.dumps(logs))
        self.logs.extend(logs)


def open_study(sweep, directory: str, directions: list[str], resume: bool):
    """The sweep's study and its storage, created or loaded. On --resume, a study file that cannot be
    opened (a local `optuna.db` that is not a database any more) is set aside and a new one rebuilt from
    the trials' records (`rebuild`), saying so in one line; a study database the user named, or one that
    fails on a new sweep, is a one-line error naming it."""
    import sqlite3

    import optuna

    name = study_name(sweep, directory)
    try:
        store = study_storage(sweep, directory)
        return optuna.create_study(study_name=name, storage=store, load_if_exists=True, directions=directions), store
    except Exception as error:  # noqa: BLE001 - SQLAlchemy's, SQLite's, Optuna's: each is one line here
        cause = getattr(error, "orig", None) or error
        reason = last_line(cause)[:200]  # SQLAlchemy's own last line is a link
        # Only a file that is no database (or a corrupt one) is set aside: a locked database, another
        # Optuna's schema or a permission error is the user's to see, with the file left as it is.
        corrupt = isinstance(cause, sqlite3.DatabaseError) and not isinstance(cause, sqlite3.OperationalError)
        if database_url(sweep) or storage.is_remote(directory) or not (resume and corrupt):
            where = f"sweep.optuna_storage: {redact(database_url(sweep))}" if database_url(sweep) else layout.optuna_db(directory)
            raise UnreadableFileError(f"{where}: the Optuna study cannot be opened ({reason})") from None
    unreadable = f"{layout.optuna_db(directory)}.unreadable-{int(time.time())}"
    storage.move(layout.optuna_db(directory), unreadable)  # kept, not deleted: it may still be of use to its owner
    print(f"[sweep] {layout.optuna_db(directory)}: the Optuna study cannot be opened ({reason}); set aside as {unreadable}, "
          "rebuilt from the trials' records", file=sys.stderr, flush=True)
    store = study_storage(sweep, directory)
    return optuna.create_study(study_name=name, storage=store, directions=directions), store


def rebuild(study, sweep, directory: str) -> int:
    """An empty study (its file lost or set aside) filled again from the trials' records: each key's
    parameters (`work/<key>/params.json`) as a failed trial of the same number, which `reconcile` then
    tells (finished) or asks again (unfinished); numbers without records are kept as failed trials with
    no key, so a new trial never takes a recorded key (a key numbered past any sweep's trials,
    `MAX_TRIALS`, is not rebuilt). Returns the trials rebuilt."""
    from optuna.trial import TrialState, create_trial

    from trainers.config import MAX_TRIALS

    distributions = {key: distribution(kind, args, step) for key, kind, args, step in AskSpace(sweep).dims}
    by_number = {int(key.removeprefix("trial_")): key for key in recorded_trials(directory) if layout.TRIAL_KEY_PATTERN.fullmatch(key)}
    for number in sorted(n for n in by_number if n >= MAX_TRIALS):
        print(f"[sweep] {layout.trial_records(directory, by_number.pop(number))}: numbered past any sweep's trials; not rebuilt",
              file=sys.stderr, flush=True)
    rebuilt = 0
    for number in range(max(by_number, default=-1) + 1):
        key = by_number.get(number)
        params = storage.read_json(layout.params_file(directory, key), "a trial's parameters") if key else None
        try:
            trial = create_trial(params=params, distributions=distributions, state=TrialState.FAIL, user_attrs={TRIAL_KEY: key})
        except (ValueError, TypeError, AttributeError):  # missing, or not this space's parameters (a value out of range)
            if key:
                print(f"[sweep] {layout.params_file(directory, key)}: not this sweep's parameters; trial {key} is not rebuilt",
                      file=sys.stderr, flush=True)
            trial = create_trial(state=TrialState.FAIL)
        study.add_trial(trial)
        rebuilt += TRIAL_KEY in trial.user_attrs
    return rebuilt


def distribution(kind: str, args, step):
    """The Optuna distribution of one dimension of the space (as AskSpace suggests it)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if kind == "loguniform":
        return FloatDistribution(*args, log=True)
    if kind == "uniform":
        return FloatDistribution(*args)
    if kind == "randint":
        return IntDistribution(args[0], args[1], step=step or 1)
    return CategoricalDistribution(args)


class AskSpace:
    """The space as an Optuna define-by-run function (OptunaSearch's `space`): each dimension suggested
    in the space's order, and the trial's key returned with them for sweeps/trial.py. A class, not a
    closure: Tune pickles its searcher (into tune/, where nothing reads it back)."""

    def __init__(self, sweep):
        from sweeps.space import dimensions

        self.dims = dimensions(sweep)

    def __call__(self, trial) -> dict:
        for key, kind, args, step in self.dims:
            if kind == "loguniform":
                trial.suggest_float(key, *args, log=True)
            elif kind == "uniform":
                trial.suggest_float(key, *args)
            elif kind == "randint":
                trial.suggest_int(key, args[0], args[1], step=step or 1)
            else:
                trial.suggest_categorical(key, args)
        name = layout.trial_key(trial.user_attrs.get(TRIAL_KEY) or f"trial_{trial.number:04d}")  # an enqueued trial keeps its key
        trial.set_user_attr(TRIAL_KEY, name)
        return {TRIAL_KEY: name}


def finished_values(directory: str, key: str, axes: dict) -> list[float] | None:
    """The figures a trial whose records end FINISHED reported last (its last evaluated checkpoint's),
    one per front axis; None when its records do not end FINISHED."""
    spool = layout.trial_spool(directory, key)
    names = record_names(spool)
    last = storage.read_json(storage.join(spool, names[-1]), "a trial's last record") if names else None
    if not isinstance(last, dict) or last.get("status") != "FINISHED":
        return None
    metrics = last_evaluation(layout.trial_checkpoints(directory, key))
    if metrics is None:
        return None
    values = [metrics.get(axis) for axis in axes]
    return values if all(isinstance(v, (int, float)) for v in values) else None


def reconcile(study, directory: str, axes: dict) -> dict[str, int]:
    """Squares the study with the sweep's records (see the module's docstring). Returns the counts:
    done (COMPLETE, before and now), told (finished, recorded as such now), again (to run again)."""
    from optuna.trial import TrialState, create_trial

    trials = study.get_trials(deepcopy=False)
    for trial in trials:  # a key names folders: one altered in the study is refused before any path is built
        if TRIAL_KEY in trial.user_attrs:
            try:
                layout.trial_key(trial.user_attrs[TRIAL_KEY])
            except ConfigError as error:
                raise ConfigError(f"--resume: Optuna trial {trial.number} of the study: {error}") from None
    keyless = [t.number for t in trials if t.state == TrialState.COMPLETE and TRIAL_KEY not in t.user_attrs]
    if keyless or (not trials and storage.listdir(layout.work_dir(directory))):
        raise ConfigError(f"--resume: {directory} was swept by an earlier version of this project, whose trials carry no key "
                          "(sweeps/search.py); it cannot be resumed, only selected from (`acpo select`); start a new sweep")
    done = {t.user_attrs.get(TRIAL_KEY) for t in trials if t.state == TrialState.COMPLETE}
    waiting = {t.user_attrs.get(TRIAL_KEY) for t in trials if t.state == TrialState.WAITING}
    told, last = 0, {}
    for trial in trials:
        key = trial.user_attrs.get(TRIAL_KEY)
        if key is not None and trial.params:
            last[key] = trial
        if trial.state not in (TrialState.RUNNING, TrialState.FAIL):
            continue
        values = finished_values(directory, key, axes) if key and key not in done else None
        if values is not None:  # finished: its end was lost (the driver died, or the tell failed and it was marked failed)
            if trial.state == TrialState.RUNNING:
                study.tell(trial.number, values)
            else:
                study.add_trial(create_trial(params=trial.params, distributions=trial.distributions, values=values,
                                             user_attrs={TRIAL_KEY: key}))
            done.add(key)
            told += 1
        elif trial.state == TrialState.RUNNING:
            study.tell(trial.number, state=TrialState.FAIL)
    again = [key for key in last if key not in done and key not in waiting]
    for key in again:
        study.enqueue_trial(last[key].params, user_attrs={TRIAL_KEY: key})
    return {"done": len(done - {None}), "told": told, "again": len(again) + len(waiting - {None})}
