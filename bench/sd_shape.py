"""The Stable Diffusion 1.5 shape, measured: the SD 1.5 architecture built from its published configs
with random weights (UNet2DConditionModel, AutoencoderKL, CLIP text encoder), bf16 autocast, batch 8
at 512 px. For the bare diffusers loop and our trainer (denoise alone; ACPO = denoise + anchor +
pyiqa's CNNIQA on a one-step and on a rollout x0), full fine-tuning and LoRA rank 16, torch.compile
off and on: seconds per step, images/s, peak memory, FLOPs per step (`torch.utils.flop_counter`) and
MFU against the device's dense bf16 peak. Ratios are against the bare loop, side by side in one run.

    .venv/bin/python bench/sd_shape.py                   # CUDA: SD 1.5 size
    .venv/bin/python bench/sd_shape.py --size tiny       # CPU: the same component types, tiny (the tests)

Random weights change nothing in the cost of a step. The training images are the digits, upsampled
to RGB at the model's resolution and written as PNGs (a folder source: decode, the latent cache).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ObjectiveStep,
    bare_loop,
    describe,
    gib,
    our_steps,
    peak_tflops,
    pick_device,
)

from trainers import rehearsal  # noqa: E402
from trainers.rehearsal import SD15  # noqa: E402

SIZES = {"sd15": SD15, "tiny": "tiny"}  # trainers/rehearsal.py: the published configs, and a narrow copy for the tests


def build(size: str, folder: Path) -> Path:
    """The architecture with random weights (seed 0), saved as a diffusers pipeline (safetensors)."""
    from trainers.models import save_base_model

    return save_base_model(rehearsal.build(SIZES[size]), folder)


def write_images(folder: Path, count: int, resolution: int) -> Path:
    """`count` digits, upsampled to RGB `resolution` px PNGs."""
    import torch.nn.functional as F
    from PIL import Image

    from trainers.image_sets import DigitsDataset

    folder.mkdir(parents=True, exist_ok=True)
    images = DigitsDataset("train").images[:count]
    pixels = F.interpolate((images + 1) / 2, size=resolution, mode="bilinear").clamp(0, 1).mul(255).round().byte()
    for i, image in enumerate(pixels):
        Image.fromarray(image[0].numpy()).convert("RGB").save(folder / f"{i:04d}.png")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--compile", choices=["both", "off", "on"], default="both")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=None, help="where the model and images go (default: a temporary folder)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    size = args.size or ("sd15" if device.type == "cuda" else "tiny")
    resolution = rehearsal.ARCHITECTURES[SIZES[size]]["resolution"]

    with tempfile.TemporaryDirectory(prefix="sd-shape-") as scratch:
        work = args.work or Path(scratch)
        base = build(size, work / "model") if not (work / "model" / "model_index.json").is_file() else work / "model"
        images = write_images(work / "images", max(64, 2 * args.batch), resolution)
        common = [f"model.base={base}", "data.source=folder", f"data.path={images}", f"data.resolution={resolution}", "data.channels=3",
                  "data.caption_column=''", "data.caption='a handwritten digit'", f"eval.reference={images}", "eval.guidance_scale=1.0",
                  f"train.batch_size={args.batch}", "train.mixed_precision=auto", f"data.cache_dir={work / 'latents'}"]
        # pyiqa's CNNIQA (the digits weights; any input size) is the reward, and scores the token evaluation
        # between timings; the digits-only prompt metrics of the preset are dropped.
        quality = "{arch: cnniqa, weights: assets/digits/quality_cnniqa.safetensors}"
        common += [f"eval.heldout_quality={quality}", "eval.extra_quality={}"]
        acpo = "{denoise: 1.0, anchor: 10.0, nr_iqa: {weight: 0.3, metric: " + quality + ", SOURCE}}"
        objectives = {"denoise": "{denoise: 1.0}", "denoise, no latent cache": "{denoise: 1.0}", "ACPO one_step": acpo.replace("SOURCE", "x0: {source: one_step, t_range: [0, 400]}"),
                      "ACPO rollout": acpo.replace("SOURCE", "x0: {source: rollout, sampling_steps: 20, feedback_steps: 1}")}
        finetunes = {"full": ["model.finetune=full"], f"LoRA {args.rank}": ["model.finetune=lora", f"model.lora_rank={args.rank}"]}
        compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]

        from sweeps.presets import load

        rows = []
        for compiled in compiles:
            flag = [f"train.compile={str(compiled).lower()}"]
            bare = bare_loop(str(base), _dataset(load("digits-t2i", common)[0]), args.batch, args.steps, args.warmup, 0, device,
                             compile=compiled, caption="a handwritten digit")
            bare_flops = _flops(load("digits-t2i", [*common, *finetunes["full"], "objective={denoise: 1.0}"])[0], device)
            rows.append(("bare loop", "full", compiled, bare, bare_flops))
            _free()
            for finetune, finetune_set in finetunes.items():
                for name, objective in objectives.items():
                    if finetune != "full" and name.startswith("denoise"):
                        continue
                    cache = ["data.cache_latents=false"] if name == "denoise, no latent cache" else []
                    overrides = [*common, *finetune_set, *flag, *cache, f"objective={objective}"]
                    run = our_steps("digits-t2i", overrides, args.steps, args.warmup, work / "runs" / f"{name}-{finetune}-{compiled}", device)
                    rows.append((f"ours, {name}", finetune, compiled, run, _flops(load("digits-t2i", overrides)[0], device)))
                    _free()

    peak = peak_tflops(device)
    print(f"device: {describe(device)}; {size} shape at {resolution} px, batch {args.batch}, bf16 autocast on CUDA, "
          f"{args.steps} timed steps after {args.warmup}; MFU against {f'{peak:.0f} TFLOP/s' if peak else 'no known peak'}")
    print(f"  {'':32s} {'tuning':>8s} {'compile':>8s} {'s/step':>8s} {'img/s':>7s} {'peak':>10s} {'TFLOP/step':>11s} {'MFU':>6s} {'x bare':>7s}")
    bare_time = {compiled: run["s_per_step"] for name, _, compiled, run, _ in rows if name == "bare loop"}
    for name, finetune, compiled, run, flops in rows:
        seconds = run["s_per_step"]
        mfu = f"{flops / seconds / (peak * 1e12):6.1%}" if peak else "   n/a"
        print(f"  {name:32s} {finetune:>8s} {'on' if compiled else 'off':>8s} {seconds:8.3f} {args.batch / seconds:7.2f} "
              f"{gib(run['peak_gib']):>10s} {flops / 1e12:11.4g} {mfu} {seconds / bare_time[compiled]:7.2f}")
    ours = next(run["s_per_step"] for name, _, compiled, run, _ in rows if name == "ours, denoise, no latent cache" and compiled == compiles[0])
    print(f"sd_shape: ratio {ours / bare_time[compiles[0]]:.3f} (ours, denoise alone, no latent cache / bare loop, "
          f"compile {'on' if compiles[0] else 'off'})")
    return 0


def _dataset(config):
    from trainers.image_sets import training_set

    return training_set(config.data)


def _flops(config, device) -> int:
    step = ObjectiveStep(config, device)
    step.run()  # lazy pieces built outside the count
    flops = step.flops()
    del step
    _free()
    return flops


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
