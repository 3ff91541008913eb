"""Presets (YAML files in sweeps/presets/) plus dotted `key=value` overrides -> a validated Config."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from trainers.config import Config, ConfigError

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


class _Loader(yaml.SafeLoader):
    """PyYAML implements YAML 1.1, where `1e-4` (no decimal point) is a string. YAML 1.2, and every
    user typing a learning rate or a term weight, mean a number; resolve it so for every value."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_preset(name_or_path: str) -> dict:
    """A preset by name (`digits`) or a path to a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {name_or_path!r} (known: {', '.join(preset_names())})")
    if not path.is_file():
        raise ConfigError(f"preset file not found: {path}")
    try:
        data = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"preset {path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path}: expected a mapping at the top level")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`train.steps=100`, `objective.anchor.weight=0.5`: the value is parsed as YAML (numbers, lists, ...)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            value = _load_yaml(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: value is not valid YAML") from None
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                # `objective.denoise=1.0` then `objective.denoise.min_snr=5`: a bare weight becomes {weight: ...}
                if parts[0] == "objective" and i == 1:
                    child = node[part] = {"weight": child}
                else:
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(preset: str = "digits", overrides: list[str] | None = None) -> Config:
    """The run config of a preset; its `sweep:` section (search space, sweep settings) is the sweep's."""
    data = apply_overrides(read_preset(preset), list(overrides or []))
    data.pop("sweep", None)
    return Config.from_dict(data)
