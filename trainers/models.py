"""Base diffusion models: the tiny digits UNet, and loading/saving in diffusers layout.

A base model is a diffusers folder (`model_index.json`, `unet/`, `scheduler/`) or a hub id such as
`google/ddpm-cifar10-32`; both go through `DiffusionPipeline.from_pretrained`. Weights are written as
safetensors only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

# The digits base model: ~1.1M parameters, 16x16 grayscale, one attention level at 8x8.
DIGITS_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
)
# squaredcos_cap_v2 (improved DDPM) rather than linear: at 16x16 the linear schedule destroys the
# image too early, wasting most timesteps on pure noise.
DIGITS_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")

diffusers_logging.disable_progress_bar()  # "Loading pipeline components" on stderr would break one-line errors
transformers_logging.disable_progress_bar()  # and the text encoder's "Loading weights"


@dataclass
class DiffusionModel:
    """A denoiser and the noise scheduler it was trained with; for latent text-to-image models
    (Stable Diffusion) also the VAE, the text encoder and its tokenizer."""

    unet: torch.nn.Module
    scheduler: DDPMScheduler
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: object = None
    text_encoder_2: torch.nn.Module | None = None  # SDXL's second (OpenCLIP bigG, with projection)
    tokenizer_2: object = None

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def text_conditioned(self) -> bool:
        return self.text_encoder is not None

    @property
    def channels(self) -> int:
        """Image channels (what the data must have)."""
        return self.vae.config.in_channels if self.latent else self.unet.config.in_channels

    @property
    def model_channels(self) -> int:
        """Channels of x0 in the UNet's space (latent channels for latent models)."""
        return self.unet.config.in_channels

    @property
    def resolution(self) -> int:
        """Image resolution in pixels."""
        size = self.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return size * self.vae_scale_factor if self.latent else size

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.latent else 1

    def encode_prompt(self, prompts: list[str]) -> dict:
        """Prompts -> the UNet's conditioning kwargs; the text encoder is frozen, so no graph."""
        if not self.text_conditioned:
            return {}
        ids = self._ids(self.tokenizer, prompts)
        with torch.no_grad():
            if self.text_encoder_2 is None:
                return {"encoder_hidden_states": self.text_encoder(ids)[0]}
            # SDXL, as its pipeline conditions: both encoders' penultimate layers side by side, the second's
            # pooled projection, and the size conditioning (original size, crop corner, target size)
            first = self.text_encoder(ids, output_hidden_states=True)
            second = self.text_encoder_2(self._ids(self.tokenizer_2, prompts), output_hidden_states=True)
            hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
            size = self.resolution
            time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=hidden.dtype, device=hidden.device).repeat(len(prompts), 1)
            return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": second.text_embeds, "time_ids": time_ids}}

    def _ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.unet.device)


def build_digits_unet(**overrides) -> UNet2DModel:
    """A freshly initialized digits UNet; `overrides` replace entries of `DIGITS_UNET_CONFIG`."""
    return UNet2DModel(**{**DIGITS_UNET_CONFIG, **overrides})


def build_digits_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**DIGITS_SCHEDULER_CONFIG)


def load_base_model(path_or_id: str | Path, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load a diffusion pipeline from a local diffusers folder or a hub id.

    Local folders must exist and hold `model_index.json`; anything else is treated as a hub id, which
    needs network access (offline, `from_pretrained` fails with its own error, re-raised with the id).
    A folder with a `cascade/` subfolder (a Cas-DM model: `objectives/lpips_x0.py`) loads as the UNet
    wrapped with its cascaded x0 head, which then takes part in every sampling step. This is the one
    call that loads an exported champion: `load_base_model(folder)`. (Plain
    `DiffusionPipeline.from_pretrained(folder)` also loads it, without the cascade.)
    """
    source = str(path_or_id)
    local = Path(source)
    looks_local = local.is_absolute() or source.startswith((".", "~")) or local.exists()
    if looks_local:
        if not local.is_dir():
            raise FileNotFoundError(f"base model folder does not exist: {local}")
        if not (local / "model_index.json").is_file():
            raise FileNotFoundError(f"base model folder has no model_index.json (not a diffusers pipeline): {local}")
    try:
        # use_safetensors=None: prefer safetensors, accept .bin only for hub models that ship nothing else
        pipe = DiffusionPipeline.from_pretrained(source, use_safetensors=None)
    except (OSError, ValueError) as error:
        # offline, or neither a folder nor a hub id: diffusers' message is long; keep its first line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(f"could not load base model {source!r}: {first}") from None
    if not hasattr(pipe, "unet") or not hasattr(pipe, "scheduler"):
        raise ValueError(f"base model {source!r} has no unet/scheduler (got {type(pipe).__name__})")
    unet = pipe.unet.to(device)
    # Training adds noise with the DDPM forward process whatever sampler the pipeline shipped with.
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    frozen = {name: getattr(pipe, name, None) for name in ("vae", "text_encoder", "text_encoder_2")}
    for module in frozen.values():
        if module is not None:
            module.to(device).requires_grad_(False).eval()
    if looks_local and (local / "cascade").is_dir():
        from objectives.lpips_x0 import CascadedDenoiser

        unet = CascadedDenoiser.load(local / "cascade", unet, scheduler.config)
    return DiffusionModel(unet=unet, scheduler=scheduler, tokenizer=getattr(pipe, "tokenizer", None),
                          tokenizer_2=getattr(pipe, "tokenizer_2", None), **frozen)


def save_base_model(model: DiffusionModel, path: str | Path) -> Path:
    """Write a diffusers pipeline folder (DDPMPipeline, StableDiffusionPipeline for latent text models,
    StableDiffusionXLPipeline with a second text encoder), weights as safetensors, and a Cas-DM head
    as `cascade/`; `load_base_model` reads it back."""
    from objectives.lpips_x0 import CascadedDenoiser, core_denoiser

    path = Path(path)
    unet = core_denoiser(model.unet)
    if model.text_encoder_2 is not None:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
                                         tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=unet, scheduler=model.scheduler)
    elif model.latent:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=unet,
                                       scheduler=model.scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = DDPMPipeline(unet=unet, scheduler=model.scheduler)
    pipe.save_pretrained(path, safe_serialization=True)
    if isinstance(model.unet, CascadedDenoiser):
        model.unet.save(path / "cascade")
    return path


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
