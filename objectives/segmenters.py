"""Frozen segmentation networks for PeFL's segmentation variant (`objectives/pefl_segmentation.py`).

A spec is a name or `{network: name, weights: path}`:
- `deeplabv3_resnet50`, `deeplabv3_mobilenet_v3_large`, `fcn_resnet50`, `lraspp_mobilenet_v3_large`:
  torchvision's semantic segmentation models with their COCO-with-VOC-labels weights (21 classes);
  they download through torchvision, so they need the hub. (UniFL used SOLO instance segmentation;
  torchvision ships no SOLO, and a semantic model's per-pixel loss is the closest it has.)
- `{network: digits-segmenter, weights: assets/digits/segmenter.safetensors}`: the offline stand-in, a
  small U-Net trained by project code (`acpo assets build --only segmenter`) to label each pixel of
  a 16x16 digit as background or the digit (0-9) its stroke belongs to: 11 classes.

`Segmenter(images01)` takes `[N, C, H, W]` in [0, 1] and returns logits `[N, K, H, W]`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from assets.digits_networks import DigitsSegmenter
from trainers.common.errors import OptionError

TORCHVISION_SEGMENTERS = ("deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "lraspp_mobilenet_v3_large")
DIGITS_SEGMENTER = "digits-segmenter"


def check_segmenter_spec(spec, option: str) -> tuple[str, str | None]:
    """(name, weights) of a valid spec, checked without loading anything (config time)."""
    if isinstance(spec, str):
        name, weights = spec, None
    elif isinstance(spec, dict) and set(spec) <= {"network", "weights"} and "network" in spec:
        name, weights = spec["network"], spec.get("weights")
    else:
        raise OptionError(option, f"expected a segmentation network name or {{network, weights}}, got {spec!r}")
    known = TORCHVISION_SEGMENTERS + (DIGITS_SEGMENTER,)
    if name not in known:
        raise OptionError(option, f"unknown segmentation network {name!r} (known: {', '.join(known)})")
    if name == DIGITS_SEGMENTER and not weights:
        raise OptionError(option, f"{DIGITS_SEGMENTER} needs weights: {{network: {DIGITS_SEGMENTER}, weights: PATH}}")
    if weights is not None:
        from pathlib import Path

        if not Path(weights).is_file():
            raise OptionError(option, f"weights file not found: {weights}")
    return name, weights



class Segmenter(nn.Module):
    """Frozen; `forward(images01)` -> logits `[N, K, H, W]` at the input's size."""

    def __init__(self, net: nn.Module, prepare, torchvision_output: bool):
        super().__init__()
        self.net, self.prepare, self.torchvision_output = net, prepare, torchvision_output
        self.requires_grad_(False).eval()

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        out = self.net(self.prepare(images01.clamp(0, 1)))
        return out["out"] if self.torchvision_output else out


def _gray(x):
    return x.mean(dim=1, keepdim=True) if x.shape[1] == 3 else x


def load_segmenter(spec, device="cpu", option: str = "segmenter") -> Segmenter:
    name, weights = check_segmenter_spec(spec, option)
    from trainers.common.weights import read_state_dict

    if name == DIGITS_SEGMENTER:
        net = DigitsSegmenter()
        net.load_state_dict(read_state_dict(weights))
        return Segmenter(net, _gray, torchvision_output=False).to(device)
    import torchvision

    from objectives.networks import _imagenet_prepare

    builder = getattr(torchvision.models.segmentation, name)
    try:
        net = builder(weights=None if weights else "DEFAULT", weights_backbone=None)
    except Exception as error:  # torchvision raises URLError/RuntimeError when the download fails
        raise OptionError(option, f"could not load {name} weights ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    if weights:
        net.load_state_dict(read_state_dict(weights))

    def prepare(x):  # torchvision's segmenters want ImageNet-normalized RGB of a usable size
        x = _imagenet_prepare(x)
        return F.interpolate(x, size=224, mode="bilinear", align_corners=False) if min(x.shape[-2:]) < 224 else x

    return Segmenter(net, prepare, torchvision_output=True).to(device)
