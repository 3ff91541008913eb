"""Cas-DM's cascade (An et al. 2024, arXiv 2401.02414): a cascaded x0 head on the model's network, part
of the model. The head and the denoiser that samples through it live here, with the model; the loss that
trains the head (LPIPS on its x0) is `objectives/lpips_x0.py`, whose docstring says how the cascade
follows and departs from the paper.

`CascadedDenoiser` is the network and its head as one denoiser with the network's call signature: its
output is the prediction (of the model's type) implied by the cascaded x0, so any sampler samples with
the cascade at every step. It is saved beside a diffusers pipeline as `cascade/`.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
from safetensors.torch import save_file

from trainers.denoiser.noise_process import NoiseProcess


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


def sample_clip(scheduler_config) -> float | None:
    return float(scheduler_config.get("clip_sample_range", 1.0)) if scheduler_config.get("clip_sample", False) else None


class CascadedDenoiser(nn.Module):
    """The eps-module and its cascaded x0 head as one denoiser with the UNet's call signature: its
    output is the prediction (of the scheduler's type) implied by the cascaded x0, so any diffusers
    scheduler samples with the cascade at every step. Saved beside a diffusers pipeline as `cascade/`."""

    def __init__(self, network: nn.Module, head: CascadedX0Head, scheduler_config, train_head: bool = True):
        super().__init__()
        self.network, self.head = network, head
        self.process = NoiseProcess(scheduler_config)
        self.clip = sample_clip(scheduler_config)
        # False in other terms' training rollouts: their gradient reaches the eps-module through the
        # cascade, as sampling sees it, but not the head, which learns from lpips_x0 alone
        self.train_head = train_head

    @property
    def config(self):  # what samplers read: sample_size, in_channels
        return self.network.config

    @property
    def device(self):
        return self.network.device

    @property
    def dtype(self):
        return self.network.dtype

    def forward(self, x_t, t, **conditioning):
        t = t.to(x_t.device).expand(len(x_t)) if t.dim() == 0 else t
        prediction = self.network(x_t, t, **conditioning).sample
        estimate = self.process.x0(prediction, x_t, t)
        head = self.head
        if not self.train_head:
            weights = {name: value.detach() for name, value in self.head.named_parameters()}
            head = lambda *inputs: torch.func.functional_call(self.head, weights, inputs)  # noqa: E731
        # the head is fp32 (it trains): with bf16 weights (model.weights_dtype) sampling hands it bf16 tensors
        x_t, estimate = x_t.float(), estimate.float()
        x0 = cascaded_x0(head, x_t, estimate, t, self.process.num_train_timesteps, self.clip)
        return SimpleNamespace(sample=self.process.from_x0(x0, x_t, t).to(prediction.dtype))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps({"_class_name": "CascadedX0Head", "source": "trainers/denoiser/cascade.py",
                                                        **self.head.settings()}, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, network: nn.Module, scheduler_config) -> "CascadedDenoiser":
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
        return cls(network, head.to(next(network.parameters()).device), scheduler_config)


def core_denoiser(denoiser: nn.Module) -> nn.Module:
    """The network itself (a UNet or a FlowTransformer), inside a CascadedDenoiser or not: where weights, LoRA and EMA go."""
    return denoiser.network if isinstance(denoiser, CascadedDenoiser) else denoiser
