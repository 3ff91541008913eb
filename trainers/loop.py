"""One fine-tuning run, read top to bottom: load, train, evaluate, save. Never imports ray.

`train(config, report)` reports through the `report(metrics: dict, checkpoint: Path | None)`
callback it is given; the command line prints, a Ray wrapper forwards to `ray.train.report`.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from eval.evaluate import Evaluator
from eval.quality import load_quality_model
from objectives.context import StepContext
from objectives.registry import build_objective
from objectives.term import BuildEnv
from trainers.config import Config, ConfigError
from trainers.lora import AdaptersDisabled, add_lora
from trainers.data import DigitsDataset, HFImageDataset, ImageFolderDataset, images_only
from trainers.models import BaseModel, load_base_model, save_base_model


def build_dataset(data):
    if data.source == "digits":
        return DigitsDataset(data.split)
    if data.source == "folder":
        return ImageFolderDataset(data.path, data.resolution, data.channels)
    return HFImageDataset(data.path, data.resolution, data.channels, data.split, data.image_column)


def build_evaluator(settings, data, device="cpu") -> Evaluator:
    if settings.reference.startswith("digits:"):
        reference = images_only(DigitsDataset(settings.reference.split(":", 1)[1]))
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
    )


def _batches(dataset, batch_size: int, seed: int):
    """Endless shuffled batches of images in [-1, 1]; the order depends on the seed alone."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)
        for batch in loader:
            yield batch[0] if isinstance(batch, (list, tuple)) else batch


def print_report(metrics: dict, checkpoint: Path | None = None) -> None:
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
    print(f"[train] {shown}" + (f" -> {checkpoint}" if checkpoint else ""), flush=True)


def train(config: Config, report=print_report) -> dict:
    """Fine-tune `config.model.base` with `config.objective`; returns the metrics before and after."""
    torch.manual_seed(config.train.seed)
    device = "cpu"
    base = load_base_model(config.model.base, device)
    if base.channels != config.data.channels or base.resolution != config.data.resolution:
        raise ConfigError(f"data: base model takes {base.channels}x{base.resolution}x{base.resolution} images, "
                          f"data.channels/resolution say {config.data.channels}x{config.data.resolution}")
    env = BuildEnv(device=device, model_channels=base.channels, image_channels=base.channels,
                   num_train_timesteps=base.scheduler.config.num_train_timesteps)
    objective = build_objective(config.objective, env)
    evaluator = build_evaluator(config.eval, config.data, device)
    dataset = build_dataset(config.data)

    # The frozen base stays untouched (it is the reference point and the anchor); the trainable
    # model starts as an exact copy. With LoRA the copy carries adapters and the base is the same
    # network with adapters disabled, so only one set of base weights is held.
    base.unet.requires_grad_(False).eval()
    model = copy.deepcopy(base.unet).requires_grad_(True).train()
    frozen = base.unet
    if config.model.finetune == "lora":
        model = add_lora(model)
        frozen = AdaptersDisabled(model)
    parameters = [p for p in model.parameters() if p.requires_grad] + objective.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=config.train.learning_rate, weight_decay=config.train.weight_decay)

    before = evaluator(base.unet, base.scheduler.config)
    report({"step": 0, **before})
    batches = _batches(dataset, config.train.batch_size, config.train.seed)
    generator = torch.Generator().manual_seed(config.train.seed + 1)
    num_timesteps = base.scheduler.config.num_train_timesteps
    for step in range(1, config.train.steps + 1):
        x0 = next(batches).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, num_timesteps, (len(x0),), generator=generator).to(device)
        ctx = StepContext(model=model, scheduler=base.scheduler, x0=x0, noise=noise, t=t, base=frozen, generator=generator)
        loss, parts = objective(ctx)
        if not math.isfinite(loss.item()):
            bad = [name for name, value in parts.items() if not torch.isfinite(value)]
            raise FloatingPointError(f"non-finite loss at step {step} (term: {', '.join(bad) or 'total'})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, config.train.grad_clip)
        optimizer.step()
        parts.update(objective.update(ctx))  # e.g. the adversarial discriminator's own step
        if step % 50 == 0 or step == config.train.steps:
            report({"step": step, "loss": loss.item(), **{f"loss/{k}": v.item() for k, v in parts.items()}})

    model.eval()
    after = evaluator(model, base.scheduler.config)
    out = Path(config.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = save_base_model(BaseModel(unet=model, scheduler=base.scheduler), out / "final")
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    report({"step": config.train.steps, **after}, checkpoint)
    return {"before": before, "after": after, "checkpoint": str(checkpoint)}
