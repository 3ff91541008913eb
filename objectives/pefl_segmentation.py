"""pefl_segmentation (UniFL, arXiv 2404.05595, Sec. 4.1, its main perceptual-feedback variant, the
structure loss of Eq. 4; its layout variant, Eq. 9 in App. A.1, is the same loss with a semantic
segmenter, DeepLab-V3 on COCO-Stuff): a frozen segmentation network's own loss, per-pixel
cross-entropy, between its output on the model's x0 and the real image's masks, so the model is
pushed to draw what the perception model sees in the real image (UniFL: object structure that SD 1.5
gets wrong). The x0 is UniFL's: a rollout from the noised real image (`objectives/pefl.py`,
`ROLLOUT_FROM_REAL`).

Where the masks come from (`masks`):
- `data`: the data set's own label images, as UniFL reads COCO's ground truth: for digits the stroke
  masks the digits segmenter was trained from, for an image folder `data.masks` (a label image per
  training image, same relative path, `.png`, the image's size: a missing or mis-sized one is a
  one-line error naming it before training). The digits presets use this.
- `segmenter` (the default, ours, for data without masks): the segmentation network's own labels of
  the real image (argmax of its output on the batch's x0, no gradient). The loss is then consistency
  with the segmenter, mistakes included, not agreement with an annotation.

Departures, said here: UniFL uses SOLO instance segmentation; the network here is a semantic one
(`objectives/segmenters.py`: torchvision's DeepLabV3/FCN/LR-ASPP online, as UniFL's layout variant;
offline the digits segmenter, 11 classes: background or the digit a stroke belongs to).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from objectives.context import StepContext
from objectives.pefl import rollout_from_real
from objectives.segmenters import check_segmenter_spec, load_segmenter
from objectives.term import BuildEnv, Term
from trainers.common.errors import OptionError


class PeflSegmentation(Term):
    name = "pefl_segmentation"

    def __init__(self, segmenter="deeplabv3_resnet50", x0: str | dict = "rollout", masks: str = "segmenter"):
        check_segmenter_spec(segmenter, "segmenter")
        if masks not in ("segmenter", "data"):
            raise OptionError("masks", f"expected 'data' (the data set's label images, UniFL's) or 'segmenter' (its own labels), got {masks!r}")
        self.masks_from = masks
        self.needs_masks = masks == "data"
        self.segmenter_spec = segmenter
        self.source = rollout_from_real(x0)
        self.segmenter = None

    def setup(self, env: BuildEnv) -> None:
        self.source.check(env.process)
        self.segmenter = load_segmenter(self.segmenter_spec, env.device, "segmenter")

    def masks(self, ctx: StepContext) -> torch.Tensor:
        """`[N, H, W]`: the real images' labels, from the data set or from the network."""
        if self.masks_from == "data":
            if ctx.masks is None:
                raise ValueError("pefl_segmentation: masks: data, but the batch carries no masks")
            return ctx.masks
        with torch.no_grad():
            return self.segmenter((ctx.image(ctx.x0) + 1) / 2).argmax(dim=1)

    def __call__(self, ctx: StepContext) -> torch.Tensor:
        logits = self.segmenter((ctx.image(ctx.generated(self.source)) + 1) / 2)
        return F.cross_entropy(logits, self.masks(ctx), reduction="none").flatten(1).mean(dim=1)
