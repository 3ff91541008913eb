"""Frozen perception networks for the feature-space terms (`pefl`, `lpips_x0`), built once per worker.

A network spec is either a name or `{network: name, weights: path}`:
- `vgg16`: torchvision's ImageNet VGG-16 (relu1_2 .. relu4_3), the usual perceptual network; its
  weights download through torchvision, so it needs the hub.
- `{network: digits-classifier, weights: assets/digits/classifier.safetensors}`: the project's digit
  classifier (three conv layers), the offline stand-in for 16x16 digits.
- `lpips` (distances only): pyiqa's LPIPS metric, the Cas-DM default; downloads its weights.

`FeatureNetwork(images)` takes `[N, C, H, W]` in [0, 1] and returns a list of feature maps.
`PerceptualDistance(a, b)` returns a per-sample distance `[N]`, 0 for identical images.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.common.errors import OptionError

FEATURE_NETWORKS = ("vgg16", "digits-classifier")
LPIPS_MIN_SIZE = 64  # images smaller than this are upsampled (bilinear) before LPIPS


def _parse(spec, option: str) -> tuple[str, str | None]:
    if isinstance(spec, str):
        return spec, None
    if isinstance(spec, dict) and set(spec) <= {"network", "weights"} and "network" in spec:
        return spec["network"], spec.get("weights")
    raise OptionError(option, f"expected a network name or {{network, weights}}, got {spec!r}")


def check_network_spec(spec, option: str, distances: bool = False) -> None:
    """Validate a spec without loading anything (config time)."""
    name, weights = _parse(spec, option)
    known = FEATURE_NETWORKS + (("lpips",) if distances else ())
    if name not in known:
        raise OptionError(option, f"unknown network {name!r} (known: {', '.join(known)})")
    if name == "digits-classifier" and not weights:
        raise OptionError(option, "digits-classifier needs weights: {network: digits-classifier, weights: PATH}")
    if weights is not None:
        from pathlib import Path

        if not Path(weights).is_file():
            raise OptionError(option, f"weights file not found: {weights}")


class FeatureNetwork(nn.Module):
    """Frozen; `forward(images01)` -> list of feature maps `[N, C_k, H_k, W_k]`."""

    def __init__(self, body: nn.Sequential, taps: tuple[int, ...], prepare):
        super().__init__()
        self.body, self.taps, self.prepare = body, set(taps), prepare
        self.requires_grad_(False).eval()

    def forward(self, images01: torch.Tensor) -> list[torch.Tensor]:
        x, features = self.prepare(images01.clamp(0, 1)), []
        for index, layer in enumerate(self.body):
            x = layer(x)
            if index in self.taps:
                features.append(x)
            if index >= max(self.taps):
                break
        return features


def _digits_prepare(x):
    x = x.mean(dim=1, keepdim=True) if x.shape[1] == 3 else x
    return x * 2 - 1  # the classifier was trained on [-1, 1]


_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _imagenet_prepare(x):
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    mean = torch.tensor(_IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def load_feature_network(spec, device="cpu", option: str = "network") -> FeatureNetwork:
    name, weights = _parse(spec, option)
    check_network_spec(spec, option)
    if name == "digits-classifier":
        from eval.digits_fid import load_digits_classifier

        body = load_digits_classifier(weights).body
        return FeatureNetwork(body, taps=(1, 3, 6), prepare=_digits_prepare).to(device)  # relu after each conv
    import torchvision

    try:
        vgg = torchvision.models.vgg16(weights=None if weights else "IMAGENET1K_V1")
    except Exception as error:  # torchvision raises URLError/RuntimeError when the download fails
        raise OptionError(option, f"could not load vgg16 ImageNet weights ({type(error).__name__}: {str(error).splitlines()[0]})") from None
    if weights:
        from trainers.common.weights import read_state_dict

        vgg.load_state_dict(read_state_dict(weights))
    return FeatureNetwork(vgg.features, taps=(3, 8, 15, 22), prepare=_imagenet_prepare).to(device)  # relu1_2..relu4_3


def normalized_distance(features_a: list[torch.Tensor], features_b: list[torch.Tensor]) -> torch.Tensor:
    """LPIPS-style distance `[N]`: channel-normalize each map, squared difference, mean over space,
    summed over layers (LPIPS without its learned per-channel weights)."""
    total = 0.0
    for a, b in zip(features_a, features_b):
        a, b = F.normalize(a, dim=1, eps=1e-8), F.normalize(b, dim=1, eps=1e-8)
        total = total + (a - b).pow(2).sum(dim=1).mean(dim=(1, 2))
    return total


class PerceptualDistance(nn.Module):
    """`forward(a01, b01)` -> `[N]`: pyiqa LPIPS for `lpips`, else `normalized_distance` of a feature network."""

    def __init__(self, spec, device="cpu", option: str = "metric"):
        super().__init__()
        name, _ = _parse(spec, option)
        check_network_spec(spec, option, distances=True)
        self.name = name
        if name == "lpips":
            import pyiqa

            try:
                self.metric = pyiqa.create_metric("lpips", as_loss=True, loss_reduction="none", device=torch.device(device))
            except Exception as error:  # pyiqa downloads the backbone and LPIPS weights here
                raise OptionError(option, f"could not load pyiqa lpips ({type(error).__name__}: {str(error).splitlines()[0]})") from None
            self.network = None
        else:
            self.metric, self.network = None, load_feature_network(spec, device, option)
        self.requires_grad_(False).eval()

    def forward(self, a01: torch.Tensor, b01: torch.Tensor) -> torch.Tensor:
        if self.metric is not None:
            a, b = a01.clamp(0, 1), b01.clamp(0, 1)
            if a.shape[1] == 1:
                a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
            if min(a.shape[-2:]) < LPIPS_MIN_SIZE:  # LPIPS's VGG/AlexNet taps pool 16x16 images away to nothing
                a = F.interpolate(a, size=LPIPS_MIN_SIZE, mode="bilinear", align_corners=False)
                b = F.interpolate(b, size=LPIPS_MIN_SIZE, mode="bilinear", align_corners=False)
            return self.metric.net(a, b).reshape(len(a))
        return normalized_distance(self.network(a01), self.network(b01))
