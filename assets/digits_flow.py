"""The `digits-flow` stand-in: a small flow-matching text-to-image model with Stable Diffusion 3's
component types, trained by this project on the digits and their captions (`acpo assets build-flow`).

What it is (every part a real diffusers / transformers class, as `StableDiffusion3Pipeline` holds it):
- text_encoder, text_encoder_2  two `CLIPTextModelWithProjection` (width 64, projection 64), randomly
                 initialised and frozen, as SD3's two CLIPs are frozen; the character-level
                 `CLIPTokenizer` of digits-t2i for both. No T5 (`text_encoder_3: null`), which SD3's
                 pipeline allows; the model is trained with no T5 tokens at all, so sample it through
                 the pipeline with `max_sequence_length=0` (diffusers would otherwise append 256 zeros);
- vae            `AutoencoderKL` 16x16x1 pixels <-> 8x8x16 latents (SD3's 16 latent channels), trained
                 on reconstruction with a small KL term; `shift_factor` and `scaling_factor` centre
                 and scale the latents, as SD3's VAE config does;
- transformer    `SD3Transformer2DModel` (MM-DiT: joint text/image attention, patch 2, 4 blocks, width
                 128), trained with rectified flow (x_t = (1 - s) x0 + s eps, target eps - x0), t drawn
                 logit-normal as diffusers' SD3 script does, the caption dropped to "" 10% of the time
                 (classifier-free guidance), EMA weights;
- scheduler      `FlowMatchEulerDiscreteScheduler`, shift 1: SD3's shift 3 is for 1024 px (its paper
                 shifts toward noise as the resolution grows); at 8x8 latents no shift is needed.

Quality bars (recomputed from the committed files by tests/test_assets.py): at least 80% of samples
prompted "a handwritten D" are classified as D by the digits classifier at guidance 3; classifier FID
against the held-out split is reported. `--quick` proves the pipeline, not quality.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from assets.digits_t2i import BAR_GUIDANCE, BAR_PROMPTED_DIGIT, CFG_DROPOUT, PROMPT_MAX_TOKENS, _schedule, build_tokenizer, t2i_figures, train_vae, vae_figures
from trainers.ema import Ema
from trainers.denoiser.flow_transformer import FlowTransformer
from trainers.image_sets import DigitsDataset, digits_captions, digits_data_hash
from trainers.loop import optimizer_step
from trainers.models import DiffusionModel, count_parameters, save_base_model

LATENT_CHANNELS = 16  # SD3's


@dataclass
class FlowBudget:
    vae_steps: int = 1500
    transformer_steps: int = 6000
    eval_samples: int = 500
    eval_sampling_steps: int = 25

    @classmethod
    def quick(cls) -> "FlowBudget":
        return cls(vae_steps=20, transformer_steps=20, eval_samples=20, eval_sampling_steps=4)


def build_text_encoder(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, projection_dim=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=PROMPT_MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config).requires_grad_(False).eval()


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 32), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                         sample_size=16)


def build_transformer():
    from diffusers import SD3Transformer2DModel

    # joint_attention_dim: the two CLIPs' widths side by side (64 + 64); pooled: their projections (64 + 64)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=4,
                                 attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128,
                                 pooled_projection_dim=128, pos_embed_max_size=8)


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def train_flow_transformer(model: DiffusionModel, steps: int, seed: int, batch_size: int = 64, lr: float = 1e-3, ema_decay: float = 0.999,
                           log=print):
    """Rectified flow on the VAE's latents of the digits, conditioned on their captions."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 5)
    data, texts, vae = DigitsDataset("train"), digits_captions("train"), model.vae
    transformer = model.denoiser.transformer
    with torch.no_grad():
        posterior = vae.encode(data.images).latent_dist  # the data is small: encode once, sample per batch
        mean, std = posterior.mean, posterior.std
        distinct = sorted(set(texts)) + [""]
        encoded = model.encode_prompt(distinct)
        hidden = dict(zip(distinct, encoded["encoder_hidden_states"]))
        pooled = dict(zip(distinct, encoded["pooled_projections"]))
    parameters = dict(transformer.named_parameters())
    ema = Ema(parameters, ema_decay)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr)
    schedule = _schedule(optimizer, steps)
    transformer.train()
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    started = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(mean), (batch_size,), generator=generator)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator) - shift) * scale
        dropped = torch.rand(batch_size, generator=generator) < CFG_DROPOUT
        captions = ["" if drop else texts[i] for i, drop in zip(idx.tolist(), dropped.tolist())]
        noise = torch.randn(x0.shape, generator=generator)
        t = model.process.draw_timesteps(batch_size, generator)
        output = model.denoiser(model.process.add_noise(x0, noise, t), t, encoder_hidden_states=torch.stack([hidden[c] for c in captions]),
                            pooled_projections=torch.stack([pooled[c] for c in captions])).sample
        loss = F.mse_loss(output, model.process.target(x0, noise, t))
        loss.backward()
        optimizer_step(optimizer, list(parameters.values()), grad_clip=1.0)
        schedule.step()
        ema.update(parameters, decay=min(ema_decay, (1 + step) / (10 + step)))
        if (step + 1) % 500 == 0:
            log(f"[assets] flow transformer: step {step + 1}/{steps}, loss {loss.item():.4f}, {(time.time() - started) / (step + 1):.2f} s/step")
    ema.copy_to(transformer)
    transformer.eval().requires_grad_(False)
    return {"steps": steps, "batch_size": batch_size, "optimizer": f"AdamW lr {lr}, warm-up + cosine", "ema_decay": ema_decay,
            "loss": "rectified flow: MSE to eps - x0, t logit-normal(0, 1) (trainers/denoiser/noise_process.py: draw_timesteps)",
            "cfg_caption_dropout": CFG_DROPOUT, "captions": "trainers.image_sets.digits_captions: 'a [thin|thick] handwritten D'",
            "seed": seed, "seconds": round(time.time() - started, 1)}


def build_digits_flow(out_dir: str | Path, classifier_path: str | Path, budget: FlowBudget | None = None, seed: int = 0, log=print) -> dict:
    """Train the VAE, then the transformer on its latents; write `out_dir/base` and its card; return the card."""
    from eval.digits_fid import load_digits_classifier

    budget = budget or FlowBudget()
    classifier_path = Path(classifier_path)
    if not classifier_path.is_file():
        raise FileNotFoundError(f"the flow figures need the digits classifier: {classifier_path} (acpo assets build --only classifier)")
    out = Path(out_dir) / "base"
    tokenizer = build_tokenizer()
    text_encoder, text_encoder_2 = build_text_encoder(tokenizer, seed), build_text_encoder(tokenizer, seed + 1)
    log(f"[assets] flow VAE: {budget.vae_steps} steps")
    vae, vae_training = train_vae(budget.vae_steps, seed, log=log, build=build_vae, shift=True)
    torch.manual_seed(seed + 2)
    model = DiffusionModel(denoiser=FlowTransformer(build_transformer()), scheduler=build_scheduler(), vae=vae, text_encoder=text_encoder,
                           tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer)
    log(f"[assets] flow transformer: {budget.transformer_steps} steps")
    transformer_training = train_flow_transformer(model, budget.transformer_steps, seed, log=log)
    save_base_model(model, out)
    log(f"[assets] flow: evaluating {budget.eval_samples} samples")
    card = {
        "name": "digits-flow",
        "what": ("latent flow-matching text-to-image stand-in with Stable Diffusion 3's component types (SD3Transformer2DModel, "
                 "AutoencoderKL with 16 latent channels, two CLIPTextModelWithProjection + CLIPTokenizer, FlowMatchEulerDiscreteScheduler), "
                 "trained by project code with rectified flow on the digits with captions 'a [thin|thick] handwritten D'"),
        "text_encoders": ("two CLIPTextModelWithProjection, randomly initialised and frozen (never trained); character-level CLIPTokenizer "
                          "built locally; no T5: sample through StableDiffusion3Pipeline with max_sequence_length=0"),
        "architecture": {"transformer_parameters": count_parameters(model.denoiser), "vae_parameters": count_parameters(vae),
                         "text_encoder_parameters": count_parameters(text_encoder) + count_parameters(text_encoder_2),
                         "latent": f"{LATENT_CHANNELS}x8x8 for 1x16x16 pixels, 16 tokens of 2x2 patches",
                         "scheduler": {k: v for k, v in model.scheduler.config.items() if not k.startswith("_")}},
        "training": {"vae": vae_training, "transformer": transformer_training},
        "figures": {"vae": vae_figures(vae, load_digits_classifier(classifier_path)),
                    **t2i_figures(model, classifier_path, budget.eval_samples, budget.eval_sampling_steps, seed, sampler_name="flow Euler")},
        "bars": {f"prompted_digit_fraction_guidance_{BAR_GUIDANCE:g}": f">= {BAR_PROMPTED_DIGIT}"},
        "budget": asdict(budget),
        "data": {"dataset": "scikit-learn digits, 8x8 -> 16x16 bilinear", "data_hash": digits_data_hash()},
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "recreate_with": "acpo assets build-flow",
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"[assets] flow: {json.dumps(card['figures'])}")
    return card
