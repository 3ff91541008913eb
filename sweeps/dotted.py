"""Dotted config keys (`train.steps`, `objective.anchor.weight`): setting them in a plain config
mapping, and a search space's nested form flattened to them. Shared by the loader (sweeps/presets.py:
`--set` overrides), the search space (sweeps/space.py) and a sweep's trials (sweeps/trial.py: its
parameters), and importing none of them. Pure and light: a trial actor imports it.
"""

from __future__ import annotations

import copy

from trainers.common.errors import ConfigError

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")  # a search dimension's kinds (sweeps/space.py)


def set_values(data: dict, values: dict) -> dict:
    """A copy of `data` with each dotted key set: data[a][b][c] = value for "a.b.c", creating sections.
    A bare term weight becomes {weight: ...} when an option of that term is set
    (`objective.denoise=1.0` then `objective.denoise.min_snr_gamma=5`)."""
    out = copy.deepcopy(data)
    for key, value in values.items():
        node, parts = out, key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                if parts[0] != "objective" or i != 1:
                    raise ConfigError(f"{'.'.join(parts[: i + 1])} is not a section")
                child = node[part] = {"weight": child}
            node = child
        node[parts[-1]] = value
    return out


def flatten_space(space: dict, prefix: str = "") -> dict:
    """`--set sweep.space.train.steps=...` arrives nested; the space is keyed by dotted config keys."""
    out = {}
    for key, value in space.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and not set(value) & set(DISTRIBUTIONS) and all(isinstance(v, dict) for v in value.values()):
            out.update(flatten_space(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out
