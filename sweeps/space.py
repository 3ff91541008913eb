"""The sweep's search space: the `space:` of the preset's `sweep:` section (settings: sweeps/presets.py).

    sweep:
      num_samples: 8                 # trials
      algorithm: tpe                 # Optuna sampler: tpe or nsga2
      fid_tolerance: 0.1             # champion: FID at most 10% above the base model's
      space:                         # any dotted config key -> a distribution
        objective.anchor.weight: {loguniform: [1.0, 100.0]}
        objective.nr_iqa.weight: {loguniform: [0.01, 1.0]}
        train.steps: {randint: [100, 300], step: 50}
        train.learning_rate: {loguniform: [5.0e-5, 3.0e-4]}
        model.finetune: {choice: [full, lora]}

A dimension must name a key the run config has (a term option counts when the term accepts it),
and a range must be possible; both are checked before Ray starts.
"""

from __future__ import annotations

import math
import sys

from sweeps.dotted import DISTRIBUTIONS, set_values
from trainers.common.errors import ConfigError
from trainers.config import Config


def _distribution(key: str, spec):
    """(kind, args, step) of one dimension, with its range checked."""
    where = f"sweep.space.{key}"
    if not isinstance(spec, dict) or len(set(spec) & set(DISTRIBUTIONS)) != 1 or set(spec) - set(DISTRIBUTIONS) - {"step"}:
        raise ConfigError(f"{where}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}} (plus `step` for randint), got {spec!r}")
    kind = next(k for k in DISTRIBUTIONS if k in spec)
    args = spec[kind]
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}.choice: expected a non-empty list")
        return kind, args, None
    if not isinstance(args, list) or len(args) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args):
        raise ConfigError(f"{where}.{kind}: expected [low, high], got {args!r}")
    low, high = args
    if not all(math.isfinite(v) for v in args):
        raise ConfigError(f"{where}.{kind}: bounds must be finite numbers, got {args!r}")
    if not low < high:
        raise ConfigError(f"{where}.{kind}: low ({low}) must be below high ({high})")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}.loguniform: low must be > 0 for a log scale, got {low}")
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"{where}.randint: expected integers, got {args!r}")
    step = spec.get("step")
    if step is not None and (kind != "randint" or not isinstance(step, int) or step < 1 or (high - low) % step):
        raise ConfigError(f"{where}.step: expected a positive integer dividing high - low (randint only), got {step!r}")
    return kind, args, step


def check_space(sweep, config: Config) -> None:
    """Every dimension names a key of the run config (or an option its objective term accepts), and
    every value of its range makes a valid config: the extremes are tried through Config.from_dict."""
    from objectives.registry import term_options

    config_dict = config.to_dict()
    for key, spec in sweep.space.items():
        kind, args, _ = _distribution(key, spec)
        parts = key.split(".")
        if parts[0] == "objective" and len(parts) == 3:
            term, option = parts[1], parts[2]
            if term not in config_dict["objective"]:
                raise ConfigError(f"sweep.space.{key}: the objective has no term {term!r} (terms: {', '.join(config_dict['objective'])})")
            accepted = term_options(term)
            if option not in accepted:
                raise ConfigError(f"sweep.space.{key}: {term} has no option {option!r} (options: {', '.join(sorted(accepted))})")
        else:
            node = config_dict
            for i, part in enumerate(parts):
                if not isinstance(node, dict) or part not in node:
                    raise ConfigError(f"sweep.space.{key}: no such config key ({'.'.join(parts[: i + 1])} does not exist)")
                node = node[part]
        for value in args:  # a choice's every value, a range's two ends
            try:
                Config.from_dict(set_values(config_dict, {key: value})).check_references()
            except ConfigError as error:
                raise ConfigError(f"sweep.space.{key}: {value!r} is not a valid value ({error})") from None


def pin_searched(sweep, overrides: list[str]):
    """A `--set KEY=VALUE` on a key the space searches pins that dimension: the key leaves the space
    (the value set stays in the run config), and the sweep says so. Pinning every dimension is an error."""
    keys = {item.partition("=")[0].strip() for item in overrides}
    pinned = sorted(keys & set(sweep.space))
    if not pinned:
        return sweep
    space = {key: spec for key, spec in sweep.space.items() if key not in pinned}
    if not space:
        raise ConfigError(f"--set {pinned[0]}: pins the only dimension(s) sweep.space searches ({', '.join(pinned)}); "
                          "nothing is left to search (run `acpo train` for one run)")
    for key in pinned:
        print(f"[sweep] --set {key} pins a searched dimension: {key} is fixed, not searched ({len(space)} dimension(s) left)", file=sys.stderr, flush=True)
    return sweep.model_copy(update={"space": space})


def dimensions(sweep) -> list[tuple[str, str, list, int | None]]:
    """(key, kind, args, step) of every dimension, in the space's order (sweeps/search.py asks Optuna for them)."""
    return [(key, *_distribution(key, spec)) for key, spec in sweep.space.items()]
