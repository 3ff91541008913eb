"""One evaluation of a denoiser: sample, then fidelity (FID/KID) and quality scores per step count.

Models it needs (feature extractor, quality models) are built once, in the constructor, and reused
for every checkpoint; only the samples change between calls.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @torch.no_grad()
    def __call__(self, unet, scheduler_config, vae=None, encode_prompt=None) -> dict[str, float]:
        """Metrics keyed `fid@25`, `aesthetic@25`, ... for every step count; `fid` and `aesthetic`
        (the sweep's two objectives) are those at the first step count."""
        metrics = {}
        for steps in self.sampling_steps:
            images = sample_images(unet, scheduler_config, self.samples, steps=steps, sampler=self.sampler, seed=self.seed,
                                   device=self.device, vae=vae, encode_prompt=encode_prompt, prompts=list(self.prompts))
            fidelity = fidelity_metrics(images, self.reference, self.feature_extractor, self.feature_extractor_weights, device=self.device)
            metrics[f"fid@{steps}"] = fidelity["fid"]
            metrics[f"kid@{steps}"] = fidelity["kid"]
            metrics[f"quality@{steps}"] = self.quality(images.to(self.device)).mean().item()
            metrics[f"aesthetic@{steps}"] = self.aesthetic(images.to(self.device)).mean().item()
        first = self.sampling_steps[0]
        metrics["fid"], metrics["aesthetic"] = metrics[f"fid@{first}"], metrics[f"aesthetic@{first}"]
        return metrics
