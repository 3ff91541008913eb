"""Sampling from a pixel-space diffusion model with a diffusers scheduler, batched and seeded.

Returns images `[N, C, H, W]` in [0, 1]. The sampler family is taken from the model's own noise
schedule (`from_config`), so a model trained with a cosine schedule is sampled with it.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from trainers.common.seeds import derive_seed

SAMPLERS = {"ddim": DDIMScheduler, "dpm_solver": DPMSolverMultistepScheduler}


def make_sampler(scheduler_config, sampler: str = "ddim"):
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    return SAMPLERS[sampler].from_config(scheduler_config)


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
    scheduler = make_sampler(scheduler_config, sampler)
    config = unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
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
                uncond, cond = unet(torch.cat([model_input] * 2), t.to(device).expand(2 * n), **conditioning).sample.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            else:
                eps = unet(model_input, t.to(device).expand(n), **conditioning).sample
            x = scheduler.step(eps, t, x).prev_sample
        if vae is not None:
            x = vae.decode(x / vae.config.scaling_factor).sample
        out.append(((x.float().clamp(-1, 1) + 1) / 2).cpu())
    unet.train(was_training)
    return torch.cat(out) if out else torch.empty(0, config.in_channels, size, size)
