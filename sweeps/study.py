"""A study: several methods, each an objective with its own search space, swept under the same budget
and the same seeds on one base model, then compared on one report. The command line is
sweeps/acpo_study.py (`acpo study`).

Every (method, seed) is an ordinary sweep (sweeps/driver.py `run_sweep`: Ray Tune + Optuna seeded with
the seed, training seeded with it too) named `<method>-seed<seed>` under
`<storage_dir>/<study>/sweeps/`, tracked in the study's MLflow experiment with its parent run nested
under the study's run. The base model is evaluated once on the screening bank and shared; each
sweep then confirms its pick on samples the search never saw (`sweep.confirm`, top 1;
sweeps/confirm.py), on one seed bank per study seed (`CONFIRMATION_BANKS` + seed) where the base is
measured once too, and the report compares those confirmed figures over seeds
(sweeps/study_report.py). `noise_seeds` > 0 also measures the base under that many sampling seeds
(the unpaired spread, reported only). A method
that fails is reported in the table, not fatal; `--resume` skips finished sweeps and resumes an
interrupted one.
The report (`sweeps/study_report.py`) is written to `<storage_dir>/<study>/report/` and logged to
the study's run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from sweeps import confirm, driver  # `driver.run_sweep`, looked up when called (a test replaces it)
from sweeps.presets import load
from sweeps.space import pin_searched
from trainers.common import layout, storage
from trainers.common.credentials import redact, redacted
from trainers.common.errors import ConfigError, last_line
from trainers.config import Section, validate

STUDIES_DIR = Path(__file__).resolve().parent / "studies"
CONFIRMATION_BANKS = 1000  # study seed s confirms on seed bank 1000 + s (the screening's is eval.seed, 0)


class Method(Section):
    objective: dict[str, Any] = Field(min_length=1)  # the objective, as in a preset
    space: dict[str, Any] = Field(min_length=1)  # its search space, as in a preset's sweep.space


class StudyConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")  # the folder under storage_dir and the MLflow experiment
    preset: str = "digits"  # the base config every method starts from
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    trials: int = Field(2, ge=1)  # trials per method and seed: the same budget for every method
    set: list[str] = Field(default_factory=list)  # overrides every method runs with (steps, evaluation)
    fid_tolerance: float = Field(0.1, ge=0)
    # The base model re-evaluated under this many sampling seeds (0: not): the unpaired spread of its
    # figures, reported. The verdicts and the hacking flag use paired intervals instead.
    noise_seeds: int = Field(0, ge=0)
    baseline: str = "baseline"  # the method every other is compared with, seed by seed ("" or absent: none)
    storage_dir: str = "runs/studies"
    tracking_uri: str = ""  # "" = the sweep's rule ($MLFLOW_TRACKING_URI, else 127.0.0.1:5000)
    methods: dict[str, Method] = Field(min_length=1)


def read_study(name_or_path: str, overrides: list[str] | None = None) -> StudyConfig:
    """A shipped study by name (`sweeps/studies/<name>.yaml`) or a YAML file, with `key=value` overrides
    of its top-level fields (`seeds=[0, 1]`, `trials=1`), validated."""
    from sweeps.presets import apply_overrides, read_yaml_mapping

    path = Path(name_or_path)
    if not path.suffix:
        path = STUDIES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in STUDIES_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"study not found: {name_or_path} (shipped: {known})")
    data = apply_overrides(read_yaml_mapping(path, "study"), list(overrides or []))
    return validate(StudyConfig, data, "study.")


def method_sweep(study: StudyConfig, method: str, seed: int, directory: Path):
    """The run config and sweep settings of one (method, seed): the study's preset and budget, the
    method's objective and space, seeded with `seed` (Optuna's sampler and the training)."""
    spec = study.methods[method]
    # Each method's sweep confirms its pick (top 1) on a fresh seed bank: what the report compares.
    # One bank per study seed, shared by its methods (their picks paired on the same noise), so the
    # seeds are independent replicates of the bank's noise too; the base is measured once per bank
    # (`confirmation_base`). The study's `set` may change it (`sweep.confirm.samples=...`;
    # `sweep.confirm.seed=...`: one bank for every seed; `sweep.confirm.top_k=0`: no confirmation).
    overrides = ["sweep.confirm.top_k=1", f"sweep.confirm.seed={CONFIRMATION_BANKS + seed}", *study.set] + [
        f"objective={json.dumps(spec.objective)}",
        f"sweep.space={json.dumps(spec.space)}",
        f"sweep.name={method}-seed{seed}",
        f"sweep.seed={seed}",
        f"train.seed={seed}",
        f"train.output_dir={directory / 'runs'}",
        f"sweep.num_samples={study.trials}",
        f"sweep.fid_tolerance={study.fid_tolerance}",
        f"sweep.storage_dir={directory / layout.STUDY_SWEEPS}",
        f"sweep.experiment={study.name}",
        "sweep.register_champion=false",
    ] + ([f"sweep.tracking_uri={study.tracking_uri}"] if study.tracking_uri else [])
    try:
        config, sweep = load(study.preset, overrides)
    except ConfigError as error:
        raise ConfigError(f"study.methods.{method}: {error}") from None
    if sweep.fidelity != "fid":  # the report's verdicts, the hacking flag and the plots read FID ratios
        raise ConfigError(f"study.set: sweep.fidelity={sweep.fidelity}: a study compares its methods on FID (its verdicts are on FID "
                          "ratios); KID as the front's axis is a sweep's choice")
    return config, pin_searched(sweep, list(study.set))  # the study's budget wins over a method's search


def check_study(study: StudyConfig, directory: Path, resume: bool):
    """Every method's config and space, validated before anything runs; the folder rule of a sweep."""
    from sweeps.space import check_space

    if resume and not (directory / "study.json").is_file():
        raise ConfigError(f"--resume: no study to resume at {directory}")
    if not resume and (directory / "study.json").is_file():
        raise ConfigError(f"study.name: {directory} already holds a study; pass --resume, or choose another name")
    from sweeps.preflight import check_inputs, check_services, check_storage_folder

    check_storage_folder(directory, "study.storage_dir")
    for number, method in enumerate(study.methods):
        config, sweep = method_sweep(study, method, study.seeds[0], directory)
        if number == 0:
            check_services(driver.tracking_uri(sweep), "study.tracking_uri" if study.tracking_uri else "$MLFLOW_TRACKING_URI")
        try:
            check_space(sweep, config)
            unchecked = check_inputs(config)
        except ConfigError as error:
            raise ConfigError(f"study.methods.{method}: {error}") from None
        for line in unchecked:
            print(f"[study] {method}: not checked before the run: {line}", file=sys.stderr, flush=True)
    if study.baseline and study.baseline not in study.methods:
        raise ConfigError(f"study.baseline: {study.baseline!r} is not one of the methods ({', '.join(study.methods)}); "
                          "name one, or set it to \"\" to compare with the base model only")


def run_study(study: StudyConfig, directory: Path, resume: bool = False) -> dict:
    from sweeps.tracking import SweepTracking

    check_study(study, directory, resume)
    first_config, first_sweep = method_sweep(study, next(iter(study.methods)), study.seeds[0], directory)
    uri = driver.tracking_uri(first_sweep)
    tracking = SweepTracking(uri, study.name, study.name)  # before anything is written: a dead server leaves no study behind
    if not resume and tracking.client.search_runs([tracking.experiment_id], "tags.`acpo.role` = 'study'", max_results=1):
        # its sweeps' names are taken there too: every one of them would fail on it, one by one
        raise ConfigError(f"study.name: '{study.name}' is already used in MLflow experiment '{study.name}' by a study whose folder "
                          f"is not {directory}; choose another name (or --resume it from its folder)")
    directory.mkdir(parents=True, exist_ok=True)
    storage.write_text(directory / "study.json", json.dumps(redacted(study.model_dump()), indent=2) + "\n")
    study_run = tracking.run("study", study.name)  # the study's own run; every method's sweep nests under it
    tracking.log_params(study_run, {"methods": ", ".join(study.methods), "seeds": study.seeds, "trials": study.trials,
                                    "budget": " ".join(study.set), "preset": study.preset})
    driver.evaluate_base(first_config, directory, tracking, study_run)  # once, shared by every method's sweep
    if study.noise_seeds:
        noise = measure_noise(first_config, directory, study.noise_seeds)
        tracking.log_metrics(study_run, {f"noise.{name}": figures["std"] for name, figures in noise.items()})
    print(f"[study] {study.name}: {len(study.methods)} methods x {len(study.seeds)} seeds x {study.trials} trials; files: {directory}",
          flush=True)
    failures = {}
    for method in study.methods:
        for seed in study.seeds:
            config, sweep = method_sweep(study, method, seed, directory)
            sweep = sweep.model_copy(update={"parent_run": study_run})
            sweep_dir = directory / layout.STUDY_SWEEPS / sweep.name
            if Path(layout.selection_file(sweep_dir)).is_file():
                print(f"[study] {sweep.name}: done before, kept", flush=True)
                continue
            sweep_dir.mkdir(parents=True, exist_ok=True)
            # the base figures file last: it marks the base as measured (sweeps/driver.py: evaluate_base)
            for shared in (layout.BASE_SAMPLES, layout.BASE_PER_SAMPLE, layout.BASE_METRICS):
                if (directory / shared).is_file():
                    storage.write_bytes(sweep_dir / shared, (directory / shared).read_bytes())
            if sweep.confirm.top_k:  # the base on this sweep's confirmation bank: measured once per bank, copied
                target = Path(confirm.base_location(config, sweep, str(sweep_dir)))
                storage.write_bytes(target, confirmation_base(config, sweep, directory).read_bytes())
            print(f"[study] {sweep.name}", flush=True)
            try:
                driver.run_sweep(config, sweep, resume=driver.holds_sweep(str(sweep_dir)), inputs_checked=True)
            except Exception as error:  # noqa: BLE001 - a failed method is reported in the table, not fatal
                failures[sweep.name] = last_line(error)
                print(f"[study] {sweep.name} failed: {failures[sweep.name]}", file=sys.stderr, flush=True)
    report = write_report(study, directory, failures)
    for method, s in report["summary"].items():
        tracking.log_metrics(study_run, {**{f"{method}.{name}": s[name][0] for name in
                                            ("hypervolume", "best_fid", "best_heldout_within_tolerance", "reward_gap")},
                                         f"{method}.hacked_checkpoints": len(s["hacking"]),
                                         **({f"{method}.confirmed_gain": s["confirmed"]["gain_vs_base"]["mean"],
                                             f"{method}.confirmed_fid_ratio": s["confirmed"]["fid_ratio_vs_base"]["mean"],
                                             f"{method}.confirmed_champions": s["confirmed"]["confirmed_champions"]}
                                            if "confirmed" in s else {})})
    tracking.client.log_artifacts(study_run, str(directory / layout.STUDY_REPORT), artifact_path="report")
    tracking.client.set_terminated(study_run)
    return report


def confirmation_base(config, sweep, directory: Path) -> Path:
    """The base model's per-sample data on `sweep`'s confirmation bank, measured the first time a
    sweep of the study needs that bank and kept in the study's folder (each sweep gets a copy where
    its confirmation looks for it: the same file name, keyed by the bank and the evaluation)."""
    location = Path(confirm.base_location(config, sweep, str(directory)))
    if not location.is_file():
        from eval.evaluate import Evaluator

        print(f"[study] the base model on the confirmation bank ({sweep.confirm.samples} samples, seed {sweep.confirm.seed})", flush=True)
        confirm.measure(confirm.confirmation_evaluator(Evaluator.from_config(config), sweep), str(location), config.model.base,
                        base_model=True, weights_dtype=config.model.weights_dtype)
    return location


def measure_noise(config, directory: Path, seeds: int) -> dict:
    """`base_noise.json`: the base model's figures over `seeds` sampling seeds (computed once)."""
    noise_file = directory / "base_noise.json"
    noise = storage.read_json(noise_file, "the base model's noise")
    if noise is None:
        from eval.evaluate import Evaluator, sampling_noise
        from trainers.models import load_base_model

        print(f"[study] evaluation noise: the base model under {seeds} sampling seeds", flush=True)
        noise = sampling_noise(Evaluator.from_config(config), load_base_model(config.model.base, weights_dtype=config.model.weights_dtype), range(seeds))
        storage.write_text(noise_file, json.dumps(noise, indent=2) + "\n")
    return noise


def study_rows(study: StudyConfig, directory: Path) -> list[dict]:
    """Every evaluated checkpoint of every (method, seed) sweep, with its method and seed."""
    from sweeps.champion import evaluated_checkpoints

    rows = []
    for method in study.methods:
        for seed in study.seeds:
            sweep_dir = directory / layout.STUDY_SWEEPS / f"{method}-seed{seed}"
            if sweep_dir.is_dir():
                rows += [{**row, "method": method, "seed": seed} for row in evaluated_checkpoints(sweep_dir)[0]]
    return rows


def confirmed_picks(study: StudyConfig, directory: Path) -> tuple[list[dict], list[dict], list[str]]:
    """Each (method, seed) sweep's confirmed pick (its selection's first confirmation candidate), with
    its method and seed; the confirmation banks they were measured on; the finished sweeps that
    confirmed nothing (run with `sweep.confirm.top_k=0`, or before the study confirmed)."""
    from sweeps.confirm import DIFF

    picks, banks, unconfirmed = [], [], []
    for method in study.methods:
        for seed in study.seeds:
            selection = Path(layout.selection_file(directory / layout.STUDY_SWEEPS / f"{method}-seed{seed}"))
            if not selection.is_file():
                continue
            confirmation = json.loads(selection.read_text()).get("confirmation") or {}
            if not confirmation.get("candidates"):
                unconfirmed.append(f"{method}-seed{seed}")
                continue
            entry = confirmation["candidates"][0]
            picks.append({"method": method, "seed": seed, "trial": entry["trial"], "step": entry.get("step", "?"),
                          "gain": entry["confirmation"][DIFF], "fid_ratio": entry["confirmation"]["fid_ratio"],
                          "passed": entry["passed"], "p_holm": entry["p_holm"], "bank": confirmation["bank"]})
            if confirmation["bank"] not in banks:
                banks.append(confirmation["bank"])
    return picks, banks, unconfirmed


def add_screening_intervals(study: StudyConfig, rows: list[dict], directory: Path, trained_lower_better: bool = False) -> None:
    """Each row's paired intervals against the base on the screening bank (`row["intervals"]`), from
    the per-sample data its evaluation stored: what the hacking flag reads (the FID ratio's only
    where it decides). Kept in the study's `screening_intervals.json`, keyed by the checkpoint, the
    base's data and the resample count, so a report written again computes none twice."""
    from eval.intervals import paired_intervals
    from sweeps.confirm import read_per_sample
    from sweeps.study_report import fidelity_decides
    from trainers.common.keys import ContentKey

    base_file = directory / layout.BASE_PER_SAMPLE
    base = read_per_sample(str(base_file))
    if base is None or not rows:
        return
    config, _ = method_sweep(study, next(iter(study.methods)), study.seeds[0], directory)
    options = {"resamples": config.eval.resamples, "seed": 0, "with_kid": False}
    settings = ContentKey().file(base_file).json(options).hex(12)
    cache_file = directory / layout.STUDY_INTERVALS
    cache = storage.read_json(cache_file, "the screening intervals' cache") or {}
    reference = None
    for row in rows:
        key = f"{row['checkpoint']} {settings}"
        if key not in cache:
            data = read_per_sample(str(Path(row["checkpoint"]) / layout.CHECKPOINT_PER_SAMPLE))
            if data is None or len(data) != len(base):
                continue
            if reference is None:
                from eval.evaluate import Evaluator

                reference = Evaluator.from_config(config, quality=False).reference_features()
            cache[key] = paired_intervals(data, reference, base, with_fid=False, **options).to_json()
            if fidelity_decides(cache[key], trained_lower_better):  # the FID ratio's interval only where the flag reads it
                cache[key] = paired_intervals(data, reference, base, **options).to_json()
        row["intervals"] = cache[key]
    storage.write_text(cache_file, json.dumps(cache, indent=1) + "\n")


def write_report(study: StudyConfig, directory: Path, failures: dict | None = None) -> dict:
    """`report/`: report.md, a self-contained report.html, fronts.png, and the champions' sample grids."""
    import base64
    import html

    from sweeps.study_report import confirmed_table, markdown_table, plot_fronts, summarize

    out = directory / layout.STUDY_REPORT
    out.mkdir(parents=True, exist_ok=True)
    base = json.loads(Path(layout.base_metrics_file(directory)).read_text())
    noise_file = directory / "base_noise.json"
    measured = storage.read_json(noise_file, "the base model's noise")
    noise = {name: f["std"] for name, f in measured.items()} if measured else None
    rows = study_rows(study, directory)
    add_screening_intervals(study, rows, directory)
    picks, banks, unconfirmed = confirmed_picks(study, directory)
    summary = summarize(rows, base, study.fid_tolerance, picks=picks, baseline=study.baseline or None) if rows else {}
    plot_fronts(rows, base, out / "fronts.png")
    grids = champion_grids(study, directory, out)
    failed = "".join(f"- {name} failed: {reason}\n" for name, reason in (failures or {}).items())
    missing = [m for m in study.methods if m not in summary]
    text = (f"# Study {study.name}\n\n{len(study.methods)} methods x seeds {study.seeds} x {study.trials} trials each, "
            f"the same budget: `{redact(' '.join(study.set)) or '(the preset)'}` on preset `{study.preset}`.\n\n"
            + markdown_table(summary, base, noise) + "\n" + (confirmed_table(summary, banks) + "\n" if picks else "")
            + (f"Not confirmed (finished without a confirmation, left out of the second table): {', '.join(unconfirmed)}.\n\n"
               if unconfirmed else "")
            + (f"No evaluated checkpoints: {', '.join(missing)}.\n\n" if missing else "") + (failed + "\n" if failed else "")
            + "![fronts](fronts.png)\n\n" + "".join(f"![{name}]({path.name})\n" for name, path in grids.items()))
    for method, s in summary.items():
        for h in s["hacking"]:
            text += f"\n- reward hacking, {method}: seed {h['seed']} trial {h['trial']} step {h['step']} (FID {h['fid']:.1f}, " \
                    f"held-out {h['heldout_quality']:.4f}, trained {h['trained_quality']:.4f})"
    storage.write_text(out / "report.md", text + "\n")
    images = {p.name: base64.b64encode(p.read_bytes()).decode() for p in [out / "fronts.png", *grids.values()]}
    body = html.escape(text)
    for name, data in images.items():
        body = body.replace(html.escape(f"({name})"), f'<br><img src="data:image/png;base64,{data}"><br>')
    storage.write_text(out / "report.html", f"<!doctype html><meta charset=utf-8><title>Study {study.name}</title><pre>{body}</pre>\n")
    storage.write_text(out / "summary.json", json.dumps({"base": base, "noise": noise, "confirmation_banks": banks, "unconfirmed": unconfirmed, "methods": summary,
                                                  "failures": failures or {}}, indent=2) + "\n")
    print((out / "report.md").read_text(), flush=True)
    return {"summary": summary, "report": str(out / "report.md"), "failures": failures or {}}


def champion_grids(study: StudyConfig, directory: Path, out: Path) -> dict[str, Path]:
    """Each method's champion (first seed with one) next to the base model's samples, upscaled 4x."""
    from PIL import Image

    grids = {}
    base_grid = Path(layout.base_samples_file(directory))
    for method in study.methods:
        for seed in study.seeds:
            selection = Path(layout.selection_file(directory / layout.STUDY_SWEEPS / f"{method}-seed{seed}"))
            champion = json.loads(selection.read_text()).get("champion") if selection.is_file() else None
            grid = Path(champion["checkpoint"]) / layout.CHECKPOINT_SAMPLES if champion else None
            if grid is not None and grid.is_file():
                panels = [Image.open(p).convert("L") for p in (base_grid, grid) if p.is_file()]
                width = sum(p.width for p in panels) + 8 * (len(panels) - 1)
                sheet = Image.new("L", (width, max(p.height for p in panels)), 255)
                x = 0
                for panel in panels:
                    sheet.paste(panel, (x, 0))
                    x += panel.width + 8
                path = out / f"samples_{method}.png"
                sheet.resize((sheet.width * 4, sheet.height * 4), Image.NEAREST).save(path)
                grids[f"{method} (right) vs base (left)" if len(panels) == 2 else method] = path
                break
    return grids
