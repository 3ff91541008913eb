"""Sampling from a diffusion model with a diffusers scheduler, batched and seeded.

Returns images `[N, C, H, W]` in [0, 1]. The sampler family is taken from the model's own noise
schedule (`from_config`), so a model trained with a cosine schedule is sampled with it, and a flow
model (`FlowMatchEulerDiscreteScheduler` config) with a flow sampler.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from trainers.common.seeds import derive_seed

SAMPLERS = ("ddim", "dpm_solver", "euler")


def is_flow_config(scheduler_config) -> bool:
    """A flow-matching model's scheduler config: one of diffusers' FlowMatch schedulers, by its class name
    when the config was read from a file, else by what only they have: a `shift` and no `prediction_type`
    (DPM-Solver's and UniPC's configs carry `use_dynamic_shifting` and `flow_shift` too, beside a
    `prediction_type`: an SD 1.5 that ships one of them is a DDPM-family model)."""
    name = scheduler_config.get("_class_name")
    if name:
        return str(name).startswith("FlowMatch")
    return "shift" in scheduler_config and "use_dynamic_shifting" in scheduler_config and "prediction_type" not in scheduler_config


class FlowMatchEuler(FlowMatchEulerDiscreteScheduler):
    """diffusers' flow Euler sampler with the two members every other diffusers sampler has (a flow
    sampler starts from unit noise and takes its input unscaled), and, for a model that shifts by
    resolution (Flux: `use_dynamic_shifting`), FluxPipeline's step grid and shift (`dynamic_shift`)."""

    init_noise_sigma = 1.0
    mu = None  # the dynamic shift's exponent (`dynamic_shift`), set by make_sampler

    def scale_model_input(self, sample, timestep=None):
        return sample

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        if self.mu is not None and sigmas is None and timesteps is None:  # FluxPipeline's grid: linspace(1, 1/N, N), then shifted
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=self.mu if mu is None else mu, timesteps=timesteps)


def dynamic_shift(scheduler_config, latent_size: int | None) -> float | None:
    """The exponent mu of the resolution-dependent shift (`use_dynamic_shifting`: Flux), from the number of
    2x2 latent patches as FluxPipeline computes it (1024 px when the size is not known); None without one."""
    if not scheduler_config.get("use_dynamic_shifting", False):
        return None
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(((latent_size or 128) // 2) ** 2, scheduler_config["base_image_seq_len"], scheduler_config["max_image_seq_len"],
                           scheduler_config["base_shift"], scheduler_config["max_shift"])


def make_sampler(scheduler_config, sampler: str = "ddim", latent_size: int | None = None):
    """A fresh sampler for a model's scheduler config. For a flow model, `ddim` and `euler` are the
    flow Euler sampler (deterministic first order on the model's ODE: what DDIM is for a DDPM model)
    and `dpm_solver` is DPM-Solver++ on flow sigmas with the config's shift; `latent_size` (the side
    of x0) sets the dynamic shift of models that shift by resolution (Flux)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    if is_flow_config(scheduler_config):
        mu = dynamic_shift(scheduler_config, latent_size)
        if sampler == "dpm_solver":  # its flow shift is the static one, or exp(mu) as its set_timesteps(mu=...) would make it
            return DPMSolverMultistepScheduler(num_train_timesteps=scheduler_config["num_train_timesteps"], use_flow_sigmas=True,
                                               prediction_type="flow_prediction",
                                               flow_shift=math.exp(mu) if mu is not None else scheduler_config.get("shift", 1.0))
        scheduler = FlowMatchEuler.from_config(scheduler_config)
        scheduler.mu = mu
        return scheduler
    return {"ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}[sampler].from_config(scheduler_config)


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> pixels in [-1, 1] (about): undo the scale, and the shift that SD3's and
    Flux's VAEs add (`shift_factor`), as their pipelines do."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample


@torch.no_grad()
def sample_images(
    unet: torch.nn.Module,
    scheduler_config,
    num_images: int,
    steps: int = 50,
    sampler: str = "ddim",
    seed: int = 0,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    vae: torch.nn.Module | None = None,
    encode_prompt=None,
    prompts: list[str] | None = None,
    rank: int = 0,
    world_size: int = 1,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Generate `num_images` images in [0, 1] with `steps` sampler steps (eta = 0 for DDIM).

    The noise of image i depends only on (seed, i // batch_size) (`derive_seed`): two calls with the same seed give
    the same images, which is what makes evaluations of two checkpoints comparable. Latent models
    pass their `vae` (latents are decoded at the end); text models pass `encode_prompt` and
    `prompts`, cycled over the images. With `world_size` > 1 each rank makes every world_size-th
    batch of the same sequence, so the ranks' outputs together are exactly the one-process images.
    `guidance_scale` > 1 (text models) is classifier-free guidance against the empty prompt, which
    is how Stable Diffusion is meant to be sampled; 1 is the plain conditional model.
    """
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    config = unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    scheduler = make_sampler(scheduler_config, sampler, latent_size=size)
    dtype = getattr(unet, "dtype", torch.float32)  # bf16 weights (model.weights_dtype) take bf16 inputs; the sampler stays fp32
    was_training = unet.training
    unet.eval()
    out = []
    for start in list(range(0, num_images, batch_size))[rank::world_size]:
        n = min(batch_size, num_images - start)
        generator = torch.Generator().manual_seed(derive_seed(seed, "sampling", start // batch_size))
        x = torch.randn(n, config.in_channels, size, size, generator=generator).to(device)
        conditioning, guided = {}, False
        if encode_prompt is not None and prompts:
            batch_prompts = [prompts[(start + i) % len(prompts)] for i in range(n)]
            guided = guidance_scale != 1.0
            # With guidance, one UNet call on [unconditional; conditional] per step.
            conditioning = encode_prompt([""] * n + batch_prompts if guided else batch_prompts)
        scheduler.set_timesteps(steps)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            if guided:
                uncond, cond = unet(torch.cat([model_input] * 2).to(dtype), t.to(device).expand(2 * n), **conditioning).sample.float().chunk(2)
                output = uncond + guidance_scale * (cond - uncond)
            else:
                output = unet(model_input.to(dtype), t.to(device).expand(n), **conditioning).sample.float()
            x = scheduler.step(output, t, x).prev_sample
        if vae is not None:
            x = decode_latents(vae, x)
        out.append(((x.float().clamp(-1, 1) + 1) / 2).cpu())
    unet.train(was_training)
    return torch.cat(out) if out else torch.empty(0, config.in_channels, size, size)
