import pytest
import torch

from assets.degradations import FAMILIES, HELDOUT_FAMILY, TRAIN_FAMILY, degrade
from trainers.image_sets import DigitsDataset

KINDS = sorted(k for family in FAMILIES.values() for k in family)


@pytest.fixture(scope="module")
def digits01():
    return (DigitsDataset("heldout").images[:64] + 1) / 2


def test_families_are_disjoint():
    assert not set(TRAIN_FAMILY) & set(HELDOUT_FAMILY)
    assert not {f.__name__ for f in TRAIN_FAMILY.values()} & {f.__name__ for f in HELDOUT_FAMILY.values()}


@pytest.mark.parametrize("kind", KINDS)
def test_severity_grades_the_damage(kind, digits01):
    """Distance from the clean image grows with severity, and the output stays in [0, 1]."""
    distances = []
    for s in (0.0, 0.5, 1.0):
        out = degrade(digits01, kind, torch.full((len(digits01),), s), torch.Generator().manual_seed(0))
        assert out.shape == digits01.shape and out.min() >= 0 and out.max() <= 1
        distances.append((out - digits01).abs().mean().item())
    assert distances[0] < 0.02, f"{kind} at severity 0 should (nearly) keep the image"
    assert distances[0] < distances[1] < distances[2]


def test_unknown_degradation(digits01):
    with pytest.raises(KeyError, match="unknown degradation 'jpeg'"):
        degrade(digits01, "jpeg", torch.zeros(len(digits01)))
