"""How sure a figure is: 95% intervals from a paired bootstrap over sample indices.

An evaluation keeps what it measured of each sample (`PerSample`: the FID layer's features and every
quality model's score). Resampling the *indices* (not the images: nothing is sampled again) and
recomputing each figure on the resample gives its bootstrap distribution; scipy's `bootstrap` does the
resampling and the percentile intervals, torch-fidelity's feature-level functions the figures. When a
base model's `PerSample` is given, it was sampled from the same seed bank (sample i of both came from
the same noise: common random numbers), and the same indices are drawn for both, so the differences
from the base (`fid_ratio`, `kid_diff`, `<quality>_diff`) are paired: the noise both share cancels.

The reference set's features stay fixed (they are the target, not a sample of the comparison). With
replacement a resample repeats some samples, which lowers its diversity; both members of a pair are
resampled alike, so the difference is what to read, not the level.

KID inside the bootstrap averages `BOOTSTRAP_KID_SUBSETS` random subsets per resample (the point
figure: torch-fidelity's 100), for cost; its interval is a little wider for it (conservative).

p-values: `one_sided_p` reads the share of resamples on the wrong side of a threshold (the inversion
of the percentile interval: it rejects at level a exactly when the one-sided 1-a bound clears the
threshold). What is decided with them (Holm over candidates) is the selection's: sweeps/selection.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import bootstrap
from torch_fidelity.metric_fid import fid_features_to_statistics

from eval.fidelity import fid_from_features, kid_from_features

CONFIDENCE = 0.95
BOOTSTRAP_KID_SUBSETS = 10
POINT_KID_SUBSETS = 100  # torch-fidelity's default, as the evaluation's `kid` figure


@dataclass
class PerSample:
    """What one evaluation measured of each sample, at one sampling step count."""

    features: torch.Tensor  # [N, D]: the feature extractor's FID layer
    scores: dict[str, torch.Tensor]  # quality metric name -> [N], in the model's own direction

    def __len__(self) -> int:
        return len(self.features)

    def tensors(self) -> dict[str, torch.Tensor]:
        """For a safetensors file (`from_tensors` reads it back)."""
        return {"features": self.features.float().contiguous(), **{f"score.{k}": v.float().contiguous() for k, v in self.scores.items()}}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "PerSample":
        if "features" not in tensors:
            raise ValueError("no 'features' tensor")
        scores = {k.removeprefix("score."): v for k, v in tensors.items() if k.startswith("score.")}
        if any(len(v) != len(tensors["features"]) for v in scores.values()):
            raise ValueError("the scores and the features count different samples")
        return cls(tensors["features"], scores)


def per_sample_tensors(per_sample: dict[int, PerSample]) -> dict[str, torch.Tensor]:
    """An evaluation's per-sample data, every step count, as flat tensors for a safetensors file."""
    return {f"{steps}.{key}": tensor for steps, data in per_sample.items() for key, tensor in data.tensors().items()}


def per_sample_bytes(per_sample: dict[int, PerSample]) -> bytes:
    """`per_sample_tensors` as safetensors bytes (what storage writes, a folder or object storage)."""
    from safetensors.torch import save

    return save(per_sample_tensors(per_sample))


def per_sample_from_bytes(data: bytes) -> dict[int, PerSample]:
    """`per_sample_bytes` read back; a ValueError (or safetensors' own error) when they are not that."""
    from safetensors.torch import load

    return per_sample_from_tensors(load(data))


def per_sample_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[int, PerSample]:
    """`per_sample_tensors` read back; a ValueError when the tensors are not that."""
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        steps, _, name = key.partition(".")
        if not steps.isdigit() or not name:
            raise ValueError(f"unexpected tensor {key!r}")
        grouped.setdefault(int(steps), {})[name] = tensor
    return {steps: PerSample.from_tensors(group) for steps, group in grouped.items()}


@dataclass
class Intervals:
    """Figures with their intervals: name -> {"value", "low", "high"} (`value`: on every sample;
    low/high: the 95% percentile interval). `distributions`: the bootstrap distributions, for tests."""

    figures: dict[str, dict[str, float]]
    distributions: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    samples: int = 0
    resamples: int = 0

    def to_json(self) -> dict:
        return {"samples": self.samples, "resamples": self.resamples, "confidence": CONFIDENCE, **self.figures}


def paired_intervals(checkpoint: PerSample, reference_features: torch.Tensor, base: PerSample | None = None, *,
                     resamples: int = 1000, seed: int = 0, with_kid: bool = True, with_fid: bool = True) -> Intervals:
    """Intervals of `checkpoint`'s FID, KID and quality means, and (with `base`, sampled from the same
    bank) of its paired differences from the base: `fid_ratio` (checkpoint / base: < 1 is better),
    `kid_diff`, `<quality>_diff` (checkpoint - base, in the quality model's own units and direction).
    `with_fid=False`: the quality figures alone (FID's bootstrap is most of the cost: ~15 ms a resample
    for 128-D features on a CPU core, against microseconds for a mean)."""
    n = len(checkpoint)
    if base is not None and len(base) != n:
        raise ValueError(f"paired intervals need as many base samples as checkpoint samples ({len(base)} != {n})")
    if n < 3:
        raise ValueError(f"intervals need at least 3 samples, got {n}")
    reference_statistics = fid_features_to_statistics(reference_features)
    kid_size = min(n, len(reference_features))  # as the evaluation's KID (digits: 297 references)
    names = list(checkpoint.scores)
    models = [checkpoint] if base is None else [checkpoint, base]

    def figures(index, kid_subsets) -> list[float]:
        out = []
        for model in models:
            features = model.features[index]
            out += [*([fid_from_features(features, reference_statistics)] if with_fid else []),
                    *([kid_from_features(features, reference_features, kid_size, kid_subsets)] if with_kid else []),
                    *(float(model.scores[name][index].mean()) for name in names)]
        return out

    labels = [*(["fid"] if with_fid else []), *(["kid"] if with_kid else []), *names]
    full = np.array(figures(torch.arange(n), POINT_KID_SUBSETS))
    result = bootstrap((np.arange(n),), lambda i: np.array(figures(torch.as_tensor(i), BOOTSTRAP_KID_SUBSETS)), vectorized=False,
                       n_resamples=resamples, confidence_level=CONFIDENCE, method="percentile", random_state=np.random.default_rng(seed))
    distribution = np.asarray(result.bootstrap_distribution)  # [figures, resamples]
    k = len(labels)
    values, draws = dict(zip(labels, full[:k])), dict(zip(labels, distribution[:k]))
    if base is not None:
        base_values, base_draws = dict(zip(labels, full[k:])), dict(zip(labels, distribution[k:]))
        if with_fid:
            values["fid_ratio"], draws["fid_ratio"] = values["fid"] / base_values["fid"], draws["fid"] / base_draws["fid"]
        for name in labels[1 if with_fid else 0:]:
            values[f"{name}_diff"], draws[f"{name}_diff"] = values[name] - base_values[name], draws[name] - base_draws[name]
    alpha = (1 - CONFIDENCE) / 2
    out = {name: {"value": float(values[name]), "low": float(np.quantile(draws[name], alpha)), "high": float(np.quantile(draws[name], 1 - alpha))}
           for name in values}
    return Intervals(out, draws, n, resamples)


def one_sided_p(distribution: np.ndarray, threshold: float, better: str) -> float:
    """Bootstrap p-value of "not better than `threshold`": the share of resamples at or on the wrong
    side of it (`better`: "greater" or "less"), with the +1 that keeps it above 0."""
    wrong = int(np.count_nonzero(distribution <= threshold if better == "greater" else distribution >= threshold))
    return (wrong + 1) / (len(distribution) + 1)
