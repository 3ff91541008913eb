"""anchor (ACPO, anchor-constrained perceptual optimization): keep the fine-tuned model's noise
prediction close to the frozen base model's at the same (x_t, t, conditioning).

Both outputs are converted to the noise they imply before comparing (`NoiseProcess.eps`): for an
epsilon model that is the raw output; for a v-prediction or sample-prediction model the raw outputs
are not noise, and their distance would weight timesteps differently from ACPO's. For a flow model
(velocity v, flow sigma s) the implied noise is x_t + (1 - s) v, so the anchor is (1 - s)^2 times the
squared velocity difference: ours, chosen so that the anchor means on a flow model what ACPO's
means on its epsilon UNet (the noise the model implies, not the raw output).

The perceptual reward pulls the model wherever the quality model likes; the anchor is what keeps it
a model of the data. With LoRA the base is the same network with its adapters disabled (no second
copy in memory); with full fine-tuning it is a frozen copy. Either way the trainer hands it over as
`ctx.base`, built once.

Where it acts (`at`), ours: ACPO's body was not available to us (its abstract only), so which
(x_t, t) the anchor is taken at is our choice, offered three ways:
- `denoise` (the default): the denoise step's (x_t, t), t uniform over the schedule;
- `feedback`: every (x_t, t) a feedback term differentiated through this step (NR-IQA's one-step
  x0 at its low t, a rollout's stop step), where the reward pushes; the denoise step's when no
  feedback term ran;
- `both`: the mean of the two.
The anchor runs after the feedback terms of its step (`after_feedback`), so it sees their forwards.
"""

from __future__ import annotations

import torch

from objectives.context import StepContext
from objectives.term import Term
from trainers.common.errors import OptionError

PLACES = ("denoise", "feedback", "both")


def noise_distance(output, base_output, x_t, t, process) -> torch.Tensor:
    """Per-sample mean squared distance between the noise two model outputs imply at (x_t, t)."""
    eps = process.eps(output.float(), x_t.float(), t)
    base_eps = process.eps(base_output.float(), x_t.float(), t)
    return (eps - base_eps).pow(2).flatten(1).mean(dim=1)


class Anchor(Term):
    name = "anchor"
    needs_base = True  # reads the frozen base model

    def __init__(self, at: str = "denoise"):
        if at not in PLACES:
            raise OptionError("at", f"expected one of {', '.join(PLACES)}, got {at!r}")
        self.at = at
        self.after_feedback = at != "denoise"

    def at_feedback(self, ctx: StepContext) -> torch.Tensor | None:
        """`[N]`: the mean distance over this step's feedback forwards (a forward of another batch
        size, e.g. one image per drawn prompt, counts its mean for every sample); None without any."""
        if not ctx.feedback_points:
            return None
        distances = []
        for point in ctx.feedback_points:
            with torch.no_grad():
                base_output = ctx.base(point.x_t, point.t, **point.conditioning).sample
            distance = noise_distance(point.output, base_output, point.x_t, point.t, ctx.process)
            distances.append(distance if len(distance) == len(ctx.x0) else distance.mean().expand(len(ctx.x0)))
        return torch.stack(distances).mean(dim=0)

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        """Per-sample mean squared distance `[N]` between the two noise predictions; 0 when the models agree."""
        at_feedback = self.at_feedback(ctx) if self.at != "denoise" else None
        if at_feedback is None:  # `denoise`, or no feedback term ran this step
            return self.at_denoise(ctx)
        return at_feedback if self.at == "feedback" else (self.at_denoise(ctx) + at_feedback) / 2

    @staticmethod
    def at_denoise(ctx: StepContext) -> torch.Tensor:
        return noise_distance(ctx.prediction, ctx.base_prediction, ctx.x_t, ctx.t, ctx.process)
