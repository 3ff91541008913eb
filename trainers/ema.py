"""Exponential moving average of the trainable weights (full model, or LoRA adapters only)."""

from __future__ import annotations

import torch


class Ema:
    def __init__(self, named_parameters: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().clone().float() for name, p in named_parameters.items()}

    @torch.no_grad()
    def update(self, named_parameters: dict[str, torch.nn.Parameter], decay: float | None = None) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights; `decay` overrides the constant for this
        update (a warm-up schedule, as the asset builder uses)."""
        decay = self.decay if decay is None else decay
        for name, p in named_parameters.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> torch.nn.Module:
        """Write the averaged weights into `module` (a copy of the trained model)."""
        params = dict(module.named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value.to(params[name].dtype))
        return module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state is missing {len(missing)} weights (e.g. {sorted(missing)[0]})")
        self.shadow = {name: state[name].float().clone() for name in self.shadow}
