"""MLflow for the sweep: one parent run per sweep, a child run for the base model and one per trial.

Runs are found again by tag (`acpo.sweep`, `acpo.role`, `acpo.trial`), never created twice: a
resumed sweep logs into the runs it started. Each trial's metrics are written by one writer, a Ray
Train callback on that trial's controller (it sees rank 0's reports), so workers never talk to MLflow.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

# MLflow's usage telemetry (on by default, at `import mlflow`) unsets an environment variable from a
# background thread when it cannot reach its endpoint; a request iterating os.environ at that moment
# (requests' proxy lookup) fails with KeyError '_MLFLOW_TELEMETRY_SESSION_ID'. It took one trial of
# 36 down in a measured study. Off unless the user turns it on; set before mlflow is imported.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from ray.train.v2.api.callback import UserCallback  # noqa: E402

from trainers.checkpoint import checkpoint_name  # noqa: E402

# MLflow limits a tag/param value's length; long config values are cut, not rejected.
_MAX_VALUE = 500


class SweepTracking:
    def __init__(self, tracking_uri: str, sweep: str, experiment: str = ""):
        """`experiment`: the MLflow experiment ("" = the sweep's name; a study's sweeps share one)."""
        self.uri, self.sweep, self.experiment = tracking_uri, sweep, experiment or sweep
        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(self.experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(self.experiment)

    def run(self, role: str, name: str, parent_id: str | None = None, trial: str | None = None) -> str:
        """The run with these tags, created once."""
        query = f"tags.`acpo.sweep` = '{self.sweep}' and tags.`acpo.role` = '{role}'"
        if trial:
            query += f" and tags.`acpo.trial` = '{trial}'"
        found = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        if found:
            return found[0].info.run_id
        tags = {"acpo.sweep": self.sweep, "acpo.role": role, "mlflow.runName": name}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        if trial:
            tags["acpo.trial"] = trial
        return self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id

    def log_params(self, run_id: str, params: dict) -> None:
        existing = self.client.get_run(run_id).data.params
        for key, value in params.items():
            if key not in existing:  # a resumed trial keeps its parameters (MLflow refuses a change)
                self.client.log_param(run_id, key, str(value)[:_MAX_VALUE])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.client.log_metric(run_id, key.replace("@", "_at_"), float(value), step=step)


    def log_selection(self, run_id: str, selection: dict, directory: Path) -> None:
        """The selection on the sweep's parent run: figures, the front's plot and table, the champion's place."""
        base, champion = selection["base"], selection["champion"]
        self.log_metrics(run_id, {"hypervolume": selection["hypervolume"], "evaluated_checkpoints": selection["evaluated"],
                                  **{f"base_{k}": v for k, v in base.items()},
                                  **({f"champion_{k}": champion[k] for k in base} if champion else {})})
        self.client.log_artifact(run_id, str(directory / "pareto.png"))
        columns = ("trial", "step", *base, "checkpoint")
        self.client.log_table(run_id, {k: [r.get(k) for r in selection["front"]] for k in columns}, artifact_file="pareto_front.json")
        self.client.log_artifact(run_id, str(directory / "selection.json"))
        if champion:
            self.client.set_tag(run_id, "acpo.champion", f"{champion['trial']}/step {champion['step']}")

    def register_champion(self, run_id: str, exported: Path, model_name: str, selection: dict) -> dict:
        """The exported champion as an artifact of the parent run, registered as a new version of
        `model_name` with alias `champion`."""
        self.client.log_artifacts(run_id, str(exported), artifact_path="champion")
        source = f"{self.client.get_run(run_id).info.artifact_uri}/champion"
        try:
            self.client.create_registered_model(model_name)
        except MlflowException:
            pass  # registered by an earlier sweep: the champion becomes a new version
        tags = {"rule": selection["rule"][:200], "checkpoint": selection["champion"]["checkpoint"], "sweep": self.sweep}
        version = self.client.create_model_version(model_name, source=source, run_id=run_id, tags=tags)
        self.client.set_registered_model_alias(model_name, "champion", version.version)
        return {"model": model_name, "version": version.version, "alias": "champion", "source": source}


class MlflowReportCallback(UserCallback):
    """Ray Train callback: each report of rank 0 -> metrics of the trial's MLflow run, and the
    checkpoint's sample grid as an artifact."""

    def __init__(self, tracking_uri: str, sweep: str, run_id: str, experiment: str = ""):
        self.tracking_uri, self.sweep, self.run_id, self.experiment = tracking_uri, sweep, run_id, experiment
        self._tracking = None  # made on the controller at the first report (the callback is shipped there)

    def after_report(self, run_context, metrics, checkpoint):
        if self._tracking is None:
            self._tracking = SweepTracking(self.tracking_uri, self.sweep, self.experiment)
        tracking = self._tracking
        rank0 = metrics[0]
        step = int(rank0.get("step", 0))
        tracking.log_metrics(self.run_id, rank0, step)
        grid = Path(checkpoint.path) / "samples.png" if checkpoint else None
        if grid is not None and grid.is_file():
            tracking.client.log_artifact(self.run_id, str(grid), artifact_path=f"samples/{checkpoint_name(step)}")
