"""The sweep: Ray Tune + Optuna over the objective's weights and step counts, two objectives at once
(FID down, held-out quality up), every trial a Ray Train fine-tuning, everything tracked in MLflow,
and the champion selected from the Pareto front and registered.

    ray job submit --working-dir . -- python sweeps/acpo_sweep.py             # digits preset
    python sweeps/acpo_sweep.py --preset digits --set sweep.num_samples=4    # joins a running cluster or starts one
    python sweeps/acpo_sweep.py --resume                                      # after an interruption
    python sweeps/acpo_sweep.py --dry-run                                     # resolved config and space

`run_sweep` reads top to bottom: resolve the storage and tracking, evaluate the base model once, build
(or restore) the Tuner, fit it, select the champion. MLflow's tracking URI comes from
`sweep.tracking_uri` or $MLFLOW_TRACKING_URI (an `mlflow server`). Everything else lives under
`<sweep.storage_dir>/<sweep.name>/`, a folder or object storage (`s3://bucket/prefix`: every read and
write goes through eval/storage.py, Ray's through the same pyarrow layer): the Tune experiment
(`tune/`), each trial's checkpoints (`trials/<trial>/step_*`) and records (`work/<trial>/`: its
parameters and tracking spool), the base model's metrics and grid, the selection, the front's plots
and the exported champion; in a local folder also the Optuna study (`optuna.db`, see optuna_storage).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python sweeps/acpo_sweep.py`: import from the project root, not from sweeps/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from trainers.common import storage  # noqa: E402
from sweeps.presets import SweepConfig, load, set_values  # noqa: E402
from sweeps.space import check_space, pin_searched  # noqa: E402
from trainers.checkpoint import CHECKPOINT_GLOB  # noqa: E402
from trainers.config import Config, ConfigError, last_line  # noqa: E402


def run_sweep(config: Config, sweep: SweepConfig, resume: bool = False, inputs_checked: bool = False) -> dict:
    """`inputs_checked`: the caller opened the config's files already (a study, once per method)."""
    uri, directory = tracking_uri(sweep), sweep_dir(sweep)
    preflight(config, sweep, directory, uri, resume, inputs_checked)  # one line and nothing written when bad
    import ray

    from sweeps.tracking import SpoolReplayer
    from trainers.ray_train import TrainingError, check_resources, root_message

    if not ray.is_initialized():
        ray.init()  # joins the cluster of `ray start` / `ray job submit`, or starts a local one
    check_resources(config)
    sweep_id = claim_folder(sweep, directory, uri)
    print(f"[sweep] files: {directory}; MLflow: {uri}", flush=True)
    tracking, parent = start_tracking(config, sweep, uri, sweep_id, directory)
    try:
        evaluate_base(config, directory, tracking, parent)
        replayer = SpoolReplayer(tracking, directory, parent).start()
        tuner = restore_tuner(config, sweep, directory) if resume else build_tuner(config, sweep, directory)
        results = fit_tuner(tuner, directory)
        finish_tracking(replayer, sweep.tracking_wait_s)
        close_interrupted(sweep, directory, tracking)
        errors = [root_message(r.error) for r in results if r.error]
        if errors:
            print(f"[sweep] {len(errors)} trial(s) failed; first: {errors[0]}", file=sys.stderr, flush=True)
            if len(errors) == len(results):
                raise TrainingError(f"every trial failed ({len(errors)}); first: {errors[0]}")
        selection = select_and_register(sweep, directory, uri)
    except BaseException as error:
        end_failed(tracking, parent, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    tracking.client.set_terminated(parent)
    return selection


LOW_SPACE = 256 * 2**20  # below this much free space in the storage folder, a failure is blamed on it


def fit_tuner(tuner, directory: str):
    """`tuner.fit()`. With the storage disk full, Tune fails in its own ways (an empty pickled error,
    a half-written state file): said as what it is, with what to do."""
    import shutil

    try:
        return tuner.fit()
    except Exception as error:
        if storage.is_remote(directory):
            raise
        free = shutil.disk_usage(directory).free
        if free >= LOW_SPACE:
            raise
        reason = last_line(error)[:160]
        raise OSError(errno.ENOSPC, f"No space left on device: {free / 2**20:.0f} MB free in {directory} "
                                    f"(Ray Tune failed with {type(error).__name__}: {reason})") from error


def preflight(config: Config, sweep: SweepConfig, directory: str, uri: str, resume: bool, inputs_checked: bool = False) -> None:
    """Everything that can be checked before Ray starts: the folder rule, the storage folder, the
    services, every file the config names. `--dry-run` runs it too."""
    from sweeps.preflight import check_inputs, check_object_storage, check_services, check_storage_folder

    if storage.is_remote(directory):
        check_object_storage(directory, "sweep.storage_dir")
    else:
        check_storage_folder(Path(directory), "sweep.storage_dir")
    check_storage(sweep, directory, resume)
    check_services(uri, "sweep.tracking_uri" if sweep.tracking_uri else "$MLFLOW_TRACKING_URI")
    for line in [] if inputs_checked else check_inputs(config):
        print(f"[sweep] not checked before the run: {line}", file=sys.stderr, flush=True)


def end_failed(tracking, parent: str, status: str) -> None:
    """A sweep that ends in an error: its parent and every run still running end FAILED (or KILLED).
    Best effort: the server may be what failed."""
    try:
        tracking.end_runs(status, roles=("trial", "base"))
        tracking.client.set_terminated(parent, status=status)
    except Exception as error:  # noqa: BLE001 - the sweep's own error is the one to report
        print(f"[sweep] could not mark the MLflow runs {status}: {last_line(error)[:200]}", file=sys.stderr)


def finish_tracking(replayer, wait_s: float) -> None:
    """Wait a bounded time for the trials' spooled records to reach MLflow; say what is left."""
    pending = replayer.finish(wait_s)
    if pending:
        print(f"[sweep] MLflow: {sum(pending.values())} record(s) of {len(pending)} trial(s) still spooled after {wait_s:g} s "
              "(they stay in work/<trial>/tracking/; --resume or `acpo select` replays them)", file=sys.stderr, flush=True)


def check_storage(sweep: SweepConfig, directory: str, resume: bool) -> None:
    """A new sweep needs a new name; --resume needs a sweep to resume. Writes nothing."""
    from ray import tune

    if not sweep.space:
        raise ConfigError("sweep.space: expected a non-empty mapping of config key -> distribution")
    tune_dir = storage.join(directory, "tune")
    if resume and not tune.Tuner.can_restore(tune_dir):
        raise ConfigError(f"--resume: no sweep to resume at {tune_dir}")
    if not resume and storage.exists(tune_dir):
        raise ConfigError(f"sweep.name: {directory} already holds a sweep; pass --resume, or choose another name")


SWEEP_ID = "sweep_id"  # the file in the sweep's folder holding its id (its MLflow runs carry it as a tag)


def claim_folder(sweep: SweepConfig, directory: str, uri: str) -> str:
    """The sweep's id: read from its folder, or made for a new one. A name that another sweep folder
    already uses in the MLflow experiment is refused (its runs would merge with this one's)."""
    import uuid

    from sweeps.tracking import SweepTracking

    sweep_id = read_sweep_id(directory) or uuid.uuid4().hex
    other = SweepTracking(uri, sweep.name, sweep.experiment, sweep_id).other_sweep()
    if other is not None:
        raise ConfigError(f"sweep.name: '{sweep.name}' is already used in MLflow experiment '{sweep.experiment or sweep.name}' "
                          f"by the sweep at {other}; choose another name (or --resume that sweep)")
    storage.makedirs(directory)
    if not read_sweep_id(directory):
        storage.write_text(storage.join(directory, SWEEP_ID), sweep_id + "\n")
    return sweep_id


def read_sweep_id(directory: str) -> str:
    id_file = storage.join(directory, SWEEP_ID)
    return storage.read_text(id_file).strip() if storage.is_file(id_file) else ""


def sweep_dir(sweep: SweepConfig) -> str:
    """Where the sweep's files live. A relative `sweep.storage_dir` resolves against the working
    directory, except under `ray job submit --working-dir`: there the working directory is Ray's
    temporary copy of the project, deleted with the job, so it resolves against ~/acpo instead.
    On a cluster, pass object storage (`s3://bucket/prefix`) or an absolute path on shared storage."""
    if storage.is_remote(sweep.storage_dir):
        return storage.join(sweep.storage_dir, sweep.name)
    folder = Path(sweep.storage_dir.removeprefix("file://")).expanduser()
    if not folder.is_absolute() and "working_dir" in json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}):
        folder = Path.home() / "acpo" / folder
    return str(folder.resolve() / sweep.name)


LOCAL_MLFLOW = "http://127.0.0.1:5000"  # where `make demo` starts the MLflow server


def tracking_uri(sweep: SweepConfig) -> str:
    """`sweep.tracking_uri`, else $MLFLOW_TRACKING_URI, else a server answering on this machine's
    port 5000 (the one `make demo` starts), else a one-line error."""
    uri = sweep.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    import urllib.request

    try:
        with urllib.request.urlopen(f"{LOCAL_MLFLOW}/health", timeout=2) as response:
            if response.status == 200:
                return LOCAL_MLFLOW
    except OSError:
        pass
    raise ConfigError("sweep.tracking_uri: not set, $MLFLOW_TRACKING_URI is empty and no MLflow server answers at "
                      f"{LOCAL_MLFLOW}; start one (make demo, or mlflow server --backend-store-uri sqlite:///runs/mlflow.db "
                      "--host 127.0.0.1) or point at yours")


def start_tracking(config: Config, sweep: SweepConfig, uri: str, sweep_id: str, directory: str):
    """The sweep's MLflow experiment and parent run (found again on --resume), with its settings."""
    from sweeps.tracking import SweepTracking

    tracking = SweepTracking(uri, sweep.name, sweep.experiment, sweep_id)
    parent = tracking.run("sweep", sweep.name, sweep.parent_run or None)
    tracking.client.set_tag(parent, "acpo.folder", str(directory))
    tracking.log_params(parent, {"preset": config.preset, "num_samples": sweep.num_samples, "algorithm": sweep.algorithm,
                                 "fid_tolerance": sweep.fid_tolerance, **{f"space.{k}": v for k, v in sweep.space.items()}})
    return tracking, parent


def evaluate_base(config: Config, directory: str | Path, tracking, parent: str) -> dict:
    """The base model, evaluated once (the reference point of the front), in its own child run."""
    base_file, grid = storage.join(directory, "base_metrics.json"), storage.join(directory, "base_samples.png")
    if not storage.is_file(base_file):
        import io

        from eval.evaluate import Evaluator
        from trainers.models import load_base_model

        from torchvision.utils import save_image

        print("[sweep] evaluating the base model", flush=True)
        evaluation = Evaluator.from_config(config).evaluate(load_base_model(config.model.base))
        png = io.BytesIO()
        save_image(evaluation.samples, png, format="png", nrow=8, padding=1)  # next to the checkpoints' grids
        storage.write_bytes(grid, png.getvalue())
        storage.write_text(base_file, json.dumps(evaluation.metrics, indent=2) + "\n")
    base = json.loads(storage.read_text(base_file))
    base_run = tracking.run("base", "base model", parent)
    tracking.log_metrics(base_run, base)
    if storage.is_file(grid):
        tracking.log_grid(base_run, grid, step=0)
    tracking.client.set_terminated(base_run)
    return base


def build_tuner(config: Config, sweep: SweepConfig, directory: str):
    """A new Tuner: Optuna's multi-objective search over the space, its study stored, as many
    concurrent trials as the cluster fits, FIFO (an early stopper on one metric would bias the front)."""
    import ray
    from optuna.samplers import NSGAIISampler, TPESampler
    from optuna.storages import RDBStorage
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from eval.evaluate import FRONT_AXES  # imported here: the trial actors import this module, and need no pyiqa
    from sweeps.space import tune_space

    settings = config.train
    if settings.use_gpu:
        fit = int(ray.cluster_resources().get("GPU", 0) // settings.workers)
    else:
        fit = int(ray.cluster_resources().get("CPU", 1) // (settings.workers * settings.cpus_per_worker))
    concurrency = sweep.max_concurrent or max(1, fit)
    sampler = NSGAIISampler(seed=sweep.seed) if sweep.algorithm == "nsga2" else TPESampler(seed=sweep.seed, multivariate=True)
    url = optuna_storage(sweep, directory)
    search = OptunaSearch(metric=list(FRONT_AXES), mode=list(FRONT_AXES.values()), sampler=sampler, study_name=sweep.name,
                          storage=RDBStorage(url) if url else None, seed=sweep.seed)
    print(f"[sweep] {sweep.num_samples} trials, {concurrency} at a time, {sweep.algorithm}", flush=True)
    return tune.Tuner(
        trainable(config, directory),
        param_space=tune_space(sweep),
        # reuse_actors: the next trial runs in the finished trial's actor, not a new process (~2.5 s a trial here)
        tune_config=tune.TuneConfig(search_alg=search, scheduler=FIFOScheduler(), num_samples=sweep.num_samples,
                                    max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(name="tune", storage_path=directory),  # a folder or a URI: Ray's pyarrow layer
    )


def optuna_storage(sweep: SweepConfig, directory: str) -> str | None:
    """The Optuna study's storage URL: `sweep.optuna_storage` (any of Optuna's RDB URLs: on a cluster, the
    tracking server's PostgreSQL), else SQLite in a local sweep folder. SQLite cannot live in object
    storage: there the default is None, a study in memory, which Tune saves with its searcher's state
    in the store and restores on --resume."""
    if sweep.optuna_storage:
        return sweep.optuna_storage
    return None if storage.is_remote(directory) else f"sqlite:///{storage.join(directory, 'optuna.db')}"


def restore_tuner(config: Config, sweep: SweepConfig, directory: str):
    """The interrupted Tuner with its searcher: unfinished trials resume from their last checkpoint."""
    from ray import tune

    return tune.Tuner.restore(storage.join(directory, "tune"), trainable=trainable(config, directory),
                              resume_unfinished=True, resume_errored=True)


def trainable(config: Config, directory: str):
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(run_trial, base_config=config.to_dict(), directory=directory),
        # The trial function only drives its TorchTrainer; the workers hold the CPUs and GPUs. A bundle
        # cannot be empty, and a CPU fraction here would leave no whole CPU for the last worker.
        {"cpu": 0, "memory": 1},
    )


def run_trial(params: dict, base_config: dict, directory: str) -> None:
    """One Tune trial: the trainer's TorchTrainer, fitted (Train V2: the trial function is its driver).
    What MLflow should show goes to the trial's spool; the driver replays it (sweeps/tracking.py)."""
    import shutil
    import tempfile

    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from sweeps.tracking import SPOOL, SpoolCallback, spool, spool_unreported
    from trainers.ray_train import build_trainer, root_message

    trial = tune.get_context().get_trial_id()
    records = storage.join(directory, "work", trial)  # the trial's parameters and spool, where the driver reads them
    # Where the workers write a checkpoint before Ray Train uploads it to `trials/`: beside the records in
    # a local sweep folder; on object storage, a scratch folder on this node, removed when the trial ends.
    scratch = Path(tempfile.gettempdir()) / "acpo-scratch" / f"{storage.name(directory)}-{trial}"
    output = scratch if storage.is_remote(directory) else Path(records)
    config = Config.from_dict(set_values(base_config, {**params, "train.output_dir": str(output)}))
    storage.write_text(storage.join(records, "params.json"), json.dumps(params, indent=2) + "\n")
    log = storage.join(records, SPOOL)
    spool(log, {"op": "start", "params": params})
    checkpoints = storage.join(directory, "trials", trial)
    # Same name and storage after a driver restart: Ray Train picks the run up from its last checkpoint.
    trainer = build_trainer(config, name=trial, storage_path=storage.join(directory, "trials"),
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
    finally:
        if output == scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    spool_unreported(log, checkpoints)
    # A trial whose training had finished when the driver was killed, but which Tune had not yet
    # recorded as done, is run again on --resume: its Train run is complete, so fit() reports
    # nothing and Tune would end the trial with no figures. Report the last evaluated checkpoint's
    # (in an ordinary trial this repeats the last report: same step, same figures).
    evaluated = storage.glob(checkpoints, f"{CHECKPOINT_GLOB}/metrics.json")
    if evaluated:
        tune.report(json.loads(storage.read_text(evaluated[-1])))
    spool(log, {"op": "end", "status": "FINISHED"})


def set_aside_unreadable_record(checkpoints: str) -> str | None:
    """Ray Train's record of a trial's checkpoints (`checkpoint_manager_snapshot.json`) is rewritten in
    place; a full disk can leave it empty, and Ray then cannot start the trial again, ever. Such a
    record is renamed aside: the trial then restarts from its first step (its checkpoint folders are
    rewritten as it goes). Returns what happened, naming the file and the free space, or None."""
    import shutil

    record = storage.join(checkpoints, "checkpoint_manager_snapshot.json")
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


def close_interrupted(sweep: SweepConfig, directory: str, tracking) -> int:
    """After the Tuner is done, nothing of this sweep is running. A trial that Optuna or MLflow still
    shows as running was interrupted with the driver before Tune's experiment state recorded it
    (Tune then ran a fresh trial in its place): record it as failed / killed, not as a duplicate."""
    import optuna

    interrupted = 0
    url = optuna_storage(sweep, directory)  # a study in memory is the searcher's own (restored with it by Tune)
    study = optuna.load_study(study_name=sweep.name, storage=url) if url else None
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if study else []:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        interrupted += 1
    tracking.end_runs("KILLED")
    if interrupted:
        print(f"[sweep] {interrupted} trial(s) interrupted with the previous driver, recorded as failed", flush=True)
    return interrupted


def select_and_register(sweep: SweepConfig, directory: str | Path, uri: str) -> dict:
    """Select; log the selection to the sweep's parent run; export the champion in diffusers layout
    (to `champion/` in the sweep's storage) and register it with alias `champion`. Records the trials
    left spooled are replayed first."""
    import tempfile

    from sweeps.tracking import SpoolReplayer, SweepTracking, TrackingError

    directory = str(directory)
    selection = select(sweep, directory)
    champion = selection["champion"]
    stored = storage.join(directory, "champion")
    with tempfile.TemporaryDirectory(prefix="acpo-champion.") as stage:
        exported = None
        if champion and sweep.register_champion:
            exported = export_champion(champion["checkpoint"], Path(stage) / "champion")
            store_folder(exported, stored)
        try:
            tracking = SweepTracking(uri, sweep.name, sweep.experiment, read_sweep_id(directory))
            parent = tracking.run("sweep", sweep.name)
            finish_tracking(SpoolReplayer(tracking, directory, parent), sweep.tracking_wait_s)
            tracking.log_selection(parent, selection, directory)
            if exported is not None:
                selection["registered"] = tracking.register_champion(parent, exported, sweep.model_name or sweep.name, selection,
                                                                     sampling_settings(champion["checkpoint"], exported))
            tracking.describe_sweep(parent, selection)
            selection["mlflow"] = {"experiment_id": tracking.experiment_id, "parent_run_id": parent, "url": tracking.experiment_url()}
            write_json(storage.join(directory, "selection.json"), selection)
        except Exception as error:  # noqa: BLE001 - the server (or the network) failed; the selection is safe in storage
            reason = last_line(error)[:200]
            raise TrackingError(f"MLflow at {uri} failed during the selection ({reason}); the selection is in "
                                f"{storage.join(directory, 'selection.json')}{' and the champion in ' + stored if exported else ''}: "
                                f"run `acpo select --sweep {sweep.name}` when the server answers") from None
    return selection


def store_folder(local: Path, location: str) -> None:
    """A finished local folder into the sweep's storage: in a local folder it replaces the previous one
    only once whole (a rename); in object storage its files are uploaded over the previous ones."""
    import shutil

    if storage.is_remote(location):
        storage.delete(location)
        storage.upload(local, location)
        return
    tmp = Path(location).with_name(f".{Path(location).name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(local, tmp)
    if Path(location).exists():
        shutil.rmtree(location)
    os.replace(tmp, location)


def sampling_settings(checkpoint: str, exported: Path) -> dict:
    """How the champion was sampled when it was evaluated (its run's config): the registered model
    samples the same way (`trainers/mlflow_model.py`); a text model with the evaluation's prompts."""
    from trainers.image_sets import captions

    config = Config.from_dict(json.loads(storage.read_text(storage.join(checkpoint, "config.json"))))
    text = (exported / "text_encoder").is_dir()
    prompts = (list(config.eval.prompts) or captions(config.data.caption, list(range(10)), 10)) if text else []
    return {"sampler": config.eval.sampler, "guidance_scale": config.eval.guidance_scale, "prompts": prompts,
            "steps": config.eval.sampling_steps[0]}


def select(sweep: SweepConfig, directory: str | Path) -> dict:
    """Pareto front, hypervolume and champion over every evaluated checkpoint (no MLflow), written
    to `selection.json` and drawn in `pareto.png` and `pareto.html`. A checkpoint on the front must load (files
    readable, tensors of the model's shapes) before it counts; those that do not are listed under
    `unreadable` and left out, and the front is taken again without them."""
    import tempfile

    from eval.evaluate import FRONT_AXES

    from sweeps.front_plots import front_figure, plot_front
    from sweeps.selection import hypervolume, pareto_front, select_champion

    directory = str(directory)
    base_file = storage.join(directory, "base_metrics.json")
    if not storage.is_file(base_file):
        raise FileNotFoundError(f"no sweep at {directory} (base_metrics.json missing)")
    base = json.loads(storage.read_text(base_file))
    rows, unreadable = evaluated_checkpoints(directory)
    print(f"[sweep] selecting the champion among {len(rows)} evaluated checkpoints", flush=True)
    verified: set[str] = set()
    while True:
        front = pareto_front(rows)
        broken = []
        for row in (r for r in front if r["checkpoint"] not in verified):
            error = checkpoint_error(row["checkpoint"])
            if error is None:
                verified.add(row["checkpoint"])
            else:
                broken.append(row)
                unreadable.append({"checkpoint": row["checkpoint"], "error": error})
        if not broken:
            break
        rows = [r for r in rows if r not in broken]
    for item in unreadable:
        print(f"[sweep] skipped an unreadable checkpoint: {item['checkpoint']}: {item['error']}", file=sys.stderr, flush=True)
    champion, rule = select_champion(rows, base, sweep.fid_tolerance)
    selection = {"base": {name: base[name] for name in FRONT_AXES}, "rule": rule, "fid_tolerance": sweep.fid_tolerance,
                 "hypervolume": hypervolume(front, base), "evaluated": len(rows), "front": front, "champion": champion,
                 "unreadable": unreadable}
    write_json(storage.join(directory, "selection.json"), selection)
    with tempfile.TemporaryDirectory(prefix="acpo-front.") as stage:
        plot_front(rows, front, base, champion, Path(stage) / "pareto.png")
        # self-contained (plotly.js inside): the MLflow UI shows it with no network, as any browser does the file
        front_figure(rows, front, base, champion).write_html(Path(stage) / "pareto.html", include_plotlyjs=True)
        for name in ("pareto.png", "pareto.html"):
            storage.write_bytes(storage.join(directory, name), (Path(stage) / name).read_bytes())
    return selection


def checkpoint_error(location: str) -> str | None:
    """Why the checkpoint at `location` cannot be loaded, or None. Read from a download when it is in
    object storage; the message names the checkpoint's location, not the temporary download."""
    from trainers.checkpoint import verify_checkpoint

    try:
        with storage.local_copy(location) as local:
            try:
                verify_checkpoint(local)
            except Exception as error:  # noqa: BLE001 - whatever makes it unloadable, it cannot be the champion
                return last_line(error).replace(str(local), location)
    except Exception as error:  # noqa: BLE001 - the download itself failed
        return last_line(error)
    return None


def write_json(location: str, data) -> None:
    """Whole or not at all: a driver killed mid-write leaves the previous file."""
    storage.write_text(location, json.dumps(data, indent=2) + "\n")


def evaluated_checkpoints(directory: str) -> tuple[list[dict], list[dict]]:
    """Every evaluated checkpoint of every trial: the table the selection runs on; and those whose
    figures cannot be read."""
    from eval.evaluate import FRONT_AXES

    rows, unreadable = [], []
    for metrics_file in storage.glob(directory, f"trials/*/{CHECKPOINT_GLOB}/metrics.json"):
        checkpoint = storage.parent(metrics_file)
        trial = storage.name(storage.parent(checkpoint))
        params_file = storage.join(directory, "work", trial, "params.json")
        try:
            params = json.loads(storage.read_text(params_file)) if storage.is_file(params_file) else {}
            metrics = json.loads(storage.read_text(metrics_file))
            if not all(isinstance(metrics.get(name), (int, float)) for name in FRONT_AXES):
                raise ValueError(f"no {' and '.join(FRONT_AXES)} in metrics.json")
        except ValueError as error:  # JSONDecodeError included
            unreadable.append({"checkpoint": checkpoint, "error": f"metrics.json: {error}"})
            continue
        rows.append({"trial": trial, "checkpoint": checkpoint, **metrics, **{f"param:{k}": v for k, v in params.items()}})
    return rows, unreadable


def export_champion(checkpoint: str, out: Path) -> Path:
    """The champion as a plain diffusers pipeline folder (LoRA merged into the weights), at the local `out`."""
    from trainers.checkpoint import load_checkpoint_model
    from trainers.lora import merge_lora
    from trainers.models import save_base_model

    with storage.local_copy(checkpoint) as local:
        model = load_checkpoint_model(local)
        merge_lora(model.unet)
        save_base_model(model, out)
        (out / "metrics.json").write_bytes((local / "metrics.json").read_bytes())
    return out


def print_summary(selection: dict, uri: str, sweep: SweepConfig) -> None:
    from sweeps.selection import params_text

    base, champion = selection["base"], selection.get("champion")
    link = selection.get("mlflow", {}).get("url", uri)
    print(f"\nMLflow: {link}  (experiment '{sweep.experiment or sweep.name}', its runs)")
    print(f"base model:  FID {base['fid']:.3f}  held-out quality {base['heldout_quality']:.4f}")
    print(f"front: {len(selection['front'])} of {selection['evaluated']} evaluated checkpoints; hypervolume {selection['hypervolume']:.4g}")
    if champion:
        params = params_text(champion)
        print(f"champion:    FID {champion['fid']:.3f}  held-out quality {champion['heldout_quality']:.4f}  ({selection['rule']})")
        print(f"             trial {champion['trial']} step {champion['step']}: {params}")
        registered = selection.get("registered")
        if registered:
            print(f"             registered as '{registered['model']}' version {registered['version']}, alias @champion")


def main(argv: list[str] | None = None) -> int:
    from trainers.common.errors import report_error

    parser = argparse.ArgumentParser(prog="acpo_sweep.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config or sweep value, e.g. --set sweep.num_samples=4 (repeatable)")
    parser.add_argument("--num-samples", type=int, default=0, help="trials (default: sweep.num_samples)")
    parser.add_argument("--name", default="", help="experiment name (default: sweep.name)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and search space, then exit")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.num_samples:
        overrides.append(f"sweep.num_samples={args.num_samples}")
    if args.name:
        overrides.append(f"sweep.name={args.name}")
    try:
        config, sweep = load(args.preset, overrides)
        sweep = pin_searched(sweep, overrides)
        check_space(sweep, config)
        if args.dry_run:
            preflight(config, sweep, sweep_dir(sweep), tracking_uri(sweep), args.resume)
            print(json.dumps({"config": config.to_dict(), "sweep": sweep.model_dump()}, indent=2))
            return 0
        selection = run_sweep(config, sweep, resume=args.resume)
        print_summary(selection, tracking_uri(sweep), sweep)
        return 0
    except Exception as error:  # noqa: BLE001 - report_error re-raises what is not a user error
        return report_error(error)


if __name__ == "__main__":
    sys.exit(main())
