"""LoRA through peft, on any diffusers UNet (UNet2DModel has no adapter mixin, so peft injects the
layers directly), and the frozen base as "the same network with its adapters disabled".

The anchor needs the base model's prediction; with LoRA the base weights never change, so turning
the adapters off reproduces the base exactly (bit for bit) without holding a second copy.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

# Attention projections (what SD LoRAs adapt) plus the ResNet convolutions: the digits UNet has a
# single attention level, so attention-only LoRA would barely move it.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


def add_lora(denoiser: torch.nn.Module, rank: int = 4, alpha: float | None = None, targets=DEFAULT_TARGETS) -> torch.nn.Module:
    """Inject LoRA adapters in place; afterwards only adapter weights require grad. lora_B starts at
    zero, so the adapted model starts equal to the base."""
    denoiser.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(targets)), denoiser)
    for name, parameter in denoiser.named_parameters():
        parameter.requires_grad_("lora_" in name)
    # peft makes adapters in the base layer's dtype: on bf16 weights (model.weights_dtype) they are fp32 anyway, in
    # training and when a checkpoint is loaded back, as diffusers' LoRA scripts keep them
    cast_training_params(denoiser, torch.float32)
    return denoiser


class AdaptersDisabled(torch.nn.Module):
    """Calls `module` with every LoRA layer bypassed: the frozen base, sharing the base weights."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
        if not self.layers:
            raise ValueError("AdaptersDisabled: the model has no LoRA layers")

    def forward(self, *args, **kwargs):
        trainable = {id(p): p.requires_grad for p in self.module.parameters()}
        for layer in self.layers:
            layer.enable_adapters(False)
        try:
            return self.module(*args, **kwargs)
        finally:
            for layer in self.layers:
                layer.enable_adapters(True)
            # peft's enable/disable toggles requires_grad on adapters; put back exactly what it was
            for p in self.module.parameters():
                p.requires_grad_(trainable[id(p)])


def merge_lora(denoiser: torch.nn.Module) -> torch.nn.Module:
    """Fold the adapters into the base weights and drop the LoRA layers, in place: a plain UNet
    again, which saves in diffusers layout (for exporting a LoRA champion)."""
    for name, module in list(denoiser.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(denoiser.get_submodule(parent_name) if parent_name else denoiser, child, module.get_base_layer())
    return denoiser
