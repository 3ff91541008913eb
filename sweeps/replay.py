"""The tracking spool, the reader's side: the sweep's driver replays every trial's spool (sweeps/spool.py)
into MLflow in order, from a background thread (`SpoolReplayer`), keeping its place in
`work/<trial>/tracking.sent`; when the server is down it waits and tries again, however long the
outage. A replay after a restart makes no duplicates: metrics carry the time they were spooled, and
MLflow stores a (key, step, time, value) once; parameters, images and run ends are idempotent too.

A record the server cannot be blamed for (not JSON, not an object, an unknown op, a key its op needs
missing or of the wrong type, an image from outside the sweep's folder) is skipped with one warning
and its place kept like a replayed one's: retried, it would stall its trial's spool forever.
"""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sweeps.spool import last_sent, pending_records, record_names, trial_spools
from trainers.common import layout, storage
from trainers.common.errors import last_line

if TYPE_CHECKING:
    from sweeps.tracking import SweepTracking


def number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def instance_of(kind: type):
    return lambda value: isinstance(value, kind)


def status(value: object) -> bool:
    return value in ("FINISHED", "FAILED", "KILLED")  # what MLflow's set_terminated takes


# op -> the keys it needs, each with the check of its value; then the keys some ops may have
NEEDS = {"start": {}, "metrics": {"metrics": instance_of(dict), "step": number, "time": number},
         "image": {"file": instance_of(str), "step": number, "time": number}, "end": {}}
OPTIONAL = {"params": instance_of(dict), "status": status}


def malformed(record: object) -> str | None:
    """What keeps `record` from being replayed, whatever the server says; None when nothing does."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not a record"
    op = record.get("op")
    if op not in NEEDS:
        return f"unknown op {op!r}"
    missing = [key for key in NEEDS[op] if key not in record]
    if missing:
        return f"op {op!r} without {', '.join(missing)}"
    checks = {**NEEDS[op], **{key: check for key, check in OPTIONAL.items() if key in record}}
    wrong = [key for key, check in checks.items() if not check(record[key])]
    return f"op {op!r} with a bad {', '.join(wrong)}" if wrong else None


def inside(directory: str, location: str) -> bool:
    """Whether `location` lies inside the folder `directory`: after `..` and symlinks for a local path;
    an object store keeps `..` as part of a key, so a URI holding one is refused outright."""
    root, target = storage.resolve(directory), storage.resolve(location)
    if storage.is_remote(root) or storage.is_remote(target):
        return ".." not in target.split("/") and target.startswith(root + "/")
    return Path(target).is_relative_to(root) and target != root


def finish_tracking(replayer: "SpoolReplayer", wait_s: float) -> None:
    """Wait a bounded time for the trials' spooled records to reach MLflow; say what is left."""
    pending = replayer.finish(wait_s)
    if pending:
        print(f"[sweep] MLflow: {sum(pending.values())} record(s) of {len(pending)} trial(s) still spooled after {wait_s:g} s "
              "(they stay in work/<trial>/tracking/; --resume or `acpo select` replays them)", file=sys.stderr, flush=True)


class SpoolReplayer:
    """Replays every trial's spool of a sweep into MLflow, in order, from the driver: in a background
    thread while the sweep runs (`start`), and to the end within a time limit (`finish`)."""

    def __init__(self, tracking: SweepTracking, directory: str | Path, parent_id: str, retry_seconds: float = 5.0):
        self.tracking, self.directory, self.parent_id, self.retry_seconds = tracking, str(directory), parent_id, retry_seconds
        self._runs: dict[str, str] = {}
        self._sent: dict[str, str] = {}  # trial -> the last record replayed (read from `tracking.sent` once)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None
        self.skipped = 0  # records that cannot be replayed (see the module): counted, never retried forever

    def start(self) -> "SpoolReplayer":
        self._thread = threading.Thread(target=self._loop, name="mlflow-spool-replay", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.replay_once()
            self._stop.wait(self.retry_seconds)

    def finish(self, timeout: float) -> dict[str, int]:
        """Stop the thread, then replay until nothing is pending or `timeout` seconds passed; returns what is still pending."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        deadline = time.monotonic() + timeout
        while not self.replay_once() and time.monotonic() < deadline:
            time.sleep(min(self.retry_seconds, max(0.0, deadline - time.monotonic())))
        return pending_records(self.directory)

    def replay_once(self) -> bool:
        """One pass over every spool; True when everything is in MLflow. An unreachable server ends the pass."""
        try:
            for trial, location in trial_spools(self.directory).items():
                self._replay(trial, location)
        except Exception as error:  # noqa: BLE001 - server down or refusing: keep the records, try again later
            if self._down_since is None:
                self._down_since = time.monotonic()
                reason = last_line(error)[:200]
                print(f"[tracking] replay to MLflow paused ({reason}); training goes on, records stay spooled and are "
                      "replayed when it can go on", file=sys.stderr, flush=True)
            return False
        if self._down_since is not None:
            print(f"[tracking] replay to MLflow resumed after {time.monotonic() - self._down_since:.0f} s; spooled records replayed", flush=True)
            self._down_since = None
        return True

    def _replay(self, trial: str, location: str) -> None:
        """The trial's records after the last one replayed. Its place is written once per pass, also
        when the server fails mid-pass; a replay from an older place adds nothing twice anyway."""
        sent = self._sent.get(trial)
        if sent is None:
            sent = self._sent[trial] = last_sent(location)
        try:
            for name in (n for n in record_names(location) if n > sent):
                record, why = self._read(storage.join(location, name))
                if why is None:
                    self._apply(trial, record)
                else:
                    self.skipped += 1
                    print(f"[tracking] skipped the spooled record {storage.join(location, name)}: {why}", file=sys.stderr, flush=True)
                self._sent[trial] = name
        finally:
            if self._sent[trial] != sent:
                storage.write_text(layout.sent_file(location), self._sent[trial])

    def _read(self, location: str) -> tuple[object, str | None]:
        """The record at `location`, and why it cannot be replayed (None when it can)."""
        try:
            record = json.loads(storage.read_text(location))
        except ValueError as error:  # not JSON, or not UTF-8; a store that does not answer raises OSError
            return None, f"not a JSON record ({last_line(error)[:120]})"
        why = malformed(record)
        if why is None and record["op"] == "image" and not inside(self.directory, record["file"]):
            why = f"its image {record['file']} lies outside the sweep's folder {self.directory}"
        return record, why

    def _apply(self, trial: str, record: dict) -> None:
        run_id = self._runs.get(trial)
        if run_id is None:
            run_id = self._runs[trial] = self.tracking.run("trial", f"trial-{trial}", self.parent_id, trial=trial)
        op = record.get("op")
        if op == "start":
            self.tracking.log_params(run_id, record.get("params", {}))
            base_grid = layout.base_samples_file(self.directory)
            if storage.is_file(base_grid):  # step 0 of the trial's images: the base model, same sampling noise as every later grid
                self.tracking.log_grid(run_id, base_grid, step=0)
        elif op == "metrics":
            self.tracking.log_metrics(run_id, record["metrics"], int(record["step"]), stamp=int(record["time"]))
        elif op == "image" and storage.is_file(record["file"]):
            self.tracking.log_grid(run_id, record["file"], int(record["step"]), int(record["time"]))
        elif op == "end":
            self.tracking.client.set_terminated(run_id, status=record.get("status", "FINISHED"))
