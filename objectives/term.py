"""The Term interface, written down once.

A term is a small class, one per file, subclassing `Term`:

- `__init__(**options)`: hyperparameters only, validated at once (cheap: loads nothing), raising
  `OptionError(option, message)`; the registry turns that into `objective.<term>.<option>: message`.
- `setup(env)`: builds the frozen helpers it needs (quality model, feature network) once, on
  `env.device`, and any trainable state. Called when the objective is built, so a bad file or
  metric fails then, not at step 1,000.
- `__call__(ctx) -> [N]` per-sample loss (lower is better), or a dict of named `[N]` parts that the
  objective sums and logs separately. No reduction, no optimizer logic.

What a term needs and owns is declared on the term itself (the defaults below: nothing):
- `needs_base`: it reads the frozen base model (`ctx.base_prediction`, `ctx.base_features`); the
  trainer then hands one over (with LoRA, the model with adapters disabled);
- `trainable_parameters()`: parameters the trainer's optimizer updates with the model (Cas-DM head);
- `own_loss(ctx) -> {part: [N]}`: the loss of a module the term trains with an optimizer of its own
  (the discriminator), on every micro-batch; the loop backpropagates it with the model's, and
  `own_step(sync)` then steps that optimizer once per optimizer step, calling `sync(parameters)`
  before it so workers stay identical;
- `state_dict()` / `load_state_dict(state)`: what a checkpoint must hold to resume the term exactly;
- `wrap_for_sampling(denoiser, scheduler_config)`: the denoiser that samples, when the term adds a module
  to the model (Cas-DM): a term must never train something the samples do not see;
- `wrap_for_rollouts(denoiser, scheduler_config)`: the same denoiser as the other terms' training-time
  rollouts call it (Cas-DM: the cascade, its head not trained by them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trainers.common.errors import OptionError
from trainers.denoiser.noise_process import NoiseProcess


class Term:
    name = ""
    needs_base = False
    after_feedback = False  # reads what the step's feedback terms computed (ctx.feedback_points): called after them
    needs_masks = False  # reads the data set's label images (ctx.masks): the trainer loads them

    def setup(self, env: "BuildEnv") -> None:
        pass

    def trainable_parameters(self) -> list:
        return []

    def own_loss(self, ctx) -> dict:
        return {}

    def own_step(self, sync=None) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def wrap_for_sampling(self, denoiser, scheduler_config):
        """A term that adds a module to the model (Cas-DM's cascaded x0 head) adds it to sampling
        here: the denoiser that sampling, evaluation, checkpoints and the export use."""
        return denoiser

    def wrap_for_rollouts(self, denoiser, scheduler_config):
        """The denoiser other terms' rollouts and samples call during training: the sampling one,
        with whatever the term alone trains kept out of their gradients."""
        return denoiser


@dataclass
class BuildEnv:
    """What a term may need to know when it builds its helpers."""

    device: str = "cpu"
    model_channels: int = 1  # channels of x0 in model space (latent channels for latent models)
    image_channels: int = 1  # channels of decoded images
    # the model's noise process (trainers/denoiser/noise_process.py): its kind, timesteps, prediction and samplers
    process: NoiseProcess = field(default_factory=lambda: NoiseProcess({"num_train_timesteps": 1000, "prediction_type": "epsilon"}))
    text_conditioned: bool = False  # the model takes encoder_hidden_states (prompts can be chosen)
    reference: object = None  # () -> (training images [N, C, H, W] in [0, 1], their captions or None): `target: auto`
    resolution: int = 16  # image resolution in pixels (a folder of preferred samples is read at it)
    cache_dir: str | None = None  # computed reward targets are cached here (None: the fidelity cache's folder)

    @property
    def num_train_timesteps(self) -> int:
        return self.process.num_train_timesteps


def require_number(option: str, value, minimum: float = 0.0, allow_none: bool = False):
    """A number >= minimum (not a bool); `None` passes through when allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise OptionError(option, f"expected a finite number >= {minimum:g}, got {value!r}")
    return float(value)


def check_t_range(value, option: str = "t_range"):
    """`[lo, hi]` integer timesteps, 0 <= lo < hi (the upper bound is checked against the model at build)."""
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) or not 0 <= value[0] < value[1]):
        raise OptionError(option, f"expected [lo, hi] integers with 0 <= lo < hi, got {value!r}")
    return (int(value[0]), int(value[1]))


def check_t_range_fits(value, num_train_timesteps: int, option: str = "t_range") -> None:
    if value is not None and value[1] > num_train_timesteps:
        raise OptionError(option, f"upper end {value[1]} exceeds the model's {num_train_timesteps} timesteps")
