import math

import pytest
import torch
import torch_fidelity

from eval.digits_fid import FEATURE_EXTRACTOR_NAME, register
from eval.fidelity import _Uint8Images, fidelity_metrics
from trainers.image_sets import DigitsDataset


@pytest.fixture(scope="module")
def splits():
    return {name: (DigitsDataset(name).images + 1) / 2 for name in ("train", "heldout")}


def test_equals_torch_fidelity_called_directly(splits, digits_assets):
    weights = str(digits_assets / "classifier.safetensors")
    ours = fidelity_metrics(splits["heldout"], splits["train"][:400], FEATURE_EXTRACTOR_NAME, weights, kid_subset_size=200)
    direct = torch_fidelity.calculate_metrics(
        input1=_Uint8Images(splits["heldout"]), input2=_Uint8Images(splits["train"][:400]), fid=True, kid=True,
        kid_subset_size=200, feature_extractor=register(), feature_extractor_weights_path=weights,
        cuda=False, cache=False, save_cpu_ram=True, verbose=False,
    )
    assert ours["fid"] == pytest.approx(direct["frechet_inception_distance"], abs=1e-4)
    assert ours["kid"] == pytest.approx(direct["kernel_inception_distance_mean"], abs=1e-4)


def test_real_digits_are_close_and_noise_is_far(splits, digits_assets):
    weights = str(digits_assets / "classifier.safetensors")
    real = fidelity_metrics(splits["heldout"], splits["train"], FEATURE_EXTRACTOR_NAME, weights, kid=False)["fid"]
    noise = torch.rand(297, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    fake = fidelity_metrics(noise, splits["train"], FEATURE_EXTRACTOR_NAME, weights, kid=False)["fid"]
    # Classifier FID has its own scale (real held-out vs train is ~42 here, noise ~2,400): compare, don't fix a number.
    assert fake > 20 * real


def test_small_sample_counts(splits, digits_assets):
    weights = str(digits_assets / "classifier.safetensors")
    with pytest.warns(UserWarning, match="KID subset size"):
        out = fidelity_metrics(splits["heldout"][:50], splits["train"], FEATURE_EXTRACTOR_NAME, weights)
    assert math.isfinite(out["kid"])  # a number, not NaN
    with pytest.raises(ValueError, match="at least 2 images"):
        fidelity_metrics(splits["heldout"][:1], splits["train"], FEATURE_EXTRACTOR_NAME, weights)


def test_extractor_rejects_float_images(digits_assets):
    from eval.digits_fid import DigitsClassifierFeatureExtractor

    extractor = DigitsClassifierFeatureExtractor(FEATURE_EXTRACTOR_NAME, ["features"], feature_extractor_weights_path=str(digits_assets / "classifier.safetensors"))
    with pytest.raises(TypeError, match="uint8"):
        extractor(torch.rand(2, 1, 16, 16))


def test_reference_features_are_cached_by_content(splits, digits_assets, tmp_path, monkeypatch):
    from eval.digits_fid import DigitsClassifierFeatureExtractor
    from eval.fidelity import content_key

    weights = str(digits_assets / "classifier.safetensors")
    seen = []
    forward = DigitsClassifierFeatureExtractor.forward
    monkeypatch.setattr(DigitsClassifierFeatureExtractor, "forward", lambda self, x: (seen.append(len(x)), forward(self, x))[1])
    samples, reference = splits["heldout"][:40], splits["train"][:300]
    first = fidelity_metrics(samples, reference, FEATURE_EXTRACTOR_NAME, weights, kid=False, cache_dir=tmp_path)
    assert sum(seen) == 40 + 300
    seen.clear()
    second = fidelity_metrics(samples, reference, FEATURE_EXTRACTOR_NAME, weights, kid=False, cache_dir=tmp_path)
    assert sum(seen) == 40  # the reference came from the cache
    assert second["fid"] == pytest.approx(first["fid"], abs=1e-6)
    assert [p.suffix for p in tmp_path.iterdir()] == [".safetensors"]
    edited = reference.clone()
    edited[17, 0, 3, 3] = 1 - edited[17, 0, 3, 3]  # one pixel of one image
    assert content_key(edited, FEATURE_EXTRACTOR_NAME, weights) != content_key(reference, FEATURE_EXTRACTOR_NAME, weights)
    seen.clear()
    fidelity_metrics(samples, edited, FEATURE_EXTRACTOR_NAME, weights, kid=False, cache_dir=tmp_path)
    assert sum(seen) == 40 + 300  # a new key, recomputed


def test_base_model_fid_lies_between_real_and_noise(splits, digits_assets):
    """Measured: real train vs held-out 42.5, base samples (DDIM-20, 500) ~73 (63.4 at 1,000: FID's bias),
    uniform noise ~2,400."""
    from eval.sampling import sample_images
    from trainers.models import load_base_model

    weights = str(digits_assets / "classifier.safetensors")
    base = load_base_model(digits_assets / "base")
    samples = sample_images(base, 500, steps=20, seed=0)
    # Against the held-out split, which the base never trained on (against train its samples score
    # below real held-out images: it has seen those very digits), with set sizes alike, because FID's
    # bias grows as sets shrink (297 vs 297 real images scores ~118).
    real = fidelity_metrics(splits["train"], splits["heldout"], FEATURE_EXTRACTOR_NAME, weights, kid=False)
    model = fidelity_metrics(samples, splits["heldout"], FEATURE_EXTRACTOR_NAME, weights, kid=False)
    noise = fidelity_metrics(torch.rand(500, 1, 16, 16), splits["heldout"], FEATURE_EXTRACTOR_NAME, weights, kid=False)
    assert real["fid"] < model["fid"] < noise["fid"]
    assert model["diversity"] > 0.5 * real["diversity"]  # samples are not collapsed onto a few digits
