"""The sweep's own settings and search space, read from the preset's `sweep:` section.

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

import copy
import inspect
from dataclasses import dataclass, field

from trainers.config import Config, ConfigError

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")


@dataclass
class SweepConfig:
    name: str = "digits-acpo"  # the experiment: folder under storage_dir and MLflow experiment
    model_name: str = ""  # the MLflow registered model the champion joins ("" = name)
    num_samples: int = 8
    algorithm: str = "tpe"  # "tpe" (default) or "nsga2"
    max_concurrent: int = 0  # 0: as many trials as the cluster's resources fit
    fid_tolerance: float = 0.1  # champion rule: FID <= base FID * (1 + tolerance)
    storage_dir: str = "runs/sweeps"  # experiment, Optuna storage, trials' checkpoints (shared storage on a cluster)
    tracking_uri: str = ""  # MLflow; "" = $MLFLOW_TRACKING_URI
    seed: int = 0
    space: dict = field(default_factory=dict)


def read_sweep(data: dict) -> SweepConfig:
    """The `sweep:` mapping -> SweepConfig; one-line errors naming `sweep.<field>`."""
    data = dict(data or {})
    known = {f for f in SweepConfig.__dataclass_fields__}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key 'sweep.{unknown[0]}' (known: {', '.join(sorted(known))})")
    sweep = SweepConfig(**data)
    if isinstance(sweep.space, dict):
        sweep.space = _flatten(sweep.space)
    checks = [("num_samples", isinstance(sweep.num_samples, int) and sweep.num_samples >= 1, "an integer >= 1"),
              ("algorithm", sweep.algorithm in ("tpe", "nsga2"), "'tpe' or 'nsga2'"),
              ("max_concurrent", isinstance(sweep.max_concurrent, int) and sweep.max_concurrent >= 0, "an integer >= 0"),
              ("fid_tolerance", isinstance(sweep.fid_tolerance, (int, float)) and sweep.fid_tolerance >= 0, "a number >= 0"),
              ("name", isinstance(sweep.name, str) and sweep.name.replace("-", "").replace("_", "").isalnum(), "letters, digits, - and _"),
              ("space", isinstance(sweep.space, dict) and sweep.space, "a non-empty mapping of config key -> distribution")]
    for name, ok, expected in checks:
        if not ok:
            raise ConfigError(f"sweep.{name}: expected {expected}, got {getattr(sweep, name)!r}")
    return sweep


def _flatten(space: dict, prefix: str = "") -> dict:
    """`--set sweep.space.train.steps=...` arrives nested; the space is keyed by dotted config keys."""
    out = {}
    for key, value in space.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not set(value) & set(DISTRIBUTIONS) and all(isinstance(v, dict) for v in value.values()):
            out.update(_flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


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


def check_space(sweep: SweepConfig, config_dict: dict) -> None:
    """Every dimension names a key of the run config (or an option its objective term accepts), and
    every value of its range makes a valid config: the extremes are tried through Config.from_dict."""
    from objectives.registry import TERMS

    for key, spec in sweep.space.items():
        kind, args, _ = _distribution(key, spec)
        parts = key.split(".")
        if parts[0] == "objective" and len(parts) == 3:
            term, option = parts[1], parts[2]
            if term not in config_dict.get("objective", {}):
                raise ConfigError(f"sweep.space.{key}: the objective has no term {term!r} (terms: {', '.join(config_dict.get('objective', {}))})")
            accepted = {"weight"} | set(inspect.signature(TERMS[term]).parameters)
            if option not in accepted:
                raise ConfigError(f"sweep.space.{key}: {term} has no option {option!r} (options: {', '.join(sorted(accepted))})")
        else:
            node = config_dict
            for i, part in enumerate(parts):
                if not isinstance(node, dict) or part not in node:
                    raise ConfigError(f"sweep.space.{key}: no such config key ({'.'.join(parts[: i + 1])} does not exist)")
                node = node[part]
        for value in (args if kind == "choice" else args):
            try:
                Config.from_dict(apply_params(config_dict, {key: value}))
            except ConfigError as error:
                raise ConfigError(f"sweep.space.{key}: {value!r} is not a valid value ({error})") from None


def apply_params(config_dict: dict, params: dict) -> dict:
    """A copy of the run config with each dotted key set (a bare term weight becomes {weight: ...})."""
    out = copy.deepcopy(config_dict)
    for key, value in params.items():
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict) and parts[0] == "objective" and i == 1:
                child = node[part] = {"weight": child}
            node = child
        node[parts[-1]] = value
    return out


def tune_space(sweep: SweepConfig) -> dict:
    """The space as Ray Tune distributions (OptunaSearch converts them to Optuna's)."""
    from ray import tune

    out = {}
    for key, spec in sweep.space.items():
        kind, args, step = _distribution(key, spec)
        if kind == "loguniform":
            out[key] = tune.loguniform(*args)
        elif kind == "uniform":
            out[key] = tune.uniform(*args)
        elif kind == "randint":
            out[key] = tune.qrandint(args[0], args[1], step) if step else tune.randint(args[0], args[1] + 1)
        else:
            out[key] = tune.choice(args)
    return out
