"""pefl_segmentation (UniFL, arXiv 2404.05595, Sec. 4.1, its main perceptual-feedback variant, the
structure loss of Eq. 4; its layout variant, Eq. 9 in App. A.1, is the same loss with a semantic
segmenter, DeepLab-V3 on COCO-Stuff): a frozen segmentation network's own loss, per-pixel
cross-entropy, between its output on the model's x0 and the real image's masks, so the model is
pushed to draw what the perception model sees in the real image (UniFL: object structure that SD 1.5
gets wrong). The x0 is UniFL's: a rollout from the noised real image (`objectives/pefl.py`,
`ROLLOUT_FROM_REAL`).

Departures, said here: UniFL scores SOLO instance segmentation against COCO's *ground-truth* masks.
Users' data carries no masks, so the masks are the segmentation network's own labels of the real
image (argmax of its output on the batch's x0, no gradient): the loss is then consistency with the
segmenter, mistakes included, not agreement with an annotation. The network is a semantic one
(`objectives/segmenters.py`: torchvision's DeepLabV3/FCN/LR-ASPP online, as UniFL's layout variant;
offline the digits segmenter, 11 classes: background or the digit a stroke belongs to). Reading masks
from the data set (a folder of label images; for digits the stroke masks the segmenter was trained
from) is issue 28's next step and not here yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from objectives.context import StepContext
from objectives.pefl import ROLLOUT_FROM_REAL, rollout_from_real
from objectives.segmenters import check_segmenter_spec, load_segmenter
from objectives.term import BuildEnv, Term


class PeflSegmentation(Term):
    name = "pefl_segmentation"

    def __init__(self, segmenter="deeplabv3_resnet50", x0: str = ROLLOUT_FROM_REAL["x0"],
                 sampling_steps: int = ROLLOUT_FROM_REAL["sampling_steps"], feedback_steps: int = 1, sampler: str = "ddim",
                 stop_low: int | None = ROLLOUT_FROM_REAL["stop_low"], stop_high: int | None = ROLLOUT_FROM_REAL["stop_high"],
                 start: int | None = ROLLOUT_FROM_REAL["start"], t_range=None):
        check_segmenter_spec(segmenter, "segmenter")
        self.segmenter_spec = segmenter
        self.source = rollout_from_real(x0, sampling_steps, feedback_steps, sampler, stop_low, stop_high, start, t_range)
        self.segmenter = None

    def setup(self, env: BuildEnv) -> None:
        self.source.check(env.num_train_timesteps)
        self.segmenter = load_segmenter(self.segmenter_spec, env.device, "segmenter")

    def masks(self, ctx: StepContext) -> torch.Tensor:
        """`[N, H, W]`: the network's labels of the real images (the annotation UniFL reads from COCO)."""
        with torch.no_grad():
            return self.segmenter((ctx.image(ctx.x0) + 1) / 2).argmax(dim=1)

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        logits = self.segmenter((ctx.image(ctx.generated(self.source)) + 1) / 2)
        return F.cross_entropy(logits, self.masks(ctx), reduction="none").flatten(1).mean(dim=1)
