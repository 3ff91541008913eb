"""The run configuration: plain dataclasses, validated once at the edge.

Every field has a default and a comment. `Config.from_dict` rejects unknown keys and wrong types
with a one-line `ConfigError` naming the dotted field (`train.steps: expected int, got 'ten'`),
so a typo fails before any model is loaded, let alone before Ray starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


def resolve_path(path: str) -> str:
    """Relative paths in presets name files of this project (`assets/digits/...`): they are looked up
    under the project root first, then under the working directory. Hub ids pass through unchanged."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return str(p)
    if (PROJECT_ROOT / p).exists():
        return str(PROJECT_ROOT / p)
    return str(p.resolve()) if p.exists() else path


def resolve_quality_paths(spec):
    """{arch, weights} specs get their weights path resolved; pyiqa names pass through."""
    if isinstance(spec, dict) and isinstance(spec.get("weights"), str):
        return {**spec, "weights": resolve_path(spec["weights"])}
    return spec


@dataclass
class ModelConfig:
    base: str = "assets/digits/base"  # a local diffusers folder or a hub id (google/ddpm-cifar10-32)
    finetune: str = "full"  # "full": every UNet weight trains; "lora": peft adapters only, the base stays frozen
    lora_rank: int = 4
    lora_alpha: float = 0.0  # 0: same as the rank (scale 1)
    lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])

    def validate(self, prefix):
        _choice(f"{prefix}finetune", self.finetune, ("full", "lora"))
        _positive(f"{prefix}lora_rank", self.lora_rank)
        _non_negative(f"{prefix}lora_alpha", self.lora_alpha)
        if not self.lora_targets:
            raise ConfigError(f"{prefix}lora_targets: expected at least one module name")


@dataclass
class DataConfig:
    source: str = "digits"  # "digits" (bundled), "folder" (path = image folder), "hf" (path = dataset name or save_to_disk folder)
    path: str = ""
    split: str = "train"
    image_column: str = "image"  # hf only: the column holding PIL images
    caption_column: str = ""  # hf only: a column of per-image captions for text models (use caption "{label}")
    caption: str = "a handwritten digit {label}"  # text models: caption per image; {label} is filled where the data has labels
    resolution: int = 16
    channels: int = 1

    def validate(self, prefix):
        _choice(f"{prefix}source", self.source, ("digits", "folder", "hf"))
        if self.caption_column and self.source != "hf":
            raise ConfigError(f"{prefix}caption_column: only for {prefix}source 'hf', not {self.source!r}")
        if self.source != "digits" and not self.path:
            raise ConfigError(f"{prefix}path: required when {prefix}source is {self.source!r}")
        _positive(f"{prefix}resolution", self.resolution)
        _choice(f"{prefix}channels", self.channels, (1, 3))


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 64  # per worker
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    gradient_accumulation: int = 1  # micro-batches per optimizer step (the loss is divided by this, once)
    seed: int = 0  # every rank derives its data order and noise from (seed, rank, step)
    ema_decay: float = 0.0  # EMA of the trainable weights, used for evaluation; 0 disables
    mixed_precision: str = "bf16"  # "bf16": autocast on CUDA (ignored on CPU); "no": fp32 everywhere
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, ~30% slower
    eval_every: int = 0  # evaluate + checkpoint every N steps (0: only at the end)
    output_dir: str = "runs/digits"  # checkpoints and the resolved config go here
    # Ray Train (ignored by `acpo train --local`)
    workers: int = 1  # data-parallel workers
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1  # restarts from the last checkpoint after a worker dies
    keep_checkpoints: int = 0  # how many reported checkpoints Ray keeps (0: all; the sweep's front needs them)

    def validate(self, prefix):
        _positive(f"{prefix}steps", self.steps)
        _positive(f"{prefix}batch_size", self.batch_size)
        _positive(f"{prefix}learning_rate", self.learning_rate)
        _positive(f"{prefix}gradient_accumulation", self.gradient_accumulation)
        _non_negative(f"{prefix}weight_decay", self.weight_decay)
        _non_negative(f"{prefix}grad_clip", self.grad_clip)
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"{prefix}ema_decay: expected 0 <= ema_decay < 1, got {self.ema_decay!r}")
        _choice(f"{prefix}mixed_precision", self.mixed_precision, ("bf16", "no"))
        _non_negative(f"{prefix}eval_every", self.eval_every)
        _positive(f"{prefix}workers", self.workers)
        _positive(f"{prefix}cpus_per_worker", self.cpus_per_worker)
        _non_negative(f"{prefix}max_failures", self.max_failures)
        _non_negative(f"{prefix}keep_checkpoints", self.keep_checkpoints)


@dataclass
class EvalConfig:
    samples: int = 500  # images generated per evaluation
    sampling_steps: list[int] = field(default_factory=lambda: [25])  # one row of figures per step count
    sampler: str = "ddim"
    reference: str = "digits:heldout"  # "digits:heldout", an image folder, or "hf:NAME[:SPLIT]" (data.image_column)
    feature_extractor: str = "digits-classifier"  # torch-fidelity extractor name (inception-v3-compat online)
    feature_extractor_weights: str = "assets/digits/classifier.safetensors"  # only for extractors that need local weights
    quality: Any = field(default_factory=lambda: {"arch": "cnniqa", "weights": "assets/digits/quality_cnniqa.safetensors"})
    aesthetic: Any = field(default_factory=lambda: {"arch": "digits_heldout_iqa", "weights": "assets/digits/heldout_iqa.safetensors"})
    prompts: list[str] = field(default_factory=list)  # text models: prompts cycled over the samples (default: data.caption for labels 0-9)
    guidance_scale: float = 1.0  # text models: classifier-free guidance when sampling (Stable Diffusion: 7.5)
    clip_score: str = ""  # text models: a pyiqa CLIP-score metric ("clipscore") reported as clip_score@S; "" = off
    extra_quality: dict = field(default_factory=dict)  # more quality models to report, name -> pyiqa name or {arch, weights}
    cache_dir: str = ""  # reference-feature cache, shareable by a cluster ("" = $ACPO_FIDELITY_CACHE or ~/.cache/acpo/fidelity)

    def validate(self, prefix):
        from eval.quality import SpecError, check_quality_spec, pyiqa_metric_names

        if self.samples < 2:
            raise ConfigError(f"{prefix}samples: FID needs at least 2 samples, got {self.samples}")
        for name, spec in {"quality": self.quality, "aesthetic": self.aesthetic,
                           **{f"extra_quality.{k}": v for k, v in self.extra_quality.items()}}.items():
            try:
                check_quality_spec(resolve_quality_paths(spec), f"{prefix}{name}")
            except SpecError as error:
                raise ConfigError(str(error)) from None
        if self.clip_score and self.clip_score not in pyiqa_metric_names():
            raise ConfigError(f"{prefix}clip_score: unknown pyiqa metric {self.clip_score!r}")
        if self.guidance_scale < 1:
            raise ConfigError(f"{prefix}guidance_scale: expected >= 1 (1 = no guidance), got {self.guidance_scale!r}")
        reserved = sorted(set(self.extra_quality) & {"quality", "aesthetic", "fid", "kid", "diversity", "clip_score"})
        if reserved:
            raise ConfigError(f"{prefix}extra_quality.{reserved[0]}: the name is taken by a built-in metric")
        if not self.sampling_steps or any(not isinstance(s, int) or s < 1 for s in self.sampling_steps):
            raise ConfigError(f"{prefix}sampling_steps: expected a non-empty list of positive ints, got {self.sampling_steps!r}")


@dataclass
class Config:
    preset: str = "digits"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # term name -> weight or {weight, ...options}; validated by the objectives registry when built
    objective: dict = field(default_factory=lambda: {"denoise": 1.0})
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        from objectives.registry import ObjectiveError, validate_objective

        config = _build(cls, data, "")
        if config.data.caption_column and not config.eval.prompts:  # the caption template alone has nothing to fill in
            raise ConfigError("eval.prompts: required when data.caption_column is set (what should evaluation prompt with?)")
        config.resolve_paths()  # before the objective check, which looks for its weight files
        try:
            validate_objective(config.objective)
        except ObjectiveError as error:
            raise ConfigError(str(error)) from None
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolve_paths(self) -> None:
        self.model.base = resolve_path(self.model.base)
        if self.data.source == "folder" or (self.data.source == "hf" and self.data.path.startswith((".", "/", "~"))):
            self.data.path = resolve_path(self.data.path)
        if self.eval.reference.startswith("hf:"):
            name, _, split = self.eval.reference[3:].partition(":")
            if name.startswith((".", "/", "~")):
                self.eval.reference = f"hf:{resolve_path(name)}" + (f":{split}" if split else "")
        elif not self.eval.reference.startswith("digits:"):
            self.eval.reference = resolve_path(self.eval.reference)
        if self.eval.feature_extractor_weights:
            self.eval.feature_extractor_weights = resolve_path(self.eval.feature_extractor_weights)
        self.eval.quality = resolve_quality_paths(self.eval.quality)
        self.eval.aesthetic = resolve_quality_paths(self.eval.aesthetic)
        self.eval.extra_quality = {k: resolve_quality_paths(v) for k, v in self.eval.extra_quality.items()}
        if self.eval.cache_dir:
            self.eval.cache_dir = str(Path(self.eval.cache_dir).expanduser().resolve())
        self.objective = _resolve_option_paths(self.objective)


# Objective options that name files: `weights` (quality models, networks) and `prompts` given as a path.
_PATH_OPTIONS = {"weights", "prompts"}


def _resolve_option_paths(options):
    if isinstance(options, dict):
        return {k: resolve_path(v) if k in _PATH_OPTIONS and isinstance(v, str) else _resolve_option_paths(v) for k, v in options.items()}
    return options


def _build(cls, data, prefix):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' (known: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(f"{prefix}{name}", hints[name], value) for name, value in data.items()}
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


def _coerce(name, hint, value):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{name}.")
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected int, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(f"{name}[{i}]", item, v) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(name, option, value)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} matches none of {hint}")
    raise ConfigError(f"{name}: unsupported type {hint}")  # a schema bug, not a user error


def _choice(name, value, options):
    if value not in options:
        raise ConfigError(f"{name}: expected one of {', '.join(map(repr, options))}, got {value!r}")


def _positive(name, value):
    if value <= 0:
        raise ConfigError(f"{name}: must be > 0, got {value!r}")


def _non_negative(name, value):
    if value < 0:
        raise ConfigError(f"{name}: must be >= 0, got {value!r}")
