"""The step's shared context: what every term may read, each expensive piece computed at most once.

Terms read attributes and call methods; the expensive results (the trainable model's prediction, the
frozen base's prediction, one-step x0 estimates, a sampled x0, VAE decodes) are cached on the
context, so the first term that needs one pays for it and the rest reuse it. A context lives for one
optimizer step.

Spaces: `x0`, `noise`, `x_t` and every `*x0*` result are in the model's space (pixels in [-1, 1], or
latents for latent models). `image(x)` maps model space to pixels in [-1, 1], decoding through the
VAE inside the graph when there is one; quality models then take `(image + 1) / 2`.

The model's kind (DDPM family or flow) is known only to its noise process (`process`:
trainers/denoiser/noise_process.py), which owns the conversions between a network output, x0, eps and the
training target, the forward process and the samplers' steps; terms ask the context, or its process,
and none branches on the kind. `t` is an integer timestep for the DDPM family and sigma * T (a float
from the flow schedule, or an integer drawn in a `t_range`) for a flow model: larger is noisier either
way, and a term's `t_range` means the same on both.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cached_property

import torch

from eval.sampling import decode_latents
from objectives.term import check_t_range, check_t_range_fits
from trainers.common.errors import OptionError
from trainers.denoiser.noise_process import SAMPLERS, NoiseProcess


@dataclass(eq=False)
class StepContext:
    """x0, noise: `[N, C, H, W]` in model space; t: `[N]` timesteps (integers for the DDPM family, sigma * T for a flow model)."""

    model: torch.nn.Module  # the trainable denoiser; called as model(x_t, t, **conditioning).sample
    process: NoiseProcess  # the model's noise process: its forward process, parameterisation and samplers
    x0: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor
    conditioning: dict = field(default_factory=dict)  # e.g. encoder_hidden_states for text models
    prompts: list[str] | None = None  # text models: the batch's captions (what prompt-conditioned rewards score against)
    base: torch.nn.Module | None = None  # the frozen base denoiser, same call signature (LoRA: the model with adapters disabled)
    vae: torch.nn.Module | None = None  # latent models: AutoencoderKL; None for pixel models
    encode_prompt: object = None  # latent text models: prompts -> conditioning dict (for prompt selection)
    generator: torch.Generator | None = None  # draws inside terms (t', sampler noise): reproducible per step
    rollout_model: torch.nn.Module | None = None  # what rollouts and samples call (Cas-DM: the cascade); None: `model`
    masks: torch.Tensor | None = None  # `[N, H, W]` class indices of the real images, from the data set (`masks: data`)
    _cache: dict = field(default_factory=dict, repr=False)
    # every forward of the trainable model that a feedback term differentiates through, in order
    # (the anchor's `at: feedback`); the step's own denoise forward is not one
    feedback_points: list["FeedbackPoint"] = field(default_factory=list, repr=False)

    # -- the step's own forward passes ------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return self.process.num_train_timesteps

    @property
    def sampler_model(self) -> torch.nn.Module:
        """The denoiser a multi-step rollout or sample calls: the one sampling uses (`rollout_model`)."""
        return self.rollout_model if self.rollout_model is not None else self.model

    @cached_property
    def x_t(self) -> torch.Tensor:
        return self.process.add_noise(self.x0, self.noise, self.t)

    @cached_property
    def target(self) -> torch.Tensor:
        """What the denoise loss regresses the prediction onto (`NoiseProcess.target`)."""
        return self.process.target(self.x0, self.noise, self.t)

    @cached_property
    def prediction(self) -> torch.Tensor:
        """The trainable model's output at (x_t, t): one forward pass shared by every term."""
        return self.model(self.x_t, self.t, **self.conditioning).sample

    @cached_property
    def base_prediction(self) -> torch.Tensor:
        """The frozen base model's output at the same (x_t, t, conditioning); no graph (it is a target)."""
        if self.base is None:
            raise ValueError("this objective needs the frozen base model, but the context has none")
        with torch.no_grad():
            return self.base(self.x_t, self.t, **self.conditioning).sample

    @cached_property
    def x0_estimate(self) -> torch.Tensor:
        """One-step (Tweedie) x0 from the shared prediction at the step's own t; carries gradients."""
        return self.process.x0(self.prediction, self.x_t, self.t)

    # -- shared generated x0, keyed by how it was made --------------------------------------------
    def draw(self, *shape, low=0, high=None, integers=False) -> torch.Tensor:
        """Random numbers from the step's generator (CPU, then moved): the same step draws the same."""
        if integers:
            return torch.randint(low, high, shape, generator=self.generator).to(self.x0.device)
        return torch.randn(shape, generator=self.generator).to(self.x0.device, self.x0.dtype)

    def one_step(self, t_range: tuple[int, int] | None = None) -> torch.Tensor:
        """One-step x0 with gradients, at t drawn uniformly from `t_range` = [lo, hi) with the step's
        x0 and noise: one extra forward, shared by every term asking for the same range (ACPO scores
        clean estimates only at low t, where Tweedie is sharp). No range means the guard
        `default_t_range()`, [0, T/2). A range covering every timestep ([0, T]) is the step's own t
        and shares the denoise forward."""
        t_range = t_range or self.default_t_range()
        if t_range[0] <= 0 and t_range[1] >= self.num_train_timesteps:
            return self.x0_estimate
        key = ("one_step", tuple(t_range))
        if key not in self._cache:
            t = self.draw(len(self.x0), low=t_range[0], high=t_range[1], integers=True)
            x_t = self.process.add_noise(self.x0, self.noise, t)
            prediction = self.model(x_t, t, **self.conditioning).sample
            self._record(x_t, t, prediction, self.conditioning)
            self._cache[key] = self.process.x0(prediction, x_t, t)
        return self._cache[key]

    def default_t_range(self) -> tuple[int, int]:
        """Where a one-step x0 is taken when a term names no range: [0, T/2). Above it an epsilon
        model's x0 = (x_t - sqrt(1-a) eps) / sqrt(a) multiplies the noise error by sqrt((1-a)/a):
        about 650x at t near T on the digits cosine schedule, 1x at T/2."""
        return (0, self.num_train_timesteps // 2)

    def sampled(self, steps: int, feedback_steps: int, sampler: str | None = None, prompts: tuple[str, ...] | None = None) -> torch.Tensor:
        """x0 sampled from pure noise in `steps` sampler steps, gradients kept only through the last
        `feedback_steps` of them (truncated backprop: ReFL, DRaFT-K). The earlier steps run without
        a graph, so memory is that of `feedback_steps` forwards. `prompts` (text models) replaces the
        batch's conditioning with the encoded prompts, one image per prompt."""
        key = ("sampled", steps, feedback_steps, sampler, prompts)
        if key not in self._cache:
            conditioning = self.conditioning if prompts is None else self.encode_prompt(list(prompts))
            n = len(self.x0) if prompts is None else len(prompts)
            scheduler = self.process.sampler(sampler, latent_size=self.x0.shape[-1])
            scheduler.set_timesteps(steps)
            x = self.draw(n, *self.x0.shape[1:]) * scheduler.init_noise_sigma
            for i, t in enumerate(scheduler.timesteps):
                with torch.set_grad_enabled(i >= steps - feedback_steps):
                    model_input = scheduler.scale_model_input(x, t)
                    output = self.sampler_model(model_input, t.to(x.device).expand(n), **conditioning).sample
                    self._record(model_input, t.to(x.device).expand(n), output, conditioning)
                    x = self.process.step(scheduler, output, t, x)  # fp32 path under autocast
            self._cache[key] = x
        return self._cache[key]

    def rollout(self, steps: int, stop_low: int, stop_high: int, start: int | None, feedback_steps: int = 1,
                sampler: str | None = None, prompts: tuple[str, ...] | None = None) -> torch.Tensor:
        """x0 from a partial rollout of a `steps`-step sampler schedule, as ReFL and UniFL make it:
        from pure noise (`start` None: ImageReward's ReFL) or from the batch's real x0 noised to step
        `start` of the schedule (UniFL's PeFL and adversarial feedback), denoised without a graph to a
        stop step drawn uniformly from [stop_low, stop_high] (indices into the schedule), where the
        last `feedback_steps` forwards (the stop step's included) keep gradients. Returns the x0 the
        model predicts at the stop step (Tweedie from its output there). `prompts` (text models, from
        noise only) conditions every forward on the encoded prompts instead of the batch's captions,
        one image per prompt (ReFL, and UniFL's decoupled feedback)."""
        key = ("rollout", steps, stop_low, stop_high, start, feedback_steps, sampler, prompts)
        if key not in self._cache:
            if prompts is not None and start is not None:
                raise ValueError("a rollout from the real image keeps the batch's captions: prompts need a rollout from noise")
            conditioning = self.conditioning if prompts is None else self.encode_prompt(list(prompts))
            scheduler = self.process.sampler(sampler, latent_size=self.x0.shape[-1])
            scheduler.set_timesteps(steps)
            timesteps = scheduler.timesteps.to(self.x0.device)
            stop = int(self.draw(1, low=stop_low, high=stop_high + 1, integers=True))
            n, first = (len(self.x0) if prompts is None else len(prompts)), start or 0
            if start is None:
                x = self.draw(n, *self.x0.shape[1:]) * scheduler.init_noise_sigma
            else:  # the forward process to the schedule's step `start`: what the sampler would hold there
                x = self.process.add_noise(self.x0, self.draw(n, *self.x0.shape[1:]), timesteps[start].expand(n))
            for i in range(first, stop + 1):
                t = timesteps[i]
                with torch.set_grad_enabled(i > stop - feedback_steps):
                    model_input = scheduler.scale_model_input(x, t)
                    output = self.sampler_model(model_input, t.expand(n), **conditioning).sample
                    self._record(model_input, t.expand(n), output, conditioning)
                    if i < stop:
                        x = self.process.step(scheduler, output, t, x)  # fp32 path under autocast
            self._cache[key] = self.process.x0(output, x, t.expand(n))
        return self._cache[key]

    def _record(self, x_t, t, output, conditioning) -> None:
        if torch.is_grad_enabled() and output.requires_grad:
            self.feedback_points.append(FeedbackPoint(x_t.detach(), t, output, conditioning))

    def generated(self, source: "X0Source", prompts: tuple[str, ...] | None = None) -> torch.Tensor:
        """The x0 a feedback term scores, made the way its `X0Source` says (shared by equal sources);
        `prompts` replaces the batch's captions for a rollout from noise or a sample."""
        if source.kind == "one_step":
            if prompts is not None:
                raise ValueError("a one-step x0 is the batch's own: it cannot take other prompts")
            return self.one_step(source.t_range)
        if source.kind == "rollout":
            return self.rollout(source.sampling_steps, source.stop_low, source.stop_high, source.start, source.feedback_steps,
                                source.sampler, prompts)
        return self.sampled(source.sampling_steps, source.feedback_steps, source.sampler, prompts)

    def image(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] for a model-space tensor; latent models decode through the VAE with
        gradients, once per tensor per step."""
        if self.vae is None:
            return x
        key = ("image", id(x))
        if key not in self._cache:
            self._cache[key] = (x, decode_latents(self.vae, x))  # keep x alive so its id stays unique
        return self._cache[key][1]

    def base_features(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The frozen base model's mid-block activations at (x_t, t); differentiable w.r.t. x_t. A flow
        transformer's are its middle block's image tokens."""
        if self.base is None:
            raise ValueError("this objective needs the frozen base model, but the context has none")
        network = getattr(self.base, "module", self.base)  # AdaptersDisabled wraps the model
        captured = {}

        def hook(_module, _inputs, out):  # returns None: the block's output goes on unchanged
            # a transformer's middle block (FlowTransformer.mid_block) returns (text stream, image stream): the image's
            captured.setdefault("features", out[-1] if isinstance(out, tuple) else out)

        handle = network.mid_block.register_forward_hook(hook)
        try:
            self.base(x_t, t, **self.conditioning)
        finally:
            handle.remove()
        return captured["features"]


@dataclass(frozen=True)
class FeedbackPoint:
    """One forward of the trainable model with gradients, taken by a feedback term: its input, its
    timesteps `[n]`, its output (with the graph) and the conditioning it was given."""

    x_t: torch.Tensor
    t: torch.Tensor
    output: torch.Tensor
    conditioning: dict


@dataclass(frozen=True)
class X0Source:
    """How a feedback term gets its clean image (a term's `x0` option: a source name, or a mapping of
    `source` and its settings):
    - `one_step`: Tweedie at t drawn in `t_range` (default [0, T/2): `StepContext.default_t_range`);
    - `sampled`: `sampling_steps` sampler steps from noise, gradients through the last `feedback_steps`
      (DRaFT-K; AlignProp);
    - `rollout`: a partial rollout of a `sampling_steps` schedule stopped at a random step in
      [`stop_low`, `stop_high`] (default: the last quarter of the schedule, ReFL's 30..39 of 40), from
      noise (ReFL) or from the real image noised to step `start` (UniFL), gradients through the last
      `feedback_steps` forwards.
    `sampler` (sampled, rollout): the model's deterministic one by default (ddim, or euler on a flow model)."""

    kind: str = "one_step"
    t_range: tuple[int, int] | None = None
    sampling_steps: int = 20
    feedback_steps: int = 1
    sampler: str | None = None  # None: the model's deterministic sampler (ddim, or euler on a flow model)
    stop_low: int | None = None
    stop_high: int | None = None
    start: int | None = None

    @classmethod
    def from_options(cls, x0="one_step", rollout_defaults: dict | None = None, default_source: str = "one_step") -> "X0Source":
        """Validated construction from a term's `x0` option; errors are `OptionError`s naming the option
        (`x0.sampling_steps`). `rollout_defaults`: a term's own settings for a rollout (UniFL's), under
        what the option sets; `default_source`: the term's source when the mapping names none."""
        if isinstance(x0, str):
            x0 = {"source": x0}
        if not isinstance(x0, dict):
            raise OptionError("x0", f"expected a source ({', '.join(X0_SOURCES)}) or a mapping with `source`, got {x0!r}")
        unknown = sorted(set(x0) - {"source", *X0_SETTINGS})
        if unknown:
            raise OptionError(f"x0.{unknown[0]}", f"unknown option (known: source, {', '.join(X0_SETTINGS)})")
        source = x0.get("source", default_source)
        if source not in X0_SOURCES:
            raise OptionError("x0.source", f"expected one of {', '.join(X0_SOURCES)}, got {source!r}")
        settings = {**(rollout_defaults or {}), **x0} if source == "rollout" else dict(x0)
        settings.pop("source", None)
        try:
            return cls._validated(source, **settings)
        except OptionError as error:
            raise OptionError(f"x0.{error.option}", error.message) from None

    @classmethod
    def _validated(cls, source, t_range=None, sampling_steps=20, feedback_steps=1, sampler=None, stop_low=None, stop_high=None,
                   start=None) -> "X0Source":
        t_range = check_t_range(t_range)
        if t_range is not None and source != "one_step":
            raise OptionError("t_range", "only applies to source: one_step")
        for name, value in (("sampling_steps", sampling_steps), ("feedback_steps", feedback_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(name, f"expected an integer >= 1, got {value!r}")
        if feedback_steps > sampling_steps:
            raise OptionError("feedback_steps", f"{feedback_steps} is more than sampling_steps ({sampling_steps})")
        if sampler is not None and sampler not in SAMPLERS:  # which of them fits the model: `check`, once it is known
            raise OptionError("sampler", f"expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if source != "rollout":
            for name, value in (("stop_low", stop_low), ("stop_high", stop_high), ("start", start)):
                if value is not None:
                    raise OptionError(name, "only applies to source: rollout")
            return cls(source, t_range, sampling_steps, feedback_steps, sampler)
        stop_low = (3 * sampling_steps) // 4 if stop_low is None else stop_low
        stop_high = sampling_steps - 1 if stop_high is None else stop_high
        for name, value in (("stop_low", stop_low), ("stop_high", stop_high), ("start", start if start is not None else 0)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < sampling_steps:
                raise OptionError(name, f"expected a step index 0..{sampling_steps - 1} of the {sampling_steps}-step schedule, got {value!r}")
        if stop_low > stop_high:
            raise OptionError("stop_low", f"{stop_low} is above stop_high ({stop_high})")
        if start is not None and start > stop_low:
            raise OptionError("start", f"{start} is after stop_low ({stop_low}): the rollout must start before it stops")
        if feedback_steps > stop_low - (start or 0) + 1:
            raise OptionError("feedback_steps", f"{feedback_steps} is more than the {stop_low - (start or 0) + 1} steps of the shortest rollout")
        return cls(source, None, sampling_steps, feedback_steps, sampler, stop_low, stop_high, start)

    def check(self, process: NoiseProcess) -> None:
        """What only the model can tell: the t range fits its timesteps, the sampler samples it."""
        check_t_range_fits(self.t_range, process.num_train_timesteps, "x0.t_range")
        problem = process.sampler_problem(self.sampler, rollout=True) if self.sampler is not None else None
        if problem:
            raise OptionError("x0.sampler", problem)


X0_SOURCES = ("one_step", "sampled", "rollout")
X0_SETTINGS = tuple(f.name for f in fields(X0Source) if f.name != "kind")
