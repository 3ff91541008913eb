"""Train the offline `digits` preset's stand-in models from scratch, deterministically.

    acpo assets build [--out assets/digits] [--quick]

writes, each with a JSON card (how it was trained, the data hash, its quality figures):
- classifier.safetensors       the digits classifier, torch-fidelity's feature extractor for FID/KID
- quality_cnniqa.safetensors   pyiqa's CNNIQA trained on the TRAIN degradation family (the reward)
- heldout_iqa.safetensors      a different architecture on the disjoint HELDOUT family (eval.heldout_quality)
- base/                        a tiny UNet2DModel DDPM in diffusers layout (the model ACPO fine-tunes)
- segmenter.safetensors        a small U-Net labelling each pixel background or digit 0-9 (PeFL's
                               segmentation variant; stand-in for a COCO instance segmenter)

They are stand-ins for Inception, MUSIQ/LAION-aesthetic and a hub DDPM, which need downloads; every
figure they produce is named for what it is ("classifier FID on digits"), never passed off as the
real metric. `--quick` trains each for a few steps only: it proves the pipeline, not the quality.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from assets.degradations import FAMILIES, degrade
from assets.digits_networks import DigitsClassifier, DigitsHeldoutIQA
from eval.digits_fid import confident_fraction
from eval.fidelity import fidelity_metrics
from eval.quality import QualityModel, load_quality_model
from eval.sampling import sample_images
from trainers.ema import Ema
from trainers.image_sets import DigitsDataset, digits_data_hash
from trainers.loop import optimizer_step
from trainers.models import DiffusionModel, build_digits_scheduler, build_digits_unet, count_parameters, save_base_model

ASSET_FILES = {
    "classifier": "classifier.safetensors",
    "quality": "quality_cnniqa.safetensors",
    "heldout_quality": "heldout_iqa.safetensors",
    "base": "base",
    "segmenter": "segmenter.safetensors",
}


@dataclass
class AssetBudget:
    """Optimizer steps per asset. The defaults made the committed assets; `quick()` is for tests."""

    classifier_steps: int = 1500
    quality_steps: int = 3000
    heldout_quality_steps: int = 5000  # the deeper held-out net needs longer to rank its family's grades
    base_steps: int = 8000
    segmenter_steps: int = 1500
    eval_samples: int = 1000  # the base model's card figures use this many DDIM samples
    eval_sampling_steps: int = 50

    @classmethod
    def quick(cls) -> "AssetBudget":
        return cls(classifier_steps=60, quality_steps=60, heldout_quality_steps=60, base_steps=30, segmenter_steps=30, eval_samples=64,
                   eval_sampling_steps=5)


def _images01(split: str) -> torch.Tensor:
    return (DigitsDataset(split).images + 1) / 2


def _random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # +-1 pixel translations: the classifier must read generated digits that are not perfectly centered.
    dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def _write_card(path: Path, card: dict) -> None:
    card = {
        **card,
        "data": {"dataset": "scikit-learn digits, 8x8 -> 16x16 bilinear", "data_hash": digits_data_hash()},
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "recreate_with": "acpo assets build",
    }
    path.write_text(json.dumps(card, indent=2) + "\n")


def train_classifier(steps: int, seed: int = 0) -> tuple[DigitsClassifier, dict]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train, heldout = DigitsDataset("train"), DigitsDataset("heldout")
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1))
    for _ in range(steps):
        idx = torch.randint(0, len(train), (128,), generator=generator)
        x = _random_shift(train.images[idx], generator)
        F.cross_entropy(model(x), train.labels[idx]).backward()
        optimizer_step(opt, list(model.parameters()))
        sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(heldout.images).argmax(1) == heldout.labels).float().mean().item()
    card = {
        "name": "digits-classifier",
        "what": "CNN digit classifier; its 128-d penultimate layer is the FID/KID feature space of the digits preset",
        "training": {"steps": steps, "batch_size": 128, "optimizer": "AdamW one-cycle lr 2e-3", "augmentation": "+-1 px shifts", "seed": seed},
        "figures": {"heldout_accuracy": round(accuracy, 4)},
    }
    return model, card


def _quality_batch(images01, family, generator, batch_size=128, clean_fraction=0.15):
    """A batch of degraded images with targets `1 - severity`, every kind of `family` in equal parts."""
    idx = torch.randint(0, len(images01), (batch_size,), generator=generator)
    x = _random_shift(images01[idx], generator)
    severity = torch.rand(batch_size, generator=generator)
    severity[torch.rand(batch_size, generator=generator) < clean_fraction] = 0.0
    chunks = torch.arange(batch_size) % len(family)
    out = torch.empty_like(x)
    for i, kind in enumerate(family):
        sel = chunks == i
        out[sel] = degrade(x[sel], kind, severity[sel], generator)
    return out, 1.0 - severity


def train_quality_model(which: str, steps: int, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """which: "quality" (pyiqa CNNIQA, TRAIN family) or "heldout_quality" (DigitsHeldoutIQA, HELDOUT family)."""
    import pyiqa

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    if which == "quality":
        family_name = "train"
        # the real pyiqa architecture, exactly as create_metric builds it (pretrained=None: no download)
        net = pyiqa.create_metric("cnniqa", pretrained=None, as_loss=True, device=torch.device("cpu")).net
        to_input = lambda x: x.expand(-1, 3, -1, -1)  # noqa: E731 - CNNIQA takes RGB
        arch = "cnniqa"
    else:
        family_name = "heldout"
        net = DigitsHeldoutIQA()
        to_input = lambda x: x  # noqa: E731
        arch = "digits_heldout_iqa"
    family = FAMILIES[family_name]
    train = _images01("train")
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=max(steps, 1))
    for _ in range(steps):
        x, target = _quality_batch(train, family, generator)
        F.mse_loss(net(to_input(x)).squeeze(1), target).backward()
        optimizer_step(opt, list(net.parameters()))
        sched.step()
    net.eval()
    return net, {
        "name": f"digits-{arch}",
        "arch": arch,
        "what": f"no-reference quality model: regresses 1 - severity of the {family_name!r} degradation family ({', '.join(family)})",
        "training": {"steps": steps, "batch_size": 128, "optimizer": "AdamW one-cycle lr 1e-3", "target": "1 - severity", "clean_fraction": 0.15, "seed": seed},
        "family": family_name,
    }


def _quality_figures(path: Path, arch: str, family_name: str) -> dict:
    model = load_quality_model({"arch": arch, "weights": str(path)})
    heldout = _images01("heldout")
    figures = {f"spearman_vs_severity_{family_name}_family": round(quality_spearman(model, heldout, FAMILIES[family_name]), 4)}
    other = "heldout" if family_name == "train" else "train"
    # How much the model also sees the other family: informative, no bar.
    figures[f"spearman_vs_severity_{other}_family"] = round(quality_spearman(model, heldout, FAMILIES[other]), 4)
    with torch.no_grad():
        figures["mean_score_clean_heldout"] = round(model(heldout).mean().item(), 4)
    return figures


def train_segmenter(steps: int, seed: int = 0, batch_size: int = 128) -> tuple[torch.nn.Module, dict]:
    """Per-pixel cross-entropy against `digit_masks` (stroke pixels labelled with their digit), on
    shifted images, a quarter of them mildly degraded so that it also reads imperfect samples."""
    from objectives.segmenters import DigitsSegmenter
    from trainers.image_sets import FOREGROUND_THRESHOLD, digit_masks

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 5)
    train = DigitsDataset("train")
    images01 = (train.images + 1) / 2
    net = DigitsSegmenter().train()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=max(steps, 1))
    for _ in range(steps):
        idx = torch.randint(0, len(images01), (batch_size,), generator=generator)
        clean = _random_shift(images01[idx], generator)
        masks = digit_masks(clean, train.labels[idx])
        degraded = clean.clone()
        noisy = torch.rand(batch_size, generator=generator) < 0.25
        degraded[noisy] = (clean[noisy] + 0.1 * torch.randn(clean[noisy].shape, generator=generator)).clamp(0, 1)
        F.cross_entropy(net(degraded), masks).backward()
        optimizer_step(opt, list(net.parameters()))
        sched.step()
    net.eval()
    return net, {
        "name": "digits-segmenter",
        "what": "U-Net labelling each pixel background (0) or the digit 0-9 its stroke belongs to (1 + d): PeFL's segmentation network offline",
        "masks": f"stroke = pixel >= {FOREGROUND_THRESHOLD} (image in [0, 1]), labelled with the image's digit",
        "training": {"steps": steps, "batch_size": batch_size, "optimizer": "AdamW one-cycle lr 2e-3",
                     "augmentation": "+-1 px shifts, Gaussian noise 0.1 on a quarter", "seed": seed},
    }


@torch.no_grad()
def segmenter_figures(net: torch.nn.Module) -> dict:
    """Mean IoU over the 11 classes and the stroke (foreground) IoU on the held-out split."""
    from trainers.image_sets import digit_masks

    heldout = DigitsDataset("heldout")
    images01 = (heldout.images + 1) / 2
    truth, predicted = digit_masks(images01, heldout.labels), net(images01).argmax(1)
    ious = []
    for c in range(net.classes):
        union = ((truth == c) | (predicted == c)).sum().item()
        if union:
            ious.append(((truth == c) & (predicted == c)).sum().item() / union)
    stroke = ((truth > 0) & (predicted > 0)).sum().item() / max(((truth > 0) | (predicted > 0)).sum().item(), 1)
    return {"mean_iou_heldout": round(sum(ious) / len(ious), 4), "stroke_iou_heldout": round(stroke, 4),
            "pixel_accuracy_heldout": round((truth == predicted).float().mean().item(), 4)}


def train_base_model(steps: int, seed: int = 0, batch_size: int = 64, lr: float = 1e-3, ema_decay: float = 0.999, log=print) -> tuple[DiffusionModel, dict]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 2)
    train = DigitsDataset("train").images
    unet, scheduler = build_digits_unet(), build_digits_scheduler()
    parameters = dict(unet.named_parameters())
    ema = Ema(parameters, ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(200, steps // 10 + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    unet.train()
    started = time.time()
    for step in range(steps):
        idx = torch.randint(0, len(train), (batch_size,), generator=generator)
        x0 = train[idx]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        loss.backward()
        optimizer_step(opt, list(parameters.values()), grad_clip=1.0)
        sched.step()
        # EMA with the usual warm-up (1+s)/(10+s): early weights are not averaged in for long.
        ema.update(parameters, decay=min(ema_decay, (1 + step) / (10 + step)))
        if (step + 1) % 500 == 0:
            elapsed = time.time() - started
            log(f"[assets] base DDPM: step {step + 1}/{steps}, loss {loss.item():.4f}, {elapsed / (step + 1):.2f} s/step")
    ema.copy_to(unet)
    unet.eval()
    card = {
        "name": "digits-ddpm",
        "what": "unconditional pixel DDPM on 16x16 digits (diffusers UNet2DModel + DDPMScheduler), EMA weights",
        "architecture": {"parameters": count_parameters(unet), "scheduler": dict(scheduler.config)},
        "training": {"steps": steps, "batch_size": batch_size, "optimizer": f"AdamW lr {lr}, warm-up + cosine", "ema_decay": ema_decay,
                     "grad_clip": 1.0, "seed": seed, "seconds": round(time.time() - started, 1)},
    }
    return DiffusionModel(denoiser=unet, scheduler=scheduler), card


def base_model_figures(model: DiffusionModel, classifier_path: Path, num_samples: int, sampling_steps: int, seed: int = 0) -> dict:
    """The base model's quality bars: confident-classification rate and classifier FID, with the real
    held-out split as the yardstick (its FID against train is the best a sampler could hope for)."""
    from eval.digits_fid import FEATURE_EXTRACTOR_NAME, load_digits_classifier

    classifier = load_digits_classifier(classifier_path)
    samples = sample_images(model, num_samples, steps=sampling_steps, seed=seed)
    heldout, train = _images01("heldout"), _images01("train")
    fid = lambda a, b: fidelity_metrics(a, b, FEATURE_EXTRACTOR_NAME, str(classifier_path), kid=False)["fid"]  # noqa: E731
    return {
        "sampler": f"DDIM {sampling_steps} steps, eta 0, {num_samples} samples, seed {seed}",
        "confident_fraction": round(confident_fraction(classifier, samples), 4),
        "classifier_fid_samples_vs_heldout": round(fid(samples, heldout), 3),
        "classifier_fid_heldout_vs_train": round(fid(heldout, train), 3),
        "note": "FID in the digits classifier's 128-d feature space (not Inception FID)",
    }


def build_digits_assets(out_dir: str | Path, budget: AssetBudget | None = None, seed: int = 0, only: list[str] | None = None, log=print) -> dict:
    """Train the assets named in `only` (default: all) into `out_dir`, each with its card.

    Order matters: the classifier scores the base model's samples, so it is trained first; building
    the base model alone needs a classifier already in `out_dir`."""
    budget = budget or AssetBudget()
    names = list(ASSET_FILES) if not only else list(only)
    unknown = sorted(set(names) - set(ASSET_FILES))
    if unknown:
        raise ValueError(f"unknown asset {unknown[0]!r} (known: {', '.join(ASSET_FILES)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cards = {}

    if "classifier" in names:
        log(f"[assets] classifier: {budget.classifier_steps} steps")
        model, cards["classifier"] = train_classifier(budget.classifier_steps, seed)
        save_file(model.state_dict(), out / ASSET_FILES["classifier"])

    for which, arch in (("quality", "cnniqa"), ("heldout_quality", "digits_heldout_iqa")):
        if which not in names:
            continue
        steps = budget.quality_steps if which == "quality" else budget.heldout_quality_steps
        log(f"[assets] {which} ({arch}): {steps} steps")
        net, card = train_quality_model(which, steps, seed)
        path = out / ASSET_FILES[which]
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
        card["figures"] = _quality_figures(path, arch, card["family"])
        cards[which] = card

    if "base" in names:
        classifier_path = out / ASSET_FILES["classifier"]
        if not classifier_path.is_file():
            raise FileNotFoundError(f"the base model's figures need the classifier: {classifier_path} (build it first)")
        log(f"[assets] base DDPM: {budget.base_steps} steps")
        base, card = train_base_model(budget.base_steps, seed, log=log)
        save_base_model(base, out / ASSET_FILES["base"])
        log(f"[assets] base DDPM: evaluating {budget.eval_samples} samples")
        card["figures"] = base_model_figures(base, classifier_path, budget.eval_samples, budget.eval_sampling_steps, seed)
        cards["base"] = card

    if "segmenter" in names:
        log(f"[assets] segmenter: {budget.segmenter_steps} steps")
        net, card = train_segmenter(budget.segmenter_steps, seed)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out / ASSET_FILES["segmenter"])
        card["figures"] = segmenter_figures(net)
        cards["segmenter"] = card

    for name, card in cards.items():
        card["budget"] = asdict(budget)
        target = out / (ASSET_FILES[name] + "/card.json" if name == "base" else Path(ASSET_FILES[name]).stem + ".json")
        _write_card(Path(target), card)
        log(f"[assets] {name}: {json.dumps(card.get('figures', {}))}")
    return cards


def quality_spearman(model: QualityModel, images: torch.Tensor, family: dict, severities=(0.0, 0.25, 0.5, 0.75, 1.0), seed: int = 0) -> float:
    """Spearman correlation between the model's quality and the *negated* true severity, pooled over
    every degradation in `family` at every grade (1.0: ranks quality perfectly; reported in cards)."""
    from scipy.stats import spearmanr

    generator = torch.Generator().manual_seed(seed)
    scores, truth = [], []
    with torch.no_grad():
        for kind in family:
            for s in severities:
                severity = torch.full((len(images),), float(s))
                scores.append(model(degrade(images, kind, severity, generator)))
                truth.append(-severity)
    return float(spearmanr(torch.cat(scores).numpy(), torch.cat(truth).numpy()).statistic)
