"""Flow-matching models (SD3 / Flux): the parameterisation in its one place, every term on a tiny
SD3-shaped model, the anchor's zero, the flow rollout, the flow samplers, and a tiny Flux-shaped
transformer training a LoRA step with the anchor and a reward."""

import copy
import dataclasses

import pytest
import torch

from eval.sampling import sample_images
from objectives.context import StepContext, X0Source
from objectives.registry import build_objective
from objectives.term import BuildEnv
from tests.objectives.term_specs import term_specs
from tests.tiny_models import build_tiny_flow
from trainers.lora import AdaptersDisabled, add_lora
from trainers.denoiser.noise_process import NoiseProcess

FLOW_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2"]


def prompted(model, conditioning):
    """`model` as sampling sees it, its prompts encoded as `conditioning` (the tiny models have no text encoders)."""
    from types import SimpleNamespace

    encode = lambda prompts: {k: v.expand(len(prompts), *v.shape[1:]) for k, v in conditioning.items()}  # noqa: E731
    return SimpleNamespace(denoiser=model.denoiser, vae=model.vae, process=model.process, text_conditioned=True, encode_prompt=encode)


def flow_context(model, base, x0, conditioning, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator)
    kwargs["process"] = NoiseProcess(kwargs.pop("scheduler").config)
    t = kwargs["process"].draw_timesteps(len(x0), generator)
    return StepContext(x0=x0, noise=noise, t=t, generator=generator, model=model, base=base,
                       conditioning={k: v.expand(len(x0), *v.shape[1:]) for k, v in conditioning.items()}, **kwargs)


def test_the_flow_parameterisation_recovers_x0_eps_and_the_target_from_the_velocity():
    model, _ = build_tiny_flow("sd3")
    process = model.process
    assert process.prediction == "flow_prediction"
    x0, eps = torch.full((2, 1, 2, 2), 0.5), torch.full((2, 1, 2, 2), -1.0)
    t = torch.tensor([250.0, 800.0])  # s = 0.25, 0.8
    s = torch.tensor([0.25, 0.8]).view(-1, 1, 1, 1)
    x_t = process.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, ((1 - s) * 0.5 + s * -1.0).expand_as(x0))  # by hand: 0.125, -0.7
    velocity = process.target(x0, eps, t)
    torch.testing.assert_close(velocity, torch.full_like(x0, -1.5))  # eps - x0
    torch.testing.assert_close(process.x0(velocity, x_t, t), x0)
    torch.testing.assert_close(process.eps(velocity, x_t, t), eps)
    torch.testing.assert_close(process.from_x0(x0, x_t, t), velocity)
    # a wrong velocity gives the x0 and eps it implies: x0 = x_t - s v, eps = x_t + (1 - s) v
    wrong = torch.zeros_like(x0)
    torch.testing.assert_close(process.x0(wrong, x_t, t), x_t)
    torch.testing.assert_close(process.eps(wrong, x_t, t), x_t)


def test_flow_timesteps_are_drawn_logit_normal_and_shifted_as_the_sd3_script_does():
    model, _ = build_tiny_flow("sd3")  # shift 3
    t = model.process.draw_timesteps(4000, torch.Generator().manual_seed(0))
    assert t.dtype.is_floating_point and 0 < t.min() and t.max() <= 1000
    # logit-normal(0, 1) has its median at u = 0.5; shift 3 moves it to sigma = 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert t.median().item() == pytest.approx(750, abs=25)
    uniform = model.process.draw_timesteps(4000, torch.Generator().manual_seed(0), "uniform")
    assert uniform.median().item() == pytest.approx(750, abs=40)  # shifted uniform: median at 3 * 0.5 / 2
    assert (t > 900).float().mean() < (uniform > 900).float().mean()  # logit-normal thins the ends


def test_the_ddpm_draw_is_unchanged():
    from trainers.models import build_digits_scheduler

    process = NoiseProcess(build_digits_scheduler().config)
    drawn = process.draw_timesteps(8, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="timestep_density: .logit_normal. is for flow models"):
        process.draw_timesteps(8, torch.Generator(), "logit_normal")


@pytest.mark.parametrize("sampler", ["euler", "dpm_solver"])
def test_flow_sampling_with_a_perfect_velocity_lands_on_the_image(sampler):
    """A model that knows x0 outputs the velocity (x_t - x0) / s at every step; the flow samplers must
    then end on x0 (the path is straight), whatever the step count."""
    target = torch.linspace(-0.8, 0.8, 16 * 64).view(1, 16, 8, 8)

    class Oracle(torch.nn.Module):
        config = type("Config", (), {"in_channels": 16, "sample_size": 8})

        def forward(self, x, t, **_):
            s = (t.float() / 1000).view(-1, 1, 1, 1)
            return type("Out", (), {"sample": (x - target) / s})()

    model, _ = build_tiny_flow("sd3")
    oracle = dataclasses.replace(model, denoiser=Oracle(), vae=None)
    for steps in (4, 10):
        latents = sample_images(oracle, 2, steps=steps, sampler=sampler, seed=0)  # pixel space: [0, 1] of the clamp
        torch.testing.assert_close(latents, ((target.clamp(-1, 1) + 1) / 2).expand(2, -1, -1, -1), atol=2e-3, rtol=0)


@pytest.mark.parametrize("sampler", ["euler", "dpm_solver"])
def test_flux_dynamic_shift_follows_the_latent_size(sampler):
    model, _ = build_tiny_flow("flux")
    small, large = (model.process.sampler(sampler, latent_size=size) for size in (8, 128))
    small.set_timesteps(4), large.set_timesteps(4)
    assert large.sigmas[1] > small.sigmas[1]  # more patches: more time at high noise, as FluxPipeline shifts


@pytest.fixture(scope="module")
def latents():
    from trainers.image_sets import DigitsDataset, images_only

    model, _ = build_tiny_flow("sd3")
    with torch.no_grad():
        return model.vae.encode(images_only(DigitsDataset("train"))[:4]).latent_dist.mean


@pytest.mark.parametrize("case", ["denoise", "anchor", "nr_iqa", "nr_iqa_sampled", "lpips_x0", "self_perceptual", "pefl", "pefl_rollout",
                                  "decoupled_rewards", "decoupled_rewards_rollout", "adversarial", "adversarial_rollout"])
def test_every_term_trains_a_flow_transformer(case, specs, latents):
    base_model, conditioning = build_tiny_flow("sd3")
    base = base_model.denoiser.requires_grad_(False)
    model = copy.deepcopy(base).requires_grad_(True)
    with torch.no_grad():  # drifted a little, so the anchor is not at its 0
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    name = case.removesuffix("_sampled").removesuffix("_rollout")
    options = term_specs(specs)[case]
    env = BuildEnv(model_channels=16, image_channels=1, process=NoiseProcess(build_tiny_flow("sd3")[0].scheduler.config))
    objective = build_objective({name: {"weight": 1.0, **options}}, env)
    ctx = flow_context(model, base, latents, conditioning, scheduler=base_model.scheduler, vae=base_model.vae,
                       rollout_model=objective.wrap_for_rollouts(model, base_model.scheduler.config))
    total, parts = objective(ctx)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
    total.backward()
    moved = [p.grad for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    if name == "lpips_x0":  # the cascade's head learns; the transformer does not (stop-gradient)
        assert not moved and any(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.trainable_parameters())
    else:
        assert moved, f"{case}: no gradient reached the transformer"
    assert all(p.grad is None for p in base.parameters())


def test_the_flow_anchor_is_zero_at_the_base_and_positive_after_one_step(specs, latents):
    base_model, conditioning = build_tiny_flow("sd3")
    model = add_lora(base_model.denoiser, 4, targets=FLOW_LORA_TARGETS)
    frozen = AdaptersDisabled(model)
    objective = build_objective({"anchor": 1.0, "nr_iqa": {"weight": 1.0, "metric": specs["cnniqa"]}},
                                BuildEnv(model_channels=16, image_channels=1, process=NoiseProcess(build_tiny_flow("sd3")[0].scheduler.config)))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)

    def step_context(seed):
        return flow_context(model, frozen, latents, conditioning, seed=seed, scheduler=base_model.scheduler, vae=base_model.vae)

    _, parts = objective(step_context(0))
    assert parts["anchor"].item() == 0.0  # LoRA's B starts at zero: the model is its base
    total, _ = objective(step_context(1))
    total.backward()
    optimizer.step()
    with torch.no_grad():
        _, parts = objective(step_context(2))
    assert parts["anchor"].item() > 0


def test_a_flow_rollout_stops_in_its_window_with_gradients_in_the_last_steps(latents):
    base_model, conditioning = build_tiny_flow("sd3")
    calls = []

    class Recording(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x, t, **kwargs):
            calls.append((t.detach().clone(), torch.is_grad_enabled()))
            return self.module(x, t, **kwargs)

    source = X0Source.from_options({"source": "rollout", "sampling_steps": 8, "stop_low": 5, "stop_high": 6, "feedback_steps": 2})
    stops = set()
    for seed in range(8):
        calls.clear()
        ctx = flow_context(Recording(base_model.denoiser), None, latents, conditioning, seed=seed, scheduler=base_model.scheduler)
        x0 = ctx.generated(source)
        stop = len(calls) - 1
        assert 5 <= stop <= 6 and [grad for _, grad in calls] == [False] * (stop - 1) + [True, True]
        assert calls[0][0][0].item() == pytest.approx(1000.0)  # the flow schedule starts from pure noise (sigma 1)
        assert x0.requires_grad and x0.shape == latents.shape
        stops.add(stop)
    assert stops == {5, 6}


def test_a_tiny_flux_transformer_trains_a_lora_step_with_the_anchor_and_a_reward_and_samples(specs, latents):
    model, conditioning = build_tiny_flow("flux")
    unet = add_lora(model.denoiser, 4, targets=FLOW_LORA_TARGETS + ["ff_context.net.0.proj", "ff_context.net.2"])
    frozen = AdaptersDisabled(unet)
    objective = build_objective({"denoise": 1.0, "anchor": 1.0, "nr_iqa": {"weight": 1.0, "metric": specs["cnniqa"],
                                                                           "x0": {"source": "sampled", "sampling_steps": 2}}},
                                BuildEnv(model_channels=16, image_channels=1, process=NoiseProcess(build_tiny_flow("sd3")[0].scheduler.config)))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ctx = flow_context(unet, frozen, latents, conditioning, scheduler=model.scheduler, vae=model.vae)
    total, parts = objective(ctx)
    assert set(parts) >= {"denoise", "anchor", "nr_iqa"} and torch.isfinite(total)
    total.backward()
    optimizer.step()
    assert any(not torch.equal(p, b) for p, b in zip(trainable, before))
    images = sample_images(prompted(dataclasses.replace(model, denoiser=unet), conditioning), 2, steps=2, seed=0, prompts=["a", "b"])
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


def test_the_kind_is_read_from_the_scheduler_class_not_its_keys():
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from trainers.denoiser.noise_process import is_flow_config

    # DPM-Solver's and UniPC's configs carry use_dynamic_shifting and flow_shift: an SD 1.5 that ships one is still a DDPM model
    assert not any(is_flow_config(kind().config) for kind in (DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler))
    assert is_flow_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)


def test_flux_sampling_steps_are_fluxpipelines():
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    model, _ = build_tiny_flow("flux")
    ours = model.process.sampler("euler", latent_size=128)  # 1024 px: 4096 patches
    ours.set_timesteps(28)
    theirs = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
    retrieve_timesteps(theirs, 28, "cpu", sigmas=np.linspace(1.0, 1 / 28, 28), mu=calculate_shift(4096))  # as FluxPipeline.__call__
    torch.testing.assert_close(ours.timesteps, theirs.timesteps)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas)


def test_a_cascade_samples_on_bf16_weights():
    """model.weights_dtype: bf16: sampling hands the fp32 Cas-DM head bf16 tensors; it computes in fp32."""
    from trainers.denoiser.cascade import CascadedDenoiser, CascadedX0Head

    model, conditioning = build_tiny_flow("sd3")
    model.denoiser.to(torch.bfloat16)
    cascade = CascadedDenoiser(model.denoiser, CascadedX0Head(16), model.scheduler.config)
    model = dataclasses.replace(model, denoiser=cascade, vae=model.vae.to(torch.bfloat16))
    images = sample_images(prompted(model, {k: v.bfloat16() for k, v in conditioning.items()}), 2, steps=2, prompts=["a"])
    assert images.shape == (2, 1, 16, 16) and images.dtype == torch.float32 and torch.isfinite(images).all()


def test_rollouts_refuse_a_sampler_whose_state_is_not_the_sample_or_that_names_another_kind():
    from trainers.common.errors import OptionError
    from trainers.models import build_digits_scheduler

    with pytest.raises(OptionError, match="x0.sampler: expected one of ddim, dpm_solver for this ddpm model, got 'euler'"):
        X0Source.from_options({"source": "sampled", "sampler": "euler"}).check(NoiseProcess(build_digits_scheduler().config))
    with pytest.raises(OptionError, match="x0.sampler: ddim is a DDPM-family sampler; this flow model samples with euler"):
        X0Source.from_options({"source": "sampled", "sampler": "ddim"}).check(build_tiny_flow("sd3")[0].process)
    with pytest.raises(OptionError, match="x0.sampler: expected one of ddim, dpm_solver, euler, got 'heun'"):
        X0Source.from_options({"source": "sampled", "sampler": "heun"})
