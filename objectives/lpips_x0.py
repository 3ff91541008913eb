"""lpips_x0 (Cas-DM: An et al. 2024, arXiv 2401.02414, "Bring Metric Functions into Diffusion
Models"): a second, cascaded module predicts the clean image from the eps-module's output; a metric
function (LPIPS by default) is applied to that x0 only, so the eps-module is unaffected.

The cascaded module (`CascadedX0Head`) sees x_t, the eps-module's one-step x0 estimate e (bounded,
below) and t, and predicts a correction to it and a blend weight r_t in (0, 1):

    x0 = r_t * e + (1 - r_t) * (e + correction)

This is the paper's blend `r * x0_eps + (1 - r) * x0_phi` with the x0-module's output written as a
residual on the estimate, `x0_phi = e + correction` (ours: it lets the head start as the identity,
below).
The estimate enters the head detached: no gradient from the metric reaches the eps-module, whose
denoising objective is unchanged. The head is part of the model, not of the loss: the trainer
optimizes and checkpoints it, and sampling, evaluation and the exported model use it at every step
through `CascadedDenoiser`, which returns the prediction implied by the cascaded x0 (for DDIM and
DPM-Solver, the step is formed from the cascaded x0 and the noise implied by it).

Where this departs from the paper: the paper trains both modules from scratch with the metric on the
x0-module; here the eps-module is a pretrained model being fine-tuned (by `denoise`, or not at all)
and the head starts as the identity (zero correction) so that adding it changes nothing (within the
bound) until it has learned. The head is a small convolutional network (`width`, `depth`), not a
second UNet.
The cascade is built on the estimate bounded: to the data range when the scheduler clips samples
(its steps clip the same x0, so sampling is unchanged), else (latent models) to +-8, past any
sampled latent (the digits-t2i base's reach 5.1; a few of its first sampling steps' estimates
exceed 8). Near t = T the estimate is the noise amplified (~650x on the digits schedule, up to
~20,000x on digits-t2i's): unbounded, that error, which no correction can undo, was the head's MSE
(a mean of 357 on digits and of 300 to 2,500 on digits-t2i, against 0.7 and 0.33 for the metric), so
the metric barely trained it; bounded, 0.07 and 0.5 (README, "The rest of issue 28").

Other terms' training-time rollouts and samples (ReFL, PeFL, adversarial) go through the cascade, as
sampling and evaluation do (`wrap_for_rollouts`: their gradient reaches the eps-module through it,
the head stays lpips_x0's alone).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
from safetensors.torch import save_file

from objectives.context import StepContext, prediction_from_x0, training_scheduler, x0_from_prediction
from objectives.networks import PerceptualDistance, check_network_spec
from objectives.term import BuildEnv, OptionError, Term, require_number


class CascadedX0Head(nn.Module):
    """`[N, C, H, W]` x_t and x0 estimate, `[N]` t in [0, 1] -> (correction `[N, C, H, W]`, r `[N, 1, H, W]` in (0, 1))."""

    def __init__(self, channels: int, width: int = 32, depth: int = 2):
        super().__init__()
        self.channels, self.width, self.depth = channels, width, depth
        layers = [nn.Conv2d(2 * channels + 1, width, 3, padding=1), nn.SiLU()]
        for i in range(depth - 1):
            layers += [nn.Conv2d(width, width, 3, padding=2 ** (i % 3 + 1), dilation=2 ** (i % 3 + 1)), nn.SiLU()]
        layers.append(nn.Conv2d(width, channels + 1, 3, padding=1))
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)  # no correction at the start: the cascade is the identity
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x_t, x0_estimate, t_fraction):
        t_map = t_fraction.view(-1, 1, 1, 1).expand(-1, 1, *x_t.shape[2:]).to(x_t.dtype)
        out = self.net(torch.cat([x_t, x0_estimate, t_map], dim=1))
        return out[:, :self.channels], torch.sigmoid(out[:, self.channels:])

    def settings(self) -> dict:
        return {"channels": self.channels, "width": self.width, "depth": self.depth}


LATENT_RANGE = 8.0  # where an unclipped (latent) estimate is bounded: 8 std of scaled latents, past any sampled one


def cascaded_x0(head: CascadedX0Head, x_t, estimate, t, num_train_timesteps: int, clip: float | None) -> torch.Tensor:
    """The cascaded x0 from the eps-module's estimate (the one formula training and sampling share),
    built on the estimate bounded: to the data range when the scheduler clips samples, else (latent
    models) to +-LATENT_RANGE; near t ~ T the estimate is amplified noise."""
    bounded = estimate.clamp(-LATENT_RANGE, LATENT_RANGE) if clip is None else estimate.clamp(-clip, clip)
    correction, r = head(x_t, bounded, t.float() / num_train_timesteps)
    return bounded + (1 - r) * correction


def _clip(scheduler_config) -> float | None:
    return float(scheduler_config.get("clip_sample_range", 1.0)) if scheduler_config.get("clip_sample", False) else None


class CascadedDenoiser(nn.Module):
    """The eps-module and its cascaded x0 head as one denoiser with the UNet's call signature: its
    output is the prediction (of the scheduler's type) implied by the cascaded x0, so any diffusers
    scheduler samples with the cascade at every step. Saved beside a diffusers pipeline as `cascade/`."""

    def __init__(self, unet: nn.Module, head: CascadedX0Head, scheduler_config, train_head: bool = True):
        super().__init__()
        self.unet, self.head = unet, head
        self.scheduler = training_scheduler(scheduler_config)
        self.clip = _clip(scheduler_config)
        # False in other terms' training rollouts: their gradient reaches the eps-module through the
        # cascade, as sampling sees it, but not the head, which learns from lpips_x0 alone
        self.train_head = train_head

    @property
    def config(self):  # what samplers read: sample_size, in_channels
        return self.unet.config

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    def forward(self, x_t, t, **conditioning):
        t = t.to(x_t.device).expand(len(x_t)) if t.dim() == 0 else t
        prediction = self.unet(x_t, t, **conditioning).sample
        estimate = x0_from_prediction(prediction, x_t, t, self.scheduler)
        head = self.head
        if not self.train_head:
            weights = {name: value.detach() for name, value in self.head.named_parameters()}
            head = lambda *inputs: torch.func.functional_call(self.head, weights, inputs)  # noqa: E731
        # the head is fp32 (it trains): with bf16 weights (model.weights_dtype) sampling hands it bf16 tensors
        x_t, estimate = x_t.float(), estimate.float()
        x0 = cascaded_x0(head, x_t, estimate, t, self.scheduler.config.num_train_timesteps, self.clip)
        return SimpleNamespace(sample=prediction_from_x0(x0, x_t, t, self.scheduler).to(prediction.dtype))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"_class_name": "CascadedX0Head", "source": "objectives/lpips_x0.py",
                                                        **self.head.settings()}, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, unet: nn.Module, scheduler_config) -> "CascadedDenoiser":
        from trainers.common.errors import UnreadableFileError
        from trainers.common.weights import read_state_dict

        try:
            settings = json.loads((folder / "config.json").read_text())
            head = CascadedX0Head(settings["channels"], settings["width"], settings["depth"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UnreadableFileError(f"{folder / 'config.json'}: not a Cas-DM head config ({type(error).__name__}: {error})") from None
        state = read_state_dict(folder / "model.safetensors")
        try:
            head.load_state_dict(state)
        except RuntimeError as error:
            raise UnreadableFileError(f"{folder / 'model.safetensors'}: does not fit the head its config describes "
                                      f"({str(error).splitlines()[0]})") from None
        return cls(unet, head.to(next(unet.parameters()).device), scheduler_config)


def core_denoiser(unet: nn.Module) -> nn.Module:
    """The UNet itself, inside a CascadedDenoiser or not (where weights, LoRA and EMA go)."""
    return unet.unet if isinstance(unet, CascadedDenoiser) else unet


class LpipsX0(Term):
    name = "lpips_x0"

    def __init__(self, metric="lpips", mse_weight: float = 1.0, width: int = 32, depth: int = 2):
        check_network_spec(metric, "metric", distances=True)
        self.metric_spec = metric
        self.mse_weight = require_number("mse_weight", mse_weight)  # Cas-DM trains the x0-module on MSE + metric
        for name, value in (("width", width), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(name, f"expected an integer >= 1, got {value!r}")
        self.width, self.depth = width, depth
        self.head = self.distance = None

    def setup(self, env: BuildEnv) -> None:
        self.distance = PerceptualDistance(self.metric_spec, env.device, "metric")
        self.head = CascadedX0Head(env.model_channels, self.width, self.depth).to(env.device)

    def trainable_parameters(self):
        return list(self.head.parameters())

    def state_dict(self):
        return {"head": self.head.state_dict()}

    def load_state_dict(self, state):
        self.head.load_state_dict(state["head"])

    def wrap_for_sampling(self, unet: nn.Module, scheduler_config) -> nn.Module:
        return CascadedDenoiser(unet, self.head, scheduler_config)

    def wrap_for_rollouts(self, unet: nn.Module, scheduler_config) -> nn.Module:
        return CascadedDenoiser(unet, self.head, scheduler_config, train_head=False)

    def x0(self, ctx: StepContext) -> torch.Tensor:
        """The cascaded x0 at the step's (x_t, t), from the eps-module's detached estimate."""
        estimate = ctx.x0_estimate.detach()  # the stop-gradient that keeps the eps-module untouched
        return cascaded_x0(self.head, ctx.x_t, estimate, ctx.t, ctx.num_train_timesteps, _clip(ctx.scheduler.config))

    def __call__(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        x0 = self.x0(ctx)
        parts = {"metric": self.distance((ctx.image(x0) + 1) / 2, (ctx.image(ctx.x0) + 1) / 2)}
        if self.mse_weight > 0:
            parts["mse"] = self.mse_weight * (x0.float() - ctx.x0.float()).pow(2).flatten(1).mean(dim=1)
        return parts
