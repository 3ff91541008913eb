"""denoise: the standard diffusion loss (Ho et al. 2020, "Denoising Diffusion Probabilistic Models";
v-prediction from Salimans & Ho 2022), optionally min-SNR weighted (Hang et al. 2023, arXiv 2303.09556);
for a flow model the flow matching loss (Lipman et al. 2023; rectified flow as SD3 trains it, Esser
et al. 2024, arXiv 2403.03206): the velocity eps - x0 as the target, optionally weighted by one of
the loss weightings diffusers' SD3 training script offers (`weighting`: sigma_sqrt or cosmap; its
timestep densities are the loop's `train.timestep_density`)."""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3

from objectives.context import StepContext, flow_sigma
from objectives.term import BuildEnv, OptionError, Term, require_number

FLOW_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


class Denoise(Term):
    name = "denoise"

    def __init__(self, min_snr_gamma: float = 0.0, weighting: str = "none"):
        self.min_snr_gamma = require_number("min_snr_gamma", min_snr_gamma)  # 0 disables min-SNR weighting
        if weighting not in FLOW_WEIGHTINGS:
            raise OptionError("weighting", f"expected one of {', '.join(FLOW_WEIGHTINGS)}, got {weighting!r}")
        self.weighting = weighting

    def setup(self, env: BuildEnv) -> None:
        flow = env.prediction_type == "flow_prediction"
        if flow and self.min_snr_gamma > 0:
            raise OptionError("min_snr_gamma", "is for DDPM-family models; a flow model takes `weighting` (sigma_sqrt, cosmap)")
        if not flow and self.weighting != "none":
            raise OptionError("weighting", "is for flow models; a DDPM-family model takes `min_snr_gamma`")

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        """Per-sample loss `[N]`: mean squared error against the target of the model's prediction type."""
        loss = (ctx.prediction.float() - ctx.target.float()).pow(2).mean(dim=(1, 2, 3))
        kind = ctx.prediction_type
        if kind == "flow_prediction" and self.weighting != "none":
            loss = loss * compute_loss_weighting_for_sd3(self.weighting, flow_sigma(ctx.scheduler, ctx.t, loss)).to(loss.device)
        elif self.min_snr_gamma > 0:
            alphas = ctx.scheduler.alphas_cumprod.to(ctx.x0.device)[ctx.t]
            snr = alphas / (1 - alphas)
            weight = torch.clamp(snr, max=self.min_snr_gamma) / {"epsilon": snr, "v_prediction": snr + 1, "sample": torch.ones_like(snr)}[kind]
            loss = loss * weight
        return loss
