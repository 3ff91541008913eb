"""denoise: the standard diffusion loss (Ho et al. 2020, "Denoising Diffusion Probabilistic Models";
v-prediction from Salimans & Ho 2022), optionally min-SNR weighted (Hang et al. 2023, arXiv 2303.09556);
for a flow model the flow matching loss (Lipman et al. 2023; rectified flow as SD3 trains it, Esser
et al. 2024, arXiv 2403.03206): the velocity eps - x0 as the target, optionally weighted by one of
the loss weightings diffusers' SD3 training script offers (`weighting`: sigma_sqrt or cosmap; its
timestep densities are the loop's `train.timestep_density`)."""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3

from objectives.context import StepContext
from objectives.term import BuildEnv, Term, require_number
from trainers.common.errors import OptionError

FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


class Denoise(Term):
    name = "denoise"

    def __init__(self, min_snr_gamma: float = 0.0, weighting: str = "none"):
        self.min_snr_gamma = require_number("min_snr_gamma", min_snr_gamma)  # 0 disables min-SNR weighting
        if weighting not in FLOW_WEIGHTINGS:
            raise OptionError("weighting", f"expected one of {', '.join(FLOW_WEIGHTINGS)}, got {weighting!r}")
        self.weighting = weighting

    def setup(self, env: BuildEnv) -> None:
        flow = env.process.flow
        if flow and self.min_snr_gamma > 0:
            raise OptionError("min_snr_gamma", "is for DDPM-family models; a flow model takes `weighting` (sigma_sqrt, cosmap)")
        if not flow and self.weighting != "none":
            raise OptionError("weighting", "is for flow models; a DDPM-family model takes `min_snr_gamma`")

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        """Per-sample loss `[N]`: mean squared error against the target of the model's prediction type."""
        loss = (ctx.prediction.float() - ctx.target.float()).pow(2).mean(dim=(1, 2, 3))
        if self.weighting != "none":  # a flow model's (setup refuses it on a DDPM-family one)
            loss = loss * compute_loss_weighting_for_sd3(self.weighting, ctx.process.flow_sigma(ctx.t, loss)).to(loss.device)
        elif self.min_snr_gamma > 0:
            loss = loss * ctx.process.min_snr_weight(ctx.t, self.min_snr_gamma)
        return loss
