"""Base diffusion models: the tiny digits UNet, and loading/saving in diffusers layout.

A base model is a diffusers folder (`model_index.json`, `unet/`, `scheduler/`) or a hub id such as
`google/ddpm-cifar10-32`; both go through `DiffusionPipeline.from_pretrained`. Weights are written as
safetensors only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from trainers.denoiser.cascade import CascadedDenoiser, core_denoiser
from trainers.denoiser.flow_transformer import FlowTransformer
from trainers.denoiser.noise_process import NoiseProcess, training_scheduler

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
    """A denoiser and the noise scheduler it trains with; for latent text-to-image models (Stable
    Diffusion) also the VAE, the text encoders and their tokenizers. The denoiser is a UNet, or a flow
    transformer behind `FlowTransformer` (SD3, Flux), with or without Cas-DM's head (`CascadedDenoiser`),
    each called `denoiser(x_t, t, **conditioning).sample`; `process` (trainers/denoiser/noise_process.py) is what
    its output means, how data is noised and how it samples."""

    denoiser: torch.nn.Module
    scheduler: object  # the training scheduler (noise_process.training_scheduler): DDPMScheduler, or FlowMatchEulerDiscreteScheduler
    vae: torch.nn.Module | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: object = None
    text_encoder_2: torch.nn.Module | None = None  # SDXL's and SD3's second CLIP; Flux's T5
    tokenizer_2: object = None
    text_encoder_3: torch.nn.Module | None = None  # SD3's T5 (optional there: None drops it)
    tokenizer_3: object = None
    # the scheduler the base shipped (its model_index.json's, with its config: SD 1.5's PNDMScheduler),
    # which an export carries so that the pipeline's defaults sample as the base's did; None: `scheduler`
    sampling_scheduler: object = None

    @functools.cached_property
    def process(self) -> NoiseProcess:
        return NoiseProcess(self.scheduler.config)

    @property
    def pipeline_kind(self) -> str:
        """Which diffusers pipeline this model is: ddpm, sd, sdxl, sd3 or flux."""
        denoiser = core_denoiser(self.denoiser)
        if isinstance(denoiser, FlowTransformer):
            return "flux" if denoiser.flux else "sd3"
        if self.text_encoder_2 is not None:
            return "sdxl"
        return "sd" if self.latent and self.text_conditioned else "ddpm"

    @property
    def latent(self) -> bool:
        return self.vae is not None

    @property
    def text_conditioned(self) -> bool:
        return self.text_encoder is not None

    @property
    def channels(self) -> int:
        """Image channels (what the data must have)."""
        return self.vae.config.in_channels if self.latent else self.denoiser.config.in_channels

    @property
    def model_channels(self) -> int:
        """Channels of x0 in the denoiser's space (latent channels for latent models)."""
        return self.denoiser.config.in_channels

    @property
    def resolution(self) -> int:
        """Image resolution in pixels."""
        size = self.denoiser.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return size * self.vae_scale_factor if self.latent else size

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.latent else 1

    def encode_prompt(self, prompts: list[str]) -> dict:
        """Prompts -> the denoiser's conditioning kwargs; the text encoder is frozen, so no graph."""
        if not self.text_conditioned:
            return {}
        if isinstance(core_denoiser(self.denoiser), FlowTransformer):
            return self._encode_flow_prompt(prompts)
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

    def _encode_flow_prompt(self, prompts: list[str]) -> dict:
        """SD3 and Flux condition as their pipelines' own `encode_prompt` does (called here on a pipeline
        of this model's frozen encoders): SD3 both CLIPs' penultimate layers side by side, padded to the
        T5 width, T5's tokens after them, both pooled outputs; Flux T5's tokens and CLIP's pooled output.
        Without SD3's T5 the pipeline would append 256 zero tokens; this model appends none (`t5_tokens`)."""
        with torch.no_grad():
            if self.pipeline_kind == "flux":
                hidden, pooled, _text_ids = self.text_pipeline.encode_prompt(list(prompts), prompt_2=None, device=self.denoiser.device,
                                                                             max_sequence_length=self.t5_tokens)
            else:
                hidden, _, pooled, _ = self.text_pipeline.encode_prompt(list(prompts), prompt_2=None, prompt_3=None, device=self.denoiser.device,
                                                                        do_classifier_free_guidance=False, max_sequence_length=self.t5_tokens)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    @property
    def t5_tokens(self) -> int:
        """How many T5 tokens a flow model's prompts take: the pipelines' defaults (SD3 256, Flux 512), and
        none for an SD3 model without T5 (diffusers would pad 256 zero tokens; `digits-flow` trains without them)."""
        if self.pipeline_kind == "flux":
            return 512
        return 256 if self.text_encoder_3 is not None else 0

    @functools.cached_property
    def text_pipeline(self):
        """The model's diffusers pipeline over its own modules (nothing copied): what encodes its prompts."""
        return pipeline_of(dataclasses.replace(self, denoiser=core_denoiser(self.denoiser)))

    def _ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.denoiser.device)


def build_digits_unet(**overrides) -> UNet2DModel:
    """A freshly initialized digits UNet; `overrides` replace entries of `DIGITS_UNET_CONFIG`."""
    return UNet2DModel(**{**DIGITS_UNET_CONFIG, **overrides})


def build_digits_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**DIGITS_SCHEDULER_CONFIG)


WEIGHTS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load_base_model(path_or_id: str | Path, device: str | torch.device = "cpu", weights_dtype: str = "fp32") -> DiffusionModel:
    """Load a diffusion pipeline from a local diffusers folder or a hub id.

    Local folders must exist and hold `model_index.json`; anything else is treated as a hub id, which
    needs network access (offline, `from_pretrained` fails with its own error, re-raised with the id).
    A folder with a `cascade/` subfolder (a Cas-DM model: `trainers/denoiser/cascade.py`) loads as the network
    wrapped with its cascaded x0 head, which then takes part in every sampling step. This is the one
    call that loads an exported champion: `load_base_model(folder)`. (Plain
    `DiffusionPipeline.from_pretrained(folder)` also loads it, without the cascade.) `weights_dtype`
    (`model.weights_dtype`): every weight in fp32, or in bf16.
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
        pipe = DiffusionPipeline.from_pretrained(source, use_safetensors=None, dtype=WEIGHTS_DTYPES[weights_dtype],
                                                 **(absent_components(local) if looks_local else {}))
    except (OSError, ValueError) as error:
        # offline, or neither a folder nor a hub id: diffusers' message is long; keep its first line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(f"could not load base model {source!r}: {first}") from None
    if not (hasattr(pipe, "unet") or hasattr(pipe, "transformer")) or not hasattr(pipe, "scheduler"):
        raise ValueError(f"base model {source!r} has no unet or transformer, or no scheduler (got {type(pipe).__name__})")
    denoiser = pipe.unet.to(device) if hasattr(pipe, "unet") else FlowTransformer(pipe.transformer.to(device))
    # Training noises with the model's forward process (DDPM's, or the flow path) whatever sampler the pipeline
    # shipped with; that one is kept for the export.
    scheduler = training_scheduler(pipe.scheduler.config)
    frozen = {name: getattr(pipe, name, None) for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")}
    for module in frozen.values():
        if module is not None:
            module.to(device).requires_grad_(False).eval()
    if looks_local and (local / "cascade").is_dir():
        denoiser = CascadedDenoiser.load(local / "cascade", denoiser, scheduler.config)
    return DiffusionModel(denoiser=denoiser, scheduler=scheduler, sampling_scheduler=pipe.scheduler, tokenizer=getattr(pipe, "tokenizer", None),
                          tokenizer_2=getattr(pipe, "tokenizer_2", None), tokenizer_3=getattr(pipe, "tokenizer_3", None), **frozen)


def absent_components(folder: Path) -> dict:
    """The components a saved pipeline records as absent (`[null, null]` in model_index.json), as None:
    diffusers saves an SD3 pipeline without T5 that way but will not load it unless told so."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"{folder / 'model_index.json'}: unreadable ({type(error).__name__}: {error})") from None
    return {name: None for name, value in index.items() if value == [None, None]} if isinstance(index, dict) else {}


def save_base_model(model: DiffusionModel, path: str | Path) -> Path:
    """Write a diffusers pipeline folder of the model's kind (`pipeline_of`: DDPMPipeline,
    StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline) with the
    scheduler the base shipped, weights as safetensors, and a Cas-DM head as `cascade/`; `load_base_model`
    reads it back."""
    path = Path(path)
    pipe = pipeline_of(dataclasses.replace(model, denoiser=core_denoiser(model.denoiser)))
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # an absent T5 is saved as absent, with a warning per checkpoint otherwise
    try:
        pipe.save_pretrained(path, safe_serialization=True)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if isinstance(model.denoiser, CascadedDenoiser):
        model.denoiser.save(path / "cascade")
    return path


def pipeline_of(model: DiffusionModel):
    """The diffusers pipeline of the model's kind over its modules (the denoiser without a Cas-DM head) and
    the scheduler the base shipped (`sampling_scheduler`; the training one for a model built here)."""
    kind, network, scheduler = model.pipeline_kind, model.denoiser, model.sampling_scheduler or model.scheduler
    if kind == "sd3":
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(transformer=network.transformer, scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder,
                                        tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2,
                                        text_encoder_3=model.text_encoder_3, tokenizer_3=model.tokenizer_3)
    if kind == "flux":
        from diffusers import FluxPipeline

        return FluxPipeline(transformer=network.transformer, scheduler=scheduler, vae=model.vae, text_encoder=model.text_encoder,
                            tokenizer=model.tokenizer, text_encoder_2=model.text_encoder_2, tokenizer_2=model.tokenizer_2)
    if kind == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
                                         tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=network, scheduler=scheduler)
    if kind == "sd":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=network,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return DDPMPipeline(unet=network, scheduler=scheduler)


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
