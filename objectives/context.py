"""The step's shared context: what every term may read, each piece computed at most once.

Terms read attributes; expensive ones (the trainable model's prediction, the one-step x0 estimate)
are `cached_property`s, so the first term that needs one pays for it and the rest reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass(eq=False)
class StepContext:
    """x0, noise, x_t: `[N, C, H, W]`, images in [-1, 1]; t: `[N]` integer timesteps."""

    model: torch.nn.Module  # the trainable denoiser
    scheduler: object  # diffusers DDPMScheduler (alphas_cumprod, prediction_type)
    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    conditioning: dict = field(default_factory=dict)  # e.g. encoder_hidden_states for text models

    @cached_property
    def x_t(self) -> torch.Tensor:
        return self.scheduler.add_noise(self.x0, self.noise, self.t)

    @cached_property
    def prediction(self) -> torch.Tensor:
        """The trainable model's output at (x_t, t): one forward pass shared by every term."""
        return self.model(self.x_t, self.t, **self.conditioning).sample

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type
