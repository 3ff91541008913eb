"""Quality and reward models behind one interface: pyiqa metrics by name, prompt-conditioned reward
models (ImageReward, PickScore, HPSv2), or local weights.

`QualityModel(images, prompts=None)` takes `[N, C, H, W]` in [0, 1] (values outside are clamped,
because pyiqa does not check the range in loss mode) and returns a score per image, `[N]`.
`lower_better` says which way is good; callers never guess it from the name. A model with
`prompt_conditioned` set scores how well each image answers its prompt and must be given the
prompts (one per image); image-only models ignore them.

Specs:
- "musiq", "topiq_nr", "clipiqa", "laion_aes", ...: any pyiqa metric; pyiqa downloads its weights.
- {"arch": "cnniqa", "weights": "path.safetensors"}: a pyiqa architecture built by
  `pyiqa.create_metric(arch, pretrained=None)` with our weights loaded into it. We load the weights
  ourselves because pyiqa's loader unpickles (it loads with `weights_only=False`); a `.pth`
  file is read with `weights_only=True`.
- {"arch": "digits_heldout_iqa", "weights": ...}: the held-out digits quality model (its own
  architecture, below), the digits preset's `eval.heldout_quality`.
- "imagereward", "pickscore", "hpsv2": the prompt-conditioned human-preference reward models
  (`eval/prompt_rewards.py`), downloaded from their published sources.
- {"arch": "digits_prompt_agreement", "weights": classifier.safetensors}: the digits-t2i stand-in
  for a prompt-conditioned reward, named for what it is: the digits classifier's probability of the
  digit the prompt names ("prompt agreement", not a preference model); `digits_prompt_accuracy`,
  whether its top class is that digit, is the evaluation's CLIP-score stand-in (no gradient).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn as nn

from assets.digits_networks import DigitsHeldoutIQA, DigitsPromptAccuracy, DigitsPromptAgreement
from trainers.common.errors import OptionError, UnreadableFileError  # noqa: F401 - callers catch them from here too
from trainers.common.weights import read_state_dict


LOCAL_ARCHS = {"digits_heldout_iqa": DigitsHeldoutIQA, "digits_prompt_agreement": DigitsPromptAgreement,
               "digits_prompt_accuracy": DigitsPromptAccuracy}


class QualityModel(nn.Module):
    """A no-reference quality model; `forward` returns `[N]` scores. Gradients flow when the
    caller enables them (the `nr_iqa` loss); evaluation wraps calls in `torch.no_grad()`."""

    def __init__(self, name: str, net: nn.Module, lower_better: bool, in_channels: int, prompt_conditioned: bool = False):
        super().__init__()
        self.name, self.net, self.lower_better, self.in_channels = name, net, lower_better, in_channels
        self.prompt_conditioned = prompt_conditioned
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"quality model {self.name}: expected images [N, 1|3, H, W], got {tuple(images.shape)}")
        x = images.clamp(0, 1)
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and self.in_channels == 1:
            x = x.mean(dim=1, keepdim=True)
        if not self.prompt_conditioned:
            return self.net(x).reshape(x.shape[0], -1)[:, 0]
        if prompts is None or len(prompts) != len(x):
            raise ValueError(f"quality model {self.name} is prompt-conditioned: it needs one prompt per image, got "
                             f"{'none' if prompts is None else len(prompts)} for {len(x)} images")
        return self.net(x, list(prompts)).reshape(x.shape[0], -1)[:, 0]


def check_quality_spec(spec, option: str) -> None:
    """Config-time check of a quality model spec: a pyiqa name pyiqa knows, or {arch, weights} with
    a weights file that exists. Loads nothing."""
    if isinstance(spec, str):
        from eval.prompt_rewards import PROMPT_REWARDS

        if spec not in pyiqa_metric_names() and spec not in PROMPT_REWARDS:
            raise OptionError(option, f"unknown quality model {spec!r}: not a pyiqa metric (see pyiqa.list_models()) nor one of "
                                    f"{', '.join(PROMPT_REWARDS)}")
        return
    if not isinstance(spec, dict) or set(spec) - {"arch", "weights", "name"} or not {"arch", "weights"} <= set(spec):
        raise OptionError(option, f"expected a pyiqa metric name or {{arch, weights}}, got {spec!r}")
    if spec["arch"] not in LOCAL_ARCHS and spec["arch"] not in pyiqa_metric_names():
        raise OptionError(f"{option}.arch", f"unknown architecture {spec['arch']!r}: neither a pyiqa metric nor one of {', '.join(LOCAL_ARCHS)}")
    if not Path(spec["weights"]).is_file():
        raise OptionError(f"{option}.weights", f"file not found: {spec['weights']}")


@functools.cache
def pyiqa_metric_names() -> tuple[str, ...]:
    import pyiqa

    return tuple(pyiqa.list_models())


def load_quality_model(spec: str | dict, device: str | torch.device = "cpu") -> QualityModel:
    """Build a quality model from a pyiqa metric name or {"arch": ..., "weights": ...}."""
    import pyiqa

    from eval.prompt_rewards import PROMPT_REWARDS, load_prompt_reward

    if isinstance(spec, str) and spec in PROMPT_REWARDS:
        return QualityModel(spec, load_prompt_reward(spec, device), lower_better=False, in_channels=3, prompt_conditioned=True).to(device)
    if isinstance(spec, str):
        if spec not in pyiqa_metric_names():
            raise ValueError(f"unknown quality metric {spec!r}: not a pyiqa metric (see pyiqa.list_models())")
        # as_loss=True: pyiqa then keeps the graph (and skips its range assert; we clamp instead).
        metric = pyiqa.create_metric(spec, as_loss=True, loss_reduction="none", device=torch.device(device))
        return QualityModel(spec, _PyiqaNet(metric), lower_better=bool(metric.lower_better), in_channels=3).to(device)
    if not isinstance(spec, dict) or set(spec) - {"arch", "weights", "name"} or "arch" not in spec or "weights" not in spec:
        raise ValueError(f"quality model spec must be a pyiqa metric name or {{arch, weights}}, got {spec!r}")
    arch, weights = spec["arch"], spec["weights"]
    state = read_state_dict(weights)
    name = spec.get("name", f"{arch}:{Path(weights).stem}")
    if arch in LOCAL_ARCHS:
        net = LOCAL_ARCHS[arch]()
        net.load_state_dict(state)
        return QualityModel(name, net, lower_better=net.lower_better, in_channels=1,
                            prompt_conditioned=getattr(net, "prompt_conditioned", False)).to(device)
    if arch not in pyiqa_metric_names():
        known = ", ".join(sorted(LOCAL_ARCHS))
        raise ValueError(f"unknown quality model arch {arch!r}: neither a pyiqa metric nor one of: {known}")
    metric = pyiqa.create_metric(arch, as_loss=True, loss_reduction="none", pretrained=None, device=torch.device(device))
    metric.net.load_state_dict(state)
    return QualityModel(name, _PyiqaNet(metric), lower_better=bool(metric.lower_better), in_channels=3).to(device)


class _PyiqaNet(nn.Module):
    """Calls a pyiqa InferenceModel's network directly: the metric's own forward would re-check
    inputs and reduce; we want per-image scores with gradients."""

    def __init__(self, metric):
        super().__init__()
        self.metric = metric

    def forward(self, x):
        return self.metric.net(x)


def load_clip_score(name: str = "clipscore", device: str | torch.device = "cpu"):
    """pyiqa's CLIP score as `(images [N, 3, H, W] in [0, 1], captions) -> [N]` (higher: the image
    matches its prompt better). pyiqa downloads the CLIP weights."""
    import pyiqa

    if name not in pyiqa_metric_names():
        raise ValueError(f"unknown CLIP score metric {name!r}: not a pyiqa metric (see pyiqa.list_models())")
    metric = pyiqa.create_metric(name, device=torch.device(device))

    def clip_score(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        x = images.clamp(0, 1)
        return metric(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x, caption_list=list(captions)).reshape(-1)

    return clip_score


__all__ = ["QualityModel", "load_quality_model", "read_state_dict"]
