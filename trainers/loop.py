"""One fine-tuning run on one worker, read top to bottom: load, train, evaluate, checkpoint. Never
imports ray: `trainers/ray_train.py` runs this same function on every Ray Train worker.

`train(config, report, rank, world_size, resume_from)` reports through the
`report(metrics: dict, checkpoint: Path | None)` callback it is given: the command line prints, the
Ray wrapper forwards to `ray.train.report`. Every report carries `step`, `fid`, `aesthetic` and the
per-term losses averaged since the previous report; every rank reports the same number of times
(Ray's report is a barrier), only rank 0 evaluates and writes checkpoints.

With several workers the process group is already up (Ray Train's TorchConfig: gloo on CPU, nccl on
GPU). Gradients are averaged by an explicit all-reduce after backward rather than by
DistributedDataParallel: feedback terms run extra forwards per backward (a one-step x0 at another t,
a sampled x0, the discriminator's own step), which DDP's reducer does not allow.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

from eval.evaluate import Evaluator
from eval.quality import load_clip_score, load_quality_model
from objectives.context import StepContext
from objectives.registry import build_objective
from objectives.term import BuildEnv
from trainers.checkpoint import read_checkpoint, write_checkpoint
from trainers.config import Config, ConfigError
from trainers.data import DigitsDataset, HFImageDataset, ImageFolderDataset, images_only
from trainers.ema import Ema
from trainers.lora import AdaptersDisabled, add_lora
from trainers.models import BaseModel, load_base_model


def build_dataset(data):
    if data.source == "digits":
        return DigitsDataset(data.split)
    if data.source == "folder":
        return ImageFolderDataset(data.path, data.resolution, data.channels)
    return HFImageDataset(data.path, data.resolution, data.channels, data.split, data.image_column, data.caption_column)


def build_evaluator(settings, data, device="cpu") -> Evaluator:
    if settings.reference.startswith("digits:"):
        reference = images_only(DigitsDataset(settings.reference.split(":", 1)[1]))
    elif settings.reference.startswith("hf:"):  # hf:NAME[:SPLIT], e.g. hf:cifar10:train
        name, _, split = settings.reference[3:].partition(":")
        reference = images_only(HFImageDataset(name, data.resolution, data.channels, split or "train", data.image_column))
    else:
        reference = images_only(ImageFolderDataset(settings.reference, data.resolution, data.channels))
    return Evaluator(
        reference=(reference + 1) / 2,
        feature_extractor=settings.feature_extractor,
        feature_extractor_weights=settings.feature_extractor_weights or None,
        quality=load_quality_model(settings.quality, device),
        aesthetic=load_quality_model(settings.aesthetic, device),
        samples=settings.samples,
        sampling_steps=tuple(settings.sampling_steps),
        sampler=settings.sampler,
        device=device,
        prompts=tuple(settings.prompts),
        guidance_scale=settings.guidance_scale,
        clip_score=load_clip_score(settings.clip_score, device) if settings.clip_score else None,
        extra_quality={name: load_quality_model(spec, device) for name, spec in settings.extra_quality.items()},
        cache_dir=settings.cache_dir or None,
    )


def evaluate_base(config: Config, device="cpu") -> dict[str, float]:
    """The base model's metrics: the reference point a run or a sweep is compared with."""
    base = load_base_model(config.model.base, device)
    evaluator = build_evaluator(config.eval, config.data, device)
    if base.text_conditioned and not evaluator.prompts:
        evaluator.prompts = tuple(captions(config.data.caption, list(range(10)), 10))
    return evaluate_model(evaluator, base)


def evaluate_model(evaluator: Evaluator, model: BaseModel) -> dict[str, float]:
    return evaluator(model.unet, model.scheduler.config, vae=model.vae,
                     encode_prompt=model.encode_prompt if model.text_conditioned else None)


class ShardedBatches:
    """Batch `index` of rank `rank`, a pure function of (seed, index): each epoch is one seeded
    permutation of the dataset, dealt round-robin to ranks, so a resumed run sees exactly the
    batches the uninterrupted run would have, and no two ranks see the same image in an epoch."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size, self.seed, self.rank, self.world_size = dataset, batch_size, seed, rank, world_size
        self.per_epoch = (len(dataset) // world_size) // batch_size
        if self.per_epoch < 1:
            raise ConfigError(f"train.batch_size: {batch_size} x {world_size} workers is more than the {len(dataset)} training images")
        self._epoch, self._order = None, None

    def __call__(self, index: int):
        epoch, i = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            self._epoch, self._order = epoch, order[self.rank::self.world_size]
        items = [self.dataset[int(j)] for j in self._order[i * self.batch_size:(i + 1) * self.batch_size]]
        if isinstance(items[0], (list, tuple)):
            return torch.stack([item[0] for item in items]), [item[1] for item in items]  # digit labels or captions
        return torch.stack(items), None


def print_report(metrics: dict, checkpoint: Path | None = None) -> None:
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    print(f"[train] {shown}" + (f" -> {checkpoint}" if checkpoint else ""), flush=True)


def average_gradients(parameters: list[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce gradients as one flat buffer (one collective per step, a sync point)."""
    if world_size == 1:
        return
    grads = []
    for p in parameters:
        if p.grad is None:  # a term that did not touch p on this rank still joins the reduction
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= world_size
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def train(config: Config, report=print_report, rank: int = 0, world_size: int = 1, resume_from: str | Path | None = None) -> dict:
    """Fine-tune `config.model.base` with `config.objective`; returns the last metrics and checkpoint."""
    settings = config.train
    use_cuda = settings.use_gpu and torch.cuda.is_available()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if use_cuda else "cpu")
    # Model construction (LoRA init, term heads) is seeded the same on every rank, so all ranks start
    # identical without a broadcast; data order and noise are seeded per rank below.
    torch.manual_seed(settings.seed)
    base = load_base_model(config.model.base, device)
    if base.channels != config.data.channels or base.resolution != config.data.resolution:
        raise ConfigError(f"data: base model takes {base.channels}x{base.resolution}x{base.resolution} images, "
                          f"data.channels/resolution say {config.data.channels}x{config.data.resolution}")
    env = BuildEnv(device=str(device), model_channels=base.model_channels, image_channels=base.channels,
                   num_train_timesteps=base.scheduler.config.num_train_timesteps, text_conditioned=base.text_conditioned)
    objective = build_objective(config.objective, env)

    # The trainable model starts as an exact copy of the frozen base. With LoRA the copy carries the
    # adapters and the base is the same network with adapters disabled: one set of base weights.
    base.unet.requires_grad_(False).eval()
    if config.model.finetune == "lora":
        model = add_lora(base.unet, config.model.lora_rank, config.model.lora_alpha or None, config.model.lora_targets)
        frozen = AdaptersDisabled(model)
    else:
        model = copy.deepcopy(base.unet).requires_grad_(True)
        frozen = base.unet if objective.needs_base else None
    model.train()
    if settings.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    parameters = list(trainable.values()) + objective.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    ema = Ema(trainable, settings.ema_decay) if settings.ema_decay > 0 else None
    evaluator = build_evaluator(config.eval, config.data, device) if rank == 0 else None
    if evaluator is not None and base.text_conditioned and not evaluator.prompts:
        evaluator.prompts = tuple(captions(config.data.caption, list(range(10)), 10))  # one per digit
    batches = ShardedBatches(build_dataset(config.data), settings.batch_size, settings.seed, rank, world_size)

    start = 0
    if resume_from is not None:
        start = read_checkpoint(resume_from, model=model, optimizer=optimizer, ema=ema, objective=objective, device=device)
    out = Path(settings.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

    # bf16 autocast on CUDA only: CPU autocast is slower than fp32 for these convolutions.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_cuda and settings.mixed_precision == "bf16")
    num_timesteps = base.scheduler.config.num_train_timesteps
    accumulation = settings.gradient_accumulation
    logged, metrics, checkpoint = {}, {}, None
    for step in range(start + 1, settings.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accumulation):
            index = (step - 1) * accumulation + micro
            # One seed per (seed, rank, micro-batch): a generator for noise, t and the terms' own draws,
            # and the global RNG too (dropout in a trainable discriminator), so that evaluation
            # drawing in between never shifts what the next step sees and a resume is exact.
            step_seed = (settings.seed * 1_000_003 + index) * 4096 + rank
            generator = torch.Generator().manual_seed(step_seed)
            torch.manual_seed(step_seed)
            pixels, labels = batches(index)
            conditioning = base.encode_prompt(captions(config.data.caption, labels, len(pixels))) if base.text_conditioned else {}
            x0 = base.encode_images(pixels.to(device))
            noise = torch.randn(x0.shape, generator=generator).to(device)
            t = torch.randint(0, num_timesteps, (len(x0),), generator=generator).to(device)
            ctx = StepContext(model=model, scheduler=base.scheduler, x0=x0, noise=noise, t=t, conditioning=conditioning,
                              base=frozen, vae=base.vae, encode_prompt=base.encode_prompt, generator=generator)
            with autocast:
                loss, parts = objective(ctx)
            if not math.isfinite(loss.item()):  # a sync point, worth it: NaN training is never silent
                bad = [name for name, value in parts.items() if not torch.isfinite(value)]
                raise FloatingPointError(f"non-finite loss at step {step} (term: {', '.join(bad) or 'total'})")
            (loss / accumulation).backward()  # the one place accumulation is normalized
            for name, value in {"loss": loss.detach(), **parts}.items():
                logged.setdefault(name, []).append(value.float().item())
        average_gradients(parameters, world_size)
        if settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
        optimizer.step()
        for name, value in objective.update(ctx, sync=lambda params: average_gradients(params, world_size)).items():
            logged.setdefault(name, []).append(value.float().item())
        if ema is not None:
            ema.update(trainable)

        if step == settings.steps or (settings.eval_every and step % settings.eval_every == 0):
            metrics = {"step": step, "resumed_from": start,  # 0 unless this process restarted from a checkpoint
                       **{f"loss/{k}" if k != "loss" else k: sum(v) / len(v) for k, v in logged.items()}}
            logged, checkpoint = {}, None
            if rank == 0:
                metrics.update(evaluate_model(evaluator, eval_model(model, base, ema)))
                checkpoint = write_checkpoint(out / "checkpoints" / f"step_{step:06d}", step=step, model=model, base=base,
                                              config=config, optimizer=optimizer, ema=ema, objective=objective, world_size=world_size,
                                              metrics=metrics, samples=evaluator.last_samples)
            report(metrics, checkpoint)
    return {"metrics": metrics, "checkpoint": str(checkpoint) if checkpoint else None, "model": model}


def eval_model(model: torch.nn.Module, base: BaseModel, ema: Ema | None) -> BaseModel:
    """What evaluation samples from: the trained weights, or their EMA (in a copy, training goes on)."""
    unet = ema.copy_to(copy.deepcopy(model)) if ema is not None else model
    return BaseModel(unet=unet, scheduler=base.scheduler, vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer)


def captions(template: str, labels: list[int] | None, n: int) -> list[str]:
    """Captions for text-conditioned training: the template, with `{label}` filled where the data has
    labels (a digit) or captions of its own (`data.caption_column`, with the template "{label}")."""
    if labels is None:
        return [template.replace("{label}", "").strip()] * n
    return [template.format(label=label) for label in labels]
