"""denoise: the standard diffusion loss (Ho et al. 2020, "Denoising Diffusion Probabilistic Models";
v-prediction from Salimans & Ho 2022), optionally min-SNR weighted (Hang et al. 2023, arXiv 2303.09556)."""

from __future__ import annotations

import torch

from objectives.context import StepContext
from objectives.term import Term, require_number


class Denoise(Term):
    name = "denoise"

    def __init__(self, min_snr_gamma: float = 0.0):
        self.min_snr_gamma = require_number("min_snr_gamma", min_snr_gamma)  # 0 disables min-SNR weighting

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        """Per-sample loss `[N]`: mean squared error against the target of the model's prediction type."""
        alphas = ctx.scheduler.alphas_cumprod.to(ctx.x0.device)[ctx.t].view(-1, 1, 1, 1)
        kind = ctx.prediction_type
        if kind == "epsilon":
            target = ctx.noise
        elif kind == "v_prediction":
            target = alphas.sqrt() * ctx.noise - (1 - alphas).sqrt() * ctx.x0
        elif kind == "sample":
            target = ctx.x0
        else:
            raise ValueError(f"unsupported prediction_type {kind!r}")
        loss = (ctx.prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        if self.min_snr_gamma > 0:
            snr = (alphas / (1 - alphas)).flatten()
            weight = torch.clamp(snr, max=self.min_snr_gamma) / {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[kind]
            loss = loss * weight
        return loss
