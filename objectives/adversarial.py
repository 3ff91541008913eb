"""adversarial (UniFL, arXiv 2404.05595, Sec. 3.4 "adversarial feedback"): a reward model is trained
as a discriminator between real images and the model's few-step x0, and the generator's term raises
its score; this keeps few-step samples sharp where a fixed reward would be exploited.

As UniFL runs it:
- the discriminator starts as a trainable copy of a named reward model (`discriminator`: any pyiqa
  name, a prompt-conditioned reward such as `imagereward`, or {arch, weights}); it has its own
  optimizer and trains on **every micro-batch** (`own_loss`, backpropagated by the loop with the
  model's loss), stepping once per optimizer step (`own_step`);
- the generator's loss is **linear** in the discriminator's output, `-D(x0)` (UniFL's Eq. 6; the hinge
  GAN generator of Lim & Ye 2017): its gradient is the score's gradient whatever the score's scale,
  where the logistic `softplus(-score)` we used before vanished (~e^-50 for MUSIQ's 0..100);
- x0 comes from a rollout of the noised real image (`x0: rollout`, 4-step schedule: the few-step
  regime the term is for; start at step 1, stop at 2 or 3, gradients through the stop step).

Ours, said here: the discriminator's output is the reward score under a learned affine calibration,
`D = a * score + b` (a, b trained with the discriminator), set on the first real batch to
a = 1/std, b = -a * mean of its scores, so that a 0..100 metric and a 0..1 one both start with logits
of order 1 and the hinge loss `relu(1 - D(real)) + relu(1 + D(fake))` (the discriminator half of the
same hinge GAN) starts in its linear region. UniFL does not say how it scales the score.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from eval.quality import check_quality_spec
from objectives.context import StepContext
from objectives.nr_iqa import load_reward
from objectives.pefl import rollout_from_real
from objectives.term import BuildEnv, Term, require_number


class Calibration(nn.Module):
    """`a * score + b`, initialised from the first batch of real scores it sees."""

    def __init__(self):
        super().__init__()
        self.scale, self.shift = nn.Parameter(torch.ones(())), nn.Parameter(torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def initialize(self, real_scores: torch.Tensor) -> None:
        mean, std = real_scores.float().mean(), real_scores.float().std() if len(real_scores) > 1 else torch.ones(())
        scale = 1.0 / torch.clamp(std, min=1e-3 * (mean.abs() + 1))
        self.scale.copy_(scale)
        self.shift.copy_(-scale * mean)
        self.initialized.fill_(True)

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return self.scale * scores + self.shift


class Adversarial(Term):
    name = "adversarial"

    def __init__(self, discriminator="musiq", learning_rate: float = 1e-5, x0: str = "rollout", sampling_steps: int = 4,
                 feedback_steps: int = 1, sampler: str = "ddim", stop_low: int | None = 2, stop_high: int | None = 3,
                 start: int | None = 1, t_range=None):
        check_quality_spec(discriminator, "discriminator")
        self.discriminator_spec = discriminator
        self.learning_rate = require_number("learning_rate", learning_rate, minimum=1e-12)
        self.source = rollout_from_real(x0, sampling_steps, feedback_steps, sampler, stop_low, stop_high, start, t_range)
        self.discriminator = self.calibration = self.optimizer = None

    def setup(self, env: BuildEnv) -> None:
        self.source.check(env.num_train_timesteps)
        reward = load_reward(self.discriminator_spec, env, "discriminator")
        self.discriminator = copy.deepcopy(reward).requires_grad_(True).train()
        self.calibration = Calibration().to(env.device)
        parameters = list(self.discriminator.parameters()) + list(self.calibration.parameters())
        self.optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate, betas=(0.5, 0.999))

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.discriminator.parameters()) + list(self.calibration.parameters())

    def state_dict(self):
        return {"discriminator": self.discriminator.state_dict(), "calibration": self.calibration.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.discriminator.load_state_dict(state["discriminator"])
        self.calibration.load_state_dict(state["calibration"])
        self.optimizer.load_state_dict(state["optimizer"])

    def logits(self, images01: torch.Tensor, prompts) -> torch.Tensor:
        """`[N]` real-vs-generated logits: the calibrated reward score, turned so that higher means real."""
        score = self.discriminator(images01, prompts)
        score = -score if self.discriminator.lower_better else score
        if not bool(self.calibration.initialized):
            raise RuntimeError("adversarial: the calibration is set from real scores first (own_loss), before any logit")
        return self.calibration(score)

    def _calibrate(self, ctx: StepContext) -> None:
        if not bool(self.calibration.initialized):
            with torch.no_grad():
                score = self.discriminator((ctx.image(ctx.x0) + 1) / 2, ctx.prompts)
                self.calibration.initialize(-score if self.discriminator.lower_better else score)

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        self._calibrate(ctx)
        # Frozen for the generator's pass: its gradient would land in the discriminator's grads.
        parameters = self.parameters()
        for p in parameters:
            p.requires_grad_(False)
        try:
            return -self.logits((ctx.image(ctx.generated(self.source)) + 1) / 2, ctx.prompts)
        finally:
            for p in parameters:
                p.requires_grad_(True)

    def own_loss(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Per-sample `[N]` hinge loss on this micro-batch: real images up, generated (detached) down."""
        self._calibrate(ctx)
        fake = (ctx.image(ctx.generated(self.source)).detach() + 1) / 2
        with torch.no_grad():
            real = (ctx.image(ctx.x0) + 1) / 2
        return {"discriminator": F.relu(1 - self.logits(real, ctx.prompts)) + F.relu(1 + self.logits(fake, ctx.prompts))}

    def own_step(self, sync=None) -> None:
        if sync is not None:
            sync(self.parameters())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
