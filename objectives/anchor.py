"""anchor (ACPO, anchor-constrained perceptual optimization): keep the fine-tuned model's noise
prediction close to the frozen base model's at the same (x_t, t, conditioning).

The perceptual reward pulls the model wherever the quality model likes; the anchor is what keeps it
a model of the data. With LoRA the base is the same network with its adapters disabled (no second
copy in memory); with full fine-tuning it is a frozen copy. Either way the trainer hands it over as
`ctx.base`, built once.
"""

from __future__ import annotations

import torch

from objectives.context import StepContext
from objectives.term import Term


class Anchor(Term):
    name = "anchor"
    needs_base = True  # reads the frozen base model

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        """Per-sample mean squared distance `[N]` between the two predictions; 0 when the models agree."""
        return (ctx.prediction.float() - ctx.base_prediction.float()).pow(2).flatten(1).mean(dim=1)
