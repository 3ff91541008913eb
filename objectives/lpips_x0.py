"""lpips_x0 (Cas-DM: An et al. 2024, arXiv 2401.02414, "Bring Metric Functions into Diffusion
Models"): a second, cascaded module predicts the clean image from the eps-module's output; a metric
function (LPIPS by default) is applied to that x0 only, so the eps-module is unaffected.

The cascaded module (`CascadedX0Head`) sees x_t, the eps-module's one-step x0 estimate e (bounded,
below) and t, and predicts a correction to it and a blend weight r_t in (0, 1):

    x0 = r_t * e + (1 - r_t) * (e + correction)

This is the paper's blend `r * x0_eps + (1 - r) * x0_phi` with the x0-module's output written as a
residual on the estimate, `x0_phi = e + correction` (ours: it lets the head start as the identity,
below).
The estimate enters the head detached: no gradient from the metric reaches the eps-module, whose
denoising objective is unchanged. The head is part of the model, not of the loss: the trainer
optimizes and checkpoints it, and sampling, evaluation and the exported model use it at every step
through `CascadedDenoiser` (trainers/denoiser/cascade.py: the head is the model's), which returns the prediction implied by the cascaded x0 (for DDIM and
DPM-Solver, the step is formed from the cascaded x0 and the noise implied by it).

Where this departs from the paper: the paper trains both modules from scratch with the metric on the
x0-module; here the eps-module is a pretrained model being fine-tuned (by `denoise`, or not at all)
and the head starts as the identity (zero correction) so that adding it changes nothing (within the
bound) until it has learned. The head is a small convolutional network (`width`, `depth`), not a
second UNet.
The cascade is built on the estimate bounded: to the data range when the scheduler clips samples
(its steps clip the same x0, so sampling is unchanged), else (latent models) to +-8, past any
sampled latent (the digits-t2i base's reach 5.1; a few of its first sampling steps' estimates
exceed 8). Near t = T the estimate is the noise amplified (~650x on the digits schedule, up to
~20,000x on digits-t2i's): unbounded, that error, which no correction can undo, was the head's MSE
(a mean of 357 on digits and of 300 to 2,500 on digits-t2i, against 0.7 and 0.33 for the metric), so
the metric barely trained it; bounded, 0.07 and 0.5 (docs/studies.md, "The methods' last departures").

Other terms' training-time rollouts and samples (ReFL, PeFL, adversarial) go through the cascade, as
sampling and evaluation do (`wrap_for_rollouts`: their gradient reaches the eps-module through it,
the head stays lpips_x0's alone).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from objectives.context import StepContext
from objectives.networks import PerceptualDistance, check_network_spec
from objectives.term import BuildEnv, Term, require_number
from trainers.denoiser.cascade import CascadedDenoiser, CascadedX0Head, cascaded_x0, sample_clip
from trainers.common.errors import OptionError


class LpipsX0(Term):
    name = "lpips_x0"

    def __init__(self, metric="lpips", mse_weight: float = 1.0, width: int = 32, depth: int = 2):
        check_network_spec(metric, "metric", distances=True)
        self.metric_spec = metric
        self.mse_weight = require_number("mse_weight", mse_weight)  # Cas-DM trains the x0-module on MSE + metric
        for name, value in (("width", width), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(name, f"expected an integer >= 1, got {value!r}")
        self.width, self.depth = width, depth
        self.head = self.distance = None

    def setup(self, env: BuildEnv) -> None:
        self.distance = PerceptualDistance(self.metric_spec, env.device, "metric")
        self.head = CascadedX0Head(env.model_channels, self.width, self.depth).to(env.device)

    def trainable_parameters(self):
        return list(self.head.parameters())

    def state_dict(self):
        return {"head": self.head.state_dict()}

    def load_state_dict(self, state):
        self.head.load_state_dict(state["head"])

    def wrap_for_sampling(self, denoiser: nn.Module, scheduler_config) -> nn.Module:
        return CascadedDenoiser(denoiser, self.head, scheduler_config)

    def wrap_for_rollouts(self, denoiser: nn.Module, scheduler_config) -> nn.Module:
        return CascadedDenoiser(denoiser, self.head, scheduler_config, train_head=False)

    def x0(self, ctx: StepContext) -> torch.Tensor:
        """The cascaded x0 at the step's (x_t, t), from the eps-module's detached estimate."""
        estimate = ctx.x0_estimate.detach()  # the stop-gradient that keeps the eps-module untouched
        return cascaded_x0(self.head, ctx.x_t, estimate, ctx.t, ctx.num_train_timesteps, sample_clip(ctx.process.config))

    def __call__(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        x0 = self.x0(ctx)
        parts = {"metric": self.distance((ctx.image(x0) + 1) / 2, (ctx.image(ctx.x0) + 1) / 2)}
        if self.mse_weight > 0:
            parts["mse"] = self.mse_weight * (x0.float() - ctx.x0.float()).pow(2).flatten(1).mean(dim=1)
        return parts
