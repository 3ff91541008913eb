"""MLflow for the sweep: one parent run per sweep, a child run for the base model and one per trial.

Runs are found again by tag (`acpo.sweep_id`, `acpo.role`, `acpo.trial`), never created twice: a
resumed sweep logs into the runs it started. The sweep id lives in the sweep's folder (`sweep_id`),
so two sweeps of one name never share a parent run (the name is refused instead).

Training never waits on MLflow: trials write what is to be logged to a spool (sweeps/spool.py), which
the driver replays into these runs (sweeps/replay.py).
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import sweeps.mlflow_settings  # noqa: F401 - before mlflow is imported
from sweeps.champion_model import save_champion_model
from sweeps.selection import params_text
from sweeps.spool import finite_metrics
from trainers.common import layout, storage
from trainers.common.credentials import has_credentials, redact
from trainers.common.errors import TrackingError  # noqa: F401 - the error of a step that needs MLflow, imported from here

# MLflow limits a tag/param value's length; long config values are cut, not rejected.
_MAX_VALUE = 500
# What the experiment is, for MLflow 3's UI (GenAI view or model training). MLflow 3.17's UI reads it only
# with its workflow switch off; with the switch (the default) the view comes from the URL, which is why
# the sweep prints `experiment_url()`, or from the browser's last choice.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# Sample grids of 16 px digits are ~136 px wide: upscaled (nearest, so pixels stay pixels) to at least this.
GRID_WIDTH = 512


class SweepTracking:
    def __init__(self, tracking_uri: str, sweep: str, experiment: str = "", sweep_id: str = "", tags: dict | None = None):
        """`experiment`: the MLflow experiment ("" = the sweep's name; a study's sweeps share one).
        `sweep_id`: the sweep folder's id; its runs are found by it ("": by name, as a study's run is).
        `tags`: set on every run this creates (a rehearsal's `acpo.weights: random (rehearsal)`)."""
        self.uri, self.sweep, self.experiment, self.sweep_id = tracking_uri, sweep, experiment or sweep, sweep_id
        if has_credentials(tracking_uri):  # MLflow prints each ended run's link with the URI as given, password and all
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.tags = dict(tags or {})
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
        tags = {**self.tags, "acpo.sweep": self.sweep, "acpo.role": role, "mlflow.runName": name}
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
        new = [Param(key, redact(str(value))[:_MAX_VALUE]) for key, value in params.items() if key not in existing]
        for start in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[start:start + 100])

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0, stamp: int | None = None) -> None:
        """`stamp`: the figures' time in ms (a spooled record's; default now): MLflow stores a (key, step, time, value) once."""
        stamp = int(time.time() * 1000) if stamp is None else stamp
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
        from sweeps.confirm import selection_fidelity

        base, champion, fidelity = selection["base"], selection["champion"], selection_fidelity(selection)
        confirmed = {}
        if champion and "confirmed" in champion:  # the champion's figures on the confirmation bank, with their bounds
            figures = champion["confirmed"]["confirmation"]
            confirmed = {f"champion_confirmed_{name}{end}": figures[name][key] for name in (fidelity.paired, "heldout_quality_diff")
                         for end, key in (("", "value"), ("_low", "low"), ("_high", "high"))}
        self.log_metrics(run_id, {"hypervolume": selection["hypervolume"], "evaluated_checkpoints": selection["evaluated"],
                                  "confirmed_candidates": len(selection.get("confirmation", {}).get("candidates", [])),
                                  "champion_found": float(champion is not None), **confirmed,
                                  **{f"base_{k}": v for k, v in base.items()},
                                  **({f"champion_{k}": champion[k] for k in base} if champion else {})})
        for location in (*layout.pareto_files(directory), layout.selection_file(directory)):
            with storage.local_copy(location) as path:
                self.client.log_artifact(run_id, str(path))
        columns = ("trial", "step", *base, "checkpoint")
        self.client.log_table(run_id, {k: [r.get(k) for r in selection["front"]] for k in columns}, artifact_file="pareto_front.json")
        if champion:
            self.client.set_tag(run_id, "acpo.champion", f"{champion['trial']}/step {champion['step']}")

    def experiment_url(self) -> str:
        """The experiment's page in the MLflow UI, on its runs: MLflow 3.17's UI picks its GenAI or
        model-training view from the URL (or the browser's last choice), not from the experiment's tag."""
        return f"{redact(self.uri).rstrip('/')}/#/experiments/{self.experiment_id}?workflowType=machine_learning"

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
        as its artifact) under the parent run's `champion/<export>/`, a path of this selection's own,
        registered as a new version of `model_name` with alias `champion`, its figures and parameters as
        the version's tags. A registered version is immutable: a later selection of the same sweep logs
        under a path of its own, so no earlier version's files are ever overwritten or merged into; the
        model is uploaded whole before the version is created and the alias moves."""
        import tempfile

        from sweeps.confirm import selection_fidelity

        champion, axis = selection["champion"], selection_fidelity(selection).axis
        path = f"{layout.CHAMPION_ARTIFACTS}/{selection['export']['id']}"
        if self.client.list_artifacts(run_id, path):
            raise MlflowException(f"{path} of run {run_id} already holds a model; a registered version's files are never replaced")
        with tempfile.TemporaryDirectory(prefix="champion-model.") as tmp:
            save_champion_model(exported, Path(tmp) / "model", settings)
            self.client.log_artifacts(run_id, str(Path(tmp) / "model"), artifact_path=path)
        source = f"{self.client.get_run(run_id).info.artifact_uri}/{path}"
        try:
            self.client.create_registered_model(model_name)
        except MlflowException:
            pass  # registered by an earlier sweep: the champion becomes a new version
        tags = {axis: f"{champion[axis]:.4f}", "heldout_quality": f"{champion['heldout_quality']:.4f}", "trial": champion["trial"],
                "step": str(champion.get("step", "")), "rule": selection["rule"][:200], "checkpoint": champion["checkpoint"],
                "sweep": self.sweep, **confirmed_tags(selection),
                **{k: str(v)[:_MAX_VALUE] for k, v in champion.items() if k.startswith("param:")}}
        version = self.client.create_model_version(model_name, source=source, run_id=run_id, tags=tags,
                                                   description=version_note(self.sweep, selection))
        self.client.set_registered_model_alias(model_name, "champion", version.version)
        return {"model": model_name, "version": version.version, "alias": "champion", "source": source}


def retire_champion(client, model_name: str, sweep: str) -> str | None:
    """When a selection of `sweep` finds no champion, the alias `champion` must not keep pointing at
    what an earlier selection of the same sweep registered: removed (the version stays). A champion of
    another sweep under the same model name keeps its alias. Returns the version unaliased, or None."""
    try:
        version = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None  # no such model or alias
    if version.tags.get("sweep") != sweep:
        return None
    client.delete_registered_model_alias(model_name, "champion")
    return version.version


def confirmed_tags(selection: dict) -> dict[str, str]:
    """The champion's screening and confirmation figures side by side, as a registered version's tags."""
    from sweeps.confirm import candidate_figures, selection_fidelity

    champion, paired = selection["champion"], selection_fidelity(selection).paired
    mine = [c for c in candidate_figures(selection) if c["checkpoint"] == champion["checkpoint"]]
    if not mine:
        return {"confirmed": "no (screening figures only)"}
    bank = selection["confirmation"]["bank"]
    return {"confirmed": f"yes: seed {bank['seed']}, {bank['samples']} samples", f"confirmed_{paired}": mine[0]["fidelity"],
            "confirmed_heldout_gain": mine[0]["gain"], "screening_heldout_gain": f"{mine[0]['screening_gain']:.4g}",
            f"screening_{paired}": f"{mine[0]['screening_fidelity']:.4g}", "holm_p": f"{mine[0]['p_holm']:.3g}"}


def confirmation_markdown(selection: dict) -> list[str]:
    """The confirmation as a Markdown table (the parent run's note)."""
    from sweeps.confirm import candidate_figures, interval_text, selection_fidelity

    confirmation = selection.get("confirmation")
    if not confirmation:
        return ["", f"Not confirmed on fresh samples: {selection['rule']}."]
    bank, base, fidelity = confirmation["bank"], confirmation["base"], selection_fidelity(selection)
    paired = fidelity.paired_label
    lines = ["", f"### Confirmation (fresh seed bank: seed {bank['seed']}, {bank['samples']} samples)", "",
             f"Base model on it: {fidelity.label} {interval_text(base[fidelity.axis])}, held-out quality {interval_text(base['heldout_quality'])} "
             "(95% intervals, paired bootstrap over samples). Each candidate is paired with the base on the same noise.", "",
             f"| candidate | {paired}, screening | {paired}, confirmed | held-out gain, screening | held-out gain, confirmed | shrinkage | Holm p | |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in candidate_figures(selection):
        lines.append(f"| {c['trial']} step {c['step']} | {c['screening_fidelity']:.3f} | {c['fidelity']} | {c['screening_gain']:+.4f} | "
                     f"{c['gain']} | {c['shrinkage']:+.4f} | {c['p_holm']:.3f} | {'passed' if c['passed'] else ''} |")
    return lines


def version_note(sweep: str, selection: dict) -> str:
    from sweeps.confirm import selection_fidelity

    base, champion, fidelity = selection["base"], selection["champion"], selection_fidelity(selection)
    label, axis = fidelity.label, fidelity.axis
    return (f"Champion of sweep `{sweep}`: trial {champion['trial']}, step {champion.get('step', '?')}; "
            f"{label} {champion[axis]:.3f} (base {base[axis]:.3f}), held-out quality {champion['heldout_quality']:.4f} "
            f"(base {base['heldout_quality']:.4f}). Rule: {selection['rule']}. Parameters: {params_text(champion)}.\n\n"
            "Load: `mlflow.pyfunc.load_model(\"models:/NAME@champion\").predict(pandas.DataFrame({\"num_images\": [8], "
            "\"steps\": [25], \"seed\": [0]}))` (uint8 images), or the diffusers pipeline in the model's `artifacts/champion/`.")


def sweep_note(sweep: str, experiment_id: str, selection: dict, trial_runs: dict[str, str]) -> str:
    """The sweep in Markdown: base, champion and rule, the front as a table linking each trial's run."""
    from sweeps.confirm import selection_fidelity

    base, champion, fidelity = selection["base"], selection["champion"], selection_fidelity(selection)
    label, axis = fidelity.label, fidelity.axis

    def trial_link(trial: str) -> str:
        run = trial_runs.get(trial)
        return f"[{trial}](#/experiments/{experiment_id}/runs/{run})" if run else trial

    headline = (f"**Champion: trial {trial_link(champion['trial'])}, step {champion.get('step', '?')}: {label} {champion[axis]:.3f} "
                f"(base {base[axis]:.3f}), held-out quality {champion['heldout_quality']:.4f} (base {base['heldout_quality']:.4f}).**"
                if champion else f"**No champion: {selection['rule']}.**")
    lines = [headline, "", f"## Sweep `{sweep}`", "",
             f"{selection['evaluated']} evaluated checkpoints; {len(selection['front'])} on the Pareto front; "
             f"hypervolume against the base model {selection['hypervolume']:.4g}.", "",
             f"| | {label} (lower is better) | held-out quality (higher is better) |", "|---|---:|---:|",
             f"| base model | {base[axis]:.3f} | {base['heldout_quality']:.4f} |"]
    if champion:
        lines.append(f"| **champion**: trial {trial_link(champion['trial'])}, step {champion.get('step', '?')} | "
                     f"**{champion[axis]:.3f}** | **{champion['heldout_quality']:.4f}** |")
    lines += ["", f"Rule: {selection['rule']}."]
    if champion:
        lines.append(f"Champion's parameters: {params_text(champion)}.")
    lines += confirmation_markdown(selection)
    registered = selection.get("registered")
    if registered:
        lines.append(f"Registered as [{registered['model']} version {registered['version']}]"
                     f"(#/models/{registered['model']}/versions/{registered['version']}), alias `@champion`.")
    lines += ["", "### Pareto front", "", f"| trial | step | {label} | held-out quality | parameters |", "|---|---:|---:|---:|---|"]
    for row in selection["front"]:
        mark = " (champion)" if champion and row["checkpoint"] == champion["checkpoint"] else ""
        lines.append(f"| {trial_link(row['trial'])}{mark} | {row.get('step', '?')} | {row[axis]:.3f} | {row['heldout_quality']:.4f} | {params_text(row)} |")
    if selection.get("unreadable"):
        lines += ["", f"{len(selection['unreadable'])} checkpoint(s) could not be read and were left out (selection.json)."]
    lines += ["", "Artifacts: `pareto.html` (interactive: each trial's path across its checkpoints), `pareto.png`, "
              "`pareto_front.json`, `selection.json`" + (", `champion/<export>/` (the registered MLflow model of each selection)." if registered else ".")]
    return "\n".join(lines) + "\n"


def read_sweep_id(directory: str | Path) -> str:
    """The sweep's id, from its folder ("" when it has none yet): its MLflow runs carry it as a tag."""
    id_file = layout.sweep_id_file(directory)
    return storage.read_text(id_file).strip() if storage.is_file(id_file) else ""
