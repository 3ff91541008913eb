"""The digits classifier (assets/digits_networks.py) as a torch-fidelity feature extractor.

Inception features mean nothing on 16x16 grayscale digits; the standard practice for MNIST-style
data is FID in the feature space of a classifier trained on the same data. This is that classifier.
FID/KID computed with it are "classifier FID" on digits, never comparable with Inception FID.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from assets.digits_networks import FEATURE_DIM, DigitsClassifier, load_digits_classifier  # noqa: F401 - what callers of the extractor use

FEATURE_EXTRACTOR_NAME = "digits-classifier"


class DigitsClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity extractor. Input: uint8 `[N, 1|3, 16, 16]` in 0..255, torch-fidelity's convention
    for images (so folders of PNG samples work as well as in-memory tensors)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"feature extractor {name!r} needs feature_extractor_weights_path (the classifier's safetensors)")
        self.model = load_digits_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return ("features", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 16, 16, dtype=torch.uint8)

    def forward(self, x):
        if x.dtype != torch.uint8:
            raise TypeError(f"{self.name}: expects uint8 images in 0..255, got {x.dtype}")
        x = x.float() / 255.0
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (16, 16):
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        feats = self.model.features(x * 2 - 1)
        out = {"features": feats, "logits": self.model.logits(feats)}
        return tuple(out[name] for name in self.features_list)


def register() -> str:
    """Register with torch-fidelity once per process; returns the name to pass as `feature_extractor`."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if FEATURE_EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(FEATURE_EXTRACTOR_NAME, DigitsClassifierFeatureExtractor)
    return FEATURE_EXTRACTOR_NAME


@torch.no_grad()
def confident_fraction(classifier: DigitsClassifier, images01: torch.Tensor, threshold: float = 0.9) -> float:
    """Fraction of images `[N, 1, 16, 16]` in [0, 1] that the classifier assigns to one digit with
    probability >= threshold. Garbage can fool a classifier, so this is always read next to FID."""
    probs = classifier(images01 * 2 - 1).softmax(dim=1)
    return (probs.max(dim=1).values >= threshold).float().mean().item()
