"""Stand-in per-sample data with a known truth, for the paired bootstrap (tests/eval/test_intervals.py)
and the champion rule that knows its noise (tests/sweeps/test_confidence_rule.py): a fixed N(0, I)
reference and "models" drawn around it."""

import torch

from eval.intervals import PerSample

D = 6
REFERENCE = torch.randn(297, D, generator=torch.Generator().manual_seed(99))


def draw(n: int, seed: int, shift: float = 0.3, gain: float = 0.0) -> PerSample:
    """A stand-in "model": features N(shift, I) (FID against the N(0, I) reference > 0), quality N(0.9 + gain, 0.05)."""
    g = torch.Generator().manual_seed(seed)
    return PerSample(torch.randn(n, D, generator=g) + shift, {"heldout_quality": 0.9 + gain + 0.05 * torch.randn(n, generator=g)})
