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

import contextlib
import functools
from pathlib import Path

import torch
import torch.nn as nn

from assets.digits_networks import DigitsHeldoutIQA, DigitsPromptAccuracy, DigitsPromptAgreement
from trainers.common.errors import OptionError
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
    metric = create_pyiqa_arch(arch, state, device, as_loss=True, loss_reduction="none")
    return QualityModel(name, _PyiqaNet(metric), lower_better=bool(metric.lower_better), in_channels=3).to(device)


def offline_arch_options(arch: str) -> dict:
    """What pyiqa's `arch` needs to be built without downloading anything: `pretrained=None` where it
    takes one, and TOPIQ's ResNet backbone, which otherwise comes from timm's hub (a weights file for
    the arch holds the backbone too)."""
    import inspect

    from pyiqa.archs import ARCH_REGISTRY, _lazy_import_arch
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    network_type = DEFAULT_CONFIGS[arch]["metric_opts"]["type"]
    _lazy_import_arch(network_type)  # pyiqa registers an architecture when build_network first imports it
    accepted = inspect.signature(ARCH_REGISTRY.get(network_type)).parameters
    options = {"pretrained": None, "backbone_pretrain": False}
    return {key: value for key, value in options.items() if key in accepted}


CLIP_PREFIX = "clip_model."  # where a CLIP-based architecture's weights file carries the CLIP model itself


def create_pyiqa_arch(arch: str, state: dict, device: str | torch.device = "cpu", **options):
    """pyiqa's metric `arch` built from `state` and nothing else: no download, no unpickling.

    pyiqa's CLIP-based architectures (laion_aes, clipscore, clipiqa) load a CLIP when they are built,
    which downloads OpenAI's weights. When `state` carries the CLIP model under `clip_model.`, it is
    built from those tensors instead (`build_model`, what the loaders do after their download), so a
    weights file with its CLIP works offline. LAION-aes and CLIP-IQA keep their CLIP outside their
    state dict (in a list), so there the CLIP tensors are used for building only."""
    import pyiqa

    clip_state = {key[len(CLIP_PREFIX):]: value for key, value in state.items() if key.startswith(CLIP_PREFIX)}
    with _clip_built_from(clip_state) if clip_state else contextlib.nullcontext():
        metric = pyiqa.create_metric(arch, device=torch.device(device), **offline_arch_options(arch), **options)
    own = metric.net.state_dict()
    metric.net.load_state_dict({key: value for key, value in state.items() if key in own or not key.startswith(CLIP_PREFIX)})
    return metric


@contextlib.contextmanager
def clip_loaders(build):
    """While open, pyiqa's two CLIP loaders (OpenAI's `clip.load`, used by laion_aes and clipscore, and
    its own `clip_model.load`, used by clipiqa) return `build(name, openai)` instead of downloading:
    `openai` says which package's CLIP class the caller expects."""
    import pyiqa.archs.clipiqa_arch as clipiqa
    from clip.clip import _transform
    from pyiqa.archs.clip_imports import clip

    def openai_load(name, device="cpu", **_):
        model = build(name, True).float().to(device)
        return model, _transform(model.visual.input_resolution)

    originals = clip.load, clipiqa.load
    clip.load, clipiqa.load = openai_load, lambda name, device="cpu", **_: build(name, False).float().to(device)
    try:
        yield
    finally:
        clip.load, clipiqa.load = originals


def _clip_built_from(clip_state: dict):
    """The CLIP a weights file carries, built as the loaders build a downloaded one (`build_model`
    casts to fp16; the metrics run in fp32 on a CPU)."""
    import clip.model
    import pyiqa.archs.clip_model

    return clip_loaders(lambda name, openai: (clip.model if openai else pyiqa.archs.clip_model).build_model(dict(clip_state)))


class _PyiqaNet(nn.Module):
    """Calls a pyiqa InferenceModel's network directly: the metric's own forward would re-check
    inputs and reduce; we want per-image scores with gradients."""

    def __init__(self, metric):
        super().__init__()
        self.metric = metric

    def forward(self, x):
        return self.metric.net(x)


def load_clip_score(spec: str | dict = "clipscore", device: str | torch.device = "cpu"):
    """pyiqa's CLIP score as `(images [N, 3, H, W] in [0, 1], captions) -> [N]` (higher: the image
    matches its prompt better). A pyiqa name (pyiqa downloads the CLIP weights) or {arch, weights}
    (a weights file carrying its CLIP: `create_pyiqa_arch`)."""
    import pyiqa

    if isinstance(spec, dict):
        metric = create_pyiqa_arch(spec["arch"], read_state_dict(spec["weights"]), device)
    elif spec not in pyiqa_metric_names():
        raise ValueError(f"unknown CLIP score metric {spec!r}: not a pyiqa metric (see pyiqa.list_models())")
    else:
        metric = pyiqa.create_metric(spec, device=torch.device(device))

    def clip_score(images: torch.Tensor, captions: list[str]) -> torch.Tensor:
        x = images.clamp(0, 1)
        return metric(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x, caption_list=list(captions)).reshape(-1)

    return clip_score


__all__ = ["QualityModel", "load_quality_model", "read_state_dict"]
