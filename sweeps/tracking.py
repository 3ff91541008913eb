"""MLflow for the sweep: one parent run per sweep, a child run for the base model and one per trial.

Runs are found again by tag (`acpo.sweep_id`, `acpo.role`, `acpo.trial`), never created twice: a
resumed sweep logs into the runs it started. The sweep id lives in the sweep's folder (`sweep_id`),
so two sweeps of one name never share a parent run (the name is refused instead).

Training never waits on MLflow. A trial writes what it has to log (its parameters, each report's
metrics, each checkpoint's sample grid, how it ended) to a spool among its records,
`work/<trial>/tracking/`, one small file per record (one object when the sweep's storage is object
storage, which has no append), written whole; a Ray Train callback on the trial's controller writes
the reports, so workers never talk to MLflow. The sweep's driver replays every spool into MLflow in
order from a background thread (`SpoolReplayer`), keeping its place in `tracking.sent`; when the
server is down it waits and tries again, however long the outage. A replay after a restart makes no
duplicates: metrics carry the time they were spooled, and MLflow stores a (key, step, time, value)
once; parameters, images and run ends are idempotent too.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import threading
import time
import uuid
from pathlib import Path

# MLflow's usage telemetry (on by default, at `import mlflow`) unsets an environment variable from a
# background thread when it cannot reach its endpoint; a request iterating os.environ at that moment
# (requests' proxy lookup) fails with KeyError '_MLFLOW_TELEMETRY_SESSION_ID'. It took one trial of
# 36 down in a measured study. Off unless the user turns it on; set before mlflow is imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow's client retries a failing request 7 times with exponential backoff (~4 minutes) before it
# raises. Nothing here waits on it: trials spool, and the replay thread has its own retry loop; so a
# call fails within seconds and the replay says the server is down instead of hanging in a retry.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per upload would drown the sweep's log

from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from ray.train.v2.api.callback import UserCallback  # noqa: E402

from trainers.common import storage  # noqa: E402
from sweeps.selection import params_text  # noqa: E402
from trainers.checkpoint import CHECKPOINT_GLOB  # noqa: E402
from trainers.common.errors import TrackingError, last_line  # noqa: E402,F401 - TrackingError: raised here, caught by the driver

# MLflow limits a tag/param value's length; long config values are cut, not rejected.
_MAX_VALUE = 500
# What the experiment is, for MLflow 3's UI (GenAI view or model training). MLflow 3.17's UI reads it only
# with its workflow switch off; with the switch (the default) the view comes from the URL, which is why
# the sweep prints `experiment_url()`, or from the browser's last choice.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# Sample grids of 16 px digits are ~136 px wide: upscaled (nearest, so pixels stay pixels) to at least this.
GRID_WIDTH = 512


class SweepTracking:
    def __init__(self, tracking_uri: str, sweep: str, experiment: str = "", sweep_id: str = ""):
        """`experiment`: the MLflow experiment ("" = the sweep's name; a study's sweeps share one).
        `sweep_id`: the sweep folder's id; its runs are found by it ("": by name, as a study's run is)."""
        self.uri, self.sweep, self.experiment, self.sweep_id = tracking_uri, sweep, experiment or sweep, sweep_id
        # The champion is registered on the sweep's own server: without registry_uri, MLflow would follow a
        # $MLFLOW_REGISTRY_URI left behind by any earlier mlflow.set_registry_uri in this process (found by the tests).
        self.client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        found = self.client.get_experiment_by_name(self.experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment, tags=EXPERIMENT_KIND)
        if found and not all(found.tags.get(k) == v for k, v in EXPERIMENT_KIND.items()):
            for key, value in EXPERIMENT_KIND.items():  # an experiment made before, or by hand
                self.client.set_experiment_tag(self.experiment_id, key, value)

    def run(self, role: str, name: str, parent_id: str | None = None, trial: str | None = None) -> str:
        """The run with these tags, created once."""
        query = f"tags.`acpo.sweep` = '{self.sweep}' and tags.`acpo.role` = '{role}'"
        if self.sweep_id:
            query += f" and tags.`acpo.sweep_id` = '{self.sweep_id}'"
        if trial:
            query += f" and tags.`acpo.trial` = '{trial}'"
        found = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        if found:
            return found[0].info.run_id
        tags = {"acpo.sweep": self.sweep, "acpo.role": role, "mlflow.runName": name}
        if self.sweep_id:
            tags["acpo.sweep_id"] = self.sweep_id
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        if trial:
            tags["acpo.trial"] = trial
        return self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id

    def other_sweep(self) -> str | None:
        """The folder of another sweep that already uses this name in this experiment, if any."""
        query = f"tags.`acpo.sweep` = '{self.sweep}' and tags.`acpo.role` = 'sweep'"
        for run in self.client.search_runs([self.experiment_id], filter_string=query, max_results=10):
            if run.data.tags.get("acpo.sweep_id") != self.sweep_id:
                return run.data.tags.get("acpo.folder", "a sweep of an earlier version")
        return None

    def end_runs(self, status: str, roles=("trial",)) -> None:
        """Every run of this sweep still RUNNING with one of `roles` ends with `status`."""
        query = f"tags.`acpo.sweep` = '{self.sweep}' and attributes.status = 'RUNNING'"
        if self.sweep_id:
            query += f" and tags.`acpo.sweep_id` = '{self.sweep_id}'"
        for run in self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000):
            if run.data.tags.get("acpo.role") in roles:
                self.client.set_terminated(run.info.run_id, status=status)

    def log_params(self, run_id: str, params: dict) -> None:
        existing = self.client.get_run(run_id).data.params
        # a resumed trial keeps its parameters (MLflow refuses a change); one request per 100 (MLflow's limit)
        new = [Param(key, str(value)[:_MAX_VALUE]) for key, value in params.items() if key not in existing]
        for start in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[start:start + 100])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        stamp = int(time.time() * 1000)
        batch = [Metric(key, value, stamp, step) for key, value in finite_metrics(metrics).items()]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def log_grid(self, run_id: str, grid: str | Path, step: int, stamp: int | None = None, key: str = "samples") -> None:
        """A sample grid as a step-indexed image (MLflow's image view compares them across steps and
        runs), upscaled to a readable size. Once per (key, step): a replay adds no second image."""
        from PIL import Image

        if any(f"/{key}+step+{step}+" in a.path for a in self.client.list_artifacts(run_id, "images")):
            return
        with Image.open(io.BytesIO(storage.read_bytes(grid))) as image:  # a file or an object
            image.load()
        scale = max(1, -(-GRID_WIDTH // image.width))
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        self.client.log_image(run_id, image, key=key, step=step, timestamp=stamp)

    def log_selection(self, run_id: str, selection: dict, directory: str | Path) -> None:
        """The selection on the sweep's parent run: figures, the front's plots (PNG and interactive
        HTML) and table, the champion's place."""
        base, champion = selection["base"], selection["champion"]
        self.log_metrics(run_id, {"hypervolume": selection["hypervolume"], "evaluated_checkpoints": selection["evaluated"],
                                  **{f"base_{k}": v for k, v in base.items()},
                                  **({f"champion_{k}": champion[k] for k in base} if champion else {})})
        for name in ("pareto.png", "pareto.html", "selection.json"):
            with storage.local_copy(storage.join(directory, name)) as path:
                self.client.log_artifact(run_id, str(path))
        columns = ("trial", "step", *base, "checkpoint")
        self.client.log_table(run_id, {k: [r.get(k) for r in selection["front"]] for k in columns}, artifact_file="pareto_front.json")
        if champion:
            self.client.set_tag(run_id, "acpo.champion", f"{champion['trial']}/step {champion['step']}")

    def experiment_url(self) -> str:
        """The experiment's page in the MLflow UI, on its runs: MLflow 3.17's UI picks its GenAI or
        model-training view from the URL (or the browser's last choice), not from the experiment's tag."""
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}?workflowType=machine_learning"

    def trial_runs(self) -> dict[str, str]:
        """Trial id -> its MLflow run id, for this sweep."""
        query = f"tags.`acpo.sweep` = '{self.sweep}' and tags.`acpo.role` = 'trial'"
        if self.sweep_id:
            query += f" and tags.`acpo.sweep_id` = '{self.sweep_id}'"
        return {r.data.tags["acpo.trial"]: r.info.run_id
                for r in self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000)}

    def describe_sweep(self, run_id: str, selection: dict) -> str:
        """The parent run's description (MLflow's note, Markdown): what a reader needs at a glance."""
        note = sweep_note(self.sweep, self.experiment_id, selection, self.trial_runs())
        self.client.set_tag(run_id, "mlflow.note.content", note)
        return note

    def register_champion(self, run_id: str, exported: Path, model_name: str, selection: dict, settings: dict) -> dict:
        """The exported champion as an MLflow model (pyfunc: `trainers/mlflow_model.py`, the pipeline
        as its artifact) under the parent run's `champion/`, registered as a new version of
        `model_name` with alias `champion`, its figures and parameters as the version's tags."""
        import tempfile

        champion = selection["champion"]
        with tempfile.TemporaryDirectory(prefix="champion-model.") as tmp:
            save_champion_model(exported, Path(tmp) / "model", settings)
            self.client.log_artifacts(run_id, str(Path(tmp) / "model"), artifact_path="champion")
        source = f"{self.client.get_run(run_id).info.artifact_uri}/champion"
        try:
            self.client.create_registered_model(model_name)
        except MlflowException:
            pass  # registered by an earlier sweep: the champion becomes a new version
        tags = {"fid": f"{champion['fid']:.4f}", "heldout_quality": f"{champion['heldout_quality']:.4f}", "trial": champion["trial"],
                "step": str(champion.get("step", "")), "rule": selection["rule"][:200], "checkpoint": champion["checkpoint"],
                "sweep": self.sweep, **{k: str(v)[:_MAX_VALUE] for k, v in champion.items() if k.startswith("param:")}}
        version = self.client.create_model_version(model_name, source=source, run_id=run_id, tags=tags,
                                                   description=version_note(self.sweep, selection))
        self.client.set_registered_model_alias(model_name, "champion", version.version)
        return {"model": model_name, "version": version.version, "alias": "champion", "source": source}


def version_note(sweep: str, selection: dict) -> str:
    base, champion = selection["base"], selection["champion"]
    return (f"Champion of sweep `{sweep}`: trial {champion['trial']}, step {champion.get('step', '?')}; "
            f"FID {champion['fid']:.3f} (base {base['fid']:.3f}), held-out quality {champion['heldout_quality']:.4f} "
            f"(base {base['heldout_quality']:.4f}). Rule: {selection['rule']}. Parameters: {params_text(champion)}.\n\n"
            "Load: `mlflow.pyfunc.load_model(\"models:/NAME@champion\").predict(pandas.DataFrame({\"num_images\": [8], "
            "\"steps\": [25], \"seed\": [0]}))` (uint8 images), or the diffusers pipeline in `artifacts/champion/`.")


def sweep_note(sweep: str, experiment_id: str, selection: dict, trial_runs: dict[str, str]) -> str:
    """The sweep in Markdown: base, champion and rule, the front as a table linking each trial's run."""
    base, champion = selection["base"], selection["champion"]

    def trial_link(trial: str) -> str:
        run = trial_runs.get(trial)
        return f"[{trial}](#/experiments/{experiment_id}/runs/{run})" if run else trial

    headline = (f"**Champion: trial {trial_link(champion['trial'])}, step {champion.get('step', '?')}: FID {champion['fid']:.3f} "
                f"(base {base['fid']:.3f}), held-out quality {champion['heldout_quality']:.4f} (base {base['heldout_quality']:.4f}).**"
                if champion else "**No champion: no checkpoint has finite figures.**")
    lines = [headline, "", f"## Sweep `{sweep}`", "",
             f"{selection['evaluated']} evaluated checkpoints; {len(selection['front'])} on the Pareto front; "
             f"hypervolume against the base model {selection['hypervolume']:.4g}.", "",
             "| | FID (lower is better) | held-out quality (higher is better) |", "|---|---:|---:|",
             f"| base model | {base['fid']:.3f} | {base['heldout_quality']:.4f} |"]
    if champion:
        lines.append(f"| **champion**: trial {trial_link(champion['trial'])}, step {champion.get('step', '?')} | "
                     f"**{champion['fid']:.3f}** | **{champion['heldout_quality']:.4f}** |")
    lines += ["", f"Rule: {selection['rule']}."]
    if champion:
        lines.append(f"Champion's parameters: {params_text(champion)}.")
    registered = selection.get("registered")
    if registered:
        lines.append(f"Registered as [{registered['model']} version {registered['version']}]"
                     f"(#/models/{registered['model']}/versions/{registered['version']}), alias `@champion`.")
    lines += ["", "### Pareto front", "", "| trial | step | FID | held-out quality | parameters |", "|---|---:|---:|---:|---|"]
    for row in selection["front"]:
        mark = " (champion)" if champion and row["checkpoint"] == champion["checkpoint"] else ""
        lines.append(f"| {trial_link(row['trial'])}{mark} | {row.get('step', '?')} | {row['fid']:.3f} | {row['heldout_quality']:.4f} | {params_text(row)} |")
    if selection.get("unreadable"):
        lines += ["", f"{len(selection['unreadable'])} checkpoint(s) could not be read and were left out (selection.json)."]
    lines += ["", "Artifacts: `pareto.html` (interactive: each trial's path across its checkpoints), `pareto.png`, "
              "`pareto_front.json`, `selection.json`" + (", `champion/` (the registered MLflow model)." if registered else ".")]
    return "\n".join(lines) + "\n"


def save_champion_model(exported: Path, out: Path, settings: dict) -> Path:
    """`exported` (a diffusers folder, `cascade/` for Cas-DM) as an MLflow pyfunc model folder at `out`:
    the code of `trainers/mlflow_model.py` (no pickle), the packages it imports as code, a signature
    and an input example, `settings` (sampler, guidance_scale, prompts, steps) as its model config."""
    from importlib.metadata import version

    import mlflow.pyfunc
    import numpy as np
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    import trainers

    root = Path(trainers.__file__).resolve().parent.parent
    text = bool(settings["prompts"])
    columns = [ColSpec("long", "num_images"), ColSpec("long", "steps"), ColSpec("long", "seed")]
    example = {"num_images": [2], "steps": [int(settings["steps"])], "seed": [0]}
    if text:
        columns.append(ColSpec("string", "prompt", required=False))
        example["prompt"] = [settings["prompts"][0]]
    signature = ModelSignature(inputs=Schema(columns), outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]))
    requirements = [f"{name}=={version(name).split('+')[0]}" for name in
                    ("torch", "diffusers", "transformers", "safetensors", "numpy", "pandas", "pillow", "pydantic", "pyyaml")]
    mlflow.pyfunc.save_model(path=str(out), python_model=str(root / "trainers" / "mlflow_model.py"), artifacts={"pipeline": str(exported)},
                             code_paths=[str(root / package) for package in ("trainers", "eval", "objectives")],
                             signature=signature, input_example=pd.DataFrame(example), pip_requirements=requirements,
                             model_config={k: settings[k] for k in ("sampler", "guidance_scale", "prompts")})
    return out


# In each trial's record folder, `<sweep>/work/<trial>/`: the spool, one file per record (object storage
# has no append), and the name of the last record replayed into MLflow.
SPOOL, SENT = "tracking", "tracking.sent"


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
        grid = storage.join(self.checkpoints, storage.name(checkpoint.path), "samples.png") if checkpoint else None
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


def spool_unreported(spool_location: str | Path, checkpoints: str | Path) -> int:
    """Evaluations in the trial's checkpoints that the spool lacks (the trial's controller was killed
    between a checkpoint's upload and its callback, and the resumed run started after that step):
    added, stamped with the figures file's time so that a second pass adds nothing. Returns how many."""
    spooled = spooled_steps(spool_location)
    added = 0
    for metrics_file in storage.glob(checkpoints, f"{CHECKPOINT_GLOB}/metrics.json"):
        try:
            metrics = json.loads(storage.read_text(metrics_file))
            step = int(metrics["step"])
        except (ValueError, KeyError):
            continue  # unreadable figures: the selection lists the checkpoint as such
        if step in spooled:
            continue
        grid = storage.join(storage.parent(metrics_file), "samples.png")
        spool_evaluation(spool_location, step, int(storage.mtime(metrics_file) * 1000), metrics, grid)
        added += 1
    return added


def last_sent(spool_location: str | Path) -> str:
    """The name of the last record replayed into MLflow ("" for none)."""
    sent = storage.join(storage.parent(spool_location), SENT)
    return storage.read_text(sent).strip() if storage.is_file(sent) else ""


def trial_spools(directory: str | Path) -> dict[str, str]:
    """Trial id -> its spool, for every trial of the sweep that has one."""
    work = storage.join(directory, "work")
    return {trial: storage.join(work, trial, SPOOL) for trial in storage.listdir(work)}


def pending_records(directory: str | Path) -> dict[str, int]:
    """Records not yet in MLflow, by trial."""
    out = {}
    for trial, location in trial_spools(directory).items():
        sent = last_sent(location)
        left = sum(1 for name in record_names(location) if name > sent)
        if left:
            out[trial] = left
    return out


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
        self.skipped = 0  # records that did not parse: counted, never retried forever

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
                try:
                    record = json.loads(storage.read_text(storage.join(location, name)))
                except json.JSONDecodeError:
                    self.skipped += 1
                else:
                    self._apply(trial, record)
                self._sent[trial] = name
        finally:
            if self._sent[trial] != sent:
                storage.write_text(storage.join(storage.parent(location), SENT), self._sent[trial])

    def _apply(self, trial: str, record: dict) -> None:
        run_id = self._runs.get(trial)
        if run_id is None:
            run_id = self._runs[trial] = self.tracking.run("trial", f"trial-{trial}", self.parent_id, trial=trial)
        op = record.get("op")
        if op == "start":
            self.tracking.log_params(run_id, record.get("params", {}))
            base_grid = storage.join(self.directory, "base_samples.png")
            if storage.is_file(base_grid):  # step 0 of the trial's images: the base model, same sampling noise as every later grid
                self.tracking.log_grid(run_id, base_grid, step=0)
        elif op == "metrics":
            step, stamp = int(record["step"]), int(record["time"])
            metrics = [Metric(key, value, stamp, step) for key, value in record["metrics"].items()]
            if metrics:
                self.tracking.client.log_batch(run_id, metrics=metrics)
        elif op == "image" and storage.is_file(record["file"]):
            self.tracking.log_grid(run_id, record["file"], int(record["step"]), int(record["time"]))
        elif op == "end":
            self.tracking.client.set_terminated(run_id, status=record.get("status", "FINISHED"))
