"""The one loader: a preset (YAML in sweeps/presets/, or a file) plus dotted `key=value` overrides ->
the validated run config and the sweep's settings.

    config, sweep = load("digits", ["train.steps=100", "sweep.num_samples=4"])

`acpo train`, `acpo eval`, `acpo select`, the sweep driver and a sweep's trials all come through
here (a trial adds its parameters with `set_values`, the same dotted setter: sweeps/dotted.py). Both halves are checked
by one typed validator (`trainers.config.validate`, pydantic), every error one line naming the field,
before any model loads or Ray starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator

from sweeps.dotted import flatten_space, set_values
from trainers.common.credentials import credentials_message, has_credentials
from trainers.common.errors import ConfigError
from trainers.config import MAX_NESTING, MAX_SAMPLES, MAX_TRIALS, Config, Section

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


class ConfirmConfig(Section):
    """After the sweep, the front's best candidates and the base model re-measured on a seed bank the
    search never saw, with more samples; the champion is chosen on those figures (sweeps/confirm.py)."""

    top_k: int = Field(3, ge=0)  # candidates taken from the front (0: no confirmation; the screening figures decide)
    samples: int = Field(2000, ge=3, le=MAX_SAMPLES)  # images per candidate and for the base
    seed: int = 1  # the confirmation bank: must differ from eval.seed (the screening bank)


class SweepConfig(Section):
    """The preset's `sweep:` section (see sweeps/space.py for the search space's form)."""

    name: str = Field("digits-acpo", pattern=r"^[A-Za-z0-9_-]+$")  # the experiment: folder under storage_dir, MLflow experiment
    model_name: str = ""  # the MLflow registered model the champion joins ("" = name)
    register_champion: bool = True  # register the champion (a study's per-method sweeps leave it to the study)
    experiment: str = ""  # the MLflow experiment ("" = name; a study's sweeps share the study's)
    parent_run: str = ""  # an MLflow run id the sweep's parent run nests under (a study's run; "" = none)
    num_samples: int = Field(8, ge=1, le=MAX_TRIALS)  # trials; bounded so a typo fails here, not after days of trials
    algorithm: Literal["tpe", "nsga2"] = "tpe"  # Optuna's sampler
    max_concurrent: int = Field(0, ge=0)  # 0: as many trials as the cluster's resources fit
    # The front's fidelity axis (eval/axes.py): fid or kid. Measured on digits (docs/sweep.md, "FID or KID"): FID's paired
    # interval is ~5x narrower at equal samples, so FID is the default; KID is unbiased at small sample counts.
    fidelity: Literal["fid", "kid"] = "fid"
    fid_tolerance: float = Field(0.1, ge=0)  # champion rule: FID <= base FID * (1 + tolerance) (confirmed: its 95% upper bound)
    # With fidelity: kid, the rule's tolerance: KID <= base KID + tolerance, absolute, in the units the evaluation
    # reports (KID is unbiased: the base's can be near 0 or below it, where a ratio means nothing). Required then.
    kid_tolerance: float | None = Field(None, ge=0)
    confirm: ConfirmConfig = Field(default_factory=ConfirmConfig)
    # experiment, trials' checkpoints, selection, champion: a folder (shared on a cluster), or object
    # storage as a URI (s3://bucket/prefix, gs://..., any pyarrow filesystem: trainers/common/storage.py)
    storage_dir: str = "runs/sweeps"
    # Optuna's study: an Optuna storage URL (sqlite:///..., postgresql://...); "" = $ACPO_OPTUNA_STORAGE (a URL
    # with a password belongs in the environment, not on a command line), else SQLite in a local sweep folder,
    # or Optuna's journal of write-once objects under the sweep's folder when storage_dir is a URI
    optuna_storage: str = ""
    tracking_uri: str = ""  # MLflow; "" = $MLFLOW_TRACKING_URI, else a server answering at 127.0.0.1:5000
    tracking_wait_s: float = Field(120.0, ge=0)  # at the end, how long to wait for an unreachable MLflow before leaving records spooled
    seed: int = 0  # Optuna's sampler
    space: dict[str, Any] = Field(default_factory=dict, min_length=1)  # dotted config key -> distribution

    @field_validator("storage_dir")
    @classmethod
    def _no_credentials(cls, location: str) -> str:
        if has_credentials(location):
            raise ValueError(credentials_message(location))
        return location

    @field_validator("space", mode="before")
    @classmethod
    def _flatten(cls, space):
        """`--set sweep.space.train.steps=...` arrives nested; the space is keyed by dotted config keys."""
        return flatten_space(space) if isinstance(space, dict) else space


class Preset(Config):
    """A preset file: the run config plus its `sweep:` section, validated together."""

    sweep: SweepConfig = Field(default_factory=SweepConfig)


class _Loader(yaml.SafeLoader):
    """PyYAML implements YAML 1.1, where `1e-4` (no decimal point) is a string. YAML 1.2, and every
    user typing a learning rate or a term weight, mean a number; resolve it so for every value."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


# Anchors and aliases stay (the studies share a space between methods with them), but an alias is a
# reference: `a: &x [*x]` builds a list that contains itself, which validation would follow forever, and
# nine nested lists of nine aliases (a "billion laughs") expand to 9^9 values when validated. The node
# graph is measured before anything is built: no preset or study comes near these.
MAX_YAML_VALUES = 1_000_000  # values after every alias is expanded


class RefusedYAMLError(yaml.YAMLError):
    """Valid YAML this loader will not build: a value that contains itself, or too large once expanded."""


def _expanded_size(node, depth: int = 0, sizes: dict | None = None, open_nodes: set | None = None) -> int:
    """How many values `node` stands for with every alias expanded (each distinct node measured once)."""
    sizes = {} if sizes is None else sizes
    open_nodes = set() if open_nodes is None else open_nodes
    if id(node) in sizes:
        return sizes[id(node)]
    where = f"line {node.start_mark.line + 1}, column {node.start_mark.column + 1}"
    if id(node) in open_nodes:
        raise RefusedYAMLError(f"the value at {where} contains itself (an alias inside its own anchor)")
    if depth > MAX_NESTING:
        raise RefusedYAMLError(f"nested deeper than {MAX_NESTING} levels at {where}")
    children = [] if isinstance(node, yaml.ScalarNode) else [
        part for item in node.value for part in (item if isinstance(node, yaml.MappingNode) else (item,))]
    open_nodes.add(id(node))
    size = 1 + sum(_expanded_size(child, depth + 1, sizes, open_nodes) for child in children)
    open_nodes.discard(id(node))
    if size > MAX_YAML_VALUES:
        raise RefusedYAMLError(f"aliases expand to more than {MAX_YAML_VALUES:,} values at {where}")
    sizes[id(node)] = size
    return size


def _load_yaml(text: str):
    loader = _Loader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # the composer recurses per level of nesting
            raise RefusedYAMLError(f"nested deeper than {MAX_NESTING} levels") from None
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file holding a mapping (a preset, a study), or a one-line error naming it."""
    try:
        data = _load_yaml(path.read_text()) or {}
    except RefusedYAMLError as error:
        raise ConfigError(f"{what} {path}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a mapping at the top level")
    return data


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_preset(name_or_path: str, _seen: tuple = ()) -> dict:
    """A preset by name (`digits`) or a path to a YAML file, as a plain mapping. A preset that starts
    with `extends: NAME` is a fragment over another preset: its sections merge key by key into the
    parent's, except `objective` and `sweep.space`, which replace the parent's whole (a method is its
    own set of terms and its own search space)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {name_or_path!r} (known: {', '.join(preset_names())})")
    if not path.is_file():
        raise ConfigError(f"preset file not found: {path}")
    data = read_yaml_mapping(path, "preset")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or str(path) in _seen:
        raise ConfigError(f"preset {path}: extends: expected the name of another preset, got {parent!r}")
    if Path(parent).suffix and not Path(parent).is_absolute():
        parent = str(path.parent / parent)
    return _merge(read_preset(parent, (*_seen, str(path))), data)


_REPLACED = {("objective",), ("sweep", "space")}  # a fragment's value replaces the parent's whole


def _merge(parent: dict, child: dict, where: tuple = ()) -> dict:
    out = dict(parent)
    for key, value in child.items():
        inner = (*where, key)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and inner not in _REPLACED:
            out[key] = _merge(out[key], value, inner)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`train.steps=100`, `objective.anchor.weight=0.5`: each value is parsed as YAML (numbers, lists, ...)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            value = _load_yaml(raw)
        except RefusedYAMLError as error:
            raise ConfigError(f"override {item!r}: {error}") from None
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: value is not valid YAML") from None
        try:
            data = set_values(data, {key: value})
        except ConfigError as error:
            raise ConfigError(f"override {item!r}: {error}") from None
    return data


def load(preset: str = "digits", overrides: list[str] | None = None) -> tuple[Config, SweepConfig]:
    """The only place presets are read and overrides applied: the validated run config and the
    sweep's settings. (The sweep also checks its space against the run config, `check_space`: a
    plain `acpo train --set objective={denoise: 1.0}` need not keep the terms the space searches.)"""
    resolved = Preset.from_dict(apply_overrides(read_preset(preset), list(overrides or [])))
    if resolved.sweep.confirm.top_k and resolved.sweep.confirm.seed == resolved.eval.seed:
        raise ConfigError(f"sweep.confirm.seed: {resolved.sweep.confirm.seed} is eval.seed, the screening bank; "
                          "the confirmation needs noise the search never saw")
    if resolved.sweep.fidelity == "kid" and resolved.sweep.kid_tolerance is None:
        raise ConfigError("sweep.kid_tolerance: required with sweep.fidelity 'kid' (KID <= the base's + this, in the evaluation's "
                          "KID units; `acpo eval --noise` prints KID's spread for this preset)")
    if resolved.model.rehearsal:
        from trainers.rehearsal import stage

        stage(resolved)  # hub models and data -> random-weight local stand-ins, built once (trainers/rehearsal.py)
        resolved.sweep.register_champion = False  # a random-weight model never joins the registry users take champions from
    config = Config.model_construct(**{name: getattr(resolved, name) for name in Config.model_fields})
    config.check_references()  # once, here at the edge; what a worker re-validates is the schema only
    return config, resolved.sweep
