"""No-reference quality models behind one interface: pyiqa metrics by name, or local weights.

`QualityModel(images)` takes `[N, C, H, W]` in [0, 1] (values outside are clamped, because pyiqa does
not check the range in loss mode) and returns a score per image, `[N]`. `lower_better` says which
way is good; callers never guess it from the name.

Specs:
- "musiq", "topiq_nr", "clipiqa", "laion_aes", ...: any pyiqa metric; pyiqa downloads its weights.
- {"arch": "cnniqa", "weights": "path.safetensors"}: a pyiqa architecture built by
  `pyiqa.create_metric(arch, pretrained=None)` with our weights loaded into it. We load the weights
  ourselves because pyiqa's loader unpickles (it loads with `weights_only=False`); a `.pth`
  file is read with `weights_only=True`.
- {"arch": "digits_heldout_iqa", "weights": ...}: the held-out digits quality model (its own
  architecture, below), the digits preset's `eval.heldout_quality`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn


class DigitsHeldoutIQA(nn.Module):
    """Small CNN regressor, architecturally unlike CNNIQA (a deep 3x3 stack with SiLU and strided
    downsampling, mean+max pooling, instead of one 7x7 layer with max/min pooling).
    Input `[N, 1, H, W]` in [0, 1]; output `[N, 1]` quality."""

    lower_better = False

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.head = nn.Sequential(nn.Linear(4 * width, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, x):
        h = self.features(x)
        # mean pooling sees global haze and blur; max pooling sees isolated defects (impulses)
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))


LOCAL_ARCHS = {"digits_heldout_iqa": DigitsHeldoutIQA}


class UnreadableFileError(ValueError):
    """A file that exists but cannot be read as what it should be (corrupt, truncated, another format)."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from `.safetensors`, or a `.pth`/`.pt` holding tensors only (pyiqa keeps them under 'params').
    A corrupt or foreign file is an `UnreadableFileError` naming it (the reader's own reason kept)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("params", state)
    except Exception as error:  # noqa: BLE001 - any failure to parse is this file's fault; its reason is kept
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        raise UnreadableFileError(f"{path}: not a readable weights file ({type(error).__name__}: {reason})") from None


class QualityModel(nn.Module):
    """A no-reference quality model; `forward` returns `[N]` scores. Gradients flow when the
    caller enables them (the `nr_iqa` loss); evaluation wraps calls in `torch.no_grad()`."""

    def __init__(self, name: str, net: nn.Module, lower_better: bool, in_channels: int):
        super().__init__()
        self.name, self.net, self.lower_better, self.in_channels = name, net, lower_better, in_channels
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"quality model {self.name}: expected images [N, 1|3, H, W], got {tuple(images.shape)}")
        x = images.clamp(0, 1)
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and self.in_channels == 1:
            x = x.mean(dim=1, keepdim=True)
        return self.net(x).reshape(x.shape[0], -1)[:, 0]


class SpecError(ValueError):
    """A bad quality model spec; `option` names the offending part (`metric.weights`)."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message


def check_quality_spec(spec, option: str) -> None:
    """Config-time check of a quality model spec: a pyiqa name pyiqa knows, or {arch, weights} with
    a weights file that exists. Loads nothing."""
    if isinstance(spec, str):
        if spec not in pyiqa_metric_names():
            raise SpecError(option, f"unknown pyiqa metric {spec!r} (see pyiqa.list_models())")
        return
    if not isinstance(spec, dict) or set(spec) - {"arch", "weights", "name"} or not {"arch", "weights"} <= set(spec):
        raise SpecError(option, f"expected a pyiqa metric name or {{arch, weights}}, got {spec!r}")
    if spec["arch"] not in LOCAL_ARCHS and spec["arch"] not in pyiqa_metric_names():
        raise SpecError(f"{option}.arch", f"unknown architecture {spec['arch']!r}: neither a pyiqa metric nor one of {', '.join(LOCAL_ARCHS)}")
    if not Path(spec["weights"]).is_file():
        raise SpecError(f"{option}.weights", f"file not found: {spec['weights']}")


@functools.cache
def pyiqa_metric_names() -> tuple[str, ...]:
    import pyiqa

    return tuple(pyiqa.list_models())


def load_quality_model(spec: str | dict, device: str | torch.device = "cpu") -> QualityModel:
    """Build a quality model from a pyiqa metric name or {"arch": ..., "weights": ...}."""
    import pyiqa

    if isinstance(spec, str):
        if spec not in pyiqa_metric_names():
            raise ValueError(f"unknown quality metric {spec!r}: not a pyiqa metric (see pyiqa.list_models())")
        # as_loss=True: pyiqa then keeps the graph (and skips its range assert; we clamp instead).
        metric = pyiqa.create_metric(spec, as_loss=True, loss_reduction="none", device=torch.device(device))
        return QualityModel(spec, _PyiqaNet(metric), lower_better=bool(metric.lower_better), in_channels=3).to(device)
    if not isinstance(spec, dict) or set(spec) - {"arch", "weights", "name"} or "arch" not in spec or "weights" not in spec:
        raise ValueError(f"quality model spec must be a pyiqa metric name or {{arch, weights}}, got {spec!r}")
    arch, weights = spec["arch"], spec["weights"]
    state = read_state_dict(weights)
    name = spec.get("name", f"{arch}:{Path(weights).stem}")
    if arch in LOCAL_ARCHS:
        net = LOCAL_ARCHS[arch]()
        net.load_state_dict(state)
        return QualityModel(name, net, lower_better=net.lower_better, in_channels=1).to(device)
    if arch not in pyiqa_metric_names():
        known = ", ".join(sorted(LOCAL_ARCHS))
        raise ValueError(f"unknown quality model arch {arch!r}: neither a pyiqa metric nor one of: {known}")
    metric = pyiqa.create_metric(arch, as_loss=True, loss_reduction="none", pretrained=None, device=torch.device(device))
    metric.net.load_state_dict(state)
    return QualityModel(name, _PyiqaNet(metric), lower_better=bool(metric.lower_better), in_channels=3).to(device)


class _PyiqaNet(nn.Module):
    """Calls a pyiqa InferenceModel's network directly: the metric's own forward would re-check
    inputs and reduce; we want per-image scores with gradients."""

    def __init__(self, metric):
        super().__init__()
        self.metric = metric

    def forward(self, x):
        return self.metric.net(x)


def load_clip_score(name: str = "clipscore", device: str | torch.device = "cpu"):
    """pyiqa's CLIP score as `(images [N, 3, H, W] in [0, 1], captions) -> [N]` (higher: the image
    matches its prompt better). pyiqa downloads the CLIP weights."""
    import pyiqa

    if name not in pyiqa_metric_names():
        raise ValueError(f"unknown CLIP score metric {name!r}: not a pyiqa metric (see pyiqa.list_models())")
    metric = pyiqa.create_metric(name, device=torch.device(device))

    def clip_score(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        x = images.clamp(0, 1)
        return metric(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x, caption_list=list(captions)).reshape(-1)

    return clip_score


def quality_spearman(model: QualityModel, images: torch.Tensor, family: dict, severities=(0.0, 0.25, 0.5, 0.75, 1.0), seed: int = 0) -> float:
    """Spearman correlation between the model's quality and the *negated* true severity, pooled over
    every degradation in `family` at every grade (1.0: ranks quality perfectly; reported in cards)."""
    from scipy.stats import spearmanr

    from eval.degradations import degrade

    generator = torch.Generator().manual_seed(seed)
    scores, truth = [], []
    with torch.no_grad():
        for kind in family:
            for s in severities:
                severity = torch.full((len(images),), float(s))
                scores.append(model(degrade(images, kind, severity, generator)))
                truth.append(-severity)
    return float(spearmanr(torch.cat(scores).numpy(), torch.cat(truth).numpy()).statistic)


__all__ = ["QualityModel", "DigitsHeldoutIQA", "load_quality_model", "quality_spearman", "read_state_dict"]
