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
`<sweep.storage_dir>/<sweep.name>/`: the Tune experiment (`tune/`), the Optuna study (`optuna.db`),
each trial's checkpoints (`trials/<trial>/step_*`), the base model's metrics, the selection and the
exported champion.
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


def fit_tuner(tuner, directory: Path):
    """`tuner.fit()`. With the storage disk full, Tune fails in its own ways (an empty pickled error,
    a half-written state file): said as what it is, with what to do."""
    import shutil

    try:
        return tuner.fit()
    except Exception as error:
        free = shutil.disk_usage(directory).free
        if free >= LOW_SPACE:
            raise
        reason = last_line(error)[:160]
        raise OSError(errno.ENOSPC, f"No space left on device: {free / 2**20:.0f} MB free in {directory} "
                                    f"(Ray Tune failed with {type(error).__name__}: {reason})") from error


def preflight(config: Config, sweep: SweepConfig, directory: Path, uri: str, resume: bool, inputs_checked: bool = False) -> None:
    """Everything that can be checked before Ray starts: the folder rule, the storage folder, the
    services, every file the config names. `--dry-run` runs it too."""
    from sweeps.preflight import check_inputs, check_services, check_storage_folder

    check_storage(sweep, directory, resume)
    check_storage_folder(directory, "sweep.storage_dir")
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
              "(they stay in work/<trial>/tracking.jsonl; --resume or `acpo select` replays them)", file=sys.stderr, flush=True)


def check_storage(sweep: SweepConfig, directory: Path, resume: bool) -> None:
    """A new sweep needs a new name; --resume needs a sweep to resume. Writes nothing."""
    from ray import tune

    if not sweep.space:
        raise ConfigError("sweep.space: expected a non-empty mapping of config key -> distribution")
    tune_dir = directory / "tune"
    if resume and not tune.Tuner.can_restore(str(tune_dir)):
        raise ConfigError(f"--resume: no sweep to resume at {tune_dir}")
    if not resume and tune_dir.exists():
        raise ConfigError(f"sweep.name: {directory} already holds a sweep; pass --resume, or choose another name")


SWEEP_ID = "sweep_id"  # the file in the sweep's folder holding its id (its MLflow runs carry it as a tag)


def claim_folder(sweep: SweepConfig, directory: Path, uri: str) -> str:
    """The sweep's id: read from its folder, or made for a new one. A name that another sweep folder
    already uses in the MLflow experiment is refused (its runs would merge with this one's)."""
    import uuid

    from sweeps.tracking import SweepTracking

    id_file = directory / SWEEP_ID
    sweep_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex
    other = SweepTracking(uri, sweep.name, sweep.experiment, sweep_id).other_sweep()
    if other is not None:
        raise ConfigError(f"sweep.name: '{sweep.name}' is already used in MLflow experiment '{sweep.experiment or sweep.name}' "
                          f"by the sweep at {other}; choose another name (or --resume that sweep)")
    directory.mkdir(parents=True, exist_ok=True)
    if not id_file.is_file():
        id_file.write_text(sweep_id + "\n")
    return sweep_id


def read_sweep_id(directory: Path) -> str:
    id_file = directory / SWEEP_ID
    return id_file.read_text().strip() if id_file.is_file() else ""


def sweep_dir(sweep: SweepConfig) -> Path:
    """Where the sweep's files live. A relative `sweep.storage_dir` resolves against the working
    directory, except under `ray job submit --working-dir`: there the working directory is Ray's
    temporary copy of the project, deleted with the job, so it resolves against ~/acpo instead.
    On a cluster, pass an absolute path on shared storage (cluster.yaml: /shared)."""
    storage = Path(sweep.storage_dir).expanduser()
    if not storage.is_absolute() and "working_dir" in json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}):
        storage = Path.home() / "acpo" / storage
    return storage.resolve() / sweep.name


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


def start_tracking(config: Config, sweep: SweepConfig, uri: str, sweep_id: str, directory: Path):
    """The sweep's MLflow experiment and parent run (found again on --resume), with its settings."""
    from sweeps.tracking import SweepTracking

    tracking = SweepTracking(uri, sweep.name, sweep.experiment, sweep_id)
    parent = tracking.run("sweep", sweep.name, sweep.parent_run or None)
    tracking.client.set_tag(parent, "acpo.folder", str(directory))
    tracking.log_params(parent, {"preset": config.preset, "num_samples": sweep.num_samples, "algorithm": sweep.algorithm,
                                 "fid_tolerance": sweep.fid_tolerance, **{f"space.{k}": v for k, v in sweep.space.items()}})
    return tracking, parent


def evaluate_base(config: Config, directory: Path, tracking, parent: str) -> dict:
    """The base model, evaluated once (the reference point of the front), in its own child run."""
    base_file = directory / "base_metrics.json"
    if not base_file.is_file():
        from eval.evaluate import Evaluator
        from trainers.models import load_base_model

        from torchvision.utils import save_image

        print("[sweep] evaluating the base model", flush=True)
        evaluation = Evaluator.from_config(config).evaluate(load_base_model(config.model.base))
        save_image(evaluation.samples, directory / "base_samples.png", nrow=8, padding=1)  # next to the checkpoints' grids
        base_file.write_text(json.dumps(evaluation.metrics, indent=2) + "\n")
    base = json.loads(base_file.read_text())
    base_run = tracking.run("base", "base model", parent)
    tracking.log_metrics(base_run, base)
    if (directory / "base_samples.png").is_file():
        tracking.log_grid(base_run, directory / "base_samples.png", step=0)
    tracking.client.set_terminated(base_run)
    return base


def build_tuner(config: Config, sweep: SweepConfig, directory: Path):
    """A new Tuner: Optuna's multi-objective search over the space, its study on disk, as many
    concurrent trials as the cluster fits, FIFO (an early stopper on one metric would bias the front)."""
    import ray
    from optuna.samplers import NSGAIISampler, TPESampler
    from optuna.storages import RDBStorage
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    from eval.evaluate import OBJECTIVES  # imported here: the trial actors import this module, and need no pyiqa
    from sweeps.space import tune_space

    settings = config.train
    if settings.use_gpu:
        fit = int(ray.cluster_resources().get("GPU", 0) // settings.workers)
    else:
        fit = int(ray.cluster_resources().get("CPU", 1) // (settings.workers * settings.cpus_per_worker))
    concurrency = sweep.max_concurrent or max(1, fit)
    sampler = NSGAIISampler(seed=sweep.seed) if sweep.algorithm == "nsga2" else TPESampler(seed=sweep.seed, multivariate=True)
    search = OptunaSearch(metric=list(OBJECTIVES), mode=list(OBJECTIVES.values()), sampler=sampler, study_name=sweep.name,
                          storage=RDBStorage(f"sqlite:///{directory / 'optuna.db'}"), seed=sweep.seed)
    print(f"[sweep] {sweep.num_samples} trials, {concurrency} at a time, {sweep.algorithm}", flush=True)
    return tune.Tuner(
        trainable(config, directory),
        param_space=tune_space(sweep),
        # reuse_actors: the next trial runs in the finished trial's actor, not a new process (~2.5 s a trial here)
        tune_config=tune.TuneConfig(search_alg=search, scheduler=FIFOScheduler(), num_samples=sweep.num_samples,
                                    max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(name="tune", storage_path=str(directory)),
    )


def restore_tuner(config: Config, sweep: SweepConfig, directory: Path):
    """The interrupted Tuner with its searcher: unfinished trials resume from their last checkpoint."""
    from ray import tune

    return tune.Tuner.restore(str(directory / "tune"), trainable=trainable(config, directory),
                              resume_unfinished=True, resume_errored=True)


def trainable(config: Config, directory: Path):
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(run_trial, base_config=config.to_dict(), directory=str(directory)),
        # The trial function only drives its TorchTrainer; the workers hold the CPUs and GPUs. A bundle
        # cannot be empty, and a CPU fraction here would leave no whole CPU for the last worker.
        {"cpu": 0, "memory": 1},
    )


def run_trial(params: dict, base_config: dict, directory: str) -> None:
    """One Tune trial: the trainer's TorchTrainer, fitted (Train V2: the trial function is its driver).
    What MLflow should show goes to the trial's spool; the driver replays it (sweeps/tracking.py)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from sweeps.tracking import SPOOL, SpoolCallback, spool, spool_unreported
    from trainers.ray_train import build_trainer, root_message

    trial = tune.get_context().get_trial_id()
    work = Path(directory) / "work" / trial
    config = Config.from_dict(set_values(base_config, {**params, "train.output_dir": str(work)}))
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    spool(work / SPOOL, {"op": "start", "params": params})
    # Same name and storage after a driver restart: Ray Train picks the run up from its last checkpoint.
    trainer = build_trainer(config, name=trial, storage_path=Path(directory) / "trials",
                            callbacks=[TuneReportCallback(), SpoolCallback(work / SPOOL)])
    checkpoints = Path(directory) / "trials" / trial
    set_aside_unreadable_record(checkpoints)
    try:
        trainer.fit()
    except Exception as error:
        spool_unreported(work / SPOOL, checkpoints)
        broken = set_aside_unreadable_record(checkpoints)
        message = f"{broken}; {root_message(error)}" if broken else root_message(error)
        spool(work / SPOOL, {"op": "end", "status": "FAILED", "error": message})
        if broken:
            raise RuntimeError(message) from error
        raise
    spool_unreported(work / SPOOL, checkpoints)
    # A trial whose training had finished when the driver was killed, but which Tune had not yet
    # recorded as done, is run again on --resume: its Train run is complete, so fit() reports
    # nothing and Tune would end the trial with no figures. Report the last evaluated checkpoint's
    # (in an ordinary trial this repeats the last report: same step, same figures).
    evaluated = sorted(checkpoints.glob(f"{CHECKPOINT_GLOB}/metrics.json"))
    if evaluated:
        tune.report(json.loads(evaluated[-1].read_text()))
    spool(work / SPOOL, {"op": "end", "status": "FINISHED"})


def set_aside_unreadable_record(checkpoints: Path) -> str | None:
    """Ray Train's record of a trial's checkpoints (`checkpoint_manager_snapshot.json`) is rewritten in
    place; a full disk can leave it empty, and Ray then cannot start the trial again, ever. Such a
    record is renamed aside: the trial then restarts from its first step (its checkpoint folders are
    rewritten as it goes). Returns what happened, naming the file and the free space, or None."""
    import shutil

    record = checkpoints / "checkpoint_manager_snapshot.json"
    try:
        json.loads(record.read_text())
        return None
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as error:
        with contextlib.suppress(OSError):
            os.replace(record, record.with_name(record.name + ".unreadable"))
        free = shutil.disk_usage(checkpoints).free / 2**20
        return (f"{record} was unreadable ({type(error).__name__}), set aside; {free:.0f} MB free in {checkpoints.parent.parent}: "
                "if the disk was full, free space and --resume (the trial restarts)")


def close_interrupted(sweep: SweepConfig, directory: Path, tracking) -> int:
    """After the Tuner is done, nothing of this sweep is running. A trial that Optuna or MLflow still
    shows as running was interrupted with the driver before Tune's experiment state recorded it
    (Tune then ran a fresh trial in its place): record it as failed / killed, not as a duplicate."""
    import optuna

    study = optuna.load_study(study_name=sweep.name, storage=f"sqlite:///{directory / 'optuna.db'}")
    interrupted = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        interrupted += 1
    tracking.end_runs("KILLED")
    if interrupted:
        print(f"[sweep] {interrupted} trial(s) interrupted with the previous driver, recorded as failed", flush=True)
    return interrupted


def select_and_register(sweep: SweepConfig, directory: Path, uri: str) -> dict:
    """Select; log the selection to the sweep's parent run; export the champion in diffusers layout
    and register it with alias `champion`. Records the trials left spooled are replayed first."""
    from sweeps.tracking import SpoolReplayer, SweepTracking, TrackingError

    selection = select(sweep, directory)
    champion = selection["champion"]
    exported = export_champion(Path(champion["checkpoint"]), directory / "champion") if champion and sweep.register_champion else None
    try:
        tracking = SweepTracking(uri, sweep.name, sweep.experiment, read_sweep_id(directory))
        parent = tracking.run("sweep", sweep.name)
        finish_tracking(SpoolReplayer(tracking, directory, parent), sweep.tracking_wait_s)
        tracking.log_selection(parent, selection, directory)
        if exported is not None:
            selection["registered"] = tracking.register_champion(parent, exported, sweep.model_name or sweep.name, selection,
                                                                 sampling_settings(Path(champion["checkpoint"]), exported))
        tracking.describe_sweep(parent, selection)
        selection["mlflow"] = {"experiment_id": tracking.experiment_id, "parent_run_id": parent, "url": tracking.experiment_url()}
        write_json(directory / "selection.json", selection)
    except Exception as error:  # noqa: BLE001 - the server (or the network) failed; the selection is safe on disk
        reason = last_line(error)[:200]
        raise TrackingError(f"MLflow at {uri} failed during the selection ({reason}); the selection is in {directory / 'selection.json'}"
                            f"{' and the champion in ' + str(exported) if exported else ''}: run `acpo select --sweep {sweep.name}` "
                            "when the server answers") from None
    return selection


def sampling_settings(checkpoint: Path, exported: Path) -> dict:
    """How the champion was sampled when it was evaluated (its run's config): the registered model
    samples the same way (`trainers/mlflow_model.py`); a text model with the evaluation's prompts."""
    from eval.image_sets import captions

    config = Config.from_dict(json.loads((checkpoint / "config.json").read_text()))
    text = (exported / "text_encoder").is_dir()
    prompts = (list(config.eval.prompts) or captions(config.data.caption, list(range(10)), 10)) if text else []
    return {"sampler": config.eval.sampler, "guidance_scale": config.eval.guidance_scale, "prompts": prompts,
            "steps": config.eval.sampling_steps[0]}


def select(sweep: SweepConfig, directory: Path) -> dict:
    """Pareto front, hypervolume and champion over every evaluated checkpoint (no MLflow), written
    to `selection.json` and drawn in `pareto.png` and `pareto.html`. A checkpoint on the front must load (files
    readable, tensors of the model's shapes) before it counts; those that do not are listed under
    `unreadable` and left out, and the front is taken again without them."""
    from eval.evaluate import OBJECTIVES

    from sweeps.front_plots import front_figure, plot_front
    from sweeps.selection import hypervolume, pareto_front, select_champion
    from trainers.checkpoint import verify_checkpoint

    base_file = directory / "base_metrics.json"
    if not base_file.is_file():
        raise FileNotFoundError(f"no sweep at {directory} (base_metrics.json missing)")
    base = json.loads(base_file.read_text())
    rows, unreadable = evaluated_checkpoints(directory)
    print(f"[sweep] selecting the champion among {len(rows)} evaluated checkpoints", flush=True)
    verified: set[str] = set()
    while True:
        front = pareto_front(rows)
        broken = []
        for row in (r for r in front if r["checkpoint"] not in verified):
            try:
                verify_checkpoint(row["checkpoint"])
                verified.add(row["checkpoint"])
            except Exception as error:  # noqa: BLE001 - whatever makes it unloadable, it cannot be the champion
                broken.append(row)
                unreadable.append({"checkpoint": row["checkpoint"], "error": last_line(error)})
        if not broken:
            break
        rows = [r for r in rows if r not in broken]
    for item in unreadable:
        print(f"[sweep] skipped an unreadable checkpoint: {item['checkpoint']}: {item['error']}", file=sys.stderr, flush=True)
    champion, rule = select_champion(rows, base, sweep.fid_tolerance)
    selection = {"base": {name: base[name] for name in OBJECTIVES}, "rule": rule, "fid_tolerance": sweep.fid_tolerance,
                 "hypervolume": hypervolume(front, base), "evaluated": len(rows), "front": front, "champion": champion,
                 "unreadable": unreadable}
    write_json(directory / "selection.json", selection)
    plot_front(rows, front, base, champion, directory / "pareto.png")
    # self-contained (plotly.js inside): the MLflow UI shows it with no network, as any browser does the file
    front_figure(rows, front, base, champion).write_html(directory / "pareto.html", include_plotlyjs=True)
    return selection


def write_json(path: Path, data) -> None:
    """Whole or not at all: a driver killed mid-write leaves the previous file."""
    from eval.fidelity import write_whole

    write_whole(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def evaluated_checkpoints(directory: Path) -> tuple[list[dict], list[dict]]:
    """Every evaluated checkpoint of every trial: the table the selection runs on; and those whose
    figures cannot be read."""
    from eval.evaluate import OBJECTIVES

    rows, unreadable = [], []
    for metrics_file in sorted(directory.glob(f"trials/*/{CHECKPOINT_GLOB}/metrics.json")):
        checkpoint = metrics_file.parent
        trial = checkpoint.parent.name
        params_file = directory / "work" / trial / "params.json"
        try:
            params = json.loads(params_file.read_text()) if params_file.is_file() else {}
            metrics = json.loads(metrics_file.read_text())
            if not all(isinstance(metrics.get(name), (int, float)) for name in OBJECTIVES):
                raise ValueError(f"no {' and '.join(OBJECTIVES)} in {metrics_file.name}")
        except ValueError as error:  # JSONDecodeError included
            unreadable.append({"checkpoint": str(checkpoint), "error": f"{metrics_file.name}: {error}"})
            continue
        rows.append({"trial": trial, "checkpoint": str(checkpoint), **metrics, **{f"param:{k}": v for k, v in params.items()}})
    return rows, unreadable


def export_champion(checkpoint: Path, out: Path) -> Path:
    """The champion as a plain diffusers pipeline folder (LoRA merged into the weights)."""
    import shutil

    from trainers.checkpoint import load_checkpoint_model
    from trainers.lora import merge_lora
    from trainers.models import save_base_model

    model = load_checkpoint_model(checkpoint)
    merge_lora(model.unet)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_base_model(model, tmp)
    shutil.copy(checkpoint / "metrics.json", tmp / "metrics.json")
    if out.exists():  # the previous export goes only once the new one is whole
        shutil.rmtree(out)
    os.replace(tmp, out)
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
    from sweeps.cli import report_error

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
