"""One evaluation of a diffusion model: sample, then fidelity, diversity and quality scores per step count.

    evaluator = Evaluator.from_config(config, device)      # once: reference set, extractor, quality models
    result = evaluator.evaluate(model)                       # per checkpoint: result.metrics, result.samples

Models it needs (feature extractor, quality models) are built once, in `from_config`, and reused for
every checkpoint; only the samples change between calls. The reference set's features are cached on
disk by content (see `eval/fidelity.py`).

Metrics, for each sampling step count S:
  fid@S, kid@S         against the reference set, in the feature extractor's space (lower is better)
  diversity@S          mean pairwise feature distance between samples (higher: more varied)
  trained_quality@S    the quality model the objective trains against
  heldout_quality@S    a quality model the objective never sees: the sweep's second objective
  <name>@S             every extra quality model named in `eval.extra_quality` (prompt-conditioned ones,
                       e.g. digits-t2i's `prompt_agreement`, score each sample against its prompt)
  clip_score@S         text models with `clip_score` set: image-prompt agreement (pyiqa's clipscore)
plus `fid`, `kid` and `heldout_quality` (the sweep's front: one fidelity figure, `sweep.fidelity`, and the
held-out quality) and `trained_quality` (the reward-gap and
reward-hacking checks of a study) at the first step count.

`reward_gap` compares a checkpoint's two quality scores with the base model's; `sampling_noise`
measures how much every figure moves with the sampling seed alone (the noise floor of a comparison).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from eval.axes import FIDELITY_AXES, QUALITY_AXIS
from eval.fidelity import extract_features, features_metrics, reference_features
from eval.intervals import PerSample
from eval.quality import QualityModel, load_clip_score, load_quality_model
from eval.sampling import sample_images
from trainers.image_sets import captions, reference_images


@dataclass
class Evaluation:
    metrics: dict[str, float]
    samples: torch.Tensor  # [<=64, C, H, W] in [0, 1]: the first images at the first step count (sample grids)
    # steps -> what was measured of each sample (features, scores): what intervals are computed from
    per_sample: dict[int, PerSample] = dataclasses.field(default_factory=dict)

    @property
    def first(self) -> PerSample:
        """The per-sample data at the first step count: the figures the sweep compares."""
        return next(iter(self.per_sample.values()))


@dataclass
class Evaluator:
    reference: torch.Tensor  # [M, C, H, W] in [0, 1]: the real images FID is measured against
    feature_extractor: str
    feature_extractor_weights: str | None
    quality: dict[str, QualityModel]  # metric name -> model: trained_quality, heldout_quality, extras
    samples: int = 500
    sampling_steps: tuple[int, ...] = (25,)
    sampler: str | None = None  # None: the model's deterministic sampler (ddim, or euler on a flow model)
    seed: int = 0  # the seed bank: the same noise for every checkpoint and the base, so differences come from the weights alone
    device: str = "cpu"
    prompts: tuple[str, ...] = ()  # text models: cycled over the samples
    guidance_scale: float = 1.0  # text models: classifier-free guidance when sampling
    clip_score: object = None  # text models: (images [N,3,H,W] in [0,1], captions) -> [N], higher is better
    cache_dir: str | Path | None = None  # reference features; None: $ACPO_FIDELITY_CACHE or ~/.cache/acpo/fidelity
    _reference_features: torch.Tensor | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_config(cls, config, device: str | torch.device = "cpu", quality: bool = True) -> "Evaluator":
        """From a run config's `eval:` (and `data:`, which says how to read the reference images and
        how to caption the default prompts of a text model: `data.caption` for the digits 0-9).
        `quality=False`: no quality or CLIP models loaded (for what needs the reference set only)."""
        settings, data = config.eval, config.data
        return cls(
            reference=reference_images(settings.reference, data),
            feature_extractor=settings.feature_extractor,
            feature_extractor_weights=settings.feature_extractor_weights or None,
            quality={name: load_quality_model(spec, device) for name, spec in settings.quality_specs().items()} if quality else {},
            samples=settings.samples,
            seed=settings.seed,
            sampling_steps=tuple(settings.sampling_steps),
            sampler=settings.sampler,
            device=str(device),
            prompts=tuple(settings.prompts) or tuple(captions(data.caption, list(range(10)), 10)),
            guidance_scale=settings.guidance_scale,
            clip_score=load_clip_score(settings.clip_score, device) if settings.clip_score and quality else None,
            cache_dir=settings.cache_dir or None,
        )

    def directions(self) -> dict[str, str]:
        """Which way is better for each metric family: what a table or a Pareto front needs."""
        out = {"fid": "min", "kid": "min", "diversity": "max", "clip_score": "max"}
        out.update({name: "min" if model.lower_better else "max" for name, model in self.quality.items()})
        return out

    @torch.no_grad()
    def evaluate(self, model) -> Evaluation:
        """`model`: a `trainers.models.DiffusionModel`. Unconditional models ignore the prompts."""
        metrics, grid, per_sample = {}, None, {}
        for steps in self.sampling_steps:
            images = sample_images(model, self.samples, steps=steps, sampler=self.sampler, seed=self.seed, device=self.device,
                                   prompts=list(self.prompts), guidance_scale=self.guidance_scale)
            features = extract_features(images, self.feature_extractor, self.feature_extractor_weights, self.device)
            fidelity = features_metrics(features, self.reference_features())
            scores = {}
            for key in ("fid", "kid", "diversity"):
                metrics[f"{key}@{steps}"] = fidelity[key]
            if grid is None:
                grid = images[:64]
            on_device = images.to(self.device)
            prompted = [self.prompts[i % len(self.prompts)] for i in range(len(images))] if model.text_conditioned else None  # sample_images' cycling
            for name, quality in self.quality.items():
                if quality.prompt_conditioned and prompted is None:
                    raise ValueError(f"eval: {quality.name} scores images against prompts; this model takes none")
                scores[name] = quality(on_device, prompted).float().cpu()
                metrics[f"{name}@{steps}"] = scores[name].mean().item()
            if self.clip_score is not None and prompted is not None:
                scores["clip_score"] = self.clip_score(on_device, prompted).float().cpu()
                metrics[f"clip_score@{steps}"] = scores["clip_score"].mean().item()
            per_sample[steps] = PerSample(features.cpu(), scores)
        first = self.sampling_steps[0]
        # what reports compare: both fidelity figures (the front's axis is the sweep's choice), both quality scores
        metrics.update({name: metrics[f"{name}@{first}"] for name in (*FIDELITY_AXES, QUALITY_AXIS, "trained_quality")})
        return Evaluation(metrics, grid, per_sample)

    def reference_features(self) -> torch.Tensor:
        """The reference set's features (cached on disk by content, and here once read)."""
        if self._reference_features is None:
            self._reference_features = reference_features(self.reference, self.feature_extractor, self.feature_extractor_weights,
                                                          self.cache_dir, self.device)
        return self._reference_features


def relative_gain(value: float, base: float, lower_better: bool = False) -> float:
    """(value - base) / |base|, positive when `value` is better than `base`."""
    gain = (value - base) / (abs(base) or 1.0)
    return -gain if lower_better else gain


def reward_gap(metrics: dict, base: dict, steps: int | None = None, lower_better: dict[str, bool] | None = None) -> float:
    """How much more the trained quality score improved than the held-out one did, each gain
    relative to the base model's value (so models on different scales compare) and counted positive
    in its own model's direction. A large gap means the objective learned to please its own reward
    model rather than to make better images. `steps`: read the `name@steps` figures (None: `name`)."""
    key = (lambda name: f"{name}@{steps}") if steps is not None else (lambda name: name)
    lower_better = lower_better or {}
    return (relative_gain(metrics[key("trained_quality")], base[key("trained_quality")], lower_better.get("trained_quality", False))
            - relative_gain(metrics[key("heldout_quality")], base[key("heldout_quality")], lower_better.get("heldout_quality", False)))


def sampling_noise(evaluator: Evaluator, model, seeds: Sequence[int]) -> dict[str, dict[str, float]]:
    """Each metric of `model` evaluated under several sampling seeds: mean and sample standard
    deviation. The noise floor of a comparison: with a few hundred samples, FID moves by more from
    the noise alone than many fine-tunings move it (a checkpoint is evaluated with the same seed as
    its base, which correlates the two, so this spread bounds the noise of their difference from above)."""
    runs = [dataclasses.replace(evaluator, seed=seed).evaluate(model).metrics for seed in seeds]
    return {name: {"mean": statistics.fmean(r[name] for r in runs),
                   "std": statistics.stdev(r[name] for r in runs) if len(runs) > 1 else 0.0}
            for name in runs[0]}


def noise_curve(evaluator: Evaluator, model, sample_counts: Sequence[int], seeds: Sequence[int], resamples: int = 1000) -> list[dict]:
    """How each front figure of `model` moves with the seed bank at each sample count: per count, the
    mean and standard deviation over `seeds` of FID, KID and the held-out quality, and the mean
    half-width of the bootstrap's 95% interval (eval/intervals.py) of each from
    one bank's per-sample data. What a preset's sample counts are chosen from (`acpo eval --noise`)."""
    from eval.intervals import paired_intervals

    rows = []
    for count in sample_counts:
        runs, widths = [], []
        for seed in seeds:
            evaluation = dataclasses.replace(evaluator, samples=count, seed=seed).evaluate(model)
            runs.append(evaluation.metrics)
            figures = paired_intervals(evaluation.first, evaluator.reference_features(), resamples=resamples, seed=seed).figures
            widths.append({name: (figures[name]["high"] - figures[name]["low"]) / 2 for name in (*FIDELITY_AXES, QUALITY_AXIS)})
        row = {"samples": count, "seeds": len(runs)}
        first = evaluator.sampling_steps[0]
        for name in ("fid", "kid", "heldout_quality"):
            values = [r[f"{name}@{first}"] for r in runs]
            row[name] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        for name in (*FIDELITY_AXES, QUALITY_AXIS):
            row[name]["bootstrap_half_width"] = statistics.fmean(w[name] for w in widths)
        rows.append(row)
    return rows


def samples_for_tolerance(curve: list[dict], tolerance: float, figure: str = "fid") -> int | None:
    """The sample count at which 1.96 standard deviations of `figure` fit in `tolerance` (relative to
    its mean): from the largest measured count, assuming std ~ 1/sqrt(N). The standard deviation is
    the larger of the spread over seed banks and the bootstrap's (half-width / 1.96): a few banks pin
    a spread down poorly. Unpaired: a checkpoint paired with its base on one bank moves less."""
    row = max(curve, key=lambda r: r["samples"], default=None)
    if row is None:
        return None
    std = max(row[figure]["std"], row[figure].get("bootstrap_half_width", 0.0) / 1.96)
    if std == 0:
        return None
    return max(1, round(row["samples"] * (1.96 * std / abs(row[figure]["mean"]) / tolerance) ** 2))
