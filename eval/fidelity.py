"""FID and KID through torch-fidelity, on images held in memory.

Images are `[N, C, H, W]` float in [0, 1]; they are quantized to uint8 (torch-fidelity's input
convention, the same quantization a PNG round trip would apply) and handed over as a Dataset.
"""

from __future__ import annotations

import warnings

import torch
import torch_fidelity
from torch.utils.data import Dataset

# Online presets use torch-fidelity's Inception; the digits preset names its classifier instead.
DEFAULT_FEATURE_EXTRACTOR = "inception-v3-compat"


class _Uint8Images(Dataset):
    def __init__(self, images: torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
        self.images = (images.clamp(0, 1) * 255).round().to(torch.uint8)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def prepare_feature_extractor(name: str) -> str:
    """Make sure `name` is registered with torch-fidelity (our digits classifier registers lazily)."""
    from eval import digits_classifier

    if name == digits_classifier.FEATURE_EXTRACTOR_NAME:
        digits_classifier.register()
    return name


def fidelity_metrics(
    samples: torch.Tensor,
    reference: torch.Tensor,
    feature_extractor: str = DEFAULT_FEATURE_EXTRACTOR,
    feature_extractor_weights_path: str | None = None,
    kid: bool = True,
    kid_subset_size: int = 1000,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """FID (and KID) of `samples` against `reference`, both `[N, C, H, W]` in [0, 1].

    KID's subset size shrinks to the smaller set's size when needed (with a warning): small
    evaluations during training should report a figure, not crash.
    """
    smallest = min(len(samples), len(reference))
    if smallest < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(samples)} samples and {len(reference)} reference images")
    if kid and kid_subset_size > smallest:
        warnings.warn(f"KID subset size {kid_subset_size} > {smallest} images; using {smallest}", stacklevel=2)
        kid_subset_size = smallest
    metrics = torch_fidelity.calculate_metrics(
        input1=_Uint8Images(samples),
        input2=_Uint8Images(reference),
        fid=True,
        kid=kid,
        kid_subset_size=kid_subset_size,
        feature_extractor=prepare_feature_extractor(feature_extractor),
        feature_extractor_weights_path=feature_extractor_weights_path,
        cuda=torch.device(device).type == "cuda",
        cache=False,
        save_cpu_ram=True,  # no DataLoader worker processes for in-memory tensors
        verbose=False,
    )
    out = {"fid": float(metrics["frechet_inception_distance"])}
    if kid:
        out["kid"] = float(metrics["kernel_inception_distance_mean"])
    return out
