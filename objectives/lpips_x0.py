"""lpips_x0 (Cas-DM, Lei et al. 2024, arXiv 2401.02414, "Cascaded Diffusion Models... with a metric
function"): a second, cascaded module predicts the clean image from (x_t, the eps-module's x0
estimate, t); a metric function (LPIPS by default) is applied to that x0 only.

The eps-module's estimate enters the head detached, so no gradient from the metric reaches the
eps-module: its denoising objective is unchanged, and the metric only shapes the head. The head's
output is blended with the estimate by a t-dependent weight (alpha_bar_t): at low noise the
estimate is already good and the head only corrects; at high noise the head carries the image.
The head is trainable state: the trainer optimizes it with the model and checkpoints it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from objectives.context import StepContext
from objectives.networks import PerceptualDistance, check_network_spec
from objectives.term import BuildEnv, OptionError, Term, require_number


class CascadedX0Head(nn.Module):
    """`[N, C, H, W]` x_t and x0 estimate, `[N]` t -> a residual correction to the estimate."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2 * channels + 1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.SiLU(),
            nn.Conv2d(width, channels, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)  # starts as the identity on the estimate
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x_t, x0_estimate, t_fraction):
        t_map = t_fraction.view(-1, 1, 1, 1).expand(-1, 1, *x_t.shape[2:]).to(x_t.dtype)
        return x0_estimate + self.net(torch.cat([x_t, x0_estimate, t_map], dim=1))


class LpipsX0(Term):
    name = "lpips_x0"

    def __init__(self, metric="lpips", mse_weight: float = 1.0, width: int = 32):
        check_network_spec(metric, "metric", distances=True)
        self.metric_spec = metric
        self.mse_weight = require_number("mse_weight", mse_weight)  # Cas-DM trains the head on MSE + metric
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise OptionError("width", f"expected an integer >= 1, got {width!r}")
        self.width = width
        self.head = self.distance = None

    def setup(self, env: BuildEnv) -> None:
        self.distance = PerceptualDistance(self.metric_spec, env.device, "metric")
        self.head = CascadedX0Head(env.model_channels, self.width).to(env.device)

    def trainable_parameters(self):
        return list(self.head.parameters())

    def state_dict(self):
        return {"head": self.head.state_dict()}

    def load_state_dict(self, state):
        self.head.load_state_dict(state["head"])

    def x0(self, ctx: StepContext) -> torch.Tensor:
        """The cascaded x0: head output blended with the (detached) eps-module estimate."""
        estimate = ctx.x0_estimate.detach()  # the stop-gradient that keeps the eps-module untouched
        alphas = ctx.scheduler.alphas_cumprod.to(estimate.device)[ctx.t].view(-1, 1, 1, 1).to(estimate.dtype)
        head = self.head(ctx.x_t, estimate, ctx.t.float() / ctx.num_train_timesteps)
        return alphas * estimate + (1 - alphas) * head

    def __call__(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        x0 = self.x0(ctx)
        parts = {"metric": self.distance((ctx.image(x0) + 1) / 2, (ctx.image(ctx.x0) + 1) / 2)}
        if self.mse_weight > 0:
            parts["mse"] = self.mse_weight * (x0.float() - ctx.x0.float()).pow(2).flatten(1).mean(dim=1)
        return parts
