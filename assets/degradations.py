"""Graded synthetic degradations of images `[N, C, H, W]` in [0, 1], severity `[N]` in [0, 1].

Two disjoint families, one per digits quality model:
- TRAIN_FAMILY trains the quality model the objective optimizes (`nr_iqa`): Gaussian blur,
  Gaussian noise, contrast loss, blockiness.
- HELDOUT_FAMILY trains the held-out quality model (`eval.heldout_quality`) that only scores the Pareto front:
  motion blur, salt-and-pepper, ghosting, uneven illumination. No function is shared with the first
  family, so the held-out model is not a copy of the reward it judges.
Severity 0 leaves an image (nearly) unchanged; severity 1 is the worst grade.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_sample(severity: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return severity.to(x).view(-1, *([1] * (x.dim() - 1)))


def _grouped_conv(x: torch.Tensor, kernels: torch.Tensor, vertical: bool) -> torch.Tensor:
    """Apply a per-sample 1-D kernel `[N, K]` along one axis, reflect-padded."""
    n, c, h, w = x.shape
    k = kernels.shape[1]
    weight = kernels.repeat_interleave(c, 0).view(n * c, 1, k, 1) if vertical else kernels.repeat_interleave(c, 0).view(n * c, 1, 1, k)
    pad = (0, 0, k // 2, k // 2) if vertical else (k // 2, k // 2, 0, 0)
    out = F.conv2d(F.pad(x.reshape(1, n * c, h, w), pad, mode="reflect"), weight, groups=n * c)
    return out.view(n, c, h, w)


def gaussian_blur(x, severity, generator=None):
    sigma = 0.1 + 1.9 * severity.to(x)
    offsets = torch.arange(-3, 4, dtype=x.dtype, device=x.device)
    kernels = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernels = kernels / kernels.sum(1, keepdim=True)
    return _grouped_conv(_grouped_conv(x, kernels, vertical=False), kernels, vertical=True)


def gaussian_noise(x, severity, generator=None):
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return (x + 0.35 * _per_sample(severity, x) * noise).clamp(0, 1)


def contrast_loss(x, severity, generator=None):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return mean + (x - mean) * (1 - 0.85 * _per_sample(severity, x))


def blockiness(x, severity, generator=None):
    blocks = F.interpolate(F.avg_pool2d(x, 4), size=x.shape[-2:], mode="nearest")
    s = _per_sample(severity, x)
    return (1 - s) * x + s * blocks


def motion_blur(x, severity, generator=None):
    # A box kernel whose length grows smoothly from 1 to 7 pixels, horizontal or vertical per sample.
    length = 1 + 6 * severity.to(x)
    offsets = torch.arange(-3, 4, dtype=x.dtype, device=x.device).abs()
    kernels = (length[:, None] / 2 - offsets[None] + 0.5).clamp(0, 1)
    kernels = kernels / kernels.sum(1, keepdim=True)
    vertical = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    out_h, out_v = _grouped_conv(x, kernels, vertical=False), _grouped_conv(x, kernels, vertical=True)
    return torch.where(vertical.view(-1, 1, 1, 1), out_v, out_h)


def salt_and_pepper(x, severity, generator=None):
    u = torch.rand(x.shape, generator=generator, device=x.device)
    salt = torch.rand(x.shape, generator=generator, device=x.device) < 0.5
    hit = u < 0.25 * _per_sample(severity, x)
    return torch.where(hit, salt.to(x.dtype), x)


def ghosting(x, severity, generator=None):
    # A faint copy 2 px off along the diagonal. Capped at 0.4: an equal-weight double image, or one
    # offset along an axis, reads as one bold digit rather than a degraded one.
    ghost = torch.roll(x, shifts=(2, 2), dims=(-2, -1))
    a = 0.4 * _per_sample(severity, x)
    return (1 - a) * x + a * ghost


def uneven_illumination(x, severity, generator=None):
    # A smooth brightness ramp across the image in a random direction: hazy, unevenly lit background.
    # Unlike contrast loss it adds light to one side only; mean contrast of the strokes is kept.
    n, _, h, w = x.shape
    angle = torch.rand(n, generator=generator, device=x.device) * 2 * torch.pi
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device), indexing="ij")
    ramp = (torch.cos(angle).view(-1, 1, 1) * xs + torch.sin(angle).view(-1, 1, 1) * ys + 1) / 2  # [N, H, W] in ~[0, 1]
    return x + 0.6 * _per_sample(severity, x) * ramp.unsqueeze(1).to(x.dtype)


TRAIN_FAMILY = {"gaussian_blur": gaussian_blur, "gaussian_noise": gaussian_noise, "contrast_loss": contrast_loss, "blockiness": blockiness}
HELDOUT_FAMILY = {"motion_blur": motion_blur, "salt_and_pepper": salt_and_pepper, "ghosting": ghosting, "uneven_illumination": uneven_illumination}
FAMILIES = {"train": TRAIN_FAMILY, "heldout": HELDOUT_FAMILY}


def degrade(x: torch.Tensor, kind: str, severity: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Degrade `x` ([N, C, H, W] in [0, 1]) by degradation `kind` at per-sample `severity` ([N] in [0, 1])."""
    for family in FAMILIES.values():
        if kind in family:
            return family[kind](x, severity, generator).clamp(0, 1)
    known = sorted(k for family in FAMILIES.values() for k in family)
    raise KeyError(f"unknown degradation {kind!r} (known: {', '.join(known)})")
