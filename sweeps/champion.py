"""The champion of a finished sweep: the selection table from the stored `metrics.json` of every
evaluated checkpoint, the front's checkpoints verified, the champion selected (`select`, no MLflow),
exported as a diffusers pipeline and registered in MLflow (`select_and_register`), and the summary
printed. Everything is read from the sweep's folder (trainers/common/layout.py), so a finished sweep
can be selected again anywhere its folder is copied (`acpo select --sweep NAME`).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from sweeps.presets import SweepConfig
from trainers.common import layout, storage
from trainers.common.credentials import redact
from trainers.common.errors import SelectionError, TrackingError, last_line
from trainers.config import Config


def select_and_register(sweep: SweepConfig, directory: str | Path, uri: str, config: Config | None = None) -> dict:
    """Select; export the champion in diffusers layout (to `champions/<export>/` in the sweep's storage); log the
    selection to the sweep's parent run and register the champion with alias `champion`. Records the
    trials left spooled are replayed first. A failure of the selection itself is a `SelectionError`;
    one of MLflow's, a `TrackingError` saying what is safe in storage."""
    directory = str(directory)
    with tempfile.TemporaryDirectory(prefix="acpo-champion.") as stage:
        selection, exported, settings = select_and_export(sweep, directory, Path(stage), config)
        stored = selection.get("export", {}).get("location", "")
        try:
            from sweeps.replay import SpoolReplayer, finish_tracking
            from sweeps.tracking import SweepTracking, read_sweep_id

            tracking = SweepTracking(uri, sweep.name, sweep.experiment, read_sweep_id(directory))
            parent = tracking.run("sweep", sweep.name)
            finish_tracking(SpoolReplayer(tracking, directory, parent), sweep.tracking_wait_s)
            tracking.log_selection(parent, selection, directory)
            if exported is not None:
                selection["registered"] = tracking.register_champion(parent, exported, sweep.model_name or sweep.name, selection, settings)
            elif sweep.register_champion and selection["champion"] is None:
                from sweeps.tracking import retire_champion

                retired = retire_champion(tracking.client, sweep.model_name or sweep.name, sweep.name)
                if retired:
                    selection["alias_removed"] = {"model": sweep.model_name or sweep.name, "version": retired}
                    print(f"[sweep] no champion: alias @champion removed from version {retired} (an earlier selection of this sweep)", flush=True)
            tracking.describe_sweep(parent, selection)
            selection["mlflow"] = {"experiment_id": tracking.experiment_id, "parent_run_id": parent, "url": tracking.experiment_url()}
        except Exception as error:  # noqa: BLE001 - the server (or the network) failed; the selection is safe in storage
            reason = last_line(error)[:200]
            raise TrackingError(f"MLflow at {redact(uri)} failed during the selection ({reason}); the selection is in "
                                f"{layout.selection_file(directory)}{' and the champion in ' + stored if exported else ''}: "
                                f"run `acpo select --sweep {sweep.name}` when the server answers") from None
        write_json(layout.selection_file(directory), selection)
    return selection


def select_and_export(sweep: SweepConfig, directory: str, stage: Path, config: Config | None = None) -> tuple[dict, Path | None, dict | None]:
    """What the selection does without MLflow: `select`, then (when the sweep registers one) the
    champion exported to `stage/champion`, stored as the sweep's `champions/<export>/` (`store_champion`), and the settings it
    was sampled with. Returns (selection, the local export or None, its sampling settings or None)."""
    selection = select(sweep, directory, config)
    champion = selection["champion"]
    if not (champion and sweep.register_champion):
        return selection, None, None
    exported = export_champion(champion["checkpoint"], stage / "champion")
    export = layout.new_export_id()
    selection["export"] = {"id": export, "location": store_champion(exported, directory, export, champion)}
    return selection, exported, sampling_settings(champion["checkpoint"], exported)


def store_champion(local: Path, directory: str, export: str, champion: dict) -> str:
    """The exported champion into the sweep's storage, replaced by upload-then-switch: written whole
    under a folder no earlier export used (`champions/<export>/`), then `champion.json` names it (one
    whole write), then the older exports are removed. A driver killed, or a store that stops answering,
    at any point leaves the previous champion named and whole. Returns the new folder's location."""
    location = layout.champion_dir(directory, export)
    if storage.is_remote(location):
        storage.upload(local, location)
    else:
        import shutil

        tmp = Path(location).with_name(f".{export}.tmp")
        shutil.copytree(local, tmp)
        storage.publish_folder(tmp, Path(location))
    write_json(layout.champion_pointer(directory), {"folder": f"{layout.CHAMPIONS}/{export}", "trial": champion["trial"],
                                                    "step": champion.get("step"), "checkpoint": champion["checkpoint"]})
    older = [layout.champion_dir(directory, name) for name in storage.listdir(layout.champions_dir(directory)) if name != export]
    for stale in [*older, layout.legacy_champion_dir(directory)]:
        try:
            storage.delete(stale)
        except OSError as error:  # the switch is done; an export left behind costs space only
            print(f"[sweep] an earlier champion export was left in place: {stale} ({last_line(error)[:160]})", file=sys.stderr, flush=True)
    return location


def sampling_settings(checkpoint: str, exported: Path) -> dict:
    """How the champion was sampled when it was evaluated (its run's config): the registered model
    samples the same way (`trainers/mlflow_model.py`); a text model with the evaluation's prompts.
    Read straight from the checkpoint's `config.json`: four values, not the whole config re-validated
    (which would need every file it names at its recorded path, not so on another machine)."""
    from trainers.image_sets import captions

    config_file = storage.join(checkpoint, layout.CHECKPOINT_CONFIG)
    try:
        config = json.loads(storage.read_text(config_file))
        evaluation = config["eval"]
        text = (exported / "text_encoder").is_dir()
        prompts = (list(evaluation["prompts"]) or captions(config["data"]["caption"], list(range(10)), 10)) if text else []
        return {"sampler": evaluation["sampler"], "guidance_scale": evaluation["guidance_scale"], "prompts": prompts,
                "steps": evaluation["sampling_steps"][0]}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:  # JSONDecodeError included
        reason = f"no {error}" if isinstance(error, KeyError) else last_line(error)[:200]
        raise SelectionError(f"{config_file}: the champion's sampling settings cannot be read ({reason})") from None


def require_sweep(directory: str) -> str:
    """The sweep's base figures file, or a `SelectionError` saying there is no sweep there (checked
    before anything else, so that a wrong name is not reported as an unreachable tracking server)."""
    base_file = layout.base_metrics_file(directory)
    if not storage.is_file(base_file):
        raise SelectionError(f"no sweep at {directory} ({layout.BASE_METRICS} missing)")
    return base_file


def select(sweep: SweepConfig, directory: str | Path, config: Config | None = None) -> dict:
    """Pareto front, hypervolume and champion over every evaluated checkpoint (no MLflow), written
    to `selection.json` and drawn in `pareto.png` and `pareto.html`. A checkpoint on the front must load (files
    readable, tensors of the model's shapes) before it counts; those that do not are listed under
    `unreadable` and left out, and the front is taken again without them.

    With the run `config` (its evaluation settings and base model), the front's points get their
    screening intervals and the first `sweep.confirm.top_k` are confirmed on a fresh seed bank
    (sweeps/confirm.py): the champion is the confirmation's, or none. Without it, or with top_k 0,
    the screening figures choose (the old rule: highest held-out quality within the FID tolerance),
    and the rule says the choice was not confirmed. The front's fidelity axis is `sweep.fidelity`."""
    from eval.axes import front_axes
    from sweeps.front_plots import front_figure, plot_front
    from sweeps.selection import Fidelity, hypervolume, pareto_front, select_champion

    directory = str(directory)
    fidelity = Fidelity.of(sweep)
    axes = front_axes(fidelity.axis)
    base_file = require_sweep(directory)
    try:
        base = json.loads(storage.read_text(base_file))
        if not all(isinstance(base.get(name), (int, float)) for name in axes):
            raise ValueError(f"no {' and '.join(axes)}")
    except (ValueError, AttributeError) as error:  # JSONDecodeError included; AttributeError: not a mapping
        raise SelectionError(f"{base_file}: not the base model's figures ({last_line(error)[:200]})") from None
    rows, unreadable = evaluated_checkpoints(directory, axes)
    print(f"[sweep] selecting the champion among {len(rows)} evaluated checkpoints", flush=True)
    verified: set[str] = set()
    while True:
        front = pareto_front(rows, fidelity.axis)
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
    screening_choice, screening_rule = select_champion(rows, base, fidelity)
    selection = {"base": {name: base[name] for name in axes}, "fidelity": fidelity.to_json(), "fid_tolerance": sweep.fid_tolerance,
                 "hypervolume": hypervolume(front, base, fidelity.axis), "evaluated": len(rows), "front": front,
                 "screening": {"bank": {"seed": config.eval.seed, "samples": config.eval.samples} if config else None,
                               "choice": screening_choice, "rule": screening_rule},
                 "unreadable": unreadable}
    if config is not None:
        from eval.evaluate import Evaluator
        from sweeps.confirm import confirm, screening_intervals
        from sweeps.selection import screening_order

        # The screening intervals need the reference features only; the confirmation samples, so it
        # loads the quality models too (the same Evaluator for both: the reference is read once).
        evaluator = Evaluator.from_config(config, quality=bool(sweep.confirm.top_k))
        screening_intervals(directory, front, evaluator.reference_features(), config.eval.resamples, fidelity)  # into the front's rows
    if config is not None and sweep.confirm.top_k:
        confirmation = confirm(config, sweep, directory, screening_order(front, base, fidelity), evaluator)
        champion, rule = confirmation.pop("champion"), confirmation["rule"]
        if champion is not None:
            champion = {**next(r for r in front if r["checkpoint"] == champion["checkpoint"]), "confirmed": champion}
        selection["confirmation"] = confirmation
    else:
        champion, rule = screening_choice, f"{screening_rule}; screening figures only, not confirmed on fresh samples"
    selection.update(champion=champion, rule=rule)
    write_json(layout.selection_file(directory), selection)
    with tempfile.TemporaryDirectory(prefix="acpo-front.") as stage:
        png, html = Path(stage) / layout.PARETO_PNG, Path(stage) / layout.PARETO_HTML
        plot_front(rows, front, base, champion, png, selection.get("confirmation"), fidelity.axis)
        # self-contained (plotly.js inside): the MLflow UI shows it with no network, as any browser does the file
        front_figure(rows, front, base, champion, selection.get("confirmation"), fidelity.axis).write_html(html, include_plotlyjs=True)
        for local, location in zip((png, html), layout.pareto_files(directory)):
            storage.write_bytes(location, local.read_bytes())
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


def evaluated_checkpoints(directory: str, axes=("fid", "heldout_quality")) -> tuple[list[dict], list[dict]]:
    """Every evaluated checkpoint of every trial: the table the selection runs on; and those whose
    figures on the front's `axes` cannot be read."""
    rows, unreadable = [], []
    for metrics_file in storage.glob(directory, layout.metrics_glob()):
        checkpoint = storage.parent(metrics_file)
        trial = storage.name(storage.parent(checkpoint))
        try:
            params_file = layout.params_file(directory, trial)  # a folder not named as a trial's key: refused, not read
            params = json.loads(storage.read_text(params_file)) if storage.is_file(params_file) else {}
            metrics = json.loads(storage.read_text(metrics_file))
            if not all(isinstance(metrics.get(name), (int, float)) for name in axes):
                raise ValueError(f"no {' and '.join(axes)} in metrics.json")
        except ValueError as error:  # JSONDecodeError included
            unreadable.append({"checkpoint": checkpoint, "error": f"metrics.json: {error}"})
            continue
        rows.append({"trial": trial, "checkpoint": checkpoint, **metrics, **{f"param:{k}": v for k, v in params.items()}})
    return rows, unreadable


def export_champion(checkpoint: str, out: Path) -> Path:
    """The champion as a plain diffusers pipeline folder (LoRA merged into the weights), at the local `out`.
    In fp32 whatever the base trained on: merged into bf16 weights, a LoRA delta below a weight's
    precision (2^-8 of it) would round away."""
    from trainers.checkpoint import load_checkpoint_model
    from trainers.lora import merge_lora
    from trainers.models import save_base_model

    with storage.local_copy(checkpoint) as local:
        model = load_checkpoint_model(local, weights_dtype="fp32")
        merge_lora(model.denoiser)
        save_base_model(model, out)
        (out / layout.CHECKPOINT_METRICS).write_bytes((local / layout.CHECKPOINT_METRICS).read_bytes())
    return out


def print_summary(selection: dict, uri: str, sweep: SweepConfig) -> None:
    from sweeps.confirm import selection_fidelity, summary_lines
    from sweeps.selection import params_text

    base, champion, fidelity = selection["base"], selection.get("champion"), selection_fidelity(selection)
    link = redact(selection.get("mlflow", {}).get("url", uri))
    print(f"\nMLflow: {link}  (experiment '{sweep.experiment or sweep.name}', its runs)")
    bank = selection.get("screening", {}).get("bank")
    where = f"  (screening bank: seed {bank['seed']}, {bank['samples']} samples)" if bank else ""
    print(f"base model:  {fidelity.label} {base[fidelity.axis]:.3f}  held-out quality {base['heldout_quality']:.4f}{where}")
    print(f"front: {len(selection['front'])} of {selection['evaluated']} evaluated checkpoints; hypervolume {selection['hypervolume']:.4g}")
    for line in summary_lines(selection):
        print(line)
    if not champion:
        print(f"champion:    none: {selection['rule']}; nothing registered")
    if champion:
        params = params_text(champion)
        print(f"champion:    {fidelity.label} {champion[fidelity.axis]:.3f}  held-out quality {champion['heldout_quality']:.4f} on the screening bank  ({selection['rule']})")
        print(f"             trial {champion['trial']} step {champion['step']}: {params}")
        registered = selection.get("registered")
        if registered:
            print(f"             registered as '{registered['model']}' version {registered['version']}, alias @champion")
