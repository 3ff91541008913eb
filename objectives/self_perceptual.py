"""self_perceptual (Lin & Yang 2024, arXiv 2401.00110, "Diffusion Model with Perceptual Loss"):
the frozen diffusion model itself is the perceptual network.

Re-noise the predicted x0 and the true x0 to a random t' with the *same* noise, run both through the
frozen base model, and compare its mid-block features. Identical x0 give identical features, so the
loss is 0 exactly when the prediction is right; the target side carries no graph.

Where the predicted x0 is taken (`x0_t_range`), by the model's prediction type:
- v-prediction and sample prediction (the paper's SD 2.1 is v-prediction with zero terminal SNR): at
  the training step's own t, every t, as the paper does (the shared denoise forward, no extra pass);
- epsilon prediction: at t in [0, T/2) (`StepContext.default_t_range`), a departure of ours: an
  epsilon model's x0 near t = T multiplies its noise error by up to ~650x (digits schedule), and that
  one sample would dominate the loss. `x0_t_range: [0, T]` restores the paper's choice there too.

Flow models (ours: the paper's model is a UNet): re-noised along the flow path, (1 - s') x0 + s' eps,
and compared on the frozen transformer's middle block's image tokens (`StepContext.base_features`);
the predicted x0 is taken at every t, as for v-prediction (a flow's x0 = x_t - s v multiplies the
velocity error by s <= 1).

The paper trains on this loss *instead of* the diffusion MSE. `sweeps/presets/digits-self-perceptual.yaml`
runs it that way (`denoise: 0`); docs/methods.md's example and the digits study keep `denoise: 1.0` beside
it (ours: the study compares each method as an addition to plain fine-tuning).
"""

from __future__ import annotations

import torch

from objectives.context import StepContext
from objectives.term import BuildEnv, Term, check_t_range, check_t_range_fits


class SelfPerceptual(Term):
    name = "self_perceptual"
    needs_base = True  # reads the frozen base model

    def __init__(self, t_range=None, x0_t_range=None):
        self.t_range = check_t_range(t_range)  # where t' is drawn; default every timestep
        self.x0_t_range = check_t_range(x0_t_range, "x0_t_range")  # where the predicted x0 is taken; default: x0_range()

    def setup(self, env: BuildEnv) -> None:
        check_t_range_fits(self.t_range, env.num_train_timesteps)
        check_t_range_fits(self.x0_t_range, env.num_train_timesteps, "x0_t_range")

    def x0_range(self, ctx: StepContext) -> tuple[int, int]:
        """`x0_t_range` as set, else by prediction type: every t (the paper) unless the model predicts epsilon."""
        if self.x0_t_range is not None:
            return self.x0_t_range
        return ctx.default_t_range() if ctx.process.prediction == "epsilon" else (0, ctx.num_train_timesteps)

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        lo, hi = self.t_range or (0, ctx.num_train_timesteps)
        t_prime = ctx.draw(len(ctx.x0), low=lo, high=hi, integers=True)
        noise = ctx.draw(*ctx.x0.shape)  # one noise for both sides: only x0 differs
        predicted = ctx.base_features(ctx.process.add_noise(ctx.one_step(self.x0_range(ctx)), noise, t_prime), t_prime)
        with torch.no_grad():
            target = ctx.base_features(ctx.process.add_noise(ctx.x0, noise, t_prime), t_prime)
        return (predicted.float() - target.float()).pow(2).flatten(1).mean(dim=1)
