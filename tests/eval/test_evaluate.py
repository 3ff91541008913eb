"""The evaluation pieces together, and `acpo eval` on the command line."""

import json

import pytest
import torch

from assets.degradations import degrade
from eval.evaluate import Evaluator, reward_gap, sampling_noise
from trainers.image_sets import DigitsDataset, images_only
from eval.quality import load_quality_model
from eval.sampling import sample_images
from sweeps.cli import main
from sweeps.presets import load
from trainers.models import DiffusionModel, build_digits_scheduler, build_digits_unet


def test_blurred_samples_score_worse_on_every_quality_model(digits_assets):
    images = (images_only(DigitsDataset("heldout"))[:64] + 1) / 2
    blurred = degrade(images, "gaussian_blur", torch.full((64,), 0.8), torch.Generator().manual_seed(0))
    specs = {"trained_quality": {"arch": "cnniqa", "weights": str(digits_assets / "quality_cnniqa.safetensors")},
             "heldout_quality": {"arch": "digits_heldout_iqa", "weights": str(digits_assets / "heldout_iqa.safetensors")}}
    for name, spec in specs.items():
        model = load_quality_model(spec)
        with torch.no_grad():
            sharp, soft = model(images).mean().item(), model(blurred).mean().item()
        better = soft < sharp if not model.lower_better else soft > sharp
        assert better, f"{name}: blur should score worse ({sharp:.3f} -> {soft:.3f})"


def test_sampling_is_seeded_and_rank_sharded():
    torch.manual_seed(0)
    model = DiffusionModel(denoiser=build_digits_unet(block_out_channels=(8, 16, 16), norm_num_groups=4), scheduler=build_digits_scheduler())
    whole = sample_images(model, 10, steps=2, batch_size=3, seed=5)
    again = sample_images(model, 10, steps=2, batch_size=3, seed=5)
    parts = [sample_images(model, 10, steps=2, batch_size=3, seed=5, rank=r, world_size=2) for r in (0, 1)]
    assert whole.shape == (10, 1, 16, 16) and 0 <= whole.min() and whole.max() <= 1
    assert torch.equal(whole, again)
    assert torch.equal(torch.cat([parts[0][:3], parts[1][:3], parts[0][3:6], parts[1][3:]]), whole)  # batches 0,1,2,3 interleaved
    assert not torch.equal(whole, sample_images(model, 10, steps=2, batch_size=3, seed=6))


def test_reward_gap_counts_relative_improvements_in_each_models_direction():
    base = {"trained_quality@4": 0.5, "heldout_quality@4": 0.5}
    hacked = {"trained_quality@4": 0.9, "heldout_quality@4": 0.45}
    honest = {"trained_quality@4": 0.6, "heldout_quality@4": 0.6}
    assert reward_gap(hacked, base, 4) == pytest.approx(0.8 + 0.1)  # +80% trained, -10% held-out
    assert reward_gap(honest, base, 4) == pytest.approx(0.0)
    # a lower-is-better training metric that went down improved
    assert reward_gap({"trained_quality@4": 0.1, "heldout_quality@4": 0.5}, base, 4, {"trained_quality": True}) == pytest.approx(0.8)
    # relative: the same absolute rise counts for less on a larger scale
    assert reward_gap({"trained_quality": 60.0, "heldout_quality": 0.5}, {"trained_quality": 50.0, "heldout_quality": 0.5}) == pytest.approx(0.2)


def test_sampling_noise_spreads_over_seeds_and_vanishes_for_one(digits_assets):
    from trainers.models import load_base_model

    config, _ = load("digits", ["eval.samples=24", "eval.sampling_steps=[2]"])
    evaluator, model = Evaluator.from_config(config), load_base_model(config.model.base)
    noise = sampling_noise(evaluator, model, [0, 1, 2])
    assert noise["fid"]["std"] > 0 and noise["heldout_quality"]["std"] > 0  # different seeds, different samples
    assert sampling_noise(evaluator, model, [0])["fid"] == {"mean": evaluator.evaluate(model).metrics["fid"], "std": 0.0}


def test_samples_for_tolerance_scales_with_one_over_n():
    """1.96 sigma in a 10% band: sigma/mean 0.1 at 500 samples needs 500 * 1.96^2; the larger of the
    banks' spread and the bootstrap's counts."""
    from eval.evaluate import samples_for_tolerance

    row = {"samples": 500, "seeds": 3, "fid": {"mean": 50.0, "std": 5.0, "bootstrap_half_width": 1.96 * 2.5}}
    assert samples_for_tolerance([{**row, "samples": 200, "fid": {"mean": 90.0, "std": 1.0}}, row], 0.1) == round(500 * 1.96 ** 2)
    wider = {**row, "fid": {"mean": 50.0, "std": 1.0, "bootstrap_half_width": 1.96 * 10.0}}  # the bootstrap's sigma, 10, counts
    assert samples_for_tolerance([wider], 0.1) == round(500 * (1.96 * 0.2 / 0.1) ** 2)
    assert samples_for_tolerance([{**row, "fid": {"mean": 50.0, "std": 0.0}}], 0.1) is None


def test_acpo_eval_noise_prints_the_curve(tmp_path, capsys, digits_assets):
    out = tmp_path / "noise.json"
    code = main(["eval", "--noise", "--noise-samples", "8,16", "--noise-seeds", "2", "--set", "eval.sampling_steps=[1]",
                 "--set", "eval.resamples=100", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    curve = json.loads(out.read_text())["curve"]
    assert [row["samples"] for row in curve] == [8, 16] and all(row["seeds"] == 2 for row in curve)
    for row in curve:  # two banks, two different figures; the bootstrap saw a spread too
        assert row["fid"]["std"] > 0 and row["heldout_quality"]["std"] > 0 and row["heldout_quality"]["bootstrap_half_width"] > 0
    assert "samples" in printed and "band: about" in printed


def test_acpo_eval_prints_and_writes_every_figure(tmp_path, capsys, digits_assets):
    out = tmp_path / "eval.json"
    code = main(["eval", "--checkpoint", str(digits_assets / "base"), "--samples", "24", "--steps", "2,4", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    report = json.loads(out.read_text())
    for steps in (2, 4):
        for key in ("fid", "kid", "diversity", "trained_quality", "heldout_quality"):
            assert f"{key}@{steps}" in report["checkpoint_metrics"] and f"{key}@{steps}" in printed
        assert report["reward_gap"][str(steps)] == pytest.approx(0.0, abs=1e-9)  # the base against itself
    assert report["directions"]["fid"] == "min" and report["directions"]["heldout_quality"] == "max"
    assert report["checkpoint_metrics"]["fid@2"] == pytest.approx(report["base_metrics"]["fid@2"])


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "/no/such/checkpoint"], "checkpoint not found: /no/such/checkpoint"),
    (["--checkpoint", ".", "--set", "eval.extra_quality.sharpness=not_a_metric"], "eval.extra_quality.sharpness: unknown quality model 'not_a_metric'"),
    (["--checkpoint", ".", "--samples", "1"], "eval.samples: Input should be greater than or equal to 3, got 1"),
])
def test_acpo_eval_bad_input_is_one_line(args, message, capsys):
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_guidance_and_clip_score_follow_the_prompts(tiny_text_model):
    model = tiny_text_model
    common = dict(steps=2, batch_size=3, seed=1)
    plain = sample_images(model, 5, prompts=["", ""], **common)
    # Guidance against the empty prompt changes nothing when the prompt is empty (cond = uncond) ...
    assert torch.allclose(sample_images(model, 5, prompts=["", ""], guidance_scale=4.0, **common),
                          plain, atol=1e-5)
    # ... and does change the images of a real prompt.
    prompted = dict(prompts=["a digit 3", "a digit 7"], **common)
    assert not torch.allclose(sample_images(model, 5, guidance_scale=4.0, **prompted),
                              sample_images(model, 5, **prompted), atol=1e-4)

    seen = []

    def clip_score(images, captions):  # a stand-in scorer: records which caption each image was scored with
        seen.extend(captions)
        return torch.tensor([1.0 if c == "a digit 3" else 0.0 for c in captions])

    quality = load_quality_model({"arch": "digits_heldout_iqa", "weights": "assets/digits/heldout_iqa.safetensors"})
    evaluator = Evaluator(reference=torch.rand(6, 1, 16, 16), feature_extractor="digits-classifier",
                          feature_extractor_weights="assets/digits/classifier.safetensors",
                          quality={"trained_quality": quality, "heldout_quality": quality},
                          samples=5, sampling_steps=(1,), prompts=("a digit 3", "a digit 7"), clip_score=clip_score)
    metrics = evaluator.evaluate(model).metrics
    assert seen == ["a digit 3", "a digit 7", "a digit 3", "a digit 7", "a digit 3"]  # the order sample_images cycles them
    assert metrics["clip_score@1"] == pytest.approx(3 / 5)
    assert evaluator.directions()["clip_score"] == "max"


def test_from_config_builds_everything_and_samples_are_returned(digits_assets):
    from sweeps.presets import load
    from trainers.models import load_base_model

    config, _ = load("digits", ["eval.samples=12", "eval.sampling_steps=[2, 3]", "eval.extra_quality.heldout_again="
                                f"{{arch: digits_heldout_iqa, weights: {digits_assets}/heldout_iqa.safetensors}}"])
    evaluator = Evaluator.from_config(config)
    assert set(evaluator.quality) == {"trained_quality", "heldout_quality", "heldout_again"}
    assert evaluator.prompts == tuple(f"a handwritten digit {d}" for d in range(10))  # data.caption, for text models
    result = evaluator.evaluate(load_base_model(config.model.base))
    assert result.samples.shape == (12, 1, 16, 16)
    assert result.metrics["heldout_again@3"] == pytest.approx(result.metrics["heldout_quality@3"])
    assert result.metrics["fid"] == result.metrics["fid@2"] and result.metrics["heldout_quality"] == result.metrics["heldout_quality@2"]


@pytest.fixture(scope="module")
def tiny_text_model():
    from tests.tiny_models import build_tiny_sd

    return build_tiny_sd()


def test_one_seed_scheme_separates_streams_indices_and_ranks():
    from trainers.common.seeds import derive_seed

    seeds = {derive_seed(seed, stream, index, rank) for seed in (0, 1) for stream in ("step", "data order", "sampling")
             for index in range(50) for rank in range(4)}
    assert len(seeds) == 2 * 3 * 50 * 4  # no two draws of training or evaluation share a generator
    assert all(0 <= s < 2**63 for s in seeds)
    # Pinned: every figure of a run (the demo's champion included) depends on this scheme.
    assert derive_seed(0, "step", 0, 0) == 1570874369896594822


def test_corrupt_weight_files_are_one_line_naming_the_file(tmp_path, capsys, digits_assets):
    from trainers.denoiser.cascade import CascadedDenoiser, CascadedX0Head
    from trainers.models import load_base_model, save_base_model

    bad = tmp_path / "reward.safetensors"
    bad.write_bytes(bytes(range(256)) * 20)  # exists, but is not safetensors
    assert main(["eval", "--checkpoint", str(digits_assets / "base"), "--no-base", "--samples", "8", "--steps", "1",
                 "--set", f"eval.trained_quality={{arch: cnniqa, weights: {bad}}}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # diffusers' progress bars aside
    assert len(err) == 1 and err[0].startswith("acpo: error: ") and f"{bad}: not a readable weights file" in err[0]

    model = load_base_model(digits_assets / "base")
    model.denoiser = CascadedDenoiser(model.denoiser, CascadedX0Head(1), model.scheduler.config)
    folder = save_base_model(model, tmp_path / "casdm")
    (folder / "cascade" / "config.json").write_text('{"channels": 1')  # truncated
    assert main(["eval", "--checkpoint", str(folder), "--no-base", "--samples", "8", "--steps", "1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and f"{folder / 'cascade' / 'config.json'}: not a Cas-DM head config" in err[0]
