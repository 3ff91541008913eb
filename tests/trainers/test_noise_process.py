"""The noise process (trainers/denoiser/noise_process.py): per kind, its conversions against hand-computed values,
its stochastic step against its deterministic one, its samplers' names; and the export's scheduler."""

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, UNet2DModel

from trainers.common.errors import ConfigError
from trainers.models import DIGITS_SCHEDULER_CONFIG, DiffusionModel, absent_components, load_base_model, save_base_model
from trainers.denoiser.noise_process import NoiseProcess

FLOW_CONFIG = dict(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).config)


def tensors(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 2, 4, 4, generator=generator) for _ in range(3)]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_a_ddpm_process_converts_as_computed_by_hand(prediction):
    process = NoiseProcess({**DIGITS_SCHEDULER_CONFIG, "prediction_type": prediction})
    x0, noise, _ = tensors()
    t = torch.tensor([10, 500, 990])
    a = DDPMScheduler(**{**DIGITS_SCHEDULER_CONFIG, "prediction_type": prediction}).alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    velocity = a.sqrt() * noise - (1 - a).sqrt() * x0  # Salimans & Ho's v
    output = {"epsilon": noise, "v_prediction": velocity, "sample": x0}[prediction]
    assert torch.allclose(process.add_noise(x0, noise, t), x_t, atol=1e-5)
    assert torch.allclose(process.target(x0, noise, t), output, atol=1e-5)
    assert torch.allclose(process.x0(output, x_t, t), x0, atol=2e-3)
    assert torch.allclose(process.eps(output, x_t, t), noise, atol=2e-3)
    assert torch.allclose(process.velocity(output, x_t, t), noise - x0, atol=2e-3)
    assert torch.allclose(process.from_x0(x0, x_t, t), output, atol=2e-3)
    assert torch.allclose(process.noise_level(t, x0), ((1 - a) / a).sqrt())


def test_a_flow_process_converts_as_computed_by_hand():
    process = NoiseProcess(FLOW_CONFIG)
    assert process.kind == "flow" and process.prediction == "flow_prediction"
    x0, noise, _ = tensors(1)
    t = torch.tensor([100.0, 500.0, 900.0])
    s = (t / 1000).view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    v = noise - x0
    assert torch.allclose(process.add_noise(x0, noise, t), x_t, atol=1e-6)
    assert torch.allclose(process.target(x0, noise, t), v)
    assert torch.allclose(process.x0(v, x_t, t), x0, atol=1e-5)
    assert torch.allclose(process.eps(v, x_t, t), noise, atol=1e-5)
    assert torch.equal(process.velocity(v, x_t, t), v)
    assert torch.allclose(process.from_x0(x0, x_t, t), v, atol=1e-4)
    assert torch.allclose(process.noise_level(t, x0), s)


@pytest.mark.parametrize("config", [DIGITS_SCHEDULER_CONFIG, FLOW_CONFIG], ids=["ddpm", "flow"])
def test_the_stochastic_step_without_noise_is_the_deterministic_step(config):
    process = NoiseProcess(config)
    x, output, _ = tensors(2)
    deterministic, stochastic = process.sampler(), process.sampler()
    for sampler in (deterministic, stochastic):
        sampler.set_timesteps(8)
    x_det = x_sto = x
    for t in deterministic.timesteps:
        x_det = process.step(deterministic, output, t, x_det)
        step = process.stochastic_step(stochastic, output, t, x_sto, noise_level=0.0, noise=torch.randn(x.shape))
        assert float(step.std.abs().max()) == 0
        x_sto = step.sample
    assert torch.allclose(x_det, x_sto, atol=1e-5)


@pytest.mark.parametrize("config", [DIGITS_SCHEDULER_CONFIG, FLOW_CONFIG], ids=["ddpm", "flow"])
def test_the_stochastic_step_draws_from_the_gaussian_it_reports(config):
    process = NoiseProcess(config)
    x, output, noise = tensors(3)
    sampler = process.sampler()
    sampler.set_timesteps(8)
    t = sampler.timesteps[2]
    step = process.stochastic_step(sampler, output, t, x, noise_level=0.7, noise=noise)
    std = float(step.std)
    assert std > 0 and torch.allclose(step.sample, step.mean + std * noise)
    # its log-density: the Gaussian's, averaged over each image's elements, highest at the mean
    expected = (-noise ** 2 / 2 - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    assert torch.allclose(step.log_prob(), expected, atol=1e-4)
    assert bool((step.log_prob(step.mean) > step.log_prob()).all())


def test_a_sampler_name_says_what_runs():
    flow, ddpm = NoiseProcess(FLOW_CONFIG), NoiseProcess(DIGITS_SCHEDULER_CONFIG)
    with pytest.raises(ConfigError, match=r"^eval.sampler: ddim is a DDPM-family sampler; this flow model samples with euler"):
        flow.check_sampler("ddim", "eval.sampler")
    assert type(flow.sampler()).__name__ == "FlowMatchEuler" and isinstance(ddpm.sampler(), DDIMScheduler)
    assert flow.sampler_problem("euler", rollout=True) is None and ddpm.sampler_problem("euler", rollout=True) is not None


def test_eval_sampler_ddim_on_the_flow_preset_is_one_line_naming_euler():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "sweeps.cli", "train", "--local", "--preset", "digits-flow", "--set", "eval.sampler=ddim",
                             "--set", "train.steps=1"], capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("acpo: error: eval.sampler: ddim") and "euler" in lines[0]


# ------------------------------------------------------------------------------------------- export

def pixel_base_shipping_ddim(folder):
    """A pixel DDPM whose folder ships DDIM as its sampler (as google/ddpm-* ship DDPM's, or SD 1.5 PNDM)."""
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)
    training = DDPMScheduler(**DIGITS_SCHEDULER_CONFIG)
    save_base_model(DiffusionModel(denoiser=unet, scheduler=training, sampling_scheduler=DDIMScheduler.from_config(training.config)), folder)
    return folder


@pytest.mark.parametrize("kind", ["tiny", "tiny-xl", "tiny-sd3", "pixel"])
def test_an_exported_champion_loads_with_its_pipeline_and_the_scheduler_its_base_shipped(kind, tmp_path):
    from sweeps.champion import export_champion
    from trainers import rehearsal

    base_folder = tmp_path / "base"
    if kind == "pixel":
        pixel_base_shipping_ddim(base_folder)
    else:
        save_base_model(rehearsal.build(kind), base_folder)
    base = DiffusionPipeline.from_pretrained(base_folder, **absent_components(base_folder))  # SD3 here ships no T5
    # a training checkpoint as the trainer writes its model (trainers/checkpoint.py), then exported
    checkpoint = tmp_path / "step_000001"
    save_base_model(load_base_model(base_folder), checkpoint / "model")
    (checkpoint / "metrics.json").write_text(json.dumps({"step": 1}))
    out = export_champion(str(checkpoint), tmp_path / "champion")
    exported = DiffusionPipeline.from_pretrained(out, **absent_components(out))
    assert type(exported) is type(base)
    assert type(exported.scheduler) is type(base.scheduler)
    assert dict(exported.scheduler.config) == dict(base.scheduler.config)
    expected = {"tiny": "PNDMScheduler", "tiny-xl": "EulerDiscreteScheduler", "tiny-sd3": "FlowMatchEulerDiscreteScheduler", "pixel": "DDIMScheduler"}
    assert type(base.scheduler).__name__ == expected[kind]
