"""The tracking spool, the writer's side: what a trial has to log to MLflow, written among its records
(`work/<trial>/tracking/`, trainers/common/layout.py) as one small file per record (one object when the
sweep's storage is object storage, which has no append), written whole. Its parameters and how it
ended come from the trial function (sweeps/trial.py); each report's metrics and each checkpoint's
sample grid from a Ray Train callback on the trial's controller (`SpoolCallback`), so workers never
talk to MLflow and training never waits on it. The driver replays the spools into MLflow
(sweeps/replay.py).

This side imports no MLflow: a trial actor and the Train controller import it.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from pathlib import Path

from ray.train.v2.api.callback import UserCallback

from trainers.common import layout, storage
from trainers.common.layout import SENT, SPOOL  # noqa: F401 - the spool's names, imported from here too


def spool(location: str | Path, record: dict) -> None:
    """One record as one file (one object on object storage), written whole, named by the time it was
    written so that a listing gives the records in order. A trial's records come from its Tune
    function and its Train controller, seconds apart: on a cluster their nodes' clocks (NTP) agree
    far better than that."""
    name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
    storage.write_text(storage.join(location, name), json.dumps(record))


def record_names(location: str | Path) -> list[str]:
    """The spool's records, in order (a local file being written is a `.tmp` until renamed)."""
    return [name for name in storage.listdir(location) if name.endswith(".json")]


def read_records(location: str | Path, names: list[str]) -> list[str]:
    return [storage.read_text(storage.join(location, name)) for name in names]


def finite_metrics(metrics: dict) -> dict:
    """The numbers MLflow can hold, under names it accepts (`fid@25` -> `fid_at_25`)."""
    return {key.replace("@", "_at_"): float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


class SpoolCallback(UserCallback):
    """Ray Train callback: each report of rank 0 -> a `metrics` record in the trial's spool, and the
    checkpoint's sample grid (in the trial's checkpoints, `checkpoints`) -> an `image` record. Writes
    one small file or object: never waits on MLflow."""

    def __init__(self, spool_location: str | Path, checkpoints: str | Path):
        self.spool_location, self.checkpoints = str(spool_location), str(checkpoints)
        self.steps: dict[int, int] | None = None  # step -> time of its first report; read from the spool once

    def after_report(self, run_context, metrics, checkpoint):
        rank0 = metrics[0]
        step = int(rank0.get("step", 0))
        # A step reported again (a restart from an older checkpoint) keeps the time of its first report:
        # the same figures are then the same MLflow entry, not a second point at that step. The spool is
        # read once per controller (on object storage, one request per record), then kept up to date here.
        if self.steps is None:
            self.steps = spooled_steps(self.spool_location)
        stamp = self.steps.setdefault(step, int(time.time() * 1000))
        grid = storage.join(self.checkpoints, storage.name(checkpoint.path), layout.CHECKPOINT_SAMPLES) if checkpoint else None
        spool_evaluation(self.spool_location, step, stamp, rank0, grid)


def spool_evaluation(spool_location: str | Path, step: int, stamp: int, metrics: dict, grid: str | None) -> None:
    """One evaluation: its figures, and its sample grid when there is one."""
    spool(spool_location, {"op": "metrics", "step": step, "time": stamp, "metrics": finite_metrics(metrics)})
    if grid is not None and storage.is_file(grid):
        spool(spool_location, {"op": "image", "file": str(grid), "step": step, "time": stamp})


def spooled_steps(spool_location: str | Path) -> dict[int, int]:
    """Step -> the time of its first metrics record in the spool."""
    steps = {}
    for text in read_records(spool_location, record_names(spool_location)):
        with contextlib.suppress(ValueError, KeyError):
            record = json.loads(text)
            if record.get("op") == "metrics":
                steps.setdefault(int(record["step"]), int(record["time"]))
    return steps


def last_evaluation(checkpoints: str | Path) -> dict | None:
    """The figures of a trial's last evaluated checkpoint (what it reported last), or None."""
    evaluated = storage.glob(checkpoints, layout.trial_metrics_glob())
    return json.loads(storage.read_text(evaluated[-1])) if evaluated else None


def spool_unreported(spool_location: str | Path, checkpoints: str | Path) -> int:
    """Evaluations in the trial's checkpoints that the spool lacks (the trial's controller was killed
    between a checkpoint's upload and its callback, and the resumed run started after that step):
    added, stamped with the figures file's time so that a second pass adds nothing. Returns how many."""
    spooled = spooled_steps(spool_location)
    added = 0
    for metrics_file in storage.glob(checkpoints, layout.trial_metrics_glob()):
        try:
            metrics = json.loads(storage.read_text(metrics_file))
            step = int(metrics["step"])
        except (ValueError, KeyError):
            continue  # unreadable figures: the selection lists the checkpoint as such
        if step in spooled:
            continue
        grid = storage.join(storage.parent(metrics_file), layout.CHECKPOINT_SAMPLES)
        spool_evaluation(spool_location, step, int(storage.mtime(metrics_file) * 1000), metrics, grid)
        added += 1
    return added


def last_sent(spool_location: str | Path) -> str:
    """The name of the last record replayed into MLflow ("" for none)."""
    sent = layout.sent_file(spool_location)
    return storage.read_text(sent).strip() if storage.is_file(sent) else ""


def recorded_trials(directory: str | Path) -> list[str]:
    """The trials with records in the sweep's folder (`work/<trial>/`), in order; an entry that is no plain
    folder name is no trial's (and never becomes a path)."""
    return [name for name in storage.listdir(layout.work_dir(directory)) if layout.FOLDER_NAME_PATTERN.fullmatch(name)]


def trial_spools(directory: str | Path) -> dict[str, str]:
    """Trial id -> its spool, for every trial of the sweep that has one."""
    return {trial: layout.trial_spool(directory, trial) for trial in recorded_trials(directory)}


def pending_records(directory: str | Path) -> dict[str, int]:
    """Records not yet in MLflow, by trial."""
    out = {}
    for trial, location in trial_spools(directory).items():
        sent = last_sent(location)
        left = sum(1 for name in record_names(location) if name > sent)
        if left:
            out[trial] = left
    return out
