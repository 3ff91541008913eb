"""pefl (UniFL, Zhang et al. 2024, arXiv 2404.05595, "perceptual feedback learning"): an existing
perception network compares the one-step x0 with the real image it was noised from: a feature
(content) distance plus a style distance between Gram matrices of the same feature maps.

Unlike `nr_iqa` it needs the real image, so it is the one-step estimate of the batch's own x0, at
the step's t or at a t drawn from `t_range` (shared with any other term asking for the same range).
"""

from __future__ import annotations

import torch

from objectives.context import StepContext
from objectives.networks import check_network_spec, load_feature_network
from objectives.term import BuildEnv, OptionError, Term, check_t_range, check_t_range_fits, require_number


def gram(features: torch.Tensor) -> torch.Tensor:
    """`[N, C, H, W]` -> `[N, C, C]` channel correlations, normalized by the map size."""
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


class Pefl(Term):
    name = "pefl"

    def __init__(self, network="vgg16", feature_weight: float = 1.0, style_weight: float = 1.0, t_range=None):
        check_network_spec(network, "network")
        self.network_spec = network
        self.feature_weight = require_number("feature_weight", feature_weight)
        self.style_weight = require_number("style_weight", style_weight)
        if self.feature_weight == 0 and self.style_weight == 0:
            raise OptionError("feature_weight", "feature_weight and style_weight are both 0: the term would be empty")
        self.t_range = check_t_range(t_range)
        self.network = None

    def setup(self, env: BuildEnv) -> None:
        check_t_range_fits(self.t_range, env.num_train_timesteps)
        self.network = load_feature_network(self.network_spec, env.device, "network")

    def __call__(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        generated = self.network((ctx.image(ctx.one_step(self.t_range)) + 1) / 2)
        with torch.no_grad():
            real = self.network((ctx.image(ctx.x0) + 1) / 2)
        parts = {}
        if self.feature_weight > 0:
            parts["feature"] = self.feature_weight * sum((g - r).pow(2).flatten(1).mean(dim=1) for g, r in zip(generated, real))
        if self.style_weight > 0:
            parts["style"] = self.style_weight * sum((gram(g) - gram(r)).pow(2).flatten(1).sum(dim=1) for g, r in zip(generated, real))
        return parts
