"""Build an Objective from config: `{term_name: weight}` or `{term_name: {weight: w, **options}}`.

The registry is a plain dict; a new term is a new file plus one line here. See `objectives/term.py`
for what a term is.
"""

from __future__ import annotations

import inspect
import math

import torch

from objectives.adversarial import Adversarial
from objectives.anchor import Anchor
from objectives.context import X0_SETTINGS, StepContext
from objectives.decoupled_rewards import DecoupledRewards
from objectives.denoise import Denoise
from objectives.lpips_x0 import LpipsX0
from objectives.nr_iqa import NrIqa
from objectives.pefl import Pefl
from objectives.pefl_segmentation import PeflSegmentation
from objectives.self_perceptual import SelfPerceptual
from objectives.term import BuildEnv
from trainers.common.errors import ObjectiveError, OptionError

TERMS = {
    "denoise": Denoise,
    "anchor": Anchor,
    "nr_iqa": NrIqa,
    "lpips_x0": LpipsX0,
    "self_perceptual": SelfPerceptual,
    "pefl": Pefl,
    "pefl_segmentation": PeflSegmentation,
    "decoupled_rewards": DecoupledRewards,
    "adversarial": Adversarial,
}


# Renamed terms: a config with the old name fails naming the new one.
RENAMED_TERMS = {"aesthetic": "decoupled_rewards (UniFL's decoupled rewards; the sweep's held-out axis is eval.heldout_quality)"}


class Weight:
    """A term's weight over optimizer steps (1, 2, ...): piecewise constant. From config, a number;
    `{weight: w, from_step: a, until_step: b}` (w on steps a <= step < b, 0 elsewhere; UniFL's two
    stages, ReFL's phases); or `{schedule: [[0, 0.0], [200, 1.0]]}` (each entry holds from its step
    on; 0 before the first)."""

    def __init__(self, points: list[tuple[int, float]]):
        self.points = sorted(points)

    def at(self, step: int) -> float:
        value = 0.0
        for start, weight in self.points:
            if step >= start:
                value = weight
        return value

    @classmethod
    def from_options(cls, options: dict, where: str) -> "Weight":
        """Pops the weight options (`weight`, `from_step`, `until_step`, `schedule`) from a term's options."""
        schedule = options.pop("schedule", None)
        window = {key: options.pop(key) for key in ("weight", "from_step", "until_step") if key in options}
        if schedule is not None:
            if window:
                raise ObjectiveError(f"{where}.schedule: give a schedule or weight/from_step/until_step, not both")
            if (not isinstance(schedule, list) or not schedule
                    or not all(isinstance(p, list) and len(p) == 2 and _is_int(p[0], 0) and _is_number(p[1], 0) for p in schedule)):
                raise ObjectiveError(f"{where}.schedule: expected [[step, weight], ...] with steps >= 0 and weights >= 0, got {schedule!r}")
            steps = [p[0] for p in schedule]
            if steps != sorted(set(steps)):
                raise ObjectiveError(f"{where}.schedule: steps must increase, got {steps}")
            return cls([(int(step), float(weight)) for step, weight in schedule])
        weight = window.get("weight", 1.0)
        if not _is_number(weight, 0):
            raise ObjectiveError(f"{where}.weight: expected a number >= 0, got {weight!r}")
        start, end = window.get("from_step", 0), window.get("until_step")
        if not _is_int(start, 0):
            raise ObjectiveError(f"{where}.from_step: expected an integer >= 0, got {start!r}")
        if end is not None and (not _is_int(end, 1) or end <= start):
            raise ObjectiveError(f"{where}.until_step: expected an integer above from_step ({start}), got {end!r}")
        points = [(0, 0.0), (start, float(weight))] if start > 0 else [(0, float(weight))]
        return cls(points + ([(end, 0.0)] if end is not None else []))


def _is_number(value, minimum) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= minimum


def _is_int(value, minimum) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


class Objective:
    """weights x terms. `__call__(ctx, step)` returns the total (a scalar: each term's mean over the
    batch, weighted and summed, the one place where losses are reduced) and every logged part: the
    term's unweighted mean, and `term/part` for terms made of named parts. A term whose weight is 0
    at this step is not called at all (no forward, nothing logged)."""

    def __init__(self, terms: dict[str, tuple[Weight, object]]):
        self.terms = terms

    def active(self, step: int):
        """(name, weight, term) of every term whose weight at `step` is above 0, in the config's order
        except that terms with `after_feedback` come last."""
        weights = {name: weight.at(step) for name, (weight, _) in self.terms.items()}
        active = [(name, weights[name], term) for name, (_, term) in self.terms.items() if weights[name] > 0]
        # a term that reads the feedback terms' forwards (the anchor's `at: feedback`) runs after them
        return sorted(active, key=lambda item: item[2].after_feedback)

    def __call__(self, ctx: StepContext, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, parts = 0.0, {}
        for name, weight, term in self.active(step):
            value = term(ctx)
            if isinstance(value, dict):
                for part, per_sample in value.items():
                    parts[f"{name}/{part}"] = per_sample.mean().detach()
                value = sum(value.values())
            value = value.mean()
            parts[name] = value.detach()
            total = total + weight * value
        if not parts:
            raise ObjectiveError(f"objective: every term has weight 0 at step {step}: nothing to train")
        return total, parts

    @property
    def needs_masks(self) -> bool:
        """Some term scores against the data set's label images: the trainer loads them with the batches."""
        return any(term.needs_masks for _, term in self._terms())

    @property
    def needs_base(self) -> bool:
        """Some term reads the frozen base: the trainer builds (or, with LoRA, exposes) it only then."""
        return any(term.needs_base for _, term in self.terms.values())

    def _terms(self):
        return [(name, term) for name, (_, term) in self.terms.items()]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters of terms' own modules that the model's optimizer trains (the Cas-DM head)."""
        return [p for _, term in self._terms() for p in term.trainable_parameters()]

    def own_losses(self, ctx: StepContext, step: int = 0) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Every micro-batch, after the model's backward: the losses of terms' own modules that have
        optimizers of their own (the discriminator), reduced here as the model's loss is (each
        term's mean, summed; unweighted: the term's weight scales the model's loss, not its own
        module's). None when no active term has one. The loop backpropagates it."""
        total, parts = None, {}
        for name, _, term in self.active(step):
            for part, per_sample in term.own_loss(ctx).items():
                value = per_sample.mean()
                parts[f"{name}/{part}"] = value.detach()
                total = value if total is None else total + value
        return total, parts

    def own_step(self, sync=None, step: int = 0) -> None:
        """After the model's optimizer step: active terms step their own optimizers on the gradients
        `own_losses` accumulated over the step's micro-batches. `sync(parameters)` averages those
        gradients across workers (None: one worker)."""
        for _, _, term in self.active(step):
            term.own_step(sync)

    def wrap_for_sampling(self, denoiser, scheduler_config):
        """The denoiser sampling uses: the model with every module a term adds to it."""
        for _, term in self._terms():
            denoiser = term.wrap_for_sampling(denoiser, scheduler_config)
        return denoiser

    def wrap_for_rollouts(self, denoiser, scheduler_config):
        """The denoiser the terms' training-time rollouts call (`StepContext.rollout_model`)."""
        for _, term in self._terms():
            denoiser = term.wrap_for_rollouts(denoiser, scheduler_config)
        return denoiser

    def state_dict(self) -> dict:
        return {name: state for name, term in self._terms() if (state := term.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        for name, term in self._terms():
            if name in state:
                term.load_state_dict(state[name])


WEIGHT_OPTIONS = ("weight", "from_step", "until_step", "schedule")


def term_options(name: str) -> set[str]:
    """The options a term accepts: its weight's (`WEIGHT_OPTIONS`) and its constructor's keyword arguments."""
    return set(WEIGHT_OPTIONS) | set(inspect.signature(TERMS[name]).parameters)


def _term_options(spec: dict, prefix: str):
    """Check names, weights and option names; yields (name, Weight, the term's own options)."""
    if not isinstance(spec, dict) or not spec:
        raise ObjectiveError(f"{prefix}: expected a non-empty mapping of term name -> weight or options")
    for name, options in spec.items():
        if name in RENAMED_TERMS:
            raise ObjectiveError(f"{prefix}.{name}: renamed to {prefix}.{RENAMED_TERMS[name]}")
        if name not in TERMS:
            raise ObjectiveError(f"{prefix}.{name}: unknown term (known: {', '.join(sorted(TERMS))})")
        options = {"weight": options} if not isinstance(options, dict) else dict(options)
        accepted = term_options(name)
        unknown = sorted(set(options) - accepted)
        moved = [key for key in unknown if key in X0_SETTINGS and "x0" in accepted]
        if moved:  # how a rollout or a one-step x0 is made was a term's own options, and is now its `x0`'s
            source = options["x0"] if isinstance(options.get("x0"), str) else "..."
            raise ObjectiveError(f"{prefix}.{name}.{moved[0]}: moved into {prefix}.{name}.x0 (x0: {{source: {source}, {moved[0]}: ...}})")
        if unknown:
            raise ObjectiveError(f"{prefix}.{name}.{unknown[0]}: unknown option (known: {', '.join(sorted(accepted))})")
        yield name, Weight.from_options(options, f"{prefix}.{name}"), options


def _construct(name: str, options: dict, prefix: str, env: BuildEnv | None):
    """The term, validated (and set up when `env` is given); every failure names its field."""
    try:
        term = TERMS[name](**options)
        if env is not None:
            term.setup(env)
        return term
    except OptionError as error:
        raise ObjectiveError(f"{prefix}.{name}.{error.option}: {error.message}") from None
    except (TypeError, ValueError, FileNotFoundError) as error:
        raise ObjectiveError(f"{prefix}.{name}: {error}") from None


def validate_objective(spec: dict, prefix: str = "objective") -> None:
    """Fail on a bad objective config before anything is loaded (called when the config is):
    constructing a term checks its options, files and metric names but loads no model."""
    for name, _, options in _term_options(spec, prefix):
        _construct(name, options, prefix, env=None)


def build_objective(spec: dict, env: BuildEnv | None = None, prefix: str = "objective") -> Objective:
    """Construct every term and build its helpers on `env.device` (default: CPU, pixel digits)."""
    env = env or BuildEnv()
    return Objective({name: (weight, _construct(name, options, prefix, env)) for name, weight, options in _term_options(spec, prefix)})
