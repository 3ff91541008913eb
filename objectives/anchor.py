"""anchor (ACPO, anchor-constrained perceptual optimization): keep the fine-tuned model's noise
prediction close to the frozen base model's at the same (x_t, t, conditioning).

Both outputs are converted to the noise they imply before comparing (`eps_from_prediction`): for an
epsilon model that is the raw output; for a v-prediction or sample-prediction model the raw outputs
are not noise, and their distance would weight timesteps differently from ACPO's.

The perceptual reward pulls the model wherever the quality model likes; the anchor is what keeps it
a model of the data. With LoRA the base is the same network with its adapters disabled (no second
copy in memory); with full fine-tuning it is a frozen copy. Either way the trainer hands it over as
`ctx.base`, built once.
"""

from __future__ import annotations

import torch

from objectives.context import StepContext, eps_from_prediction
from objectives.term import Term


class Anchor(Term):
    name = "anchor"
    needs_base = True  # reads the frozen base model

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        """Per-sample mean squared distance `[N]` between the two noise predictions; 0 when the models agree."""
        eps = eps_from_prediction(ctx.prediction.float(), ctx.x_t.float(), ctx.t, ctx.scheduler)
        base_eps = eps_from_prediction(ctx.base_prediction.float(), ctx.x_t.float(), ctx.t, ctx.scheduler)
        return (eps - base_eps).pow(2).flatten(1).mean(dim=1)
