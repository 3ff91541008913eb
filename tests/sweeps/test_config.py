import json

import pytest

from sweeps.cli import main
from sweeps.config import PRESETS_DIR, apply_overrides, load_config, preset_names, read_preset
from trainers.config import PROJECT_ROOT, Config, ConfigError


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_validates(name):
    config = load_config(name)
    assert config.preset == name


def test_digits_preset_points_at_the_committed_assets(digits_assets):
    config = load_config("digits")
    assert config.model.base == str(digits_assets / "base")
    assert config.eval.quality["weights"] == str(digits_assets / "quality_cnniqa.safetensors")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stepz=3"], r"unknown key 'train.stepz'"),
        (["train.steps=ten"], r"train.steps: expected int, got 'ten'"),
        (["train.steps=0"], r"train.steps: must be > 0"),
        (["train.learning_rate=true"], r"train.learning_rate: expected a number"),
        (["train.learning_rate=fast"], r"train.learning_rate: expected a number, got 'fast'"),
        (["model.finetune=half"], r"model.finetune: expected one of 'full', 'lora'"),
        (["data.source=folder"], r"data.path: required when data.source is 'folder'"),
        (["eval.sampling_steps=[25, 0]"], r"eval.sampling_steps"),
        (["objective.denoize=1"], r"objective.denoize: unknown term"),
        (["objective.denoise=-1"], r"objective.denoise.weight: expected a number >= 0"),
        (["objective.denoise.min_snr=5"], r"objective.denoise.min_snr: unknown option"),
        (["train"], r"expected key=value"),
        (["train.steps.inner=1"], r"train.steps is not a section"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("digits", overrides)


def test_overrides_parse_yaml_values_and_promote_bare_weights():
    data = apply_overrides({"objective": {"denoise": 1.0}}, ["train.steps=7", "objective.denoise.min_snr_gamma=5", "eval.sampling_steps=[4, 25]"])
    assert data["train"]["steps"] == 7
    assert data["objective"]["denoise"] == {"weight": 1.0, "min_snr_gamma": 5}
    config = Config.from_dict(data)
    assert config.eval.sampling_steps == [4, 25] and config.train.steps == 7
    # YAML 1.1 reads 1e-4 as a string; a float field still takes it
    assert load_config("digits", ["train.learning_rate=1e-4"]).train.learning_rate == 1e-4
    # ...and so does a term weight, which no typed field guards
    assert load_config("digits", ["objective.denoise=1e-3"]).objective["denoise"] == 1e-3


def test_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        read_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_preset(str(bad))


def test_dry_run_prints_the_resolved_config(capsys):
    assert main(["train", "--dry-run", "--set", "train.steps=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["steps"] == 3
    assert printed["model"]["base"].startswith(str(PROJECT_ROOT))


def test_cli_bad_input_is_one_line_and_exit_2(capsys):
    assert main(["train", "--set", "train.stepz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.stepz" in err


def test_presets_dir_ships_digits():
    assert (PRESETS_DIR / "digits.yaml").is_file()
