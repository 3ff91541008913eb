"""The `sd15` preset rehearsed (issue 29): its real architectures at random weights, SD 1.5's channel
widths at 64 px (8x8 latents) instead of 512, bf16 autocast on the CPU as the preset asks, LoRA + anchor
+ MUSIQ (random) on a sampled x0 through the VAE decode, one evaluation with every metric of the
preset, a checkpoint, its export. Integration: it builds ~1.2B parameters of models and writes ~7 GB.
"""

import math
import os
import shutil

import pytest
import torch

pytestmark = pytest.mark.integration

FAST = ["model.rehearsal=true", "data.resolution=64", "train.steps=2", "train.batch_size=1", "train.gradient_accumulation=1",
        "objective.nr_iqa.x0.sampling_steps=2", "eval.samples=3", "eval.sampling_steps=[2]", "eval.resamples=100", "data.workers=0"]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """One trained rehearsal (config, result, the staged base's UNet weights before training)."""
    from safetensors.torch import load_file

    from sweeps.presets import load
    from trainers.loop import train

    root = tmp_path_factory.mktemp("rehearsal")  # the stand-ins go to the session's $ACPO_REHEARSAL_CACHE (tests/conftest.py)
    try:
        config, sweep = load("sd15", [*FAST, f"train.output_dir={root / 'run'}", f"data.cache_dir={root / 'latents'}"])
        base_unet = load_file(f"{config.model.base}/unet/diffusion_pytorch_model.safetensors")
        yield config, sweep, train(config), base_unet, root
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the export and checkpoints: GBs pytest would keep for three sessions


def test_the_rehearsal_points_every_hub_model_at_a_local_random_stand_in(rehearsal):
    config, sweep, *_ = rehearsal
    assert config.model.rehearsal and config.model.base.endswith("-64px-random-seed0")
    assert config.data.source == "hf" and config.data.path.startswith(os.environ["ACPO_REHEARSAL_CACHE"])
    for spec in (config.eval.trained_quality, config.eval.heldout_quality, config.eval.clip_score, *config.eval.extra_quality.values(),
                 config.objective["nr_iqa"]["metric"]):
        assert spec["name"].endswith("(random weights)") and spec["weights"].endswith("-random-seed0.safetensors")
    assert config.eval.feature_extractor == "inception-v3-compat" and "random" in config.eval.feature_extractor_weights
    assert sweep.register_champion is False  # a random model never reaches the registry


def test_bf16_lora_anchor_musiq_steps_are_finite_and_every_metric_is_reported(rehearsal):
    config, _, result, *_ = rehearsal
    assert config.train.mixed_precision == "bf16" and config.model.finetune == "lora"
    metrics = result["metrics"]
    for term in ("loss", "loss/denoise", "loss/anchor", "loss/nr_iqa"):
        assert math.isfinite(metrics[term]), term
    for name in ("fid", "kid", "diversity", "trained_quality", "heldout_quality", "topiq_nr", "clip_score"):
        assert math.isfinite(metrics[f"{name}@2"]), name


def test_lora_weights_moved_and_the_base_is_untouched(rehearsal):
    from safetensors.torch import load_file

    config, _, result, base_unet, _ = rehearsal
    adapters = load_file(f"{result['checkpoint']}/model/adapter_model.safetensors")
    lora_b = [value for key, value in adapters.items() if "lora_B" in key]
    assert lora_b and any(value.abs().max() > 0 for value in lora_b)  # peft starts B at zero: nonzero means trained
    after = load_file(f"{config.model.base}/unet/diffusion_pytorch_model.safetensors")
    assert after.keys() == base_unet.keys() and all(torch.equal(after[key], base_unet[key]) for key in after)


def test_the_export_loads_with_stable_diffusion_pipeline_and_samples(rehearsal, tmp_path):
    from diffusers import StableDiffusionPipeline

    from sweeps.champion import export_champion

    _, _, result, _, root = rehearsal
    exported = export_champion(str(result["checkpoint"]), root / "export")
    pipe = StableDiffusionPipeline.from_pretrained(exported, use_safetensors=True)
    image = pipe("a fox spirit", num_inference_steps=1, height=64, width=64, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
