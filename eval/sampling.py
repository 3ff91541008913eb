"""Sampling from a diffusion model, batched and seeded.

Returns images `[N, C, H, W]` in [0, 1]. The sampler is the model's noise process's
(`DiffusionModel.process.sampler`: trainers/denoiser/noise_process.py), built from the model's own noise
schedule, so a model trained with a cosine schedule is sampled with it, and a flow model with a flow sampler.
"""

from __future__ import annotations

import torch

from trainers.common.seeds import derive_seed


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> pixels in [-1, 1] (about): undo the scale, and the shift that SD3's and
    Flux's VAEs add (`shift_factor`), as their pipelines do."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample


@torch.no_grad()
def sample_images(
    model,
    num_images: int,
    steps: int = 50,
    sampler: str | None = None,
    seed: int = 0,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    prompts: list[str] | None = None,
    rank: int = 0,
    world_size: int = 1,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Generate `num_images` images in [0, 1] from `model` (a `trainers.models.DiffusionModel`) with
    `steps` steps of its `sampler` (None: its deterministic one, DDIM or the flow Euler step).

    The noise of image i depends only on (seed, i // batch_size) (`derive_seed`): two calls with the same seed give
    the same images, which is what makes evaluations of two checkpoints comparable. Latent models
    decode through their VAE at the end; text models are conditioned on `prompts`, cycled over the
    images (unconditional models ignore them). With `world_size` > 1 each rank makes every world_size-th
    batch of the same sequence, so the ranks' outputs together are exactly the one-process images.
    `guidance_scale` > 1 (text models) is classifier-free guidance against the empty prompt, which
    is how Stable Diffusion is meant to be sampled; 1 is the plain conditional model.
    """
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    denoiser, vae = model.denoiser, model.vae
    encode_prompt = model.encode_prompt if model.text_conditioned else None
    config = denoiser.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    scheduler = model.process.sampler(sampler, latent_size=size)
    dtype = getattr(denoiser, "dtype", torch.float32)  # bf16 weights (model.weights_dtype) take bf16 inputs; the sampler stays fp32
    was_training = denoiser.training
    denoiser.eval()
    out = []
    for start in list(range(0, num_images, batch_size))[rank::world_size]:
        n = min(batch_size, num_images - start)
        generator = torch.Generator().manual_seed(derive_seed(seed, "sampling", start // batch_size))
        x = torch.randn(n, config.in_channels, size, size, generator=generator).to(device)
        conditioning, guided = {}, False
        if encode_prompt is not None and prompts:
            batch_prompts = [prompts[(start + i) % len(prompts)] for i in range(n)]
            guided = guidance_scale != 1.0
            # With guidance, one denoiser call on [unconditional; conditional] per step.
            conditioning = encode_prompt([""] * n + batch_prompts if guided else batch_prompts)
        scheduler.set_timesteps(steps)
        x = x * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(x, t)
            if guided:
                uncond, cond = denoiser(torch.cat([model_input] * 2).to(dtype), t.to(device).expand(2 * n), **conditioning).sample.float().chunk(2)
                output = uncond + guidance_scale * (cond - uncond)
            else:
                output = denoiser(model_input.to(dtype), t.to(device).expand(n), **conditioning).sample.float()
            x = scheduler.step(output, t, x).prev_sample
        if vae is not None:
            x = decode_latents(vae, x)
        out.append(((x.float().clamp(-1, 1) + 1) / 2).cpu())
    denoiser.train(was_training)
    return torch.cat(out) if out else torch.empty(0, config.in_channels, size, size)
