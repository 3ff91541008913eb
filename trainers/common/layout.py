"""The sweep folder's layout: every path under `<storage>/<sweep>`, named once.

    <storage>/<sweep>/
      sweep_id                      the sweep's id (its MLflow runs carry it as a tag)
      driver.lease                  the driver that runs the sweep now: host, pid, heartbeat (sweeps/lease.py)
      tune/                         Ray Tune's experiment state (written by Tune, never read: --resume reads the rest)
      optuna.db                     the Optuna study, in a local sweep folder (sweeps/search.py)
      optuna-journal/               the Optuna study as a journal of write-once objects, on object storage
      trials/<trial>/step_NNNNNN/   each trial's checkpoints (<trial>: its key, `trial_0003`, sweeps/search.py) (trainers/checkpoint.py), kept by Ray Train;
                                    Ray's record of them: checkpoint_manager_snapshot.json
      work/<trial>/params.json      each trial's parameters
      work/<trial>/tracking/        its tracking spool (sweeps/spool.py), and tracking.sent, the place of its replay
      base_metrics.json             the base model's figures, evaluated once on the screening bank
      base_samples.png              and its sample grid
      base_per_sample.safetensors   and what was measured of each sample (the screening intervals' pairs)
      selection.json                the front, the hypervolume, the confirmation, the champion
      confirmation/<bank>/          per-sample data of the base and each confirmed candidate on the confirmation bank
      pareto.png, pareto.html       the front's plots
      champions/<export>/           each selection's champion, exported as a diffusers pipeline (<export>: when and which,
                                    `20261207-101500-1a2b3c`), written whole before champion.json names it
      champion.json                 which of them is the sweep's champion now (the older ones are removed after the switch)

Every function takes the sweep's folder (or a trial's folder) as a location: a local path or a URI
(`s3://bucket/prefix`), joined with `storage.join`, so the same names hold on a disk and in object storage.
"""

from __future__ import annotations

import re
from pathlib import Path

from trainers.common.errors import ConfigError
from trainers.common.storage import join, parent

SWEEP_ID = "sweep_id"
TUNE = "tune"
OPTUNA_DB, OPTUNA_JOURNAL = "optuna.db", "optuna-journal"
LEASE = "driver.lease"
TRIAL_KEY = "acpo.trial"  # a trial's key: the Optuna trial's user attribute, the Tune trial's parameter, the MLflow run's tag
TRIALS = "trials"
WORK = "work"
PARAMS = "params.json"
SPOOL, SENT = "tracking", "tracking.sent"  # in a trial's records: one file per record (object storage has no append); the last replayed
BASE_METRICS, BASE_SAMPLES, BASE_PER_SAMPLE = "base_metrics.json", "base_samples.png", "base_per_sample.safetensors"
SELECTION = "selection.json"
PARETO_PNG, PARETO_HTML = "pareto.png", "pareto.html"
CHAMPIONS, CHAMPION_POINTER = "champions", "champion.json"
CHAMPION_ARTIFACTS = "champion"  # in the sweep's MLflow parent run: champion/<export>/, one registered version each
CONFIRMATION = "confirmation"
# A study's folder: its sweeps under SWEEPS, its report, the screening intervals the report reads (a
# cache: recomputed when missing) beside the files above (the base's, shared by its sweeps).
STUDY_SWEEPS, STUDY_REPORT, STUDY_INTERVALS = "sweeps", "report", "screening_intervals.json"

# Inside one checkpoint folder (the whole list: trainers/checkpoint.py's docstring).
CHECKPOINT_GLOB = "step_*"  # every checkpoint folder of a run, in step order when sorted
CHECKPOINT_CONFIG, CHECKPOINT_METRICS, CHECKPOINT_SAMPLES = "config.json", "metrics.json", "samples.png"
CHECKPOINT_PER_SAMPLE = "per_sample.safetensors"  # the evaluation's per-sample features and scores (eval/intervals.py)
# Ray Train's record of a trial's checkpoints, in `trials/<trial>/`.
TRAIN_RECORD = "checkpoint_manager_snapshot.json"

Location = str | Path
# A trial's key names folders: read from the Optuna storage or Tune's parameters, it is checked as a key
# (`trial_key`) before it is used; every path built from a trial's name is checked to stay one plain
# folder name (`trial_folder`: `../x` or `/tmp/x` would leave the sweep's folder). Names listed from
# `trials/` or `work/` are folder names already; a sweep of an earlier version named them by Tune's
# trial id (`run_trial_3ad7f_00000`), which `acpo select` still reads.
TRIAL_KEY_PATTERN = re.compile(r"trial_\d{4,9}")
FOLDER_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def trial_key(key) -> str:
    """`key` when it is a trial's key (`trial_0003`), else a one-line ConfigError naming it."""
    if not isinstance(key, str) or not TRIAL_KEY_PATTERN.fullmatch(key):
        raise ConfigError(f"{TRIAL_KEY}: {key!r} is not a trial's key (trial_NNNN); a record of this sweep was altered "
                          "(its Optuna study or a trial's parameters): refused before it names a folder")
    return key


def trial_folder(name) -> str:
    """`name` when it is a plain folder name for a trial, else a one-line ConfigError naming it."""
    if not isinstance(name, str) or not FOLDER_NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"{TRIAL_KEY}: {name!r} is not a trial's folder name; refused before it names a folder")
    return name


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after `step` (the trainer writes it, Ray keeps it
    under that name, the sweep's selection finds it by `CHECKPOINT_GLOB`)."""
    return f"step_{step:06d}"


def sweep_id_file(directory: Location) -> str:
    return join(directory, SWEEP_ID)


def tune_dir(directory: Location) -> str:
    return join(directory, TUNE)


def optuna_db(directory: Location) -> str:
    return join(directory, OPTUNA_DB)


def optuna_journal(directory: Location) -> str:
    return join(directory, OPTUNA_JOURNAL)


def lease_file(directory: Location) -> str:
    return join(directory, LEASE)


def trials_dir(directory: Location) -> str:
    """Where Ray Train keeps every trial's checkpoints (its `storage_path`)."""
    return join(directory, TRIALS)


def trial_checkpoints(directory: Location, trial: str) -> str:
    return join(directory, TRIALS, trial_folder(trial))


def work_dir(directory: Location) -> str:
    return join(directory, WORK)


def trial_records(directory: Location, trial: str) -> str:
    """A trial's parameters and tracking spool, where the driver reads them."""
    return join(directory, WORK, trial_folder(trial))


def params_file(directory: Location, trial: str) -> str:
    return join(directory, WORK, trial_folder(trial), PARAMS)


def trial_spool(directory: Location, trial: str) -> str:
    return join(directory, WORK, trial_folder(trial), SPOOL)


def sent_file(spool_location: Location) -> str:
    """Beside a spool: the name of its last record replayed into MLflow."""
    return join(parent(spool_location), SENT)


def base_metrics_file(directory: Location) -> str:
    return join(directory, BASE_METRICS)


def base_per_sample_file(directory: Location) -> str:
    return join(directory, BASE_PER_SAMPLE)


def base_samples_file(directory: Location) -> str:
    return join(directory, BASE_SAMPLES)


def selection_file(directory: Location) -> str:
    return join(directory, SELECTION)


def pareto_files(directory: Location) -> tuple[str, str]:
    """The front's plots: (pareto.png, pareto.html)."""
    return join(directory, PARETO_PNG), join(directory, PARETO_HTML)


def confirmation_dir(directory: Location) -> str:
    return join(directory, CONFIRMATION)


def champions_dir(directory: Location) -> str:
    return join(directory, CHAMPIONS)


def champion_dir(directory: Location, export: str) -> str:
    """One selection's exported champion (`export`: its id, `new_export_id`)."""
    return join(directory, CHAMPIONS, export)


def legacy_champion_dir(directory: Location) -> str:
    """Where an earlier version kept its one export (`champion/`), replaced in place: removed at the next switch."""
    return join(directory, "champion")


def champion_pointer(directory: Location) -> str:
    return join(directory, CHAMPION_POINTER)


def new_export_id() -> str:
    """A name no earlier export has: the time (sorts in order) and a random part (two in one second)."""
    import time
    import uuid

    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def metrics_glob() -> str:
    """Relative to the sweep's folder: every evaluated checkpoint's figures, of every trial."""
    return f"{TRIALS}/*/{CHECKPOINT_GLOB}/{CHECKPOINT_METRICS}"


def trial_metrics_glob() -> str:
    """Relative to one trial's checkpoints: every evaluated checkpoint's figures."""
    return f"{CHECKPOINT_GLOB}/{CHECKPOINT_METRICS}"
