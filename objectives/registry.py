"""Build an Objective from config: `{term_name: weight}` or `{term_name: {weight: w, **options}}`.

The registry is a plain dict; a new term is a new file plus one line here.
"""

from __future__ import annotations

import inspect

import torch

from objectives.context import StepContext
from objectives.denoise import Denoise

TERMS = {"denoise": Denoise}


class ObjectiveError(ValueError):
    """A bad objective config; the message names the field (`objective.denoise.weight`)."""


class Objective:
    """weights x terms. Returns the total (a scalar, mean over the batch) and each term's mean, so
    the loop logs what moved. Reduction happens here, once; terms return per-sample losses."""

    def __init__(self, terms: dict[str, tuple[float, object]]):
        self.terms = terms

    def __call__(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, parts = 0.0, {}
        for name, (weight, term) in self.terms.items():
            value = term(ctx).mean()
            parts[name] = value.detach()
            total = total + weight * value
        return total, parts


def _term_options(spec: dict, prefix: str):
    """Check names, weights and option names (cheap: builds nothing); yields (name, weight, options)."""
    if not isinstance(spec, dict) or not spec:
        raise ObjectiveError(f"{prefix}: expected a non-empty mapping of term name -> weight or options")
    for name, options in spec.items():
        if name not in TERMS:
            raise ObjectiveError(f"{prefix}.{name}: unknown term (known: {', '.join(sorted(TERMS))})")
        options = {"weight": options} if not isinstance(options, dict) else dict(options)
        weight = options.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ObjectiveError(f"{prefix}.{name}.weight: expected a number >= 0, got {weight!r}")
        accepted = set(inspect.signature(TERMS[name]).parameters)
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ObjectiveError(f"{prefix}.{name}.{unknown[0]}: unknown option (known: weight, {', '.join(sorted(accepted))})")
        yield name, float(weight), options


def validate_objective(spec: dict, prefix: str = "objective") -> None:
    """Fail on a bad objective config before anything is loaded (called when the config is)."""
    for _ in _term_options(spec, prefix):
        pass


def build_objective(spec: dict, prefix: str = "objective") -> Objective:
    terms = {}
    for name, weight, options in _term_options(spec, prefix):
        try:
            terms[name] = (weight, TERMS[name](**options))
        except (TypeError, ValueError) as error:
            raise ObjectiveError(f"{prefix}.{name}: {error}") from None
    return Objective(terms)
