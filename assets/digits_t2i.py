"""Train the offline `digits-t2i` stand-in: a small latent text-to-image model with Stable Diffusion's
component types, on the digits captioned "a thick handwritten 7" (`trainers.image_sets.digits_captions`).

    acpo assets build-t2i [--out assets/digits-t2i] [--quick]

writes `base/`, a `StableDiffusionPipeline` folder (safetensors) with its `card.json`:
- tokenizer      `CLIPTokenizer` over a local character vocabulary (a-z, 0-9; the real BPE
                 vocabulary lives on the hub), 32 tokens;
- text_encoder   `CLIPTextModel`, 2 layers, width 64, **randomly initialised and frozen** (never
                 trained: the UNet learns to read its features through cross-attention, as SD's UNet
                 reads a frozen CLIP); seeded, so the rebuild is the same model;
- vae            `AutoencoderKL` 16x16x1 pixels <-> 8x8x4 latents, trained on reconstruction (MSE)
                 with a small KL term; `scaling_factor` set to 1/std of the training latents, as SD's;
- unet           `UNet2DConditionModel` (~1M parameters, cross-attention at 4x4) trained with the
                 epsilon loss on latents, the caption dropped to "" 10% of the time (classifier-free
                 guidance), EMA weights;
- scheduler      `DDPMScheduler`, cosine schedule (squaredcos_cap_v2: at 8x8 latents SD's
                 scaled_linear schedule leaves too much signal at t = T), `clip_sample: false`.

Quality bars (recomputed from the committed files by tests/test_assets.py): at least 80% of samples
prompted "a handwritten D" are classified as D by the digits classifier at guidance 3; the VAE's
reconstruction error on the held-out split is reported. `--quick` proves the pipeline, not quality.
"""

from __future__ import annotations

import json
import math
import platform
import string
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from trainers.ema import Ema
from trainers.image_sets import DigitsDataset, digits_captions, digits_data_hash
from trainers.loop import optimizer_step
from trainers.models import DiffusionModel, count_parameters, save_base_model

PROMPT_MAX_TOKENS = 32
CFG_DROPOUT = 0.1  # fraction of training captions replaced by "" (the unconditional branch of guidance)
BAR_GUIDANCE = 3.0
BAR_PROMPTED_DIGIT = 0.8


@dataclass
class T2IBudget:
    vae_steps: int = 1500
    unet_steps: int = 6000
    eval_samples: int = 500
    eval_sampling_steps: int = 25

    @classmethod
    def quick(cls) -> "T2IBudget":
        return cls(vae_steps=20, unet_steps=20, eval_samples=20, eval_sampling_steps=4)


def build_tokenizer():
    """A CLIPTokenizer over single characters (each word is split into letters, the last one marked
    with `</w>`, CLIP's end-of-word convention), built offline from a written vocabulary."""
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits)
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"), model_max_length=PROMPT_MAX_TOKENS)


def build_text_encoder(tokenizer, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=PROMPT_MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config).requires_grad_(False).eval()


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
                         sample_size=16)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=64, norm_num_groups=8, attention_head_dim=8)


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", clip_sample=False,
                         steps_offset=1)  # as Stable Diffusion's


def _schedule(optimizer, steps: int):
    warmup = min(200, steps // 10 + 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))


def train_vae(steps: int, seed: int, batch_size: int = 64, kl_weight: float = 1e-4, log=print, build=build_vae, shift: bool = False):
    """`build()` the VAE and train it; `shift`: also centre the latents (`shift_factor`, SD3's and Flux's VAEs)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 3)
    train = DigitsDataset("train").images
    vae = build().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    schedule = _schedule(optimizer, steps)
    for step in range(steps):
        x = train[torch.randint(0, len(train), (batch_size,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(reconstruction, x) + kl_weight * posterior.kl().mean() / x[0].numel()
        loss.backward()
        optimizer_step(optimizer, list(vae.parameters()), grad_clip=1.0)
        schedule.step()
        if (step + 1) % 500 == 0:
            log(f"[assets] VAE: step {step + 1}/{steps}, loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = vae.encode(train).latent_dist.mean
    mean = latents.mean().item() if shift else 0.0
    std = (latents - mean).std().item()
    vae.register_to_config(scaling_factor=1.0 / std, **({"shift_factor": mean} if shift else {}))
    return vae, {"steps": steps, "batch_size": batch_size, "loss": "MSE + KL", "kl_weight": kl_weight, "optimizer": "AdamW lr 1e-3, warm-up + cosine",
                 "scaling_factor": round(1.0 / std, 5), **({"shift_factor": round(mean, 5)} if shift else {})}


@torch.no_grad()
def vae_figures(vae, classifier) -> dict:
    heldout = DigitsDataset("heldout")
    reconstruction = vae.decode(vae.encode(heldout.images).latent_dist.mean).sample.clamp(-1, 1)
    mse = F.mse_loss((reconstruction + 1) / 2, (heldout.images + 1) / 2).item()
    return {"reconstruction_mse_heldout_01": round(mse, 5), "reconstruction_psnr_db": round(10 * math.log10(1 / mse), 2),
            "classifier_accuracy_on_reconstructions": round((classifier(reconstruction).argmax(1) == heldout.labels).float().mean().item(), 4),
            "classifier_accuracy_on_originals": round((classifier(heldout.images).argmax(1) == heldout.labels).float().mean().item(), 4)}


def train_t2i_unet(vae, text_encoder, tokenizer, steps: int, seed: int, batch_size: int = 64, lr: float = 1e-3, ema_decay: float = 0.999, log=print):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 4)
    data = DigitsDataset("train")
    texts = digits_captions("train")
    unet, scheduler = build_unet(), build_scheduler()
    model = DiffusionModel(denoiser=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)
    with torch.no_grad():
        posterior = vae.encode(data.images).latent_dist  # the data is small: encode once, sample per batch
        mean, std = posterior.mean, posterior.std
        distinct = sorted(set(texts)) + [""]
        encoded = dict(zip(distinct, model.encode_prompt(distinct)["encoder_hidden_states"]))
    parameters = dict(unet.named_parameters())
    ema = Ema(parameters, ema_decay)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    schedule = _schedule(optimizer, steps)
    unet.train()
    started = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(mean), (batch_size,), generator=generator)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)) * vae.config.scaling_factor
        dropped = torch.rand(batch_size, generator=generator) < CFG_DROPOUT
        hidden = torch.stack([encoded["" if drop else texts[i]] for i, drop in zip(idx.tolist(), dropped.tolist())])
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=hidden).sample, noise)
        loss.backward()
        optimizer_step(optimizer, list(parameters.values()), grad_clip=1.0)
        schedule.step()
        ema.update(parameters, decay=min(ema_decay, (1 + step) / (10 + step)))
        if (step + 1) % 500 == 0:
            log(f"[assets] t2i UNet: step {step + 1}/{steps}, loss {loss.item():.4f}, {(time.time() - started) / (step + 1):.2f} s/step")
    ema.copy_to(unet)
    unet.eval().requires_grad_(False)
    return model, {"steps": steps, "batch_size": batch_size, "optimizer": f"AdamW lr {lr}, warm-up + cosine", "ema_decay": ema_decay,
                   "cfg_caption_dropout": CFG_DROPOUT, "captions": "trainers.image_sets.digits_captions: 'a [thin|thick] handwritten D'",
                   "seed": seed, "seconds": round(time.time() - started, 1)}


@torch.no_grad()
def t2i_figures(model: DiffusionModel, classifier_path: Path, num_samples: int, sampling_steps: int, seed: int = 0, sampler_name: str = "DDIM") -> dict:
    """The fraction of samples the digits classifier reads as the prompted digit, at guidance 1 and
    3, and classifier FID against the held-out split (prompts "a handwritten D", D cycling 0-9)."""
    from eval.digits_fid import FEATURE_EXTRACTOR_NAME, load_digits_classifier
    from eval.fidelity import fidelity_metrics
    from eval.sampling import sample_images

    classifier = load_digits_classifier(classifier_path)
    prompts = [f"a handwritten {d}" for d in range(10)]
    wanted = torch.arange(num_samples) % 10
    figures = {"sampler": f"{sampler_name} {sampling_steps} steps, {num_samples} samples, prompts 'a handwritten D' for D = 0..9, seed {seed}"}
    for guidance in (1.0, BAR_GUIDANCE):
        images = sample_images(model, num_samples, steps=sampling_steps, seed=seed, prompts=prompts, guidance_scale=guidance)
        agreement = (classifier(images * 2 - 1).argmax(1) == wanted).float().mean().item()
        figures[f"prompted_digit_fraction_guidance_{guidance:g}"] = round(agreement, 4)
        heldout = (DigitsDataset("heldout").images + 1) / 2
        figures[f"classifier_fid_vs_heldout_guidance_{guidance:g}"] = round(
            fidelity_metrics(images, heldout, FEATURE_EXTRACTOR_NAME, str(classifier_path), kid=False)["fid"], 3)
    return figures


def build_digits_t2i(out_dir: str | Path, classifier_path: str | Path, budget: T2IBudget | None = None, seed: int = 0, log=print) -> dict:
    """Train the VAE, then the UNet on its latents; write `out_dir/base` and its card; return the card."""
    from eval.digits_fid import load_digits_classifier

    budget = budget or T2IBudget()
    classifier_path = Path(classifier_path)
    if not classifier_path.is_file():
        raise FileNotFoundError(f"the t2i figures need the digits classifier: {classifier_path} (acpo assets build --only classifier)")
    out = Path(out_dir) / "base"
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer, seed)
    log(f"[assets] t2i VAE: {budget.vae_steps} steps")
    vae, vae_training = train_vae(budget.vae_steps, seed, log=log)
    log(f"[assets] t2i UNet: {budget.unet_steps} steps")
    model, unet_training = train_t2i_unet(vae, text_encoder, tokenizer, budget.unet_steps, seed, log=log)
    save_base_model(model, out)
    log(f"[assets] t2i: evaluating {budget.eval_samples} samples")
    card = {
        "name": "digits-t2i",
        "what": ("latent text-to-image stand-in with Stable Diffusion's component types (UNet2DConditionModel, AutoencoderKL, "
                 "CLIPTextModel + CLIPTokenizer), trained by project code on the digits with captions 'a [thin|thick] handwritten D'"),
        "text_encoder": "CLIPTextModel, randomly initialised and frozen (never trained); character-level CLIPTokenizer built locally",
        "architecture": {"unet_parameters": count_parameters(model.denoiser), "vae_parameters": count_parameters(vae),
                         "text_encoder_parameters": count_parameters(text_encoder), "latent": "4x8x8 for 1x16x16 pixels",
                         "scheduler": {k: v for k, v in model.scheduler.config.items() if not k.startswith("_")}},
        "training": {"vae": vae_training, "unet": unet_training},
        "figures": {"vae": vae_figures(vae, load_digits_classifier(classifier_path)),
                    **t2i_figures(model, classifier_path, budget.eval_samples, budget.eval_sampling_steps, seed)},
        "bars": {f"prompted_digit_fraction_guidance_{BAR_GUIDANCE:g}": f">= {BAR_PROMPTED_DIGIT}"},
        "budget": asdict(budget),
        "data": {"dataset": "scikit-learn digits, 8x8 -> 16x16 bilinear", "data_hash": digits_data_hash()},
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "recreate_with": "acpo assets build-t2i",
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"[assets] t2i: {json.dumps(card['figures'])}")
    return card
