"""adversarial (UniFL, arXiv 2404.05595, "adversarial feedback"): a reward model is trained as a
discriminator between real images and the model's few-step generations, and the generator's term
raises its score; this keeps few-step samples sharp where a fixed reward would be exploited.

The discriminator starts as a trainable copy of a quality model (any pyiqa name or {arch, weights}),
whose raw output is read as a logit. It has its own optimizer (the generator's optimizer must not
touch it) and its own step, `update(ctx)`, run by the objective after the model's step on the same
generated images, detached. Both its weights and its optimizer state are checkpointed.
Losses are the non-saturating logistic pair of Goodfellow et al. 2014.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from eval.quality import check_quality_spec
from objectives.context import StepContext, X0Source
from objectives.term import BuildEnv, Term, require_number


class Adversarial(Term):
    name = "adversarial"

    def __init__(self, discriminator="musiq", learning_rate: float = 1e-4, x0: str = "sampled", t_range=None,
                 sampling_steps: int = 4, feedback_steps: int = 1, sampler: str = "ddim", stop_low: int | None = None,
                 stop_high: int | None = None, start: int | None = None):
        check_quality_spec(discriminator, "discriminator")
        self.discriminator_spec = discriminator
        self.learning_rate = require_number("learning_rate", learning_rate, minimum=1e-12)
        self.source = X0Source.from_options(x0, t_range, sampling_steps, feedback_steps, sampler, stop_low, stop_high, start)
        self.discriminator = self.optimizer = None

    def setup(self, env: BuildEnv) -> None:
        from eval.quality import load_quality_model

        self.source.check(env.num_train_timesteps)
        reward = load_quality_model(self.discriminator_spec, env.device)
        self.discriminator = copy.deepcopy(reward).requires_grad_(True).train()
        self.optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=self.learning_rate, betas=(0.5, 0.999))

    def state_dict(self):
        return {"discriminator": self.discriminator.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer.load_state_dict(state["optimizer"])

    def logits(self, images01: torch.Tensor) -> torch.Tensor:
        """`[N]` real-vs-generated logits; the quality score, turned so that higher means real."""
        score = self.discriminator(images01)
        return -score if self.discriminator.lower_better else score

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        # Frozen for the generator's pass: its gradient would only be thrown away by update().
        self.discriminator.requires_grad_(False)
        try:
            return F.softplus(-self.logits((ctx.image(ctx.generated(self.source)) + 1) / 2))
        finally:
            self.discriminator.requires_grad_(True)

    def discriminator_loss(self, ctx: StepContext) -> torch.Tensor:
        """Per-sample `[N]` logistic loss: real images up, generated (detached) images down."""
        fake = (ctx.image(ctx.generated(self.source)).detach() + 1) / 2
        with torch.no_grad():
            real = (ctx.image(ctx.x0) + 1) / 2
        return F.softplus(-self.logits(real)) + F.softplus(self.logits(fake))

    def update(self, ctx: StepContext, sync=None) -> dict[str, torch.Tensor]:
        loss = self.discriminator_loss(ctx).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sync is not None:
            sync(list(self.discriminator.parameters()))
        self.optimizer.step()
        return {"discriminator": loss.detach()}
