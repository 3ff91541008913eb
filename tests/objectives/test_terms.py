"""Every loss term on tiny models with the digits stand-ins: gradients go where they should, the
special cases hold exactly, and shared pieces are computed once."""

import copy

import pytest
import torch

from trainers.image_sets import DigitsDataset, images_only
from eval.quality import QualityModel, load_quality_model
from objectives.context import StepContext
from objectives.registry import TERMS, build_objective, validate_objective
from trainers.common.errors import ObjectiveError
from objectives.term import BuildEnv
from tests.objectives.term_specs import term_specs
from trainers.lora import AdaptersDisabled, add_lora
from trainers.models import build_digits_scheduler, build_digits_unet
from trainers.denoiser.noise_process import NoiseProcess


class Counting(torch.nn.Module):
    """Wraps a module; records whether grad was enabled at each forward call."""

    def __init__(self, module, attribute=None):
        super().__init__()
        self.module, self.grad_modes = module, []

    @property
    def calls(self):
        return len(self.grad_modes)

    def forward(self, *args, **kwargs):
        self.grad_modes.append(torch.is_grad_enabled())
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


@pytest.fixture(scope="module")
def digits():
    return images_only(DigitsDataset("train"))[:6]


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return build_digits_unet(block_out_channels=(8, 16, 16), norm_num_groups=4)


def make_context(model, base, x0, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, 1000, (len(x0),), generator=generator)
    return StepContext(model=model, process=NoiseProcess(kwargs.pop("scheduler", build_digits_scheduler()).config), x0=x0, noise=noise, t=t,
                       base=base, generator=generator, **kwargs)


@pytest.mark.parametrize("case", ["denoise", "anchor", "nr_iqa", "nr_iqa_sampled", "lpips_x0", "self_perceptual", "pefl", "pefl_rollout",
                                  "pefl_segmentation", "decoupled_rewards", "decoupled_rewards_rollout", "adversarial", "adversarial_rollout"])
def test_every_term_is_finite_and_trains_only_what_it_should(case, specs, digits):
    base = tiny_unet().requires_grad_(False)
    model = copy.deepcopy(base).requires_grad_(True)
    with torch.no_grad():  # the trainable model has drifted a little, so the anchor is not at its 0
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    name = case.removesuffix("_sampled").removesuffix("_rollout")
    objective = build_objective({name: {"weight": 1.0, **term_specs(specs)[case]}})
    term = objective.terms[name][1]
    ctx = make_context(model, base, digits)
    total, parts = objective(ctx)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
    total.backward()

    own = objective.trainable_parameters()
    model_grads = [p.grad for p in model.parameters()]
    if name == "lpips_x0":  # the metric trains the cascaded head only
        assert all(g is None or not g.any() for g in model_grads)
        assert own and any(p.grad is not None and p.grad.abs().sum() > 0 for p in own)
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in model_grads)
    helpers = [getattr(term, attribute) for attribute in ("quality", "network", "distance", "discriminator", "segmenter")
               if isinstance(getattr(term, attribute, None), torch.nn.Module)] + list(getattr(term, "models", {}).values())
    helper_parameters = [p for helper in helpers for p in helper.parameters()]
    # every term that judges images holds a frozen network; denoise, anchor and self_perceptual hold none
    assert bool(helper_parameters) == (name not in ("denoise", "anchor", "self_perceptual"))
    assert all(p.grad is None for p in list(base.parameters()) + helper_parameters), "a frozen network received a gradient"
    assert term.needs_base == (name in ("anchor", "self_perceptual"))


def test_shared_pieces_are_computed_once_per_step(specs, digits):
    base, model = Counting(tiny_unet().requires_grad_(False)), Counting(tiny_unet(1))
    s = term_specs(specs)
    objective = build_objective({"denoise": 1.0, "anchor": 0.5, "nr_iqa": {"metric": specs["cnniqa"]}, "pefl": s["pefl"],
                                 "lpips_x0": s["lpips_x0"], "self_perceptual": 0.1, "decoupled_rewards": s["decoupled_rewards"]})
    objective(make_context(model, base, digits))
    # the step's own t (denoise, anchor, lpips_x0), and one forward at t in the default [0, T/2) shared by
    # nr_iqa, pefl, self_perceptual and decoupled_rewards, which name no range
    assert model.calls == 2
    assert base.calls == 3  # anchor's prediction once; self_perceptual's two feature passes

    model.grad_modes.clear()
    low = {"source": "one_step", "t_range": [0, 400]}
    objective = build_objective({"denoise": 1.0, "nr_iqa": s["nr_iqa"], "pefl": {**s["pefl"], "x0": low},
                                 "decoupled_rewards": {**s["decoupled_rewards"], "x0": low}})
    objective(make_context(model, None, digits))
    assert model.calls == 2  # the step's own t, plus one forward at t in [0, 400) shared by three terms

    model.grad_modes.clear()
    sampled = {"x0": {"source": "sampled", "sampling_steps": 4, "feedback_steps": 2}}
    objective = build_objective({"nr_iqa": {"metric": specs["cnniqa"], **sampled},
                                 "decoupled_rewards": {**s["decoupled_rewards"], **sampled}})
    objective(make_context(model, None, digits))
    assert model.grad_modes == [False, False, True, True]  # one sampling run, graph only in the last 2 steps


def test_a_vae_decode_happens_once_per_tensor(specs, digits):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=1, block_out_channels=(8,), norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).requires_grad_(False)
    decodes = []
    original = vae.decode
    vae.decode = lambda z, *a, **k: (decodes.append(1), original(z, *a, **k))[1]
    model = tiny_unet()
    objective = build_objective({"nr_iqa": {"metric": specs["cnniqa"]}, "decoupled_rewards": term_specs(specs)["decoupled_rewards"],
                                 "pefl": term_specs(specs)["pefl"]})
    total, _ = objective(make_context(model, None, digits, vae=vae))
    total.backward()
    assert len(decodes) == 2  # the shared x0 estimate once, the real x0 once
    assert any(p.grad is not None for p in model.parameters())  # gradients pass through the decoder


def test_anchor_is_zero_for_the_base_and_grows_with_divergence(digits):
    base = tiny_unet().requires_grad_(False)
    anchor = TERMS["anchor"]()
    values = []
    for scale in (0.0, 1e-3, 1e-2, 1e-1):
        model = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn(p.shape, generator=generator))
        values.append(anchor(make_context(model, base, digits)).mean().item())
    assert values[0] == 0.0
    assert values[0] < values[1] < values[2] < values[3]


def test_lora_base_is_the_model_with_adapters_disabled_bit_for_bit(digits):
    base = tiny_unet().requires_grad_(False).eval()
    model = add_lora(copy.deepcopy(base)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # as after some training
    x, t = torch.randn(4, 1, 16, 16), torch.tensor([1, 10, 500, 999])
    with torch.no_grad():
        reference, adapted = base(x, t).sample, model(x, t).sample
        disabled = AdaptersDisabled(model)(x, t).sample
        again = model(x, t).sample
    assert torch.equal(disabled, reference)
    assert not torch.allclose(adapted, reference)
    assert torch.equal(again, adapted)  # adapters are back on afterwards
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in dict(model.named_parameters()) if "lora_" in n}
    ctx = make_context(model.train(), AdaptersDisabled(model), digits)
    loss = TERMS["anchor"]()(ctx).mean()
    loss.backward()
    assert loss > 0 and all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


class ImageAsPrediction(torch.nn.Module):
    """A "model" whose prediction (type `sample`) is a learnable image: gradient steps on the image."""

    def __init__(self, images):
        super().__init__()
        self.image = torch.nn.Parameter(images.clone())

    def forward(self, x_t, t, **_):
        return type("Out", (), {"sample": self.image})()


def _sample_scheduler():
    scheduler = build_digits_scheduler()
    scheduler.register_to_config(prediction_type="sample")
    return scheduler


def _blurred(digits):
    from assets.degradations import degrade

    return degrade((digits + 1) / 2, "gaussian_blur", torch.full((len(digits),), 0.7), torch.Generator().manual_seed(0)) * 2 - 1


def test_nr_iqa_gradient_steps_raise_the_quality_score(specs, digits):
    term = build_objective({"nr_iqa": {"metric": specs["cnniqa"]}}).terms["nr_iqa"][1]
    model = ImageAsPrediction(_blurred(digits))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    scores = []
    for _ in range(15):
        loss = term(make_context(model, None, digits, scheduler=_sample_scheduler())).mean()
        scores.append(-loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert scores[-1] > scores[0] + 0.05


def test_nr_iqa_follows_a_lower_is_better_metric(specs, digits):
    term = build_objective({"nr_iqa": {"metric": specs["cnniqa"]}}).terms["nr_iqa"][1]
    cnniqa = term.quality

    class Badness(torch.nn.Module):  # lower is better: minus the quality score
        def forward(self, x):
            return -cnniqa.net(x)

    term.quality = QualityModel("badness", Badness(), lower_better=True, in_channels=3)
    model = ImageAsPrediction(_blurred(digits))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    with torch.no_grad():
        start = term.quality((model.image + 1) / 2).mean().item()
    for _ in range(15):
        loss = term(make_context(model, None, digits, scheduler=_sample_scheduler())).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        end = term.quality((model.image + 1) / 2).mean().item()
    assert end < start - 0.05  # optimized downwards, as the metric asks


def test_nr_iqa_hinge_stops_at_the_target(specs, digits):
    model = ImageAsPrediction(digits)
    scheduler = _sample_scheduler()
    quality = load_quality_model(specs["cnniqa"])
    with torch.no_grad():
        scores = quality((digits + 1) / 2)
    low = build_objective({"nr_iqa": {"metric": specs["cnniqa"], "target": float(scores.min()) - 0.01}}).terms["nr_iqa"][1]
    high = build_objective({"nr_iqa": {"metric": specs["cnniqa"], "target": float(scores.max()) + 0.01}}).terms["nr_iqa"][1]
    assert (low(make_context(model, None, digits, scheduler=scheduler)) == 0).all()
    assert (high(make_context(model, None, digits, scheduler=scheduler)) > 0).all()


def test_self_perceptual_is_zero_for_a_perfect_x0(digits):
    base = tiny_unet().requires_grad_(False)
    term = TERMS["self_perceptual"]()
    exact = make_context(ImageAsPrediction(digits), base, digits, scheduler=_sample_scheduler())
    assert term(exact).abs().max().item() == 0.0
    off = make_context(ImageAsPrediction(digits + 0.3), base, digits, scheduler=_sample_scheduler())
    assert (term(off) > 0).all()


@pytest.mark.parametrize("prediction_type, default_range", [("epsilon", (0, 500)), ("v_prediction", (0, 1000)), ("sample", (0, 1000))])
def test_self_perceptual_takes_x0_where_the_prediction_type_allows(digits, prediction_type, default_range):
    # the paper's every-t choice for v- and sample-prediction; [0, T/2) only guards an epsilon model's x0
    scheduler = build_digits_scheduler()
    scheduler.register_to_config(prediction_type=prediction_type)
    model, base = tiny_unet(), tiny_unet(1).requires_grad_(False)
    term = TERMS["self_perceptual"]()
    assert term.x0_range(make_context(model, base, digits, scheduler=scheduler)) == default_range
    by_default = term(make_context(model, base, digits, scheduler=scheduler))
    named = TERMS["self_perceptual"](x0_t_range=list(default_range))(make_context(model, base, digits, scheduler=scheduler))
    other = (0, 1000) if default_range == (0, 500) else (0, 500)
    elsewhere = TERMS["self_perceptual"](x0_t_range=list(other))(make_context(model, base, digits, scheduler=scheduler))
    assert torch.equal(by_default, named) and not torch.allclose(by_default, elsewhere)


def test_the_anchor_acts_where_it_is_told(specs, digits):
    from objectives.anchor import noise_distance

    base, model = tiny_unet().requires_grad_(False), tiny_unet(1)
    nr_iqa = {"metric": specs["cnniqa"], "x0": {"t_range": [0, 400]}}
    for at in ("denoise", "feedback", "both"):
        objective = build_objective({"anchor": {"weight": 1.0, "at": at}, "nr_iqa": nr_iqa})  # listed first, run after
        ctx = make_context(model, base, digits)
        _, parts = objective(ctx)
        [point] = ctx.feedback_points  # NR-IQA's one-step forward, at its low t
        assert (point.t < 400).all() and point.output.requires_grad
        with torch.no_grad():
            at_feedback = noise_distance(point.output, base(point.x_t, point.t).sample, point.x_t, point.t, ctx.process)
            at_denoise = noise_distance(ctx.prediction, ctx.base_prediction, ctx.x_t, ctx.t, ctx.process)
        assert not torch.allclose(at_feedback, at_denoise)
        expected = {"denoise": at_denoise, "feedback": at_feedback, "both": (at_denoise + at_feedback) / 2}[at]
        assert parts["anchor"].item() == pytest.approx(expected.mean().item(), rel=1e-5)
    # no feedback term this step: `feedback` falls back to the denoise step's (x_t, t)
    ctx = make_context(model, base, digits)
    _, parts = build_objective({"denoise": 1.0, "anchor": {"at": "feedback"}})(ctx)
    with torch.no_grad():
        assert parts["anchor"].item() == pytest.approx(noise_distance(ctx.prediction, ctx.base_prediction, ctx.x_t, ctx.t,
                                                                      ctx.process).mean().item(), rel=1e-5)
    with pytest.raises(ObjectiveError, match=r"objective.anchor.at: expected one of denoise, feedback, both"):
        validate_objective({"anchor": {"at": "everywhere"}})


def test_the_cascade_is_built_on_a_bounded_estimate():
    # near t ~ T the estimate is amplified noise: the head sees it bounded and the cascade starts from
    # it bounded, so the head's MSE is not that noise's (which no correction can undo)
    from trainers.denoiser.cascade import LATENT_RANGE, CascadedX0Head, cascaded_x0

    head, seen = CascadedX0Head(4, width=8), []
    head.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[1]))
    estimate = torch.cat([100 * torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)])  # t ~ T, and a clean-ish one
    x0 = cascaded_x0(head, torch.randn(2, 4, 8, 8), estimate, torch.tensor([999, 10]), 1000, clip=None)
    assert seen[0].abs().max() == LATENT_RANGE and x0.abs().max() == LATENT_RANGE
    assert torch.equal(x0[1], estimate[1])  # the identity head within the range: the estimate itself
    x0 = cascaded_x0(head, torch.randn(2, 4, 8, 8), estimate, torch.tensor([999, 10]), 1000, clip=1.0)
    assert seen[1].abs().max() == 1.0 and x0.abs().max() == 1.0  # a clipping (pixel) scheduler: the data range


def test_with_lpips_x0_the_other_terms_roll_out_through_the_cascade(specs, digits):
    # training and sampling must see the same denoiser: Cas-DM's head sits in every rollout step
    model = tiny_unet(1)
    objective = build_objective({"denoise": 1.0, "lpips_x0": {"metric": specs["network"]},
                                 "pefl": {"network": specs["network"], "x0": {"sampling_steps": 6, "start": 2, "stop_low": 4, "stop_high": 5}}})
    head = objective.terms["lpips_x0"][1].head
    with torch.no_grad():  # a head that is not the identity, so going through it shows in x0
        head.net[-1].weight.normal_(0, 0.1)
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    scheduler = build_digits_scheduler()
    ctx = make_context(model, None, digits, scheduler=scheduler, rollout_model=objective.wrap_for_rollouts(model, scheduler.config))
    pefl = objective.terms["pefl"][1]
    x0 = ctx.generated(pefl.source)
    assert len(calls) in (3, 4)  # steps 2..stop (4 or 5) of the schedule, each through the head
    bare = make_context(model, None, digits, scheduler=scheduler).generated(pefl.source)
    assert not torch.allclose(x0, bare)
    # its gradient reaches the eps-module through the cascade, not the head (lpips_x0 alone trains that)
    pefl(ctx)["style"].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(p.grad is None for p in head.parameters())


def test_objective_logs_every_term_and_part(specs, digits):
    objective = build_objective({"denoise": 1.0, "decoupled_rewards": term_specs(specs)["decoupled_rewards"], "pefl": term_specs(specs)["pefl"]})
    _, parts = objective(make_context(tiny_unet(), None, digits))
    assert {"denoise", "decoupled_rewards", "decoupled_rewards/sharp", "decoupled_rewards/clean", "pefl", "pefl/style"} == set(parts)


@pytest.mark.parametrize("spec, message", [
    ({"anchor": -1.0}, r"objective.anchor.weight: expected a number >= 0"),
    ({"perceptual": 1.0}, r"objective.perceptual: unknown term"),
    ({"nr_iqa": {"metric": "not_a_metric"}}, r"objective.nr_iqa.metric: unknown quality model 'not_a_metric'"),
    ({"nr_iqa": {"metric": "musiq", "x0": {"t_range": [400, 0]}}}, r"objective.nr_iqa.x0.t_range: expected \[lo, hi\]"),
    ({"nr_iqa": {"metric": "musiq", "x0": {"t_range": [0]}}}, r"objective.nr_iqa.x0.t_range"),
    ({"nr_iqa": {"metric": "musiq", "x0": {"source": "sampled", "sampling_steps": 2, "feedback_steps": 3}}}, r"objective.nr_iqa.x0.feedback_steps"),
    ({"nr_iqa": {"metric": "musiq", "x0": "one_step", "t_range": [0, 400]}},
     r"^objective.nr_iqa.t_range: moved into objective.nr_iqa.x0 \(x0: \{source: one_step, t_range: ...\}\)$"),
    ({"nr_iqa": {"metric": "musiq", "x0": {"source": "rollout", "stop": 3}}}, r"objective.nr_iqa.x0.stop: unknown option"),
    ({"nr_iqa": {"metric": "musiq", "x0": "tweedie"}}, r"objective.nr_iqa.x0.source: expected one of one_step, sampled, rollout"),
    ({"nr_iqa": {"metric": {"arch": "cnniqa", "weights": "missing.safetensors"}}}, r"objective.nr_iqa.metric.weights: file not found"),
    ({"pefl": {"network": "resnet9000"}}, r"objective.pefl.network: unknown network"),
    ({"pefl_segmentation": {"segmenter": "solo"}}, r"objective.pefl_segmentation.segmenter: unknown segmentation network 'solo'"),
    ({"pefl": {"network": "vgg16", "x0": "sampled"}}, r"objective.pefl.x0.source: a sampled x0 has no real image"),
    ({"decoupled_rewards": {"rewards": {"c": {"model": "musiq", "target": "high"}}}}, r"objective.decoupled_rewards.rewards.c.target"),
    ({"decoupled_rewards": {"rewards": {"c": {"model": "musiq"}}, "prompt_order": "best"}}, r"objective.decoupled_rewards.prompt_order"),
    ({"decoupled_rewards": {"rewards": {}}}, r"objective.decoupled_rewards.rewards"),
    ({"aesthetic": {"rewards": {}}}, r"objective.aesthetic: renamed to objective.decoupled_rewards"),
    ({"decoupled_rewards": {"rewards": {"color": {"model": "musiq", "weight": -1}}}}, r"objective.decoupled_rewards.rewards.color.weight"),
    ({"decoupled_rewards": {"rewards": {"color": {"model": "musiq"}}, "x0": "one_step", "prompts": ["a cat"]}}, r"objective.decoupled_rewards.prompts: .*x0: rollout from noise"),
    ({"decoupled_rewards": {"rewards": {"color": {"model": "musiq"}}, "x0": {"source": "rollout", "start": 2}, "prompts": ["a cat"]}}, r"objective.decoupled_rewards.prompts: .*no start"),
    ({"adversarial": {"discriminator": "musiq", "learning_rate": 0}}, r"objective.adversarial.learning_rate"),
])
def test_bad_terms_fail_at_validation_naming_the_field(spec, message):
    with pytest.raises(ObjectiveError, match=message):
        validate_objective(spec)


def test_t_range_beyond_the_schedule_fails_when_built(specs):
    with pytest.raises(ObjectiveError, match=r"objective.nr_iqa.x0.t_range: upper end 2000 exceeds the model's 1000"):
        build_objective({"nr_iqa": {"metric": specs["cnniqa"], "x0": {"t_range": [0, 2000]}}}, BuildEnv())


def test_prompts_need_a_text_model(specs, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red digit\na blue digit\n")
    spec = {"decoupled_rewards": {"rewards": {"c": {"model": specs["cnniqa"]}}, "x0": "sampled", "prompts": str(prompts)}}
    validate_objective(spec)
    with pytest.raises(ObjectiveError, match=r"objective.decoupled_rewards.prompts: the base model is not text-conditioned"):
        build_objective(spec, BuildEnv(text_conditioned=False))


def test_bad_objective_in_a_config_fails_at_load(specs):
    from trainers.config import Config
    from trainers.common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"objective.nr_iqa.metric: unknown quality model"):
        Config.from_dict({"objective": {"denoise": 1.0, "nr_iqa": {"metric": "nope"}}}).check_references()


class Recording(torch.nn.Module):
    """Wraps a model; records each call's (input, t, grad mode)."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, []

    def forward(self, x, t, **kwargs):
        self.calls.append((x.detach().clone(), t.detach().clone(), torch.is_grad_enabled()))
        return self.module(x, t, **kwargs)


def test_rollout_from_noise_has_gradients_in_the_last_steps_and_a_random_stop_in_the_window(digits):
    from objectives.context import X0Source

    source = X0Source.from_options({"source": "rollout", "sampling_steps": 10, "stop_low": 6, "stop_high": 8, "feedback_steps": 2})
    stops = set()
    for seed in range(12):
        model = Recording(tiny_unet())
        x0 = make_context(model, None, digits, seed=seed).generated(source)
        modes = [grad for _, _, grad in model.calls]
        stop = len(modes) - 1  # from noise: forwards at steps 0..stop
        assert 6 <= stop <= 8 and modes == [False] * (stop - 1) + [True, True]
        assert x0.requires_grad and x0.shape == digits.shape
        stops.add(stop)
    assert stops == {6, 7, 8}  # the stop step varies from one training step to the next


def test_rollout_from_the_real_image_starts_at_the_image_noised_to_start(digits):
    from objectives.context import X0Source

    source = X0Source.from_options({"source": "rollout", "sampling_steps": 10, "start": 3, "stop_low": 7, "stop_high": 7})
    model = Recording(tiny_unet())
    ctx = make_context(model, None, digits, seed=5)
    ctx.generated(source)
    # Replay the step's generator: noise and t (make_context), the stop step, then the rollout's noise.
    generator = torch.Generator().manual_seed(5)
    torch.randn(digits.shape, generator=generator)
    torch.randint(0, 1000, (len(digits),), generator=generator)
    torch.randint(7, 8, (1,), generator=generator)
    noise = torch.randn(digits.shape, generator=generator)
    schedule = ctx.process.sampler("ddim")
    schedule.set_timesteps(10)
    first_input, first_t, _ = model.calls[0]
    assert torch.equal(first_t, schedule.timesteps[3].expand(len(digits)))
    torch.testing.assert_close(first_input, ctx.process.scheduler.add_noise(digits, noise, schedule.timesteps[3].expand(len(digits))))
    assert [grad for _, _, grad in model.calls] == [False] * 4 + [True]  # steps 3..7, the last with gradients


@pytest.mark.parametrize("options, message", [
    ({"source": "rollout", "sampling_steps": 10, "stop_low": 9, "stop_high": 8}, r"x0.stop_low: 9 is above stop_high"),
    ({"source": "rollout", "sampling_steps": 10, "stop_high": 10}, r"x0.stop_high: expected a step index 0..9"),
    ({"source": "rollout", "sampling_steps": 10, "start": 8, "stop_low": 7}, r"x0.start: 8 is after stop_low"),
    ({"source": "one_step", "start": 3}, r"x0.start: only applies to source: rollout"),
])
def test_bad_rollout_options_name_the_field(options, message, specs):
    with pytest.raises(ObjectiveError, match=r"objective.nr_iqa." + message):
        validate_objective({"nr_iqa": {"metric": specs["cnniqa"], "x0": options}})


def test_one_step_without_a_range_stays_in_the_safe_half(specs, digits):
    model = Recording(tiny_unet())
    build_objective({"nr_iqa": {"metric": specs["cnniqa"]}})(make_context(model, None, digits))
    (_, t, _), = model.calls  # nr_iqa alone: only the one-step forward
    assert t.max() < 500  # [0, T/2): the default guard


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_anchor_compares_noise_predictions(prediction_type):
    scheduler = build_digits_scheduler()
    scheduler.register_to_config(prediction_type=prediction_type)
    x0, noise, t = torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), -1.0), torch.tensor([300])
    outputs = {"model": torch.full((1, 1, 2, 2), 0.3), "base": torch.full((1, 1, 2, 2), 0.1)}

    def constant(which):
        return lambda x_t, t, **_: type("Out", (), {"sample": outputs[which]})()

    anchor = TERMS["anchor"]()
    ctx = StepContext(model=constant("model"), base=constant("model"), process=NoiseProcess(scheduler.config), x0=x0, noise=noise, t=t)
    assert anchor(ctx).item() == 0.0  # the base itself: 0, whatever the prediction type
    ctx = StepContext(model=constant("model"), base=constant("base"), process=NoiseProcess(scheduler.config), x0=x0, noise=noise, t=t)
    a = scheduler.alphas_cumprod[300].item()
    # by hand: eps = v * sqrt(a) + x_t * sqrt(1-a) for v; eps = (x_t - sqrt(a) x0) / sqrt(1-a) for sample
    expected = {"epsilon": 0.2 ** 2, "v_prediction": a * 0.2 ** 2, "sample": a / (1 - a) * 0.2 ** 2}[prediction_type]
    assert anchor(ctx).item() == pytest.approx(expected, rel=1e-5)


def test_a_staged_weight_is_zero_before_its_step_and_costs_no_forward(specs, digits):
    objective = build_objective({"denoise": 1.0, "nr_iqa": {"weight": 0.5, "from_step": 3, "metric": specs["cnniqa"],
                                                              "x0": {"t_range": [0, 400]}}})
    for step, forwards in ((2, 1), (3, 2)):
        model = Recording(tiny_unet())
        total, parts = objective(make_context(model, None, digits), step)
        assert len(model.calls) == forwards and ("nr_iqa" in parts) == (step >= 3)
        if step >= 3:
            assert total.item() == pytest.approx(parts["denoise"].item() + 0.5 * parts["nr_iqa"].item(), rel=1e-5)
    schedule = build_objective({"denoise": {"schedule": [[0, 1.0], [5, 0.25], [9, 0.0]]}}).terms["denoise"][0]
    assert [schedule.at(s) for s in (1, 4, 5, 8, 9, 100)] == [1.0, 1.0, 0.25, 0.25, 0.0, 0.0]


@pytest.mark.parametrize("spec, message", [
    ({"denoise": {"weight": 1.0, "from_step": -1}}, r"objective.denoise.from_step: expected an integer >= 0"),
    ({"denoise": {"from_step": 5, "until_step": 5}}, r"objective.denoise.until_step: expected an integer above from_step"),
    ({"denoise": {"schedule": [[5, 1.0], [0, 0.0]]}}, r"objective.denoise.schedule: steps must increase"),
    ({"denoise": {"schedule": [[0, 1.0]], "weight": 2.0}}, r"objective.denoise.schedule: give a schedule or"),
])
def test_bad_schedules_name_the_field(spec, message):
    with pytest.raises(ObjectiveError, match=message):
        validate_objective(spec)
