"""Test fixtures: small models shaped like the real ones, built offline with random weights."""

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from trainers.models import DiffusionModel


def build_tiny_sd(image_channels: int = 1, resolution: int = 16, seed: int = 0) -> DiffusionModel:
    """A randomly initialized model shaped like Stable Diffusion (UNet2DConditionModel with cross
    attention, AutoencoderKL, CLIP text encoder and tokenizer), small enough for CPU tests. The
    tokenizer is built from a local character vocabulary, since the real one lives on the hub."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=image_channels, out_channels=image_channels, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                        sample_size=resolution)
    unet = UNet2DConditionModel(sample_size=resolution // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=32, layers_per_block=1, norm_num_groups=8, attention_head_dim=4)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=16, bos_token_id=72, eos_token_id=73, pad_token_id=73))
    chars = list(string.ascii_lowercase + string.digits)
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"), model_max_length=16)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="epsilon", steps_offset=1, clip_sample=False)  # Stable Diffusion's schedule
    for module in (vae, text_encoder):
        module.requires_grad_(False).eval()
    return DiffusionModel(denoiser=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)


def build_tiny_flow(family: str = "sd3", resolution: int = 16, seed: int = 0):
    """A randomly initialized flow model shaped like SD3 (SD3Transformer2DModel, two CLIP encoders with
    projection, no T5) or Flux (FluxTransformer2DModel with guidance embedding, CLIP + T5 encoders are
    not built: the test passes conditioning tensors of their shapes), an AutoencoderKL with 16 latent
    channels and a shift, and the flow scheduler. Returns (DiffusionModel, conditioning for 1 sample)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, SD3Transformer2DModel

    from trainers.denoiser.flow_transformer import FlowTransformer

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=16, block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=resolution, shift_factor=0.1,
                        scaling_factor=1.5).requires_grad_(False).eval()
    latent = resolution // 2
    if family == "sd3":
        transformer = SD3Transformer2DModel(sample_size=latent, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                                            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24,
                                            pos_embed_max_size=latent)
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
        conditioning = {"encoder_hidden_states": torch.randn(1, 5, 32), "pooled_projections": torch.randn(1, 24)}
    else:
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
                                             axes_dims_rope=(2, 2, 4))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
        conditioning = {"encoder_hidden_states": torch.randn(1, 5, 32), "pooled_projections": torch.randn(1, 24)}
    return DiffusionModel(denoiser=FlowTransformer(transformer, sample_size=latent), scheduler=scheduler, vae=vae), conditioning
