"""The one loader (sweeps/presets.py): every shipped preset validates, bad values fail in one line
naming the field, and every entry point reports the same line for the same bad override."""

import json

import pytest

from sweeps.cli import main
from sweeps.presets import PRESETS_DIR, apply_overrides, load, preset_names, read_preset
from trainers.config import PROJECT_ROOT, Config
from trainers.common.errors import ConfigError


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_validates(name):
    config, sweep = load(name)
    assert config.preset == name and sweep.space


def test_digits_preset_points_at_the_committed_assets(digits_assets):
    config, _ = load("digits")
    assert config.model.base == str(digits_assets / "base")
    assert config.eval.trained_quality["weights"] == str(digits_assets / "quality_cnniqa.safetensors")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stepz=3"], r"^unknown key 'train.stepz' \(known: steps, "),
        (["train.steps=ten"], r"^train.steps: expected an integer, got 'ten'$"),
        (["train.steps=2.5"], r"^train.steps: expected an integer, got 2.5$"),
        (["train.steps=0"], r"^train.steps: .*greater than 0, got 0$"),
        (["train.learning_rate=true"], r"^train.learning_rate: expected a number, got True$"),
        (["train.learning_rate=fast"], r"^train.learning_rate: expected a number, got 'fast'$"),
        (["train.learning_rate=.nan"], r"^train.learning_rate: expected a finite number"),
        (["train.use_gpu=1"], r"^train.use_gpu: expected true/false, got 1$"),
        (["model.finetune=half"], r"^model.finetune: .*'full' or 'lora', got 'half'$"),
        (["data.source=folder"], r"^data.path: required when data.source is 'folder'$"),
        (["eval.sampling_steps=[25, 0]"], r"^eval.sampling_steps.1: "),
        (["eval.samples=1"], r"^eval.samples: .*greater than or equal to 3, got 1$"),
        (["eval.aesthetic=musiq"], r"^eval.aesthetic: renamed to eval.heldout_quality"),
        (["eval.quality=musiq"], r"^eval.quality: renamed to eval.trained_quality"),
        (["objective.aesthetic={rewards: {c: {model: musiq}}}"], r"^objective.aesthetic: renamed to objective.decoupled_rewards"),
        (["objective.denoize=1"], r"^objective.denoize: unknown term"),
        (["objective.denoise=-1"], r"^objective.denoise.weight: expected a number >= 0"),
        (["objective.denoise.min_snr=5"], r"^objective.denoise.min_snr: unknown option"),
        (["sweep.algorithm=grid"], r"^sweep.algorithm: .*'tpe' or 'nsga2', got 'grid'$"),
        (["sweep.num_samples=0"], r"^sweep.num_samples: "),
        (["sweep.name=a b"], r"^sweep.name: "),
        (["sweep.confirm.seed=0"], r"^sweep.confirm.seed: 0 is eval.seed, the screening bank"),
        (["eval.seed=3", "sweep.confirm.seed=3"], r"^sweep.confirm.seed: 3 is eval.seed"),
        (["sweep.confirm.top_k=-1"], r"^sweep.confirm.top_k: "),
        (["sweep.fidelity=kid"], r"^sweep.kid_tolerance: required with sweep.fidelity 'kid'"),
        (["sweep.fidelity=lpips"], r"^sweep.fidelity: .*'fid' or 'kid', got 'lpips'$"),
        (["sweep.fidelity=kid", "sweep.kid_tolerance=-1"], r"^sweep.kid_tolerance: .*greater than or equal to 0"),
        (["eval.resamples=10"], r"^eval.resamples: .*greater than or equal to 100, got 10$"),
        (["train"], r"expected key=value"),
        (["train.steps.inner=1"], r"train.steps is not a section"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message) as raised:
        load("digits", overrides)
    assert "\n" not in str(raised.value)


def test_the_space_is_checked_by_the_sweep_not_by_a_single_run(capsys):
    from sweeps.acpo_sweep import main as sweep_main

    config, _ = load("digits", ["objective={denoise: 1.0}"])  # the space searches anchor: not this run's business
    assert set(config.objective) == {"denoise"}
    assert sweep_main(["--set", "objective={denoise: 1.0}", "--dry-run"]) == 2
    assert capsys.readouterr().err == ("acpo: error: sweep.space.objective.anchor.weight: the objective has no term 'anchor' "
                                       "(terms: denoise)\n")


def test_overrides_parse_yaml_values_and_promote_bare_weights():
    data = apply_overrides({"objective": {"denoise": 1.0}}, ["train.steps=7", "objective.denoise.min_snr_gamma=5", "eval.sampling_steps=[4, 25]"])
    assert data["train"]["steps"] == 7
    assert data["objective"]["denoise"] == {"weight": 1.0, "min_snr_gamma": 5}
    config = Config.from_dict(data)
    assert config.eval.sampling_steps == [4, 25] and config.train.steps == 7
    # YAML 1.1 reads 1e-4 as a string; a float field still takes it
    assert load("digits", ["train.learning_rate=1e-4"])[0].train.learning_rate == 1e-4
    # ...and so does a term weight, which no typed field guards
    assert load("digits", ["objective.denoise=1e-3"])[0].objective["denoise"] == 1e-3


def test_a_resolved_config_round_trips_through_a_worker():
    """What a Ray worker does with the dict it is shipped: the same config comes out."""
    config, _ = load("digits", ["train.steps=7"])
    assert Config.from_dict(config.to_dict()) == config


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


def test_the_same_bad_override_gives_the_same_line_from_every_entry_point(capsys):
    from sweeps.acpo_sweep import main as sweep_main

    bad = ["--set", "train.stepz=3"]
    lines = []
    for run in (lambda: main(["train", *bad]), lambda: main(["eval", "--checkpoint", ".", *bad]), lambda: sweep_main([*bad, "--dry-run"]),
                lambda: main(["select", "--sweep", "x", *bad])):
        assert run() == 2
        captured = capsys.readouterr()
        lines.append(captured.err)
        assert captured.out == ""
    assert len(set(lines)) == 1, lines
    assert lines[0].startswith("acpo: error: unknown key 'train.stepz'") and lines[0].count("\n") == 1


def test_presets_dir_ships_digits():
    assert (PRESETS_DIR / "digits.yaml").is_file()


def test_a_preset_fragment_extends_its_parent():
    config, sweep = load("digits-cas-dm")
    assert set(config.objective) == {"denoise", "lpips_x0"}  # the objective is replaced whole
    digits, _ = load("digits")
    assert config.eval == digits.eval and config.model == digits.model  # everything else is the parent's
    assert config.train.output_dir.endswith("digits-cas-dm") and config.train.steps == digits.train.steps
    assert set(sweep.space) == {"objective.lpips_x0.weight", "train.steps", "train.learning_rate"} and sweep.name == "digits-cas-dm"


def active_terms(spec: dict, step: int) -> set[str]:
    """The terms an objective config trains at `step` (weights only: no model is built)."""
    from objectives.registry import _term_options

    return {name for name, weight, _ in _term_options(spec, "objective") if weight.at(step) > 0}


def test_the_self_perceptual_fragment_trains_without_the_diffusion_loss():
    # the paper's objective: the self-perceptual loss instead of the MSE, not beside it
    config, sweep = load("digits-self-perceptual")
    assert active_terms(config.objective, 0) == {"self_perceptual"}
    assert set(sweep.space) == {"train.steps", "train.learning_rate"}


def test_unifl_as_published_has_no_diffusion_loss_in_either_stage():
    # UniFL's Eq. 7: stage 1 PeFL + decoupled rewards, stage 2 the adversarial pair + decoupled rewards
    config, _ = load("digits-t2i-unifl-published")
    assert active_terms(config.objective, 0) == {"pefl_segmentation", "pefl", "decoupled_rewards"}
    assert active_terms(config.objective, 150) == {"decoupled_rewards", "adversarial"}
    ours, _ = load("digits-t2i-unifl")
    assert set(ours.objective) - set(config.objective) == {"denoise"}  # the only departure of the other preset


def test_the_sweep_can_search_a_stage_boundary(capsys):
    from sweeps.acpo_sweep import main as sweep_main

    assert sweep_main(["--set", "sweep.space.objective.nr_iqa.from_step={randint: [0, 100], step: 50}", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["sweep"]["space"]["objective.nr_iqa.from_step"] == {"randint": [0, 100], "step": 50}
    assert sweep_main(["--set", "sweep.space.objective.nr_iqa.from_step={randint: [-10, 100]}", "--dry-run"]) == 2
    assert "objective.nr_iqa.from_step: expected an integer >= 0" in capsys.readouterr().err
