"""Hub base models at their real architectures with random weights, built offline: the groundwork of
rehearsing the hub presets on a machine that cannot reach the hub (issue 29).

`ARCHITECTURES` holds the published configs (each model's `unet/config.json`, `vae/config.json`,
`text_encoder/config.json` and `scheduler/scheduler_config.json` on the hub) of the models the hub
presets name, plus `tiny`: the same component types as Stable Diffusion 1.5, narrow, at 64 px (the
tests). `build(name)` makes one with random weights (seed 0); `save_base_model` writes it as the
diffusers folder `load_base_model` reads. Stable Diffusion's tokenizer is CLIP's own BPE vocabulary,
converted from the copy the `clip` package (openai-clip, a pyiqa dependency) ships (49,408 tokens, the ids `clip.tokenize` gives), so a
rehearsal tokenizes prompts as the real model does.

Random weights change nothing in what a step costs in time or memory; they make every quality figure
meaningless. Nothing built here is ever a quality figure.
"""

from __future__ import annotations

import torch

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CHURCH256 = "google/ddpm-church-256"

_SD_SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                     prediction_type="epsilon", steps_offset=1, clip_sample=False)

ARCHITECTURES = {
    SD15: {
        "resolution": 512,
        "unet": dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768, attention_head_dim=8),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
                    scaling_factor=0.18215),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                     hidden_act="quick_gelu", projection_dim=768),
        "scheduler": _SD_SCHEDULER,
    },
    "tiny": {  # SD 1.5's block types and depth pattern, narrow, at 64 px
        "resolution": 64,
        "unet": dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32, attention_head_dim=4,
                     norm_num_groups=8),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64,
                    norm_num_groups=8, scaling_factor=0.18215),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                     hidden_act="quick_gelu"),
        "scheduler": _SD_SCHEDULER,
    },
    CHURCH256: {  # the LSUN-256 DDPMs share this UNet: attention at 16x16 only
        "resolution": 256,
        "unet": dict(sample_size=256, in_channels=3, out_channels=3, block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
                     down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
                     norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1),
        "scheduler": dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="epsilon",
                          clip_sample=True, variance_type="fixed_small"),
    },
}


def clip_tokenizer(model_max_length: int = 77):
    """CLIP's BPE tokenizer (Stable Diffusion's) as a transformers `CLIPTokenizer`, from the vocabulary
    and merges the `clip` package ships (`clip/bpe_simple_vocab_16e6.txt.gz`): no download."""
    from clip.simple_tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)  # rank order is the merge order
    return CLIPTokenizer(vocab=dict(bpe.encoder), merges=[tuple(pair) for pair in merges], model_max_length=model_max_length)


def build(name: str, seed: int = 0, device: str | torch.device = "cpu"):
    """The architecture `name` (a key of ARCHITECTURES) with random weights drawn from `seed`, as a
    `DiffusionModel`. `device="meta"` builds it without memory (parameter counts)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainers.models import DiffusionModel

    if name not in ARCHITECTURES:
        raise KeyError(f"no rehearsal architecture for {name!r} (known: {', '.join(ARCHITECTURES)})")
    spec = ARCHITECTURES[name]
    torch.manual_seed(seed)
    scheduler = DDPMScheduler(**spec["scheduler"])
    with torch.device(device):
        if "text" not in spec:  # a pixel DDPM
            return DiffusionModel(unet=UNet2DModel(**spec["unet"]), scheduler=scheduler)
        tokenizer = clip_tokenizer(spec["text"]["max_position_embeddings"])
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **spec["text"], bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        return DiffusionModel(unet=UNet2DConditionModel(**spec["unet"]), scheduler=scheduler, vae=AutoencoderKL(**spec["vae"]),
                              text_encoder=text_encoder.requires_grad_(False).eval(), tokenizer=tokenizer)

