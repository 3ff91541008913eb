"""A flow-matching transformer (diffusers' `SD3Transformer2DModel`, `FluxTransformer2DModel`) behind
the call every denoiser here answers: `model(x_t, t, **conditioning).sample`, x_t `[N, C, H, W]`
latents and t `[N]` the flow timestep sigma * 1000 (what the flow schedulers' `timesteps` hold).

So the loop, the terms, sampling, LoRA, EMA and checkpoints take a flow model as they take a UNet.
What each family needs is done here, as its diffusers pipeline does it:
- SD3: the transformer takes the latents and sigma * 1000 as they are; `conditioning` carries the
  joint text embeddings and the pooled projections (`encoder_hidden_states`, `pooled_projections`).
- Flux: latents are packed into 2x2 patches (a sequence of `4C` tokens) with their position ids,
  the timestep is passed as sigma (the transformer multiplies by 1000 itself), the text ids are zeros,
  and a guidance-distilled model (`guidance_embeds`, FLUX.1-dev) gets its guidance value embedded
  (`guidance`, 3.5 as FluxPipeline's default) on every call, training included, as the diffusers Flux
  training scripts pass it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


class FlowTransformer(torch.nn.Module):
    def __init__(self, transformer: torch.nn.Module, sample_size: int | None = None, guidance: float = 3.5):
        super().__init__()
        self.transformer = transformer
        self.flux = type(transformer).__name__.startswith("Flux")
        if self.flux:  # its packing helpers, looked up once rather than on every forward
            from diffusers import FluxPipeline

            self._pack, self._unpack, self._image_ids = (FluxPipeline._pack_latents, FluxPipeline._unpack_latents,
                                                         FluxPipeline._prepare_latent_image_ids)
        # the latent side the model samples at: SD3's config holds it; Flux's does not (FluxPipeline's default, 1024 px)
        self.sample_size = sample_size or getattr(transformer.config, "sample_size", None) or 128
        self.guidance = guidance

    @property
    def config(self):
        """What sampling and the trainer read of a denoiser: the latent channels and side."""
        channels = self.transformer.config.in_channels // 4 if self.flux else self.transformer.config.in_channels
        return SimpleNamespace(in_channels=channels, sample_size=self.sample_size)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def mid_block(self) -> torch.nn.Module:
        """The middle joint (text + image) block: where the self-perceptual loss reads features."""
        blocks = self.transformer.transformer_blocks
        return blocks[len(blocks) // 2]

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states=None, pooled_projections=None):
        t = t.to(x_t.device).expand(len(x_t)) if t.dim() == 0 else t
        if not self.flux:
            out = self.transformer(hidden_states=x_t, encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections,
                                   timestep=t, return_dict=False)[0]
            return SimpleNamespace(sample=out)
        n, c, h, w = x_t.shape
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((n,), self.guidance, device=x_t.device, dtype=x_t.dtype)
        out = self.transformer(
            hidden_states=self._pack(x_t, n, c, h, w), encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections, timestep=t.to(x_t.dtype) / 1000, guidance=guidance,
            img_ids=self._image_ids(n, h // 2, w // 2, x_t.device, x_t.dtype),
            txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=x_t.device, dtype=x_t.dtype), return_dict=False)[0]
        return SimpleNamespace(sample=self._unpack(out, h, w, 1))
