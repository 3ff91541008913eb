"""One fine-tuning run on one worker, read top to bottom: set up, then train, evaluate, checkpoint.
Never imports ray: `trainers/ray_train.py` runs this same function on every Ray Train worker.

`train(config, report, rank, world_size, resume_from)` reports through the
`report(metrics: dict, checkpoint: Path | None)` callback it is given: the command line prints, the
Ray wrapper forwards to `ray.train.report`. Every report carries `step`, `fid`, `heldout_quality`,
the per-term losses averaged since the previous report, rank 0's clocks (`time/train_s`,
`time/eval_s`; the first also `time/setup_s`: what bench/sweep_overhead.py sums) and its memory
high-water mark (`memory/*`); every rank reports the same number of times (Ray's report is a
barrier), only rank 0 evaluates and writes checkpoints.

With several workers the process group is already up (Ray Train's TorchConfig: gloo on CPU, nccl on
GPU). Gradients are averaged by an explicit all-reduce after backward rather than by
DistributedDataParallel: feedback terms run extra forwards per backward (a one-step x0 at another t,
a sampled x0, the discriminator's own step), which DDP's reducer does not allow.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from eval.evaluate import Evaluator
from eval.intervals import per_sample_tensors
from objectives.context import StepContext
from objectives.registry import Objective, build_objective
from objectives.term import BuildEnv
from trainers.checkpoint import checkpoint_name, read_checkpoint, write_checkpoint
from trainers.common import storage
from trainers.common.errors import ConfigError, OptionError
from trainers.common.seeds import derive_seed
from trainers.config import Config
from trainers.data import PromptCache, batch_loader, cached_latents, latent_moments, sample_latents
from trainers.ema import Ema
from trainers.image_sets import WithMasks, captioned_images, captions, data_masks, training_set
from trainers.lora import AdaptersDisabled, add_lora
from trainers.models import DiffusionModel, load_base_model


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


def optimizer_step(optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], grad_clip: float = 0.0,
                   world_size: int = 1) -> None:
    """After backward: average gradients across workers, clip their global norm (0: no clipping),
    step, and clear them for the next accumulation."""
    average_gradients(parameters, world_size)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def setup_models(config: Config, base: DiffusionModel, objective: Objective):
    """The trainable model, starting as an exact copy of the frozen base, and the frozen base the
    terms see (None when no term reads it). With LoRA the copy carries the adapters and the base is
    the same network with adapters disabled: one set of base weights in memory."""
    base.denoiser.requires_grad_(False).eval()
    if config.model.finetune == "lora":
        model = add_lora(base.denoiser, config.model.lora_rank, config.model.lora_alpha or None, config.model.lora_targets)
        frozen = AdaptersDisabled(model)
    else:
        model = copy.deepcopy(base.denoiser).requires_grad_(True)
        frozen = base.denoiser if objective.needs_base else None
    model.train()
    if config.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
        if base.vae is not None:  # feedback terms decode x0 with gradient: at 512 px the decoder's activations outweigh the UNet's
            base.vae.enable_gradient_checkpointing()
    return model, frozen


def train(config: Config, report=print_report, rank: int = 0, world_size: int = 1, resume_from: str | Path | None = None) -> dict:
    """Fine-tune `config.model.base` with `config.objective`; returns the last metrics and checkpoint."""
    settings, data = config.train, config.data
    started = time.perf_counter()

    # Device, and the seed of model construction: LoRA init and term heads are the same on every
    # rank, so all ranks start identical without a broadcast (data and noise are seeded per rank).
    use_cuda = settings.use_gpu and torch.cuda.is_available()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if use_cuda else "cpu")
    torch.manual_seed(settings.seed)

    # The base model, the objective, the trainable model and the frozen base.
    base = load_base_model(config.model.base, device, config.model.weights_dtype)
    check_against_model(config, base)
    if base.channels != data.channels or base.resolution != data.resolution:
        raise ConfigError(f"data: base model takes {base.channels}x{base.resolution}x{base.resolution} images, "
                          f"data.channels/resolution say {data.channels}x{data.resolution}")
    objective = build_objective(config.objective, objective_env(config, base, device))
    model, frozen = setup_models(config, base, objective)

    # Optimizer (the model's trainable weights and the terms' own modules), EMA, evaluator.
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    parameters = list(trainable.values()) + objective.trainable_parameters()
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    ema = Ema(trainable, settings.ema_decay) if settings.ema_decay > 0 else None
    evaluator = Evaluator.from_config(config, device) if rank == 0 else None

    # Resume: the same step, weights, optimizer, EMA and term state as when the checkpoint was taken.
    start = 0
    if resume_from is not None:
        start = read_checkpoint(resume_from, model=model, optimizer=optimizer, ema=ema, objective=objective, device=device)
    out = Path(settings.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        storage.write_text(out / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")

    # Data: micro-batches from the resumed one on, as latent moments when the VAE's encodings are
    # cached, conditioning from the caption cache for text models.
    accumulation = settings.gradient_accumulation
    dataset = training_set(data)
    if base.latent and data.cache_latents:
        dataset = cached_latents(dataset, base.vae, device, data.cache_dir or None, workers=data.workers)
    if objective.needs_masks:  # PeFL's structure loss against the data set's label images
        dataset = WithMasks(dataset, data_masks(data))
    batches = iter(batch_loader(dataset, settings.batch_size, settings.seed, rank, world_size, start=start * accumulation,
                                stop=settings.steps * accumulation, workers=data.workers, prefetch=data.prefetch, pin_memory=use_cuda))
    encode_prompt = PromptCache(base.encode_prompt) if base.text_conditioned and data.cache_captions else base.encode_prompt
    if settings.compile:
        model.compile()  # in place: parameter names and checkpoints stay those of the plain UNet

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings.bf16_autocast(device.type))
    rollout_model = objective.wrap_for_rollouts(model, base.scheduler.config)  # Cas-DM: rollouts through its cascade
    logged, metrics, checkpoint = {}, {}, None
    times = {"time/setup_s": time.perf_counter() - started}  # the first report carries the set-up time
    clock = time.perf_counter()
    for step in range(start + 1, settings.steps + 1):
        # Accumulate gradients over micro-batches.
        step_values = []
        for micro in range(accumulation):
            index = (step - 1) * accumulation + micro
            # One seed per (seed, micro-batch, rank): a generator for noise, t and the terms' own draws,
            # and the global RNG too (dropout in a trainable discriminator), so that evaluation
            # drawing in between never shifts what the next step sees and a resume is exact.
            step_seed = derive_seed(settings.seed, "step", index, rank)
            generator = torch.Generator().manual_seed(step_seed)
            torch.manual_seed(step_seed)
            images, labels, *masks = next(batches)
            images = images.to(device, non_blocking=True)
            masks = masks[0].to(device, non_blocking=True) if masks else None
            prompts = captions(data.caption, labels, len(images)) if base.text_conditioned else None
            conditioning = encode_prompt(prompts) if prompts else {}
            if base.latent:  # a latent drawn from the posterior with this step's generator, cached or not
                moments = images if data.cache_latents else latent_moments(base.vae, images)
                x0 = sample_latents(moments, base.vae.config, generator)
            else:
                x0 = images
            noise = torch.randn(x0.shape, generator=generator).to(device)
            t = base.process.draw_timesteps(len(x0), generator, settings.timestep_density).to(device)
            ctx = StepContext(model=model, process=base.process, x0=x0, noise=noise, t=t, conditioning=conditioning, prompts=prompts,
                              base=frozen, vae=base.vae, encode_prompt=base.encode_prompt, generator=generator,
                              rollout_model=rollout_model, masks=masks)
            with autocast:
                loss, parts = objective(ctx, step)
            (loss / accumulation).backward()  # the one place accumulation is normalized
            # Terms' own modules (the discriminator) learn from every micro-batch too, on its x0, detached.
            own_loss, own_parts = objective.own_losses(ctx, step)
            if own_loss is not None:
                (own_loss / accumulation).backward()
            step_values.append({"loss": loss.detach(), **parts, **own_parts})

        # One host sync per step, before the update: NaN training is never silent, and never reaches the weights.
        if not bool(torch.isfinite(torch.stack([v.float() for values in step_values for v in values.values()])).all()):
            bad = sorted({name for values in step_values for name, v in values.items() if name != "loss" and not torch.isfinite(v)})
            raise FloatingPointError(f"non-finite loss at step {step} (term: {', '.join(bad) or 'total'})")
        for values in step_values:  # summed on the device; read back only when reported
            for name, value in values.items():
                total, count = logged.get(name, (0.0, 0))
                logged[name] = (total + value.float(), count + 1)

        # Update the model, then the terms' own optimizers (the discriminator), then the EMA.
        optimizer_step(optimizer, parameters, settings.grad_clip, world_size)
        objective.own_step(sync=lambda params: average_gradients(params, world_size), step=step)
        if ema is not None:
            ema.update(trainable)

        # Evaluate, checkpoint (rank 0) and report (every rank), with where the time went since the last report.
        if step == settings.steps or (settings.eval_every and step % settings.eval_every == 0):
            if use_cuda:
                torch.cuda.synchronize(device)
            times["time/train_s"] = time.perf_counter() - clock
            times.update(peak_memory(device))  # before evaluation: what training (and set-up) took
            metrics = {"step": step, "resumed_from": start,  # 0 unless this process restarted from a checkpoint
                       **{f"loss/{k}" if k != "loss" else k: float(total) / count for k, (total, count) in logged.items()}}
            logged, checkpoint = {}, None
            if rank == 0:
                clock = time.perf_counter()
                evaluation = evaluator.evaluate(eval_model(model, base, ema, objective))
                times["time/eval_s"] = time.perf_counter() - clock
                metrics.update(evaluation.metrics, **times)
                checkpoint = write_checkpoint(out / "checkpoints" / checkpoint_name(step), step=step, model=model, base=base,
                                              config=config, optimizer=optimizer, ema=ema, objective=objective, world_size=world_size,
                                              metrics=metrics, samples=evaluation.samples,
                                              per_sample=per_sample_tensors(evaluation.per_sample))
            report(metrics, checkpoint)
            times, clock = {}, time.perf_counter()
    return {"metrics": metrics, "checkpoint": str(checkpoint) if checkpoint else None, "model": model}


def peak_memory(device: torch.device) -> dict:
    """The high-water mark so far, in GiB: on CUDA what torch allocated (`memory/cuda_peak_gib`), on the
    CPU the process's resident set (`memory/rss_peak_gib`: every model, the data, Python itself)."""
    if device.type == "cuda":
        return {"memory/cuda_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"memory/rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # Linux: kB


def check_against_model(config: Config, base: DiffusionModel) -> None:
    """What only the loaded model can tell of the config: the timestep density fits its kind, the sampler samples it."""
    try:
        base.process.check_density(config.train.timestep_density)
    except OptionError as error:
        raise ConfigError(f"train.{error}") from None
    if config.eval.sampler is not None:
        base.process.check_sampler(config.eval.sampler, "eval.sampler")


def objective_env(config: Config, base: DiffusionModel, device) -> BuildEnv:
    """What the objective's terms are built against: the base model's shapes and scheduler, the data."""
    return BuildEnv(device=str(device), model_channels=base.model_channels, image_channels=base.channels, process=base.process,
                    text_conditioned=base.text_conditioned,
                    reference=lambda: captioned_images(config.data, base.text_conditioned), resolution=base.resolution,
                    cache_dir=config.eval.cache_dir or None)


def eval_model(model: torch.nn.Module, base: DiffusionModel, ema: Ema | None, objective: Objective) -> DiffusionModel:
    """What evaluation samples from: the trained weights, or their EMA (in a copy, training goes on),
    with every module a term adds to the model (the Cas-DM head)."""
    denoiser = ema.copy_to(copy.deepcopy(model)) if ema is not None else model
    denoiser = objective.wrap_for_sampling(denoiser, base.scheduler.config)
    return dataclasses.replace(base, denoiser=denoiser)
