"""One Tune trial: the trial function a Ray Tune trial actor runs (`run_trial`), and only what it needs.

This is the only project module a trial actor imports (Tune pickles `run_trial` by reference), so it
is light by construction: no pyiqa, diffusers or MLflow at import (tests/test_trial_imports.py).
What MLflow should show goes to the trial's spool (sweeps/spool.py); the driver replays it.
"""

from __future__ import annotations

import contextlib
import json
import shutil

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from sweeps.dotted import set_values
from sweeps.spool import SpoolCallback, last_evaluation, spool, spool_unreported
from trainers.common import layout, storage
from trainers.common.errors import root_message
from trainers.config import Config
from trainers.ray_train import build_trainer


def run_trial(params: dict, base_config: dict, directory: str) -> None:
    """One Tune trial: the trainer's TorchTrainer, fitted (Train V2: the trial function is its driver).
    `base_config`: the sweep's resolved run config as a dict (`Config.to_dict`), validated here once
    with the trial's parameters set (the schema only: the driver checked what it refers to).
    `params` carries the trial's key (`layout.TRIAL_KEY`, given by the Optuna trial: sweeps/search.py),
    which names its records and its Ray Train run: a trial asked again on --resume has the same key,
    and so resumes from its last checkpoint."""
    params = dict(params)
    trial = layout.trial_key(params.pop(layout.TRIAL_KEY, None))  # checked before it names any folder
    records = layout.trial_records(directory, trial)  # the trial's parameters and spool, where the driver reads them
    # Where the workers write a checkpoint before Ray Train uploads it to `trials/`: beside the records in
    # a local sweep folder; on object storage, "": each worker's own scratch folder on its own node
    # (trainers/ray_train.py), not a path named here, which would be another node's.
    output = "" if storage.is_remote(directory) else records
    config = Config.from_dict(set_values(base_config, {**params, "train.output_dir": output}))
    storage.write_text(layout.params_file(directory, trial), json.dumps(params, indent=2) + "\n")
    log = layout.trial_spool(directory, trial)
    spool(log, {"op": "start", "params": params})
    checkpoints = layout.trial_checkpoints(directory, trial)
    # Same name and storage after a driver restart: Ray Train picks the run up from its last checkpoint.
    trainer = build_trainer(config, name=trial, storage_path=layout.trials_dir(directory),
                            callbacks=[TuneReportCallback(), SpoolCallback(log, checkpoints)])
    set_aside_unreadable_record(checkpoints)
    try:
        trainer.fit()
    except Exception as error:
        spool_unreported(log, checkpoints)
        broken = set_aside_unreadable_record(checkpoints)
        message = f"{broken}; {root_message(error)}" if broken else root_message(error)
        spool(log, {"op": "end", "status": "FAILED", "error": message})
        if broken:
            raise RuntimeError(message) from error
        raise
    spool_unreported(log, checkpoints)
    # A trial whose training had finished when the driver was killed, but which Tune had not yet
    # recorded as done, is run again on --resume: its Train run is complete, so fit() reports
    # nothing and Tune would end the trial with no figures. Report the last evaluated checkpoint's
    # (in an ordinary trial this repeats the last report: same step, same figures).
    evaluated = last_evaluation(checkpoints)
    if evaluated is not None:
        tune.report(evaluated)
    spool(log, {"op": "end", "status": "FINISHED"})


def set_aside_unreadable_record(checkpoints: str) -> str | None:
    """Ray Train's record of a trial's checkpoints (`checkpoint_manager_snapshot.json`) is rewritten in
    place; a full disk can leave it empty, and Ray then cannot start the trial again, ever. Such a
    record is renamed aside: the trial then restarts from its first step (its checkpoint folders are
    rewritten as it goes). Returns what happened, naming the file and the free space, or None."""
    record = storage.join(checkpoints, layout.TRAIN_RECORD)
    try:
        json.loads(storage.read_text(record))
        return None
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as error:
        with contextlib.suppress(OSError):
            storage.move(record, record + ".unreadable")
        where = storage.parent(storage.parent(checkpoints))
        free = "" if storage.is_remote(checkpoints) else f"; {shutil.disk_usage(checkpoints).free / 2**20:.0f} MB free in {where}"
        return (f"{record} was unreadable ({type(error).__name__}), set aside{free}: "
                "if the disk was full, free space and --resume (the trial restarts)")
