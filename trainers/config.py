"""The run configuration: what one fine-tuning run takes, as pydantic models validated once.

Every field has a default and a comment. Types are strict (`train.steps: ten` is an error, not a
coercion) and unknown keys are refused; `validate(Section, data)` turns pydantic's report into the
project's one-line `ConfigError` naming the dotted field (`train.steps: expected an integer, got
'ten'`). Presets and `--set` overrides are read by `sweeps/presets.py`, the one loader.

Two checks, kept apart:
- `Config.from_dict`: the schema (types, ranges, paths made absolute, rules between fields). Pure and
  cheap: it imports nothing above the bottom layer, and is what a Ray worker or a trial re-runs on
  the resolved dict it is shipped.
- `Config.check_references`: what the config refers to (quality models known to pyiqa or present on
  disk, the objective's terms and their options). It imports eval/ and objectives/ (pyiqa), so it
  runs once, at the edge: the preset loader, the sweep's space check, the preflight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainers.common.credentials import credentials_message, has_credentials, redact
from trainers.common.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# Keys that were renamed, so that a config written for an old name fails naming the new one (renamed
# objective terms: objectives/registry.py).
RENAMED = {
    "eval.aesthetic": ("eval.heldout_quality", "the held-out quality model: the sweep's second objective"),
    "eval.quality": ("eval.trained_quality", "the quality model the objective trains against, measured on samples"),
}


def check_renamed(data: dict) -> None:
    for old, (new, what) in RENAMED.items():
        section, _, key = old.partition(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            raise ConfigError(f"{old}: renamed to {new} ({what})")


class Section(BaseModel):
    """Strict types, no unknown keys, no NaN or infinity in a float field."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def validate(section: type[Section], data, prefix: str = ""):
    """`section.model_validate(data)` with the first problem as a one-line ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    try:
        return section.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_one_line(section, error.errors()[0], prefix)) from None


_EXPECTED = {"int_type": "expected an integer", "float_type": "expected a number", "bool_type": "expected true/false",
             "string_type": "expected a string", "list_type": "expected a list", "dict_type": "expected a mapping",
             "model_type": "expected a mapping", "finite_number": "expected a finite number"}


def _one_line(section: type[Section], error: dict, prefix: str) -> str:
    where = prefix + ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        owner = section  # the section the unknown key is in, to list its known keys
        for part in error["loc"][:-1]:
            field = owner.model_fields.get(part) if owner else None
            owner = field.annotation if field and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) else None
        known = f" (known: {', '.join(owner.model_fields)})" if owner else ""
        return f"unknown key '{where}'{known}"
    message = _EXPECTED.get(error["type"]) or error["msg"].removeprefix("Value error, ")
    return redact(f"{where}: {message}, got {error['input']!r}" if "input" in error else f"{where}: {message}")


def resolve_path(path: str) -> str:
    """Relative paths in presets name files of this project (`assets/digits/...`): they are looked up
    under the project root first, then under the working directory. Hub ids pass through unchanged."""
    if not path:
        return path
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


NonNegative = Annotated[int, Field(ge=0)]

# Upper bounds on what a config can ask for. Each is far beyond any real run; they exist because a typo
# (`samples: 1000000000`, an extra zero in a batch size) would otherwise run for days or exhaust memory
# before the first figure, rather than fail here in one line naming the field.
MAX_SAMPLES = 200_000  # images generated per evaluation (eval.samples, sweep.confirm.samples): 4x FID's usual 50,000
MAX_RESAMPLES = 100_000  # bootstrap resamples per interval: intervals settle by a few thousand
MAX_RESOLUTION = 4096  # pixels per side: 4x the largest preset (1024)
MAX_BATCH = 65_536  # images per micro-batch, and micro-batches per step
MAX_SAMPLING_STEPS = 10_000  # denoising steps per sample: 10x DDPM's 1,000
MAX_TRAIN_STEPS = 10_000_000  # optimizer steps: 5,000x the presets' 2,000
MAX_WORKERS = 1024  # processes per run (DataLoader readers, data-parallel workers)
MAX_TRIALS = 100_000  # trials per sweep (sweep.num_samples)
MAX_LORA_RANK = 8192  # past every hidden width of the supported models: a larger rank is no longer low-rank
# Levels of nested mappings and lists: presets use under ten. A value that contains itself (a Python
# caller's, or a YAML alias inside its own anchor) would otherwise recurse until Python gives up.
MAX_NESTING = 100


def check_nesting(value, where: str = "config", depth: int = 0, open_ids: set | None = None) -> None:
    """A one-line error naming the first value that contains itself or is nested past MAX_NESTING."""
    if not isinstance(value, (dict, list, tuple)):
        return
    open_ids = set() if open_ids is None else open_ids
    if id(value) in open_ids:
        raise ConfigError(f"{where}: the value contains itself")
    if depth > MAX_NESTING:
        raise ConfigError(f"{where}: nested deeper than {MAX_NESTING} levels")
    open_ids.add(id(value))
    for key, item in value.items() if isinstance(value, dict) else enumerate(value):
        check_nesting(item, f"{where}.{key}" if depth else str(key), depth + 1, open_ids)
    open_ids.discard(id(value))


class ModelConfig(Section):
    base: str = "assets/digits/base"  # a local diffusers folder or a hub id (google/ddpm-cifar10-32)
    finetune: Literal["full", "lora"] = "full"  # full: every UNet weight trains; lora: peft adapters only, the base stays frozen
    lora_rank: int = Field(4, gt=0, le=MAX_LORA_RANK)
    lora_alpha: float = Field(0.0, ge=0)  # 0: same as the rank (scale 1)
    lora_targets: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"], min_length=1)
    # The dtype the base model's weights are loaded in. bf16 halves the frozen weights (what FLUX.1-dev's 12B transformer
    # and its T5-XXL need to fit one 80 GB GPU): LoRA only, the adapters stay fp32, every step under bf16 autocast.
    weights_dtype: Literal["fp32", "bf16"] = "fp32"
    # A rehearsal (trainers/rehearsal.py): every hub model of the preset replaced by its architecture with RANDOM
    # weights, built here, and the hub data by local RGB images: the run's cost and code path, never its quality.
    rehearsal: bool = False


class DataConfig(Section):
    source: Literal["digits", "folder", "hf"] = "digits"  # bundled digits, an image folder (path), a datasets name or save_to_disk folder (path)
    path: str = ""
    split: str = "train"
    image_column: str = "image"  # hf only: the column holding PIL images
    caption_column: str = ""  # hf: a column of per-image captions for text models (use caption "{label}"); digits: "caption" ("a thick handwritten 7")
    caption: str = "a handwritten digit {label}"  # text models: caption per image; {label} is filled where the data has labels
    resolution: int = Field(16, gt=0, le=MAX_RESOLUTION)
    channels: Literal[1, 3] = 1
    # Feeding the GPU (trainers/data.py): batch order stays a function of (seed, rank, step) whatever these say.
    workers: int = Field(0, ge=0, le=MAX_WORKERS)  # DataLoader worker processes (0: read in the training process; in-memory digits need none)
    prefetch: int = Field(2, gt=0, le=MAX_BATCH)  # batches each worker reads ahead
    cache_latents: bool = True  # latent models: encode the training images with the VAE once, keyed by content and VAE weights
    cache_captions: bool = True  # text models: encode each distinct caption once
    cache_dir: str = ""  # latent cache, shareable by a sweep's trials ("" = $ACPO_LATENT_CACHE or ~/.cache/acpo/latents)
    masks: str = ""  # folder source: a folder of label images, one per training image at the same relative path (.png), read by `masks: data`


class TrainConfig(Section):
    steps: int = Field(200, gt=0, le=MAX_TRAIN_STEPS)  # optimizer steps
    batch_size: int = Field(64, gt=0, le=MAX_BATCH)  # per worker
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # max global grad norm; 0 disables
    gradient_accumulation: int = Field(1, gt=0, le=MAX_BATCH)  # micro-batches per optimizer step (the loss is divided by this, once)
    seed: int = 0  # every draw derives from (seed, rank, step): trainers.common.seeds.derive_seed
    ema_decay: float = Field(0.0, ge=0, lt=1)  # EMA of the trainable weights, used for evaluation; 0 disables
    # auto: bf16 autocast on CUDA, fp32 on the CPU (where autocast is slower than fp32 for these convolutions);
    # bf16: autocast on either (the CPU runs the GPU's dtype path, for rehearsals and tests); no: fp32 everywhere
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    # how the denoise step draws t: auto is the family's (DDPM: uniform; flow models: logit-normal, as diffusers'
    # SD3 and Flux scripts); logit_normal and mode (SD3's densities) are for flow models
    timestep_density: Literal["auto", "uniform", "logit_normal", "mode"] = "auto"
    gradient_checkpointing: bool = False  # recompute UNet (and VAE decoder) activations in backward: less memory, ~30% slower
    compile: bool = False  # torch.compile the trainable UNet (first steps pay the compilation)
    eval_every: int = Field(0, ge=0, le=MAX_TRAIN_STEPS)  # evaluate + checkpoint every N steps (0: only at the end)
    # checkpoints and the resolved config go here ("" under Ray Train: a private scratch folder on each worker's
    # node, removed when the worker ends; what a sweep on object storage uses, Ray uploading each checkpoint)
    output_dir: str = "runs/digits"
    # Ray Train (ignored by `acpo train --local`)
    workers: int = Field(1, gt=0, le=MAX_WORKERS)  # data-parallel workers
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: NonNegative = 1  # restarts from the last checkpoint after a worker dies
    keep_checkpoints: NonNegative = 0  # how many reported checkpoints Ray keeps (0: all; the sweep's front needs them)

    def bf16_autocast(self, device_type: str) -> bool:
        """Whether steps run under bf16 autocast on this device (`mixed_precision`, read in one place)."""
        return self.mixed_precision == "bf16" or (self.mixed_precision == "auto" and device_type == "cuda")


class EvalConfig(Section):
    samples: int = Field(500, ge=3, le=MAX_SAMPLES)  # images generated per evaluation (intervals need at least 3)
    # The screening seed bank: the noise every checkpoint and the base are sampled from during a sweep
    # (the same noise for all: common random numbers). The confirmation bank is sweep.confirm.seed.
    seed: int = 0
    resamples: int = Field(1000, ge=100, le=MAX_RESAMPLES)  # paired-bootstrap resamples behind every interval (eval/intervals.py)
    sampling_steps: list[Annotated[int, Field(gt=0, le=MAX_SAMPLING_STEPS)]] = Field(default_factory=lambda: [25], min_length=1)  # one row of figures per step count
    # None: the model's deterministic sampler (ddim; euler on a flow model, which refuses ddim: trainers/denoiser/noise_process.py)
    sampler: Literal["ddim", "dpm_solver", "euler"] | None = None
    reference: str = "digits:heldout"  # "digits:heldout", an image folder, or "hf:NAME[:SPLIT]" (data.image_column)
    feature_extractor: str = "digits-classifier"  # torch-fidelity extractor name (inception-v3-compat online)
    feature_extractor_weights: str = "assets/digits/classifier.safetensors"  # only for extractors that need local weights
    # The quality model the objective trains against, measured on samples (a pyiqa name or {arch, weights}).
    trained_quality: Any = Field(default_factory=lambda: {"arch": "cnniqa", "weights": "assets/digits/quality_cnniqa.safetensors"})
    # Held out: a quality model the objective never sees; the sweep's second objective, next to FID.
    heldout_quality: Any = Field(default_factory=lambda: {"arch": "digits_heldout_iqa", "weights": "assets/digits/heldout_iqa.safetensors"})
    prompts: list[str] = Field(default_factory=list)  # text models: prompts cycled over the samples (default: data.caption for labels 0-9)
    guidance_scale: float = Field(1.0, ge=1)  # text models: classifier-free guidance when sampling (1 = none; Stable Diffusion: 7.5)
    clip_score: str | dict = ""  # text models: a pyiqa CLIP-score metric ("clipscore", or {arch, weights}) reported as clip_score@S; "" = off
    extra_quality: dict[str, Any] = Field(default_factory=dict)  # more quality models to report, name -> pyiqa name or {arch, weights}
    cache_dir: str = ""  # reference-feature cache, shareable by a cluster ("" = $ACPO_FIDELITY_CACHE or ~/.cache/acpo/fidelity)

    def quality_specs(self) -> dict:
        """Every quality model evaluation reports, by metric name."""
        return {"trained_quality": self.trained_quality, "heldout_quality": self.heldout_quality, **self.extra_quality}


class Config(Section):
    preset: str = "digits"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    # term name -> weight or {weight, ...options}; checked by the objectives registry
    objective: dict[str, Any] = Field(default_factory=lambda: {"denoise": 1.0})
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @classmethod
    def from_dict(cls, data: dict):
        """The schema: types and ranges, project paths resolved, the rules between fields. Opens no
        file and imports no model library (`check_references` does, once, at the edge)."""
        check_nesting(data)
        check_renamed(data)
        config = validate(cls, data)
        config.resolve_paths()
        config.check_fields()
        return config

    def to_dict(self) -> dict:
        return self.model_dump()

    def check_fields(self) -> None:
        data, evaluation = self.data, self.eval
        if self.model.weights_dtype == "bf16" and self.model.finetune != "lora":
            raise ConfigError("model.weights_dtype: bf16 keeps the base weights frozen in bf16; full fine-tuning trains them (use fp32)")
        if self.model.weights_dtype == "bf16" and self.train.mixed_precision != "bf16":
            raise ConfigError("model.weights_dtype: bf16 weights need train.mixed_precision: bf16 (every step under bf16 autocast)")
        if data.caption_column and data.source == "folder":
            raise ConfigError("data.caption_column: only for data.source 'hf' (a column) or 'digits' ('caption': digits_captions)")
        if data.source == "digits" and data.caption_column not in ("", "caption"):
            raise ConfigError(f"data.caption_column: the digits have one caption column, 'caption', not {data.caption_column!r}")
        if data.source != "digits" and not data.path:
            raise ConfigError(f"data.path: required when data.source is {data.source!r}")
        if data.caption_column and not evaluation.prompts:  # the caption template alone has nothing to fill in
            raise ConfigError("eval.prompts: required when data.caption_column is set (what should evaluation prompt with?)")
        reserved = sorted(set(evaluation.extra_quality) & {"trained_quality", "heldout_quality", "fid", "kid", "diversity", "clip_score"})
        if reserved:
            raise ConfigError(f"eval.extra_quality.{reserved[0]}: the name is taken by a built-in metric")

    def check_references(self) -> None:
        """What types cannot say: every quality model is a pyiqa metric or an architecture with its
        weights file, the CLIP-score metric exists, the objective's terms and options are valid.
        Builds no model; imports eval/ and objectives/ (and pyiqa's metric list)."""
        from eval.quality import check_quality_spec, pyiqa_metric_names
        from objectives.registry import validate_objective
        from trainers.common.errors import ObjectiveError, OptionError

        evaluation = self.eval
        for name, spec in evaluation.quality_specs().items():
            option = f"eval.extra_quality.{name}" if name in evaluation.extra_quality else f"eval.{name}"
            try:
                check_quality_spec(spec, option)
            except OptionError as error:
                raise ConfigError(str(error)) from None
        if isinstance(evaluation.clip_score, dict):
            try:
                check_quality_spec(evaluation.clip_score, "eval.clip_score")
            except OptionError as error:
                raise ConfigError(str(error)) from None
        elif evaluation.clip_score and evaluation.clip_score not in pyiqa_metric_names():
            raise ConfigError(f"eval.clip_score: unknown pyiqa metric {evaluation.clip_score!r}")
        try:
            validate_objective(self.objective)
        except ObjectiveError as error:
            raise ConfigError(str(error)) from None

    def resolve_paths(self) -> None:
        self.model.base = resolve_path(self.model.base)
        if self.data.source == "folder" or (self.data.source == "hf" and self.data.path.startswith((".", "/", "~"))):
            self.data.path = resolve_path(self.data.path)
        if self.eval.reference.startswith("hf:"):
            from trainers.image_sets import parse_hf_reference

            name, split = parse_hf_reference(self.eval.reference)
            if name.startswith((".", "/", "~")):
                self.eval.reference = f"hf:{resolve_path(name)}:{split}"
        elif not self.eval.reference.startswith("digits:"):
            self.eval.reference = resolve_path(self.eval.reference)
        if self.eval.feature_extractor_weights:
            self.eval.feature_extractor_weights = resolve_path(self.eval.feature_extractor_weights)
        self.eval.trained_quality = resolve_quality_paths(self.eval.trained_quality)
        self.eval.heldout_quality = resolve_quality_paths(self.eval.heldout_quality)
        self.eval.extra_quality = {k: resolve_quality_paths(v) for k, v in self.eval.extra_quality.items()}
        self.eval.clip_score = resolve_quality_paths(self.eval.clip_score)
        from trainers.common.storage import is_remote, resolve

        if has_credentials(self.eval.cache_dir):
            raise ConfigError(f"eval.cache_dir: {credentials_message(self.eval.cache_dir)}")
        if is_remote(self.data.cache_dir):
            raise ConfigError(f"data.cache_dir: {self.data.cache_dir} is a URI; the latent cache is a local folder on each node "
                              "(object storage serves sweep.storage_dir and eval.cache_dir)")
        for section in (self.eval, self.data):
            if section.cache_dir:  # eval's may be object storage (a URI), shared by every node
                section.cache_dir = resolve(section.cache_dir)
        self.objective = _resolve_option_paths(self.objective)


# Objective options that name files: `weights` (quality models, networks), `prompts` given as a path,
# and `target_reference` unless it is `data` (the training set, not a folder of that name).
_PATH_OPTIONS = {"weights", "prompts", "target_reference"}


def _resolve_option_paths(options):
    if isinstance(options, dict):
        return {k: resolve_path(v) if k in _PATH_OPTIONS and isinstance(v, str) and v != "data" else _resolve_option_paths(v)
                for k, v in options.items()}
    return options
