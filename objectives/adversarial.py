"""adversarial (UniFL, arXiv 2404.05595, Sec. 4.3 "adversarial feedback learning", Eq. 6): a reward
model is trained as a discriminator between real images and the model's x0, and the generator's
term raises its score; this keeps few-step samples sharp where a fixed reward would be exploited.

As UniFL runs it:
- the discriminator starts as a trainable copy of a named reward model (`discriminator`: any pyiqa
  name, a prompt-conditioned reward such as `imagereward`, or {arch, weights}; UniFL: its detail
  reward); it has its own optimizer and trains on **every micro-batch** (`own_loss`, backpropagated
  by the loop with the model's loss), stepping once per optimizer step (`own_step`);
- the discriminator's loss is Eq. 6's logistic one (`loss: logistic`, the default):
  `L_D = -log s(D(x0_real)) - log(1 - s(D(x0_gen)))`, s the sigmoid;
- the generator's loss is Eq. 6's **linear** one, `L_G = -D(x0_gen)`: its gradient is the score's
  gradient whatever the score's scale, where `softplus(-score)` would vanish (~e^-50 on MUSIQ's 0..100);
- x0 comes as in PeFL (UniFL: "diffusion and denoising consecutively"): the real image is noised to
  the start of a 20-step DDIM schedule and denoised, without a graph, to a stop step drawn over the
  whole schedule (`start: 0`, `stop_low: 0`, `stop_high: 19`: UniFL's "optimization step t in [0, 20]
  encompassing the entire diffusion process"), where the forward keeps gradients; so the high-noise
  steps that few-step sampling takes are trained too. UniFL's stage 2 has no diffusion loss (Eq. 7):
  the presets that keep `denoise` beside it say so.

Ours, said here:
- the discriminator's output is the reward score under a learned affine calibration,
  `D = a * score + b` (a, b trained with the discriminator), set on the first real batch to
  a = 1/std, b = -a * mean of its scores, so that a 0..100 metric and a 0..1 one both start with
  logits of order 1, where the sigmoid is not saturated. UniFL does not say how it scales the score;
- `loss: hinge` (`relu(1 - D(real)) + relu(1 + D(fake))`, the hinge GAN of Lim & Ye 2017) is the
  discriminator loss this term used before, kept as an option;
- a short schedule, `sampling_steps: 4, start: 1, stop_low: 2, stop_high: 3` (the few-step regime
  alone: 2-3 forwards a step where the whole schedule takes 10.5 on average), is what the digits
  studies use for their budget, named there as ours. Measured on digits at 4 sampling steps (docs/studies.md,
  "UniFL's adversarial feedback"): the paper's version cost about twice the FID of that one for the same held-out gain,
  within noise on three seeds.

On a flow model (SD3, Flux) the schedule is the flow Euler sampler's (`euler`, its default there; `ddim` is refused) and
`start` noises the real image along the flow path; ours, as UniFL's models are DDPM-family UNets.
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
from trainers.common.errors import OptionError


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


ROLLOUT_OVER_THE_SCHEDULE = dict(sampling_steps=20, start=0, stop_low=0, stop_high=19)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "logistic") -> torch.Tensor:
    """Per-sample `[N]` discriminator loss: UniFL's Eq. 6 (logistic, `softplus(-x) = -log s(x)` and
    `softplus(x) = -log(1 - s(x))`, numerically stable) or the hinge GAN's."""
    if kind == "logistic":
        return F.softplus(-real_logits) + F.softplus(fake_logits)
    return F.relu(1 - real_logits) + F.relu(1 + fake_logits)


class Adversarial(Term):
    name = "adversarial"

    def __init__(self, discriminator="musiq", learning_rate: float = 1e-5, loss: str = "logistic",
                 x0: str | dict = "rollout"):
        check_quality_spec(discriminator, "discriminator")
        if loss not in ("logistic", "hinge"):
            raise OptionError("loss", f"expected 'logistic' (UniFL's Eq. 6) or 'hinge' (ours, before), got {loss!r}")
        self.loss = loss
        self.discriminator_spec = discriminator
        self.learning_rate = require_number("learning_rate", learning_rate, minimum=1e-12)
        self.source = rollout_from_real(x0, ROLLOUT_OVER_THE_SCHEDULE)
        self.discriminator = self.calibration = self.optimizer = None

    def setup(self, env: BuildEnv) -> None:
        self.source.check(env.process)
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
        """Per-sample `[N]` discriminator loss on this micro-batch: real images up, generated (detached) down."""
        self._calibrate(ctx)
        fake = (ctx.image(ctx.generated(self.source)).detach() + 1) / 2
        with torch.no_grad():
            real = (ctx.image(ctx.x0) + 1) / 2
        return {"discriminator": discriminator_loss(self.logits(real, ctx.prompts), self.logits(fake, ctx.prompts), self.loss)}

    def own_step(self, sync=None) -> None:
        if sync is not None:
            sync(self.parameters())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
