import pytest
import torch

from objectives.context import StepContext
from objectives.denoise import Denoise
from objectives.registry import build_objective
from trainers.common.errors import ObjectiveError
from trainers.models import build_digits_scheduler, build_digits_unet
from trainers.denoiser.noise_process import NoiseProcess


class CountingModel(torch.nn.Module):
    """Wraps a UNet and counts forward calls (the shared-forward contract)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.unet(*args, **kwargs)


def _context(model, prediction_type="epsilon", n=4):
    torch.manual_seed(0)
    scheduler = build_digits_scheduler()
    scheduler.register_to_config(prediction_type=prediction_type)
    return StepContext(model=model, process=NoiseProcess(scheduler.config), x0=torch.rand(n, 1, 16, 16) * 2 - 1,
                       noise=torch.randn(n, 1, 16, 16), t=torch.tensor([5, 200, 600, 990][:n]))


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_digits_unet(block_out_channels=(8, 16, 16), norm_num_groups=4)


def test_denoise_is_per_sample_and_trains_the_model(unet):
    model = CountingModel(unet)
    ctx = _context(model)
    loss = Denoise()(ctx)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)
    unet.zero_grad()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoise_is_zero_for_a_perfect_prediction(prediction_type):
    ctx = _context(None, prediction_type)
    alphas = ctx.process.scheduler.alphas_cumprod[ctx.t].view(-1, 1, 1, 1)
    target = {"epsilon": ctx.noise, "sample": ctx.x0, "v_prediction": alphas.sqrt() * ctx.noise - (1 - alphas).sqrt() * ctx.x0}[prediction_type]
    ctx.__dict__["prediction"] = target.clone()  # what a perfect model would output
    assert Denoise()(ctx).abs().max() < 1e-10
    ctx.__dict__["prediction"] = target + 0.1
    assert torch.allclose(Denoise()(ctx), torch.full((4,), 0.01), atol=1e-6)


def test_min_snr_downweights_low_noise_steps():
    ctx = _context(None)
    ctx.__dict__["prediction"] = ctx.noise + 0.1  # the same error at every t
    plain, weighted = Denoise()(ctx), Denoise(min_snr_gamma=5.0)(ctx)
    ratio = weighted / plain
    assert ratio[0] < 0.01  # t=5: SNR in the thousands, clamped to 5
    assert ratio[-1] == pytest.approx(1.0, abs=1e-4)  # t=990: SNR < 5, untouched
    assert (ratio[:-1] <= ratio[1:] + 1e-6).all()


def test_objective_shares_one_forward_and_weights_terms(unet):
    model = CountingModel(unet)
    objective = build_objective({"denoise": {"weight": 0.5}})
    ctx = _context(model)
    total, parts = objective(ctx)
    total2, _ = objective(ctx)  # second pass over the same step: no new forward
    assert model.calls == 1
    assert total.item() == pytest.approx(0.5 * parts["denoise"].item())
    assert total2.item() == pytest.approx(total.item())


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"lpips": 1.0}, r"objective.lpips: unknown term"),
        ({"denoise": -0.1}, r"objective.denoise.weight: expected a number >= 0"),
        ({"denoise": {"weight": "high"}}, r"objective.denoise.weight"),
        ({"denoise": {"min_snr": 5}}, r"objective.denoise.min_snr: unknown option"),
        ({"denoise": {"min_snr_gamma": -1}}, r"objective.denoise.min_snr_gamma: expected a finite number >= 0"),
        ({}, r"objective: expected a non-empty mapping"),
    ],
)
def test_bad_objectives_name_the_field(spec, message):
    with pytest.raises(ObjectiveError, match=message):
        build_objective(spec)
