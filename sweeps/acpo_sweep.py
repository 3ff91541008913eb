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
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python sweeps/acpo_sweep.py`: import from the project root, not from sweeps/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from eval.evaluate import OBJECTIVES  # noqa: E402
from sweeps.presets import SweepConfig, load, set_values  # noqa: E402
from sweeps.space import check_space  # noqa: E402
from trainers.checkpoint import CHECKPOINT_GLOB  # noqa: E402
from trainers.config import Config, ConfigError  # noqa: E402


def run_sweep(config: Config, sweep: SweepConfig, resume: bool = False) -> dict:
    uri, directory = tracking_uri(sweep), sweep_dir(sweep)
    check_storage(sweep, directory, resume)
    print(f"[sweep] files: {directory}; MLflow: {uri}", flush=True)
    tracking, parent = start_tracking(config, sweep, uri)
    evaluate_base(config, directory, tracking, parent)
    import ray

    if not ray.is_initialized():
        ray.init()  # joins the cluster of `ray start` / `ray job submit`, or starts a local one
    tuner = restore_tuner(config, sweep, directory, uri, parent) if resume else build_tuner(config, sweep, directory, uri, parent)
    results = tuner.fit()
    close_interrupted(sweep, directory, tracking)
    errors = [str(r.error).strip().splitlines()[-1] for r in results if r.error]
    if errors:
        print(f"[sweep] {len(errors)} trial(s) failed; first: {errors[0]}", file=sys.stderr, flush=True)
    selection = select_and_register(sweep, directory, uri)
    tracking.client.set_terminated(parent)
    return selection


def check_storage(sweep: SweepConfig, directory: Path, resume: bool) -> None:
    """A new sweep needs a new name; --resume needs a sweep to resume. Then the folder exists."""
    from ray import tune

    if not sweep.space:
        raise ConfigError("sweep.space: expected a non-empty mapping of config key -> distribution")
    tune_dir = directory / "tune"
    if resume and not tune.Tuner.can_restore(str(tune_dir)):
        raise ConfigError(f"--resume: no sweep to resume at {tune_dir}")
    if not resume and tune_dir.exists():
        raise ConfigError(f"sweep.name: {directory} already holds a sweep; pass --resume, or choose another name")
    directory.mkdir(parents=True, exist_ok=True)


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


def start_tracking(config: Config, sweep: SweepConfig, uri: str):
    """The sweep's MLflow experiment and parent run (found again on --resume), with its settings."""
    from sweeps.tracking import SweepTracking

    tracking = SweepTracking(uri, sweep.name, sweep.experiment)
    parent = tracking.run("sweep", sweep.name, sweep.parent_run or None)
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
    tracking.client.set_terminated(base_run)
    return base


def build_tuner(config: Config, sweep: SweepConfig, directory: Path, uri: str, parent: str):
    """A new Tuner: Optuna's multi-objective search over the space, its study on disk, as many
    concurrent trials as the cluster fits, FIFO (an early stopper on one metric would bias the front)."""
    import ray
    from optuna.samplers import NSGAIISampler, TPESampler
    from optuna.storages import RDBStorage
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

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
        trainable(config, sweep, directory, uri, parent),
        param_space=tune_space(sweep),
        tune_config=tune.TuneConfig(search_alg=search, scheduler=FIFOScheduler(), num_samples=sweep.num_samples,
                                    max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name="tune", storage_path=str(directory)),
    )


def restore_tuner(config: Config, sweep: SweepConfig, directory: Path, uri: str, parent: str):
    """The interrupted Tuner with its searcher: unfinished trials resume from their last checkpoint."""
    from ray import tune

    return tune.Tuner.restore(str(directory / "tune"), trainable=trainable(config, sweep, directory, uri, parent),
                              resume_unfinished=True, resume_errored=True)


def trainable(config: Config, sweep: SweepConfig, directory: Path, uri: str, parent: str):
    from ray import tune

    return tune.with_resources(
        tune.with_parameters(run_trial, base_config=config.to_dict(), directory=str(directory), uri=uri,
                             sweep_name=sweep.name, parent_id=parent, experiment=sweep.experiment),
        # The trial function only drives its TorchTrainer; the workers hold the CPUs and GPUs. A bundle
        # cannot be empty, and a CPU fraction here would leave no whole CPU for the last worker.
        {"cpu": 0, "memory": 1},
    )


def run_trial(params: dict, base_config: dict, directory: str, uri: str, sweep_name: str, parent_id: str, experiment: str = "") -> None:
    """One Tune trial: the trainer's TorchTrainer, fitted (Train V2: the trial function is its driver)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from sweeps.tracking import MlflowReportCallback, SweepTracking
    from trainers.ray_train import build_trainer

    trial = tune.get_context().get_trial_id()
    work = Path(directory) / "work" / trial
    config = Config.from_dict(set_values(base_config, {**params, "train.output_dir": str(work)}))
    work.mkdir(parents=True, exist_ok=True)
    (work / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    tracking = SweepTracking(uri, sweep_name, experiment)
    run_id = tracking.run("trial", f"trial-{trial}", parent_id, trial=trial)
    tracking.log_params(run_id, params)
    # Same name and storage after a driver restart: Ray Train picks the run up from its last checkpoint.
    trainer = build_trainer(config, name=trial, storage_path=Path(directory) / "trials",
                            callbacks=[TuneReportCallback(), MlflowReportCallback(uri, sweep_name, run_id, experiment)])
    trainer.fit()
    # A trial whose training had finished when the driver was killed, but which Tune had not yet
    # recorded as done, is run again on --resume: its Train run is complete, so fit() reports
    # nothing and Tune would end the trial with no figures. Report the last evaluated checkpoint's
    # (in an ordinary trial this repeats the last report: same step, same figures).
    checkpoints = sorted((Path(directory) / "trials" / trial).glob(f"{CHECKPOINT_GLOB}/metrics.json"))
    if checkpoints:
        tune.report(json.loads(checkpoints[-1].read_text()))
    tracking.client.set_terminated(run_id)


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
    for run in tracking.client.search_runs([tracking.experiment_id], filter_string=f"tags.`acpo.sweep` = '{sweep.name}' and attributes.status = 'RUNNING' and tags.`acpo.role` = 'trial'"):
        tracking.client.set_terminated(run.info.run_id, status="KILLED")
    if interrupted:
        print(f"[sweep] {interrupted} trial(s) interrupted with the previous driver, recorded as failed", flush=True)
    return interrupted


def select_and_register(sweep: SweepConfig, directory: Path, uri: str) -> dict:
    """Select; log the selection to the sweep's parent run; export the champion in diffusers layout
    and register it with alias `champion`."""
    from sweeps.tracking import SweepTracking

    selection = select(sweep, directory)
    tracking = SweepTracking(uri, sweep.name, sweep.experiment)
    parent = tracking.run("sweep", sweep.name)
    tracking.log_selection(parent, selection, directory)
    champion = selection["champion"]
    if champion is not None and sweep.register_champion:
        exported = export_champion(Path(champion["checkpoint"]), directory / "champion")
        selection["registered"] = tracking.register_champion(parent, exported, sweep.model_name or sweep.name, selection)
        (directory / "selection.json").write_text(json.dumps(selection, indent=2) + "\n")
    return selection


def select(sweep: SweepConfig, directory: Path) -> dict:
    """Pareto front, hypervolume and champion over every evaluated checkpoint (no MLflow), written
    to `selection.json` and drawn in `pareto.png`."""
    from sweeps.selection import hypervolume, pareto_front, select_champion

    base_file = directory / "base_metrics.json"
    if not base_file.is_file():
        raise FileNotFoundError(f"no sweep at {directory} (base_metrics.json missing)")
    base = json.loads(base_file.read_text())
    rows = evaluated_checkpoints(directory)
    front = pareto_front(rows)
    champion, rule = select_champion(rows, base, sweep.fid_tolerance)
    selection = {"base": {name: base[name] for name in OBJECTIVES}, "rule": rule, "fid_tolerance": sweep.fid_tolerance,
                 "hypervolume": hypervolume(front, base), "evaluated": len(rows), "front": front, "champion": champion}
    (directory / "selection.json").write_text(json.dumps(selection, indent=2) + "\n")
    plot_front(rows, front, base, champion, directory / "pareto.png")
    return selection


def evaluated_checkpoints(directory: Path) -> list[dict]:
    """Every evaluated checkpoint of every trial: the table the selection runs on."""
    rows = []
    for metrics_file in sorted(directory.glob(f"trials/*/{CHECKPOINT_GLOB}/metrics.json")):
        checkpoint = metrics_file.parent
        trial = checkpoint.parent.name
        params_file = directory / "work" / trial / "params.json"
        params = json.loads(params_file.read_text()) if params_file.is_file() else {}
        metrics = json.loads(metrics_file.read_text())
        rows.append({"trial": trial, "checkpoint": str(checkpoint), **metrics, **{f"param:{k}": v for k, v in params.items()}})
    return rows


def plot_front(rows, front, base, champion, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter([r["fid"] for r in rows], [r["heldout_quality"] for r in rows], s=14, c="0.7", label="evaluated checkpoints")
    ax.plot([r["fid"] for r in front], [r["heldout_quality"] for r in front], "o-", c="tab:red", ms=5, label="Pareto front")
    ax.scatter([base["fid"]], [base["heldout_quality"]], marker="*", s=160, c="black", label="base model")
    if champion:
        ax.scatter([champion["fid"]], [champion["heldout_quality"]], s=160, facecolors="none", edgecolors="tab:blue", linewidths=2,
                   label="champion")
    save_front_plot(fig, ax, path)


def save_front_plot(fig, ax, path: Path) -> None:
    """The axes every FID / held-out quality plot shares (a sweep's front, a study's fronts), then the file."""
    import matplotlib.pyplot as plt

    ax.set_xlabel("FID (lower is better)")
    ax.set_ylabel("held-out quality (higher is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def export_champion(checkpoint: Path, out: Path) -> Path:
    """The champion as a plain diffusers pipeline folder (LoRA merged into the weights)."""
    import shutil

    from trainers.checkpoint import load_checkpoint_model
    from trainers.lora import merge_lora
    from trainers.models import save_base_model

    model = load_checkpoint_model(checkpoint)
    merge_lora(model.unet)
    if out.exists():
        shutil.rmtree(out)
    save_base_model(model, out)
    shutil.copy(checkpoint / "metrics.json", out / "metrics.json")
    return out


def print_summary(selection: dict, uri: str, sweep: SweepConfig) -> None:
    base, champion = selection["base"], selection.get("champion")
    print(f"\nMLflow: {uri}  (experiment '{sweep.name}')")
    print(f"base model:  FID {base['fid']:.3f}  held-out quality {base['heldout_quality']:.4f}")
    print(f"front: {len(selection['front'])} of {selection['evaluated']} evaluated checkpoints; hypervolume {selection['hypervolume']:.4g}")
    if champion:
        params = ", ".join(f"{k[6:]}={v:.4g}" if isinstance(v, float) else f"{k[6:]}={v}" for k, v in champion.items() if k.startswith("param:"))
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
        check_space(sweep, config)
        if args.dry_run:
            print(json.dumps({"config": config.to_dict(), "sweep": sweep.model_dump()}, indent=2))
            return 0
        selection = run_sweep(config, sweep, resume=args.resume)
        print_summary(selection, tracking_uri(sweep), sweep)
        return 0
    except Exception as error:  # noqa: BLE001 - report_error re-raises what is not a user error
        return report_error(error)


if __name__ == "__main__":
    sys.exit(main())
