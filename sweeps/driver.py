"""The sweep's driver: Ray Tune + Optuna over the objective's weights and step counts, two objectives at
once (FID down, held-out quality up), every trial a Ray Train fine-tuning (sweeps/trial.py), everything
tracked in MLflow (sweeps/tracking.py), and the champion selected from the Pareto front and registered
(sweeps/champion.py). The command line is sweeps/acpo_sweep.py.

`run_sweep` reads top to bottom: resolve the storage and tracking, check what can be checked before
Ray starts, claim the folder and take its lease (one driver per sweep: sweeps/lease.py), evaluate the
base model once, square the Optuna study with the trials' records on --resume (sweeps/search.py), fit
a Tuner for the trials still to run, select the champion. --resume reads only what the sweep wrote
itself (the study, each trial's parameters, checkpoints, figures and spool), never Ray Tune's pickled
experiment state. MLflow's tracking URI comes from `sweep.tracking_uri` or $MLFLOW_TRACKING_URI (an
`mlflow server`). Everything else lives under `<sweep.storage_dir>/<sweep.name>/`
(trainers/common/layout.py), a folder or object storage (`s3://bucket/prefix`: every read and write
goes through trainers/common/storage.py, Ray's through the same pyarrow layer).
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

from sweeps.presets import SweepConfig
from trainers.common import layout, storage
from trainers.common.credentials import redact
from trainers.common.errors import ConfigError, last_line
from trainers.config import Config


def run_sweep(config: Config, sweep: SweepConfig, resume: bool = False, inputs_checked: bool = False) -> dict:
    """`inputs_checked`: the caller opened the config's files already (a study, once per method)."""
    uri, directory = tracking_uri(sweep), sweep_dir(sweep)
    preflight(config, sweep, directory, uri, resume, inputs_checked)  # one line and nothing written when bad

    from sweeps.champion import select_and_register
    from sweeps.lease import Lease
    from sweeps.replay import SpoolReplayer, finish_tracking
    from trainers.ray_train import TrainingError, check_resources, init_ray, root_message

    init_ray()  # joins the cluster of `ray start` / `ray job submit`, or starts a local one (not a stopped head's record)
    check_resources(config)
    use_the_node_cores()
    sweep_id, new = claim_folder(sweep, directory, uri)
    with Lease(directory) as lease:  # until the sweep ends, however it ends: a second driver refuses
        if new:
            storage.write_text(layout.sweep_id_file(directory), sweep_id + "\n")
        print(f"[sweep] files: {directory}; MLflow: {redact(uri)}", flush=True)
        if config.model.rehearsal:
            from trainers.rehearsal import NOTE

            print(f"[sweep] {NOTE}", flush=True)
        tracking, parent = start_tracking(config, sweep, uri, sweep_id, directory)
        try:
            evaluate_base(config, directory, tracking, parent)
            replayer = SpoolReplayer(tracking, directory, parent).start()
            tuner = build_tuner(config, sweep, directory, resume)
            results = fit_tuner(tuner, directory) if tuner is not None else []
            lease.check()  # taken over during the fit: the study, MLflow and the selection are the other driver's now
            finish_tracking(replayer, sweep.tracking_wait_s)
            close_interrupted(sweep, directory, tracking)
            errors = [root_message(r.error) for r in results if r.error]
            if errors:
                print(f"[sweep] {len(errors)} trial(s) failed; first: {errors[0]} (--resume runs them again from their last checkpoint)",
                      file=sys.stderr, flush=True)
                if len(errors) == len(results):
                    raise TrainingError(f"every trial failed ({len(errors)}); first: {errors[0]}")
            selection = select_and_register(sweep, directory, uri, config)
        except BaseException as error:
            end_failed(tracking, parent, "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
            raise
        tracking.client.set_terminated(parent)
    return selection


def use_the_node_cores() -> None:
    """Ray starts a job's driver with OMP_NUM_THREADS=1 (for its workers' sake), which torch reads: the
    driver's own evaluations, the base model's before the trials and the confirmation's after them,
    then sampled on one core (measured in `make demo`: ~4 min per 2,000 digits samples instead of ~2).
    No trial runs while they do, so they take the cores this process may use."""
    import torch

    torch.set_num_threads(max(torch.get_num_threads(), len(os.sched_getaffinity(0))))


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
    check_name_and_resume(sweep, directory, resume)
    if resume:
        from sweeps.lease import check_free

        check_free(directory)
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


def holds_sweep(directory: str) -> bool:
    """Whether a sweep was started in `directory` (its id is the first thing a sweep writes; Tune's folder, for older sweeps)."""
    return storage.is_file(layout.sweep_id_file(directory)) or storage.exists(layout.tune_dir(directory))


def check_name_and_resume(sweep: SweepConfig, directory: str, resume: bool) -> None:
    """A new sweep needs a new name (no sweep in its folder yet); --resume needs a sweep to resume. Writes nothing."""
    if not sweep.space:
        raise ConfigError("sweep.space: expected a non-empty mapping of config key -> distribution")
    if resume and not holds_sweep(directory):
        raise ConfigError(f"--resume: no sweep to resume at {directory}")
    if not resume and holds_sweep(directory):
        raise ConfigError(f"sweep.name: {directory} already holds a sweep; pass --resume, or choose another name")


def claim_folder(sweep: SweepConfig, directory: str, uri: str) -> tuple[str, bool]:
    """The sweep's id and whether it is new: read from its folder, or made for a new one (written under
    the lease, by run_sweep). A name that another sweep folder already uses in the MLflow experiment is refused (its
    runs would merge with this one's). Writes nothing."""
    import uuid

    from sweeps.tracking import SweepTracking, read_sweep_id

    recorded = read_sweep_id(directory)
    sweep_id = recorded or uuid.uuid4().hex
    other = SweepTracking(uri, sweep.name, sweep.experiment, sweep_id).other_sweep()
    if other is not None:
        raise ConfigError(f"sweep.name: '{sweep.name}' is already used in MLflow experiment '{sweep.experiment or sweep.name}' "
                          f"by the sweep at {other}; choose another name (or --resume that sweep)")
    return sweep_id, not recorded


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
    from trainers.rehearsal import WEIGHTS_TAG

    tracking = SweepTracking(uri, sweep.name, sweep.experiment, sweep_id, tags=WEIGHTS_TAG if config.model.rehearsal else None)
    parent = tracking.run("sweep", sweep.name, sweep.parent_run or None)
    tracking.client.set_tag(parent, "acpo.folder", str(directory))
    tracking.log_params(parent, {"preset": config.preset, "num_samples": sweep.num_samples, "algorithm": sweep.algorithm,
                                 "fidelity": sweep.fidelity,
                                 "fidelity_tolerance": sweep.fid_tolerance if sweep.fidelity == "fid" else sweep.kid_tolerance,
                                 "screening_bank": f"seed {config.eval.seed}, {config.eval.samples} samples",
                                 "confirmation_bank": (f"seed {sweep.confirm.seed}, {sweep.confirm.samples} samples, top {sweep.confirm.top_k}"
                                                       if sweep.confirm.top_k else "none"),
                                 **{f"space.{k}": v for k, v in sweep.space.items()}})
    return tracking, parent


def evaluate_base(config: Config, directory: str | Path, tracking, parent: str) -> dict:
    """The base model, evaluated once (the reference point of the front), in its own child run."""
    base_file, grid = layout.base_metrics_file(directory), layout.base_samples_file(directory)
    base = storage.read_json(base_file, "the base model's figures")  # one cut short by hand or another tool: measured again
    if base is None:
        import io

        from torchvision.utils import save_image

        from eval.evaluate import Evaluator
        from eval.intervals import per_sample_bytes
        from trainers.models import load_base_model

        print("[sweep] evaluating the base model", flush=True)
        evaluation = Evaluator.from_config(config).evaluate(load_base_model(config.model.base, weights_dtype=config.model.weights_dtype))
        png = io.BytesIO()
        save_image(evaluation.samples, png, format="png", nrow=8, padding=1)  # next to the checkpoints' grids
        storage.write_bytes(grid, png.getvalue())
        # the screening intervals' other half (sweeps/confirm.py), before the figures file that marks the base as done
        storage.write_bytes(layout.base_per_sample_file(directory), per_sample_bytes(evaluation.per_sample))
        storage.write_text(base_file, json.dumps(evaluation.metrics, indent=2) + "\n")
        base = json.loads(storage.read_text(base_file))
    base_run = tracking.run("base", "base model", parent)
    tracking.log_metrics(base_run, base)
    if storage.is_file(grid):
        tracking.log_grid(base_run, grid, step=0)
    tracking.client.set_terminated(base_run)
    return base


def build_tuner(config: Config, sweep: SweepConfig, directory: str, resume: bool = False):
    """A Tuner for the trials still to run (None when none is left): Optuna's multi-objective search over
    the space, its study stored (sweeps/search.py), as many concurrent trials as the cluster fits, FIFO
    (an early stopper on one metric would bias the front). On --resume the study is first squared with
    the trials' records: finished trials are told, interrupted and failed ones asked again with their
    parameters and key (each resumes from its last checkpoint)."""
    import ray
    from optuna.samplers import NSGAIISampler, TPESampler
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from eval.axes import front_axes
    from sweeps.search import AskSpace, open_study, rebuild, reconcile
    from sweeps.spool import recorded_trials

    settings = config.train
    if settings.use_gpu:
        fit = int(ray.cluster_resources().get("GPU", 0) // settings.workers)
    else:
        fit = int(ray.cluster_resources().get("CPU", 1) // (settings.workers * settings.cpus_per_worker))
    concurrency = sweep.max_concurrent or max(1, fit)
    axes = front_axes(sweep.fidelity)  # Optuna's two objectives are the front's axes
    study, store = open_study(sweep, directory, ["minimize" if mode == "min" else "maximize" for mode in axes.values()], resume)
    if resume and not study.trials and recorded_trials(directory):  # the study's file was lost or set aside
        rebuilt = rebuild(study, sweep, directory)
        print(f"[sweep] the Optuna study had no trials; rebuilt {rebuilt} from the trials' records (work/<trial>/params.json)",
              flush=True)
    asked, done = len(study.trials), 0
    if resume:
        counts = reconcile(study, directory, axes)
        done = counts["done"]
        print(f"[sweep] resuming from the sweep's records: {done} trial(s) done ({counts['told']} of them told now), "
              f"{counts['again']} to run again from their last checkpoint", flush=True)
    remaining = sweep.num_samples - done
    if remaining <= 0:
        return None
    # A resumed search draws from a seed of its own: the first run's seed would repeat its first random draws.
    seed = sweep.seed + asked
    sampler = NSGAIISampler(seed=seed) if sweep.algorithm == "nsga2" else TPESampler(seed=seed, multivariate=True)
    search = OptunaSearch(space=AskSpace(sweep), metric=list(axes), mode=list(axes.values()), sampler=sampler,
                          study_name=study.study_name, storage=store)
    print(f"[sweep] {remaining} trials, {concurrency} at a time, {sweep.algorithm}", flush=True)
    return tune.Tuner(
        trainable(config, directory),
        # reuse_actors: the next trial runs in the finished trial's actor, not a new process (~2.5 s a trial here)
        tune_config=tune.TuneConfig(search_alg=search, scheduler=FIFOScheduler(), num_samples=remaining,
                                    max_concurrent_trials=concurrency, reuse_actors=True),
        # Tune writes its experiment state there (a folder or a URI: Ray's pyarrow layer); no driver reads it back
        run_config=tune.RunConfig(name=layout.TUNE, storage_path=directory),
    )


def trainable(config: Config, directory: str):
    """The trial function (sweeps/trial.py: all a trial actor imports) with the sweep's config and folder."""
    from ray import tune

    from sweeps.trial import run_trial

    return tune.with_resources(
        tune.with_parameters(run_trial, base_config=config.to_dict(), directory=directory),
        # The trial function only drives its TorchTrainer; the workers hold the CPUs and GPUs. A bundle
        # cannot be empty, and a CPU fraction here would leave no whole CPU for the last worker.
        {"cpu": 0, "memory": 1},
    )


def close_interrupted(sweep: SweepConfig, directory: str, tracking) -> int:
    """After the Tuner is done, nothing of this sweep is running. A trial that Optuna or MLflow still
    shows as running lost its end (Optuna's tell or the run's end failed: a full disk, an outage):
    record it as failed / killed; a --resume reads its records and tells it, or runs it again."""
    import optuna

    from sweeps.search import study_exists, study_name, study_storage

    interrupted = 0
    study = (optuna.load_study(study_name=study_name(sweep, directory), storage=study_storage(sweep, directory))
             if study_exists(sweep, directory) else None)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)) if study else []:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        interrupted += 1
    tracking.end_runs("KILLED")
    if interrupted:
        print(f"[sweep] {interrupted} trial(s) interrupted with the previous driver, recorded as failed", flush=True)
    return interrupted
