"""Memory of one training step at Stable Diffusion 1.5's real shape: the `sd15` preset in
rehearsal (random weights, trainers/rehearsal.py), one setting changed per row from the preset's own
(LoRA 16 + anchor + MUSIQ on a sampled x0, DRaFT-1 through the VAE decode, gradient checkpointing,
bf16 autocast, batch 1), each row in its own process.

    .venv/bin/python bench/sd_memory.py                      # here: 512 px on the CPU (peak RSS)
    .venv/bin/python bench/sd_memory.py --resolution 64 --rows preset,lora_no_anchor   # the test

Per row: the parameter part (every model the step holds: UNet, VAE, text encoder, reward model), the
gradient and AdamW-state parts (counted: 4 and 8 bytes per trainable parameter), and the activation
part (measured: the process's peak resident set over forward and backward, less what it held before
the step and the gradients; AdamW's state is allocated after the activations are freed). A row that runs out of memory says so.

The projection to a GPU is arithmetic on the same counts, not a measurement: trainable weights, their
gradients and AdamW state in fp32; frozen weights in bf16 (what a GPU run would load them as);
activations scaled linearly with batch from the measured batch-1 figure (CPU autocast saves bf16
activations as a GPU's does; the allocator's slack and CUDA's workspace are not in it).
`anchor_parameter_gib` compares LoRA with and without the anchor: the anchor reads the base through
the same network with adapters disabled, so it must add no parameter memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

NR_IQA = "{weight: 0.05, metric: musiq, x0: SOURCE}"
SOURCES = {"sampled": "{source: sampled, sampling_steps: 2, feedback_steps: 1}", "one_step": "one_step",
           "rollout": "{source: rollout, sampling_steps: 2, feedback_steps: 1}"}


def objective(source: str = "sampled", anchor: bool = True) -> str:
    return "objective={denoise: 1.0, " + ("anchor: {weight: 10.0}, " if anchor else "") + "nr_iqa: " + NR_IQA.replace("SOURCE", SOURCES[source]) + "}"


ROWS = {  # one change from the preset each
    "preset": ("LoRA + anchor, sampled x0, ckpt on", [objective()]),
    "lora_no_anchor": ("LoRA, no anchor", [objective(anchor=False)]),
    "full": ("full fine-tuning + anchor", ["model.finetune=full", objective()]),
    "one_step": ("LoRA + anchor, one-step x0", [objective("one_step")]),
    "rollout": ("LoRA + anchor, rollout x0", [objective("rollout")]),
    "no_checkpointing": ("LoRA + anchor, sampled x0, ckpt off", ["train.gradient_checkpointing=false", objective()]),
}
GPUS = {"24 GB": 24e9, "80 GB": 80e9, "141 GB": 141e9}
BATCHES = (1, 4, 8)


def resident() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def measure_row(row: str, resolution: int) -> dict:
    """In this process: set up the row's step as the trainer does, run one step, read the peaks."""
    from common import ObjectiveStep

    from sweeps.presets import load

    config, _ = load("sd15", ["model.rehearsal=true", f"data.resolution={resolution}", "train.batch_size=1", "data.workers=0",
                              *ROWS[row][1]])
    step = ObjectiveStep(config, torch.device("cpu"))
    # a full fine-tuning's frozen base is a second UNet; SDXL has a second text encoder
    modules = [step.model, step.frozen, step.base.vae, step.base.text_encoder, step.base.text_encoder_2]
    modules += [value for _, term in step.objective.terms.values() for value in vars(term).values() if isinstance(value, torch.nn.Module)]
    parameters = {id(p): p for module in filter(None, modules) for p in module.parameters()}  # LoRA's base is the UNet's own
    parameters.update({id(p): p for p in step.objective.trainable_parameters()})
    trainable = sum(p.numel() for p in parameters.values() if p.requires_grad)
    for p in parameters.values():  # weights loaded from safetensors may be mapped, not yet read: read them before measuring
        p.detach().sum()
    before, _ = resident()
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to now
    backward_peak, update = [], step.optimizer.step
    # the activations peak in forward and backward and are freed before AdamW's state is allocated: read the
    # high-water mark when the update begins (forward + backward: activations and gradients), and after it
    step.optimizer.step = lambda *a, **k: (backward_peak.append(resident()[1]), update(*a, **k))[1]
    seconds = step.run()
    _, peak = resident()
    grads, adam = 4 * trainable, 8 * trainable
    return {"row": row, "setting": ROWS[row][0], "resolution": resolution, "s_per_step": seconds,
            "parameters": sum(p.numel() for p in parameters.values()), "trainable": trainable,
            "parameter_bytes": sum(p.numel() * p.element_size() for p in parameters.values()),
            "frozen_parameters": sum(p.numel() for p in parameters.values() if not p.requires_grad),
            "gradient_bytes": grads, "optimizer_bytes": adam, "rss_before_step": before, "rss_peak_step": peak,
            "activation_bytes": max(0, backward_peak[0] - before - grads)}


def project(row: dict) -> dict:
    """Bytes on a GPU in bf16 at each batch: trainable fp32 (+ grads + AdamW), frozen bf16, activations x batch."""
    fixed = 4 * row["trainable"] + row["gradient_bytes"] + row["optimizer_bytes"] + 2 * row["frozen_parameters"]
    return {batch: fixed + batch * row["activation_bytes"] for batch in BATCHES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--row", default="", help=argparse.SUPPRESS)  # a child: measure one row, print its JSON
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.row:
        print("ROW " + json.dumps(measure_row(args.row, args.resolution)), flush=True)
        return 0
    results = []
    for row in args.rows.split(","):
        if row not in ROWS:
            raise SystemExit(f"--rows: unknown row {row!r} (known: {', '.join(ROWS)})")
        done = subprocess.run([sys.executable, __file__, "--row", row, "--resolution", str(args.resolution)], capture_output=True, text=True)
        lines = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or not lines:
            killed = done.returncode in (-9, 137)
            results.append({"row": row, "setting": ROWS[row][0], "error": "out of memory (killed)" if killed else done.stderr.strip()[-300:]})
        else:
            results.append(json.loads(lines[0]))
    gib = 2**30
    print(f"SD 1.5 architecture (random weights), {args.resolution} px, batch 1, bf16 autocast on the CPU; GiB")
    print(f"  {'setting':38s} {'params':>7s} {'grads':>7s} {'AdamW':>7s} {'activ.':>7s} {'peak RSS':>9s} {'s/step':>7s}   "
          + "  ".join(f"{gpu}: {'/'.join(f'b{b}' for b in BATCHES)}" for gpu in GPUS))
    for row in results:
        if "error" in row:
            print(f"  {row['setting']:38s} {row['error']}")
            continue
        projected = project(row)
        fits = "  ".join(f"{gpu:>6s}: {'/'.join('y' if projected[b] <= size else 'n' for b in BATCHES):>8s}" for gpu, size in GPUS.items())
        print(f"  {row['setting']:38s} {row['parameter_bytes'] / gib:7.2f} {row['gradient_bytes'] / gib:7.2f} {row['optimizer_bytes'] / gib:7.2f} "
              f"{row['activation_bytes'] / gib:7.2f} {row['rss_peak_step'] / gib:9.2f} {row['s_per_step']:7.1f}   {fits}")
    by_row = {row["row"]: row for row in results if "error" not in row}
    if {"preset", "lora_no_anchor"} <= set(by_row):
        added = by_row["preset"]["parameter_bytes"] - by_row["lora_no_anchor"]["parameter_bytes"]
        print(f"anchor_parameter_gib: {added / gib:.3f} (LoRA + anchor vs LoRA alone: the anchor is the same UNet, adapters disabled)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
