"""One evaluation of a denoiser: sample, then fidelity, diversity and quality scores per step count.

Models it needs (feature extractor, quality models) are built once, in the constructor or on first
use, and reused for every checkpoint; only the samples change between calls. The reference set's
features are cached on disk by content (see `eval/fidelity.py`).

Metrics, for each sampling step count S:
  fid@S, kid@S       against the reference set, in the feature extractor's space (lower is better)
  diversity@S        mean pairwise feature distance between samples (higher: more varied)
  quality@S          the quality model the objective trains against
  aesthetic@S        the held-out quality model: the sweep's second objective
  <name>@S           every extra quality model named in `eval.extra_quality`
  clip_score@S       text models with `clip_score` set: image-prompt agreement (pyiqa's clipscore)
plus `fid` and `aesthetic` (the sweep's objectives) at the first step count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from eval.fidelity import fidelity_metrics
from eval.quality import QualityModel
from eval.sampling import sample_images


@dataclass
class Evaluator:
    reference: torch.Tensor  # [M, C, H, W] in [0, 1]: the real images FID is measured against
    feature_extractor: str
    feature_extractor_weights: str | None
    quality: QualityModel  # the model the objective trains against
    aesthetic: QualityModel  # held out: never seen by the objective; the sweep's second objective
    samples: int = 500
    sampling_steps: tuple[int, ...] = (25,)
    sampler: str = "ddim"
    seed: int = 0  # the same noise for every checkpoint: differences come from the weights alone
    device: str = "cpu"
    prompts: tuple[str, ...] = ()  # text models: cycled over the samples
    guidance_scale: float = 1.0  # text models: classifier-free guidance when sampling
    clip_score: object = None  # text models: (images [N,3,H,W] in [0,1], captions) -> [N], higher is better
    extra_quality: dict[str, QualityModel] = field(default_factory=dict)
    cache_dir: str | Path | None = None  # reference features; None: $ACPO_FIDELITY_CACHE or ~/.cache/acpo/fidelity
    last_samples: torch.Tensor | None = field(default=None, repr=False)  # the first step count's images, for sample grids

    def directions(self) -> dict[str, str]:
        """Which way is better for each metric family: what a table or a Pareto front needs."""
        out = {"fid": "min", "kid": "min", "diversity": "max", "clip_score": "max"}
        for name, model in {"quality": self.quality, "aesthetic": self.aesthetic, **self.extra_quality}.items():
            out[name] = "min" if model.lower_better else "max"
        return out

    @torch.no_grad()
    def __call__(self, unet, scheduler_config, vae=None, encode_prompt=None) -> dict[str, float]:
        metrics = {}
        for steps in self.sampling_steps:
            images = sample_images(unet, scheduler_config, self.samples, steps=steps, sampler=self.sampler, seed=self.seed,
                                   device=self.device, vae=vae, encode_prompt=encode_prompt, prompts=list(self.prompts),
                                   guidance_scale=self.guidance_scale)
            fidelity = fidelity_metrics(images, self.reference, self.feature_extractor, self.feature_extractor_weights,
                                        device=self.device, cache_dir=self.cache_dir)
            for key in ("fid", "kid", "diversity"):
                metrics[f"{key}@{steps}"] = fidelity[key]
            if steps == self.sampling_steps[0]:
                self.last_samples = images[:64]
            on_device = images.to(self.device)
            for name, model in {"quality": self.quality, "aesthetic": self.aesthetic, **self.extra_quality}.items():
                metrics[f"{name}@{steps}"] = model(on_device).mean().item()
            if self.clip_score is not None and self.prompts and encode_prompt is not None:
                captions = [self.prompts[i % len(self.prompts)] for i in range(len(images))]  # sample_images' cycling
                metrics[f"clip_score@{steps}"] = self.clip_score(on_device, captions).float().mean().item()
        first = self.sampling_steps[0]
        metrics["fid"], metrics["aesthetic"] = metrics[f"fid@{first}"], metrics[f"aesthetic@{first}"]
        return metrics


def reward_hacking_gap(metrics: dict, base: dict, steps: int, lower_better: dict[str, bool] | None = None) -> float:
    """How much more the training quality score improved than the held-out score did, both measured
    from the base model, in each model's own units with improvements counted positive. A large gap
    means the objective learned to please its own reward model rather than to make better images."""
    sign = {name: -1.0 if (lower_better or {}).get(name) else 1.0 for name in ("quality", "aesthetic")}
    trained = sign["quality"] * (metrics[f"quality@{steps}"] - base[f"quality@{steps}"])
    held_out = sign["aesthetic"] * (metrics[f"aesthetic@{steps}"] - base[f"aesthetic@{steps}"])
    return trained - held_out
