"""The `acpo` command line.

    acpo train  [--preset digits] [--set key=value ...] [--workers N] [--local] [--dry-run]
                                                                      one fine-tuning run (Ray Train)
    acpo eval   --checkpoint PATH [--preset digits] [--samples N] [--steps 4,25] [--json FILE]
                                                                      evaluate a checkpoint next to the base model
    acpo sweep  [--preset digits] [--num-samples N] [--resume] [--dry-run]   the sweep (= python sweeps/acpo_sweep.py)
    acpo study  [--preset digits] [--seeds N] [--resume] [--dry-run]     methods compared over seeds (= python sweeps/acpo_study.py)
    acpo select --sweep NAME [--preset digits]                        re-run the selection of a finished sweep
    acpo assets build [--out assets/digits] [--quick]                 re-create the digits stand-ins
    acpo assets build-t2i [--out assets/digits-t2i] [--quick]         re-create the digits-t2i text-to-image stand-in
    acpo assets build-flow [--out assets/digits-flow] [--quick]       re-create the digits-flow flow-matching stand-in (SD3 types)
    acpo prompts select --in FILE --out FILE [--preset P] [--size N]  UniFL's offline prompt selection

Bad input ends with one line on stderr naming the field or file, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trainers.common.credentials import redacted
from trainers.common.errors import ConfigError, report_error


def _add_config_args(parser):
    from sweeps.presets import preset_names

    parser.add_argument("--preset", default="digits", help=f"preset name ({', '.join(preset_names())}) or a YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


DIGITS_NOTE = ("(digits preset: classifier FID, not Inception FID; trained and held-out quality from the project's "
               "stand-in models)")


def cmd_train(args) -> int:
    from sweeps.preflight import check_inputs, check_ray_address
    from sweeps.presets import load

    overrides = list(args.overrides) + ([f"train.workers={args.workers}"] if args.workers else [])
    config, _ = load(args.preset, overrides)
    if not config.train.output_dir:  # "" is a sweep trial's setting: each Ray Train worker's own scratch
        raise ConfigError("train.output_dir: expected a folder for the run's checkpoints, got ''")
    for line in check_inputs(config):  # every file the config names, opened; before Ray starts
        print(f"[train] not checked before the run: {line}", file=sys.stderr, flush=True)
    if not args.local:
        check_ray_address()
    if args.dry_run:
        print(json.dumps(redacted(config.to_dict()), indent=2))
        return 0
    from eval.evaluate import Evaluator
    from trainers.models import load_base_model

    before = Evaluator.from_config(config).evaluate(load_base_model(config.model.base, weights_dtype=config.model.weights_dtype)).metrics
    if args.local:  # the same loop in this process: one worker, no Ray (for debugging)
        from trainers.loop import train

        result = train(config)
        after, checkpoint = result["metrics"], result["checkpoint"]
    else:
        from trainers.ray_train import run_training

        result = run_training(config)
        after, checkpoint = result.metrics, result.checkpoint.path
    keys = [k for k in before if "@" in k]
    print(f"\n{'metric':<22}{'base':>12}{'fine-tuned':>12}")
    for key in keys:
        print(f"{key:<22}{before[key]:>12.4f}{after[key]:>12.4f}")
    print(f"\nstep {after['step']}, checkpoint: {checkpoint}")
    if config.preset.startswith("digits"):
        print(DIGITS_NOTE)
    if config.model.rehearsal:
        from trainers.rehearsal import NOTE

        print(NOTE)
    return 0


def cmd_eval(args) -> int:
    from sweeps.presets import load

    overrides = list(args.overrides)
    if args.samples:
        overrides.append(f"eval.samples={args.samples}")
    if args.steps:
        overrides.append(f"eval.sampling_steps=[{args.steps}]")
    config, _ = load(args.preset, overrides)
    if args.dry_run:
        print(json.dumps(redacted(config.to_dict()["eval"]), indent=2))
        return 0
    if args.noise:
        return cmd_eval_noise(args, config)
    if not args.checkpoint:
        raise ConfigError("--checkpoint: required (or --noise, to measure the base model's noise)")
    from eval.evaluate import Evaluator, reward_gap
    from trainers.checkpoint import load_checkpoint_model

    model = load_checkpoint_model(args.checkpoint)  # fails first, in one line, on a bad path
    evaluator = Evaluator.from_config(config)
    metrics = evaluator.evaluate(model).metrics
    base = None if args.no_base else evaluator.evaluate(load_checkpoint_model(config.model.base)).metrics
    directions = evaluator.directions()
    lower_better = {name: way == "min" for name, way in directions.items()}
    gaps = {steps: reward_gap(metrics, base, steps, lower_better) for steps in config.eval.sampling_steps} if base else {}

    print(f"\n{'metric':<26}{'better':>8}{'base':>12}{'checkpoint':>12}")
    for key in [k for k in metrics if "@" in k]:
        base_value = f"{base[key]:>12.4f}" if base else f"{'-':>12}"
        print(f"{key:<26}{directions[key.split('@')[0]]:>8}{base_value}{metrics[key]:>12.4f}")
    for steps, gap in gaps.items():
        print(f"{f'reward_gap@{steps}':<26}{'min':>8}{'':>12}{gap:>12.4f}")
    print(f"\n{config.eval.samples} samples per step count, {config.eval.sampler}; FID/KID against {config.eval.reference} "
          f"in {config.eval.feature_extractor} features")
    if config.preset.startswith("digits"):
        print(DIGITS_NOTE)
    if config.model.rehearsal:
        from trainers.rehearsal import NOTE

        print(NOTE)
    if args.json:
        report = {"checkpoint": str(args.checkpoint), "preset": config.preset, "samples": config.eval.samples,
                  "directions": directions, "checkpoint_metrics": metrics, "base_metrics": base,
                  "reward_gap": {str(k): v for k, v in gaps.items()}}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"written: {args.json}")
    return 0


def cmd_eval_noise(args, config) -> int:
    """`acpo eval --noise`: the figures' spread over seed banks against the sample count."""
    from eval.evaluate import Evaluator, noise_curve, samples_for_tolerance
    from trainers.checkpoint import load_checkpoint_model

    try:
        counts = [int(part) for part in args.noise_samples.split(",")]
    except ValueError:
        raise ConfigError(f"--noise-samples: expected comma-separated integers, got {args.noise_samples!r}") from None
    if any(count < 3 for count in counts) or args.noise_seeds < 1:
        raise ConfigError("--noise-samples: each count must be >= 3, and --noise-seeds >= 1")
    model = load_checkpoint_model(args.checkpoint or config.model.base)
    curve = noise_curve(Evaluator.from_config(config), model, counts, range(100, 100 + args.noise_seeds), config.eval.resamples)
    print(f"\n{args.checkpoint or config.model.base}: each figure over {args.noise_seeds} seed banks (mean +- std), and the bootstrap's "
          f"95% half-width from one bank")
    print(f"{'samples':>8}{'FID':>18}{'FID/mean':>10}{'boot. +-':>10}{'KID':>20}{'boot. +-':>10}{'held-out':>20}{'boot. +-':>10}")
    for row in curve:
        fid, kid, heldout = row["fid"], row["kid"], row["heldout_quality"]
        print(f"{row['samples']:>8}{fid['mean']:>10.2f} +- {fid['std']:<5.2f}{fid['std'] / abs(fid['mean']):>10.3f}{fid['bootstrap_half_width']:>10.2f}"
              f"{kid['mean']:>11.2f} +- {kid['std']:<6.2f}{kid['bootstrap_half_width']:>10.2f}"
              f"{heldout['mean']:>11.4f} +- {heldout['std']:<6.4f}{heldout['bootstrap_half_width']:>10.4f}")
    needed = samples_for_tolerance(curve, args.tolerance)
    if needed:
        print(f"\nFor 1.96 std of FID (the larger of the banks' and the bootstrap's) to fit in a {args.tolerance:.0%} band: about "
              f"{needed} samples (unpaired; a checkpoint paired with its base on one bank needs fewer).")
    if args.json:
        Path(args.json).write_text(json.dumps({"curve": curve, "tolerance": args.tolerance, "samples_needed": needed}, indent=2) + "\n")
        print(f"written: {args.json}")
    return 0


def cmd_sweep(args) -> int:
    from sweeps.acpo_sweep import main as sweep_main

    return sweep_main(args.rest)


def cmd_study(args) -> int:
    from sweeps.acpo_study import main as study_main

    return study_main(args.rest)


def cmd_select(args) -> int:
    from sweeps.champion import print_summary, require_sweep, select_and_register
    from sweeps.driver import sweep_dir, tracking_uri
    from sweeps.lease import Lease
    from sweeps.presets import load

    config, sweep = load(args.preset, [*args.overrides, f"sweep.name={args.sweep}"])
    directory = sweep_dir(sweep)
    require_sweep(directory)
    if args.dry_run:  # the selection registers a model version: a dry run stops before it
        print(json.dumps(redacted({"sweep": sweep.model_dump(), "folder": str(directory)}), indent=2))
        return 0
    uri = tracking_uri(sweep)
    with Lease(directory):  # not while a driver runs the sweep (it selects at its end)
        selection = select_and_register(sweep, directory, uri, config)
    print_summary(selection, uri, sweep)
    return 0


def cmd_assets_build(args) -> int:
    from assets.build import ASSET_FILES, AssetBudget, build_digits_assets
    from trainers.common.errors import ConfigError

    only = args.only.split(",") if args.only else None
    unknown = sorted(set(only or []) - set(ASSET_FILES))
    if unknown:
        raise ConfigError(f"--only: unknown asset {unknown[0]!r} (known: {', '.join(ASSET_FILES)})")
    build_digits_assets(args.out, AssetBudget.quick() if args.quick else AssetBudget(), seed=args.seed, only=only)
    return 0


def cmd_assets_build_t2i(args) -> int:
    from assets.digits_t2i import T2IBudget, build_digits_t2i

    build_digits_t2i(args.out, args.classifier, T2IBudget.quick() if args.quick else T2IBudget(), seed=args.seed)
    return 0


def cmd_assets_build_flow(args) -> int:
    from assets.digits_flow import FlowBudget, build_digits_flow

    build_digits_flow(args.out, args.classifier, FlowBudget.quick() if args.quick else FlowBudget(), seed=args.seed)
    return 0


def cmd_prompts_select(args) -> int:
    from objectives.prompt_pool import read_prompts
    from objectives.prompt_select import load_filter, min_words, select_prompts, text_embedder
    from sweeps.presets import load
    from trainers.common.errors import ConfigError
    from trainers.models import load_base_model

    config, _ = load(args.preset, args.overrides)
    if args.size < 1 or not 0 < args.threshold <= 1:
        raise ConfigError("--size must be >= 1 and --threshold in (0, 1]")
    if args.dry_run:  # what would be read and written, nothing loaded
        print(json.dumps(redacted({"model.base": config.model.base, "in": args.input, "out": args.out, "size": args.size,
                                   "seed": args.seed, "threshold": args.threshold}), indent=2))
        return 0
    base = load_base_model(config.model.base, weights_dtype=config.model.weights_dtype)
    if not base.text_conditioned:
        raise ConfigError(f"model.base: {config.model.base} has no text encoder: prompt selection embeds prompts with it")
    try:
        candidates = read_prompts(args.input)
        keep = load_filter(args.filter) if args.filter else min_words
        pool = select_prompts(candidates, text_embedder(base), args.size, args.seed, args.threshold, keep)
    except ValueError as error:
        raise ConfigError(f"{args.input}: {error}") from None
    Path(args.out).write_text("\n".join(pool) + "\n")
    print(f"[prompts] {len(candidates)} candidates -> {len(pool)} prompts in {args.out} (seed {args.seed}, cosine <= {args.threshold})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acpo", description="Perceptual fine-tuning sweeps for diffusion models")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run one fine-tuning from a preset")
    _add_config_args(train)
    train.add_argument("--workers", type=int, default=0, help="data-parallel Ray Train workers (default: train.workers)")
    train.add_argument("--local", action="store_true", help="run the loop in this process, without Ray")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint (FID/KID, diversity, quality scores) next to the base model")
    _add_config_args(evaluate)
    evaluate.add_argument("--checkpoint", default="", help="a training checkpoint, its model/ folder, or any diffusers pipeline folder "
                                                           "(required unless --noise, which defaults to the base model)")
    evaluate.add_argument("--noise", action="store_true", help="each figure's spread over seed banks vs the sample count, and the count "
                                                              "a tolerance needs (--noise-samples, --noise-seeds, --tolerance)")
    evaluate.add_argument("--noise-samples", default="200,500,2000", help="--noise: comma-separated sample counts")
    evaluate.add_argument("--noise-seeds", type=int, default=3, help="--noise: seed banks per sample count (seeds 100, 101, ...)")
    evaluate.add_argument("--tolerance", type=float, default=0.1, help="--noise: the relative FID tolerance to size the sample count for")
    evaluate.add_argument("--samples", type=int, default=0, help="images per step count (default: eval.samples)")
    evaluate.add_argument("--steps", default="", help="comma-separated sampling step counts, e.g. 4,25 (default: eval.sampling_steps)")
    evaluate.add_argument("--json", default="", help="also write the figures to this JSON file")
    evaluate.add_argument("--no-base", action="store_true", help="skip the base model (no reward gap)")
    evaluate.set_defaults(func=cmd_eval)

    sweep = sub.add_parser("sweep", help="the Ray Tune + Optuna sweep (same as python sweeps/acpo_sweep.py)", add_help=False)
    sweep.add_argument("rest", nargs=argparse.REMAINDER)
    sweep.set_defaults(func=cmd_sweep)

    study = sub.add_parser("study", help="methods compared over seeds (same as python sweeps/acpo_study.py)", add_help=False)
    study.add_argument("rest", nargs=argparse.REMAINDER)
    study.set_defaults(func=cmd_study)

    select = sub.add_parser("select", help="re-run Pareto front, champion selection and registration of a sweep")
    _add_config_args(select)
    select.add_argument("--sweep", required=True, help="the sweep's name (sweep.name)")
    select.set_defaults(func=cmd_select)

    assets = sub.add_parser("assets", help="the digits preset's stand-in models")
    assets_sub = assets.add_subparsers(dest="assets_command", required=True)
    build = assets_sub.add_parser("build", help="train the classifier, both quality models and the base DDPM from scratch")
    build.add_argument("--out", default="assets/digits", help="output folder (default: assets/digits)")
    build.add_argument("--quick", action="store_true", help="a few steps each: proves the pipeline, not the quality bars")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--only", default="", help="comma-separated subset of: classifier, quality, heldout_quality, base, segmenter")
    build.set_defaults(func=cmd_assets_build)
    t2i = assets_sub.add_parser("build-t2i", help="train the digits-t2i text-to-image stand-in (VAE, then UNet; text encoder frozen)")
    t2i.add_argument("--out", default="assets/digits-t2i", help="output folder (default: assets/digits-t2i)")
    t2i.add_argument("--classifier", default="assets/digits/classifier.safetensors", help="the digits classifier that scores the samples")
    t2i.add_argument("--quick", action="store_true", help="a few steps each: proves the pipeline, not the quality bars")
    t2i.add_argument("--seed", type=int, default=0)
    t2i.set_defaults(func=cmd_assets_build_t2i)
    flow = assets_sub.add_parser("build-flow", help="train the digits-flow stand-in (VAE, then SD3 transformer with rectified flow; text encoders frozen)")
    flow.add_argument("--out", default="assets/digits-flow", help="output folder (default: assets/digits-flow)")
    flow.add_argument("--classifier", default="assets/digits/classifier.safetensors", help="the digits classifier that scores the samples")
    flow.add_argument("--quick", action="store_true", help="a few steps each: proves the pipeline, not the quality bars")
    flow.add_argument("--seed", type=int, default=0)
    flow.set_defaults(func=cmd_assets_build_flow)

    prompts = sub.add_parser("prompts", help="prompt pools for prompt-conditioned rewards")
    prompts_sub = prompts.add_subparsers(dest="prompts_command", required=True)
    prompt_select = prompts_sub.add_parser("select", help="UniFL's offline prompt selection: semantic filter, near-duplicate removal, seeded subset")
    _add_config_args(prompt_select)
    prompt_select.add_argument("--in", dest="input", required=True, help="candidate prompts, one per line")
    prompt_select.add_argument("--out", required=True, help="the pool file to write")
    prompt_select.add_argument("--size", type=int, default=64, help="prompts in the pool (default 64)")
    prompt_select.add_argument("--seed", type=int, default=0)
    prompt_select.add_argument("--threshold", type=float, default=0.8,
                               help="drop a prompt whose text-embedding cosine with a kept one is above this (UniFL: 0.8, on seeded-shuffled prompts)")
    prompt_select.add_argument("--filter", default="", help="semantic filter module:function (default: at least 3 words)")
    prompt_select.set_defaults(func=cmd_prompts_select)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["sweep"], ["study"]):  # their own parsers take every argument after the word
        return cmd_sweep(argparse.Namespace(rest=argv[1:])) if argv[0] == "sweep" else cmd_study(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as error:  # noqa: BLE001 - report_error re-raises what is not a user error
        return report_error(error)


if __name__ == "__main__":
    sys.exit(main())
