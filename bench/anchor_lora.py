"""What the anchor costs with LoRA: LoRA + `anchor` against LoRA alone, side by side in one run.
With LoRA the frozen base the anchor compares against is the same network with its adapters
switched off (`trainers.lora.AdaptersDisabled`), so the anchor should add no parameter memory, only
the base's forward pass (no backward). Full fine-tuning, where the anchor needs a frozen copy, is
shown for contrast.

    .venv/bin/python bench/anchor_lora.py                    # digits, CPU
    .venv/bin/python bench/anchor_lora.py --base runs/bench/sd15 --preset digits-t2i --set data.source=folder ... --rank 16
    .venv/bin/python bench/anchor_lora.py --tiny             # the test suite's size

Targets: extra parameter memory 0 with LoRA; time (and, on CUDA, peak memory) <= 1.4x.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import describe, gib, median, our_steps, pick_device  # noqa: E402


def parameter_bytes(config, device) -> int:
    """Bytes of every distinct parameter and buffer the trainer holds for the model and the frozen
    base the terms see (`trainers.loop.setup_models`), counted once per storage."""
    from objectives.registry import build_objective
    from trainers.loop import objective_env, setup_models
    from trainers.models import load_base_model

    base = load_base_model(config.model.base, device)
    objective = build_objective(config.objective, objective_env(config, base, device))
    model, frozen = setup_models(config, base, objective)
    seen, total = set(), 0
    for module in filter(None, (model, frozen)):
        for tensor in [*module.parameters(), *module.buffers()]:
            key = tensor.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += tensor.untyped_storage().nbytes()
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="digits")
    parser.add_argument("--base", default="")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--anchor-weight", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    from sweeps.presets import load

    common = [*([f"model.base={args.base}"] if args.base else []), *args.set, *(["train.batch_size=8"] if args.tiny else [])]
    if args.tiny:
        args.steps, args.warmup, args.repeats = 3, 1, 1
    variants = {
        "lora": [*common, "model.finetune=lora", f"model.lora_rank={args.rank}", "objective={denoise: 1.0}"],
        "lora + anchor": [*common, "model.finetune=lora", f"model.lora_rank={args.rank}", f"objective={{denoise: 1.0, anchor: {args.anchor_weight}}}"],
        "full": [*common, "model.finetune=full", "objective={denoise: 1.0}"],
        "full + anchor": [*common, "model.finetune=full", f"objective={{denoise: 1.0, anchor: {args.anchor_weight}}}"],
    }
    memory = {name: parameter_bytes(load(args.preset, overrides)[0], device) for name, overrides in variants.items()}
    runs = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="anchor-lora-") as work:
        for r in range(args.repeats):
            for name, overrides in variants.items():
                runs[name].append(our_steps(args.preset, overrides, args.steps, args.warmup, Path(work) / f"{name}-{r}", device))
            print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]['s_per_step'] * 1000:.1f} ms" for k, v in runs.items()),
                  flush=True)
    seconds = {name: median([run["s_per_step"] for run in values]) for name, values in runs.items()}
    # The ratio: the median of the repeats' own ratios (each pair ran back to back).
    paired = median([a["s_per_step"] / b["s_per_step"] for a, b in zip(runs["lora + anchor"], runs["lora"])])
    peaks = {name: values[-1]["peak_gib"] for name, values in runs.items()}
    print(f"device: {describe(device)}; preset {args.preset}, batch {runs['lora'][0]['batch']}, LoRA rank {args.rank}, "
          f"{args.steps} timed steps, median of {args.repeats}")
    print(f"  {'':14s} {'parameters':>12s} {'ms/step':>9s} {'peak':>10s}")
    for name in variants:
        print(f"  {name:14s} {memory[name] / 2**20:9.2f} MiB {seconds[name] * 1000:9.2f} {gib(peaks[name]):>10s}")
    extra = memory["lora + anchor"] - memory["lora"]
    print(f"anchor with LoRA: extra parameter memory {extra / 2**20:.2f} MiB (full fine-tuning: "
          f"{(memory['full + anchor'] - memory['full']) / 2**20:.2f} MiB, a frozen copy)")
    if peaks["lora"] is not None:
        print(f"anchor with LoRA: peak memory x{peaks['lora + anchor'] / peaks['lora']:.3f}")
    print(f"anchor_lora: ratio {paired:.3f} (time, LoRA + anchor / LoRA, median of the repeats' ratios, target <= 1.4); "
          f"extra parameter memory {extra} bytes (target 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
