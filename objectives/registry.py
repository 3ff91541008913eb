"""Build an Objective from config: `{term_name: weight}` or `{term_name: {weight: w, **options}}`.

The registry is a plain dict; a new term is a new file plus one line here. See `objectives/term.py`
for what a term is.
"""

from __future__ import annotations

import inspect

import torch

from eval.quality import SpecError
from objectives.adversarial import Adversarial
from objectives.anchor import Anchor
from objectives.context import StepContext
from objectives.decoupled_rewards import DecoupledRewards
from objectives.denoise import Denoise
from objectives.lpips_x0 import LpipsX0
from objectives.nr_iqa import NrIqa
from objectives.pefl import Pefl
from objectives.self_perceptual import SelfPerceptual
from objectives.term import BuildEnv, ObjectiveError, OptionError

TERMS = {
    "denoise": Denoise,
    "anchor": Anchor,
    "nr_iqa": NrIqa,
    "lpips_x0": LpipsX0,
    "self_perceptual": SelfPerceptual,
    "pefl": Pefl,
    "decoupled_rewards": DecoupledRewards,
    "adversarial": Adversarial,
}


# Renamed terms: a config with the old name fails naming the new one.
RENAMED_TERMS = {"aesthetic": "decoupled_rewards (UniFL's decoupled rewards; the sweep's held-out axis is eval.heldout_quality)"}


class Objective:
    """weights x terms. `__call__` returns the total (a scalar: each term's mean over the batch,
    weighted and summed, the one place where losses are reduced) and every logged part: the term's
    unweighted mean, and `term/part` for terms made of named parts."""

    def __init__(self, terms: dict[str, tuple[float, object]]):
        self.terms = terms

    def __call__(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, parts = 0.0, {}
        for name, (weight, term) in self.terms.items():
            value = term(ctx)
            if isinstance(value, dict):
                for part, per_sample in value.items():
                    parts[f"{name}/{part}"] = per_sample.mean().detach()
                value = sum(value.values())
            value = value.mean()
            parts[name] = value.detach()
            total = total + weight * value
        return total, parts

    @property
    def needs_base(self) -> bool:
        """Some term reads the frozen base: the trainer builds (or, with LoRA, exposes) it only then."""
        return any(term.needs_base for _, term in self.terms.values())

    def _terms(self):
        return [(name, term) for name, (_, term) in self.terms.items()]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters of terms' own modules that the model's optimizer trains (the Cas-DM head)."""
        return [p for _, term in self._terms() for p in term.trainable_parameters()]

    def update(self, ctx: StepContext, sync=None) -> dict[str, torch.Tensor]:
        """After the model's optimizer step: terms with optimizers of their own take theirs.
        `sync(parameters)` averages their gradients across workers (None: one worker)."""
        logged = {}
        for name, term in self._terms():
            logged.update({f"{name}/{k}": v for k, v in term.update(ctx, sync).items()})
        return logged

    def state_dict(self) -> dict:
        return {name: state for name, term in self._terms() if (state := term.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        for name, term in self._terms():
            if name in state:
                term.load_state_dict(state[name])


def term_options(name: str) -> set[str]:
    """The options a term accepts besides `weight`: its constructor's keyword arguments."""
    return set(inspect.signature(TERMS[name]).parameters)


def _term_options(spec: dict, prefix: str):
    """Check names, weights and option names; yields (name, weight, options)."""
    if not isinstance(spec, dict) or not spec:
        raise ObjectiveError(f"{prefix}: expected a non-empty mapping of term name -> weight or options")
    for name, options in spec.items():
        if name in RENAMED_TERMS:
            raise ObjectiveError(f"{prefix}.{name}: renamed to {prefix}.{RENAMED_TERMS[name]}")
        if name not in TERMS:
            raise ObjectiveError(f"{prefix}.{name}: unknown term (known: {', '.join(sorted(TERMS))})")
        options = {"weight": options} if not isinstance(options, dict) else dict(options)
        weight = options.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ObjectiveError(f"{prefix}.{name}.weight: expected a number >= 0, got {weight!r}")
        accepted = term_options(name)
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ObjectiveError(f"{prefix}.{name}.{unknown[0]}: unknown option (known: weight, {', '.join(sorted(accepted))})")
        yield name, float(weight), options


def _construct(name: str, options: dict, prefix: str, env: BuildEnv | None):
    """The term, validated (and set up when `env` is given); every failure names its field."""
    try:
        term = TERMS[name](**options)
        if env is not None:
            term.setup(env)
        return term
    except (OptionError, SpecError) as error:
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
