"""Our trainer's step against a bare diffusers training loop: the same model, batch size, seed and
optimizer, the `denoise` term alone, measured side by side in one run (interleaved, median of the
repeats). Also what reading the loss back every step costs (the bare loop with and without
`loss.item()`), which is the price of our one non-finite check per step.

    .venv/bin/python bench/step_overhead.py                                   # digits, CPU
    .venv/bin/python bench/step_overhead.py --base runs/bench/sd15 --preset digits-t2i --set data.source=folder ...
    .venv/bin/python bench/step_overhead.py --tiny                            # the test suite's size

Target: ours / bare <= 1.05. For latent models ours is timed with the latent cache off (the bare
loop encodes every batch too) and on; `bench/sd_shape.py` runs this comparison at Stable Diffusion size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bare_loop, describe, median, our_steps, pick_device  # noqa: E402


def measure(preset: str, overrides: list[str], steps: int, warmup: int, repeats: int, device, work: Path, log=print) -> dict:
    """Median seconds per step of: ours (latent cache off), ours (cache on, latent models only), the
    bare loop, the bare loop reading its loss every step."""
    from sweeps.presets import load
    from trainers.image_sets import training_set

    config, _ = load(preset, overrides)
    latent = (Path(config.model.base) / "vae").is_dir()
    dataset = training_set(config.data)
    variants = {"ours": [*overrides, "objective={denoise: 1.0}", "data.cache_latents=false"],
                **({"ours, latent cache": [*overrides, "objective={denoise: 1.0}", f"data.cache_dir={work / 'cache'}"]} if latent else {})}
    seconds = {name: [] for name in [*variants, "bare", "bare + loss.item()"]}
    for r in range(repeats):  # interleaved, so that a slow spell of the machine hits every variant alike
        for name, variant in variants.items():
            seconds[name].append(our_steps(preset, variant, steps, warmup, work / f"{r}-{len(seconds[name])}", device)["s_per_step"])
        for name, item in (("bare", False), ("bare + loss.item()", True)):
            seconds[name].append(bare_loop(config.model.base, dataset, config.train.batch_size, steps, warmup, config.train.seed, device,
                                           lr=config.train.learning_rate, item_each_step=item, caption=config.data.caption)["s_per_step"])
        log(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1] * 1000:.1f} ms" for k, v in seconds.items()))
    # The ratio is the median of the repeats' own ratios: each pair ran back to back, on the same machine state.
    paired = median([ours / bare for ours, bare in zip(seconds["ours"], seconds["bare"])])
    return {name: median(values) for name, values in seconds.items()} | {"batch": config.train.batch_size, "paired": paired}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--base", default="", help="a diffusers folder to train instead of the preset's model")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="a few steps of batch 8 (the test suite's size)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    overrides = [*([f"model.base={args.base}"] if args.base else []), *args.set]
    if args.tiny:
        overrides, args.steps, args.warmup, args.repeats = [*overrides, "train.batch_size=8"], 3, 1, 1
    with tempfile.TemporaryDirectory(prefix="step-overhead-") as work:
        figures = measure(args.preset, overrides, args.steps, args.warmup, args.repeats, device, Path(work))
    bare = figures["bare"]
    print(f"device: {describe(device)}; preset {args.preset}, batch {figures['batch']}, {args.steps} timed steps after "
          f"{args.warmup}, median of {args.repeats}")
    for name in [k for k in figures if k not in ("batch", "paired")]:
        print(f"  {name:22s} {figures[name] * 1000:9.2f} ms/step   x{figures[name] / bare:.3f}")
    print(f"one loss.item() per step costs x{figures['bare + loss.item()'] / bare:.3f} on the bare loop")
    print(f"step_overhead: ratio {figures['paired']:.3f} (ours / bare, median of the repeats' ratios, target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
