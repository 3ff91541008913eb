"""pefl, the style variant (UniFL, Zhang et al. 2024, arXiv 2404.05595, Sec. 4.1 "perceptual feedback
learning", style loss Eq. 8, App. A.1): a frozen perception network compares the model's x0 with the
real image it came from, through the style loss of Gatys et al.: squared differences of the Gram
matrices of its feature maps, `||Gram(V(x0')) - Gram(V(x0))||^2`.

Where the x0 comes from is UniFL's (Algorithm 1 and Sec. 5.1): the real image is noised to step
`start` of a 20-step DDIM schedule (its T_a = 10: `start: 10`) and denoised from there without a
graph to a stop step in the last five of the schedule (its optimisation step t in [0, 5]:
`stop_low: 15`, `stop_high: 19` in our indices, which count from the noisiest step), whose forward
keeps gradients; x0 is the model's prediction there (`x0: rollout`; `objectives/context.py`).
`x0: one_step` remains an option (cheaper, and what this term did before).

UniFL's style variant is the Gram loss only: `content_weight` is 0 by default. A content part
(feature distance, Johnson et al.'s perceptual loss) is ours, optional. The network is torchvision's
VGG-16 (as in UniFL, which fine-tunes it on ~150k artist-style pairs; which of its layers it reads
is not said: we read relu1_2, relu2_2, relu3_3 and relu4_3, the usual style taps) or, offline, the
digits classifier's convolutions. UniFL's main variant, the structure loss (Eq. 4, instance
segmentation), is the separate term `pefl_segmentation`.

On a flow model (SD3, Flux) the schedule is the flow Euler sampler's (`euler`, its default there; `ddim` is refused) and
`start` noises the real image along the flow path; ours, as UniFL's models are DDPM-family UNets.
"""

from __future__ import annotations

import torch

from objectives.context import StepContext, X0Source
from objectives.networks import check_network_spec, load_feature_network
from objectives.term import BuildEnv, Term, require_number
from trainers.common.errors import OptionError

ROLLOUT_FROM_REAL = dict(sampling_steps=20, start=10, stop_low=15, stop_high=19)


def gram(features: torch.Tensor) -> torch.Tensor:
    """`[N, C, H, W]` -> `[N, C, C]` channel correlations, normalized by the map size."""
    n, c, h, w = features.shape
    flat = features.reshape(n, c, h * w)
    return flat @ flat.transpose(1, 2) / (c * h * w)


def rollout_from_real(x0, rollout_defaults: dict = ROLLOUT_FROM_REAL) -> X0Source:
    """The X0Source of a UniFL feedback term: a rollout from the noised real image (`rollout_defaults`
    unless the option says otherwise) or a one-step x0 (the rollout defaults then do not apply).
    A sampled x0, or a rollout from pure noise, has no real image to compare with."""
    source = X0Source.from_options(x0, rollout_defaults, default_source="rollout")
    if source.kind == "sampled":
        raise OptionError("x0.source", "a sampled x0 has no real image to compare with: use rollout (UniFL) or one_step")
    if source.kind == "rollout" and source.start is None:
        raise OptionError("x0.start", "a UniFL feedback term compares x0 with the real image it came from: the rollout must start from it")
    return source


class Pefl(Term):
    name = "pefl"

    def __init__(self, network="vgg16", style_weight: float = 1.0, content_weight: float = 0.0, x0: str | dict = "rollout"):
        check_network_spec(network, "network")
        self.network_spec = network
        self.style_weight = require_number("style_weight", style_weight)
        self.content_weight = require_number("content_weight", content_weight)
        if self.content_weight == 0 and self.style_weight == 0:
            raise OptionError("style_weight", "style_weight and content_weight are both 0: the term would be empty")
        self.source = rollout_from_real(x0)
        self.network = None

    def setup(self, env: BuildEnv) -> None:
        self.source.check(env.process)
        self.network = load_feature_network(self.network_spec, env.device, "network")

    def __call__(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        generated = self.network((ctx.image(ctx.generated(self.source)) + 1) / 2)
        with torch.no_grad():
            real = self.network((ctx.image(ctx.x0) + 1) / 2)
        parts = {}
        if self.style_weight > 0:
            parts["style"] = self.style_weight * sum((gram(g) - gram(r)).pow(2).flatten(1).sum(dim=1) for g, r in zip(generated, real))
        if self.content_weight > 0:
            parts["content"] = self.content_weight * sum((g - r).pow(2).flatten(1).mean(dim=1) for g, r in zip(generated, real))
        return parts
