"""FID, KID and a diversity figure through torch-fidelity, on images held in memory, with the
reference set's features cached on disk.

Images are `[N, C, H, W]` float in [0, 1]; they are quantized to uint8 (torch-fidelity's input
convention, the same quantization a PNG round trip would apply). Features come from a
torch-fidelity feature extractor (`inception-v3-compat` by default, the digits classifier for the
digits preset, anything registered with `register_feature_extractor`), and the metrics from
torch-fidelity's own functions (`fid_features_to_statistics`, `fid_statistics_to_metric`,
`kid_features_to_metric`): `tests/eval/test_fidelity.py` checks the result equals
`torch_fidelity.calculate_metrics` on the same inputs.

Why our own reference cache rather than torch-fidelity's: its cache is keyed by the name the caller
gives and read back by unpickling (torch.load with weights_only off). Ours is keyed by the *content* (a hash
of the reference images, the extractor, its layer and its weights file), so editing one reference
image can never reuse stale statistics, and it is stored as safetensors, so a shared cache
directory on a cluster cannot smuggle in a pickle.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch.utils.data import Dataset
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset, resolve_feature_layer_for_metric

from trainers.common import storage
from trainers.common.keys import ContentKey
from trainers.common.weights import read_state_dict

# Online presets use torch-fidelity's Inception; the digits preset names its classifier instead.
DEFAULT_FEATURE_EXTRACTOR = "inception-v3-compat"
# a folder or a URI (trainers/common/storage.py)
DEFAULT_CACHE_DIR = os.environ.get("ACPO_FIDELITY_CACHE") or str(Path.home() / ".cache" / "acpo" / "fidelity")


class _Uint8Images(Dataset):
    def __init__(self, images: torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"expected images [N, C, H, W], got shape {tuple(images.shape)}")
        self.images = to_uint8(images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def prepare_feature_extractor(name: str) -> str:
    """Make sure `name` is registered with torch-fidelity (our digits classifier registers lazily)."""
    from eval import digits_fid

    if name == digits_fid.FEATURE_EXTRACTOR_NAME:
        digits_fid.register()
    return name


@functools.lru_cache(maxsize=4)
def _extractor(name: str, weights: str | None, cuda: bool):
    """One extractor per process and setting, reused for every evaluation (built once, like every helper)."""
    prepare_feature_extractor(name)
    layer = resolve_feature_layer_for_metric("fid", feature_extractor=name)
    if name.startswith("inception-v3") and weights:
        # torch-fidelity would unpickle a local Inception file (its weights path loads pickles); ours is
        # read as tensors only (safetensors) and handed over in place of its download.
        import torch_fidelity.feature_extractor_inceptionv3 as inception

        state = read_state_dict(weights)
        original, inception.load_state_dict_from_url = inception.load_state_dict_from_url, lambda *_, **__: state
        try:
            return create_feature_extractor(name, [layer], cuda=cuda, verbose=False), layer
        finally:
            inception.load_state_dict_from_url = original
    kwargs = {"feature_extractor_weights_path": weights} if weights else {}
    return create_feature_extractor(name, [layer], cuda=cuda, verbose=False, **kwargs), layer


def extract_features(images: torch.Tensor, feature_extractor: str = DEFAULT_FEATURE_EXTRACTOR, weights: str | None = None,
                     device: str | torch.device = "cpu", batch_size: int = 250) -> torch.Tensor:
    """`[N, D]` features (the layer FID uses) of images `[N, C, H, W]` in [0, 1]."""
    cuda = torch.device(device).type == "cuda"
    extractor, layer = _extractor(feature_extractor, weights, cuda)
    features = get_featuresdict_from_dataset(_Uint8Images(images), extractor, batch_size, cuda, True, False)
    return features[layer].float()


def content_key(reference: torch.Tensor, feature_extractor: str, weights: str | None) -> str:
    """Cache key from what the figures depend on: the quantized reference images, the extractor and
    its layer, and the bytes of its weights file (a retrained classifier is a different extractor)."""
    layer = resolve_feature_layer_for_metric("fid", feature_extractor=prepare_feature_extractor(feature_extractor))
    key = ContentKey().pixels(to_uint8(reference)).text(f"{feature_extractor}:{layer}")
    if weights:
        key.file(weights)
    return f"{feature_extractor}-{key.hex()}"


def reference_features(reference: torch.Tensor, feature_extractor: str = DEFAULT_FEATURE_EXTRACTOR, weights: str | None = None,
                       cache_dir: str | Path | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
    """The reference set's features, from the cache when the same content was seen before."""
    # A local folder or object storage (`s3://...`): one cache for every node of a cluster. Written
    # whole, so the trials of a sweep sharing it never read half a file.
    location = storage.join(cache_dir or DEFAULT_CACHE_DIR, f"{content_key(reference, feature_extractor, weights)}.safetensors")
    if storage.is_file(location):
        return safetensors_load(storage.read_bytes(location))["features"]
    features = extract_features(reference, feature_extractor, weights, device)
    storage.write_bytes(location, safetensors_save({"features": features.contiguous()}))
    return features


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Diversity: mean L2 distance between all pairs of samples in feature space (0: all identical)."""
    return float(torch.pdist(features.double()).mean()) if len(features) > 1 else 0.0


def fid_from_features(sample_features: torch.Tensor, reference_statistics: dict) -> float:
    """torch-fidelity's FID of `[N, D]` features against the reference's `fid_features_to_statistics`."""
    return float(fid_statistics_to_metric(fid_features_to_statistics(sample_features), reference_statistics, False)["frechet_inception_distance"])


def kid_from_features(sample_features: torch.Tensor, real_features: torch.Tensor, subset_size: int = 1000, subsets: int = 100) -> float:
    """torch-fidelity's KID: the mean over `subsets` random subsets of `subset_size` of each set (its
    seeded generator: the same call gives the same figure)."""
    return float(kid_features_to_metric(sample_features, real_features, kid_subsets=subsets, kid_subset_size=subset_size,
                                        verbose=False)[KEY_METRIC_KID_MEAN])


def fidelity_metrics(
    samples: torch.Tensor,
    reference: torch.Tensor,
    feature_extractor: str = DEFAULT_FEATURE_EXTRACTOR,
    feature_extractor_weights_path: str | None = None,
    kid: bool = True,
    kid_subset_size: int = 1000,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """FID, KID and diversity of `samples` against `reference`, both `[N, C, H, W]` in [0, 1]."""
    sample_features = extract_features(samples, feature_extractor, feature_extractor_weights_path, device)
    real_features = reference_features(reference, feature_extractor, feature_extractor_weights_path, cache_dir, device)
    return features_metrics(sample_features, real_features, kid, kid_subset_size)


def features_metrics(sample_features: torch.Tensor, real_features: torch.Tensor, kid: bool = True, kid_subset_size: int = 1000) -> dict[str, float]:
    """FID, KID and diversity from the features of the samples and of the reference set.

    KID's subset size shrinks to the smaller set's size when needed (with a warning): small
    evaluations during training should report a figure, not crash.
    """
    smallest = min(len(sample_features), len(real_features))
    if smallest < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(sample_features)} samples and {len(real_features)} reference images")
    out = {"fid": fid_from_features(sample_features, fid_features_to_statistics(real_features)),
           "diversity": mean_pairwise_distance(sample_features)}
    if kid:
        if kid_subset_size > smallest:
            warnings.warn(f"KID subset size {kid_subset_size} > {smallest} images; using {smallest}", stacklevel=2)
            kid_subset_size = smallest
        out["kid"] = kid_from_features(sample_features, real_features, kid_subset_size)
    return out
