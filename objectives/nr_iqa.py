"""nr_iqa (ACPO): a learned no-reference IQA model scores the predicted clean image; the loss
improves the score. Hinge form `relu(target - score)` as in ImageReward's ReFL and UniFL.

The model is any pyiqa metric name (`musiq`, `topiq_nr`, ...) or `{arch, weights}` for a pyiqa
architecture with local weights (the digits preset's CNNIQA). The sign follows the metric's
`lower_better`; images go in as [0, 1] and are clamped, because pyiqa does not check the range in
loss mode. The clean image is the one-step estimate at t in `t_range`, or a sampled image with
truncated backprop (`x0: sampled`, `sampling_steps`, `feedback_steps`), decoded through the VAE
inside the graph for latent models.
"""

from __future__ import annotations

import torch

from eval.quality import check_quality_spec
from objectives.context import StepContext, X0Source
from objectives.term import BuildEnv, OptionError, Term, require_number


def quality_loss(score: torch.Tensor, lower_better: bool, target: float | None) -> torch.Tensor:
    """Per-sample loss from scores `[N]`: lower is better for the loss whatever the metric's direction.
    `target` is in the metric's own units: no loss once a sample is at least that good."""
    if target is None:
        return score if lower_better else -score
    return torch.relu(score - target) if lower_better else torch.relu(target - score)


class NrIqa(Term):
    name = "nr_iqa"

    def __init__(self, metric="musiq", target: float | None = None, x0: str = "one_step", t_range=None,
                 sampling_steps: int = 20, feedback_steps: int = 1, sampler: str = "ddim", stop_low: int | None = None,
                 stop_high: int | None = None, start: int | None = None):
        check_quality_spec(metric, "metric")
        self.metric_spec = metric
        self.target = require_number("target", target, minimum=float("-inf"), allow_none=True)
        self.source = X0Source.from_options(x0, t_range, sampling_steps, feedback_steps, sampler, stop_low, stop_high, start)
        self.quality = None

    def setup(self, env: BuildEnv) -> None:
        from eval.quality import load_quality_model

        self.source.check(env.num_train_timesteps)
        self.quality = load_quality_model(self.metric_spec, env.device)  # frozen, eval mode

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        images = (ctx.image(ctx.generated(self.source)) + 1) / 2
        return quality_loss(self.quality(images), self.quality.lower_better, self.target)
