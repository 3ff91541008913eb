"""What the bench scripts share: the device and its clock, peak memory, a run of our trainer timed by
its own clocks, one objective step outside the trainer (to count forwards and FLOPs), and the bare
diffusers training loop our trainer is measured against.

Every timing runs warm-up steps first and reads the clock after the device has finished
(`torch.cuda.synchronize`); figures are medians where a script repeats.
"""

from __future__ import annotations

import copy
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 peak of the accelerators we expect, TFLOP/s (vendor data sheets), for MFU.
BF16_PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0,
                    "L40S": 362.0, "A10G": 70.0, "4090": 165.2}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    return torch.device(name)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"cpu, {torch.get_num_threads()} threads (torch {torch.__version__})"


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak memory allocated by torch since the last reset (CUDA only: CPU allocations are not tracked)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


def our_steps(preset: str, overrides: list[str], steps: int, warmup: int, work: Path, device: torch.device) -> dict:
    """Our trainer (`trainers.loop.train`) for `warmup + steps` steps; the figures are of the last
    `steps`, from the trainer's own clock (`time/train_s` excludes evaluation). Evaluation is shrunk
    to a token, and peak memory is reset at every report, the warm-up's included."""
    from sweeps.presets import load
    from trainers.loop import train

    config, _ = load(preset, [*overrides, f"train.steps={warmup + steps}", f"train.eval_every={warmup}", "eval.samples=3",
                              "eval.sampling_steps=[1]", f"train.output_dir={work}", f"train.use_gpu={str(device.type == 'cuda').lower()}",
                              "train.ema_decay=0"])
    reports = []

    def report(metrics, checkpoint=None):
        reports.append((metrics, peak_gib(device)))
        reset_peak(device)

    reset_peak(device)
    train(config, report=report)
    timed = reports[1:]  # every `warmup` steps a report (and a token evaluation, off the clock) until the end
    seconds = sum(metrics["time/train_s"] for metrics, _ in timed)
    peak = max(peak for _, peak in timed) if device.type == "cuda" else None
    return {"s_per_step": seconds / steps, "peak_gib": peak, "loss": timed[-1][0]["loss"], "batch": config.train.batch_size}


def bare_loop(base_path: str, dataset, batch_size: int, steps: int, warmup: int, seed: int, device: torch.device, lr: float = 1e-4,
              bf16: bool = True, item_each_step: bool = False, caption: str = "a photo", compile: bool = False) -> dict:
    """A bare training loop as diffusers' examples write it (train_unconditional.py,
    train_text_to_image.py): shuffle, encode, noise, predict, MSE, backward, clip, step; nothing else.
    `item_each_step` reads the loss back every step, as those examples do for their progress bar."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base_path)
    unet = copy.deepcopy(pipe.unet).to(device).train().requires_grad_(True)
    if compile:
        unet.compile()
    vae, text_encoder = getattr(pipe, "vae", None), getattr(pipe, "text_encoder", None)
    for module in filter(None, (vae, text_encoder)):
        module.to(device).requires_grad_(False).eval()
    scheduler = pipe.scheduler
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator,
                                         collate_fn=lambda items: torch.stack([i[0] if isinstance(i, tuple) else i for i in items]))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
    ids = pipe.tokenizer([caption] * batch_size, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(device) if text_encoder is not None else None
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            reset_peak(device)
            started = time.perf_counter()
        pixels = next(batches).to(device)
        with torch.no_grad():
            x0 = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor if vae is not None else pixels
            conditioning = {"encoder_hidden_states": text_encoder(ids)[0]} if text_encoder is not None else {}
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator).to(device)
        with autocast:
            prediction = unet(scheduler.add_noise(x0, noise, t), t, **conditioning).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if item_each_step:
            loss.item()
    sync(device)
    return {"s_per_step": (time.perf_counter() - started) / steps, "peak_gib": peak_gib(device), "batch": batch_size}


class ObjectiveStep:
    """One step of an objective built from a config, outside the trainer: the trainer's own set-up
    (`setup_models`, `objective_env`), a batch of the training set, and `run()` = forward and backward.
    The trainable UNet counts its forward calls in `calls`."""

    def __init__(self, config, device: torch.device):
        from objectives.registry import build_objective
        from trainers.data import collate, latent_moments, sample_latents
        from trainers.image_sets import captions, training_set
        from trainers.loop import objective_env, setup_models
        from trainers.models import load_base_model

        self.device, self.config = device, config
        self.base = base = load_base_model(config.model.base, device, config.model.weights_dtype)
        self.objective = build_objective(config.objective, objective_env(config, base, device))
        self.model, self.frozen = setup_models(config, base, self.objective)
        self.calls = 0
        self.model.register_forward_pre_hook(self._count)
        dataset = training_set(config.data)
        images, labels = collate([dataset[i] for i in range(config.train.batch_size)])
        images = images.to(device)
        self.prompts = captions(config.data.caption, labels, len(images)) if base.text_conditioned else None
        self.conditioning = base.encode_prompt(self.prompts) if self.prompts else {}
        generator = torch.Generator().manual_seed(0)
        self.x0 = sample_latents(latent_moments(base.vae, images), base.vae.config, generator) if base.latent else images
        params = [p for p in self.model.parameters() if p.requires_grad] + self.objective.trainable_parameters()
        self.optimizer = torch.optim.AdamW(params, lr=config.train.learning_rate)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.train.bf16_autocast(device.type))  # as the trainer
        self.seed = 0

    def _count(self, *_):
        self.calls += 1

    def run(self) -> float:
        """One forward and backward of the objective (and the optimizer step); seconds, synced."""
        from objectives.context import StepContext

        self.seed += 1
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.x0.shape, generator=generator).to(self.device)
        t = self.base.process.draw_timesteps(len(self.x0), generator, self.config.train.timestep_density).to(self.device)
        sync(self.device)
        started = time.perf_counter()
        ctx = StepContext(model=self.model, process=self.base.process, x0=self.x0, noise=noise, t=t, conditioning=self.conditioning,
                          prompts=self.prompts, base=self.frozen, vae=self.base.vae, encode_prompt=self.base.encode_prompt,
                          generator=generator)
        with self.autocast:
            loss, _ = self.objective(ctx, 1)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - started

    def flops(self) -> int:
        """FLOPs of one step, as `torch.utils.flop_counter` counts them (matmuls and convolutions)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.run()
        return counter.get_total_flops()


def median(values) -> float:
    values = sorted(values)
    return values[len(values) // 2]
