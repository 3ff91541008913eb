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
import re
from pathlib import Path

import torch
import torch.nn as nn


class DigitsHeldoutIQA(nn.Module):
    """Small CNN regressor, architecturally unlike CNNIQA (a deep 3x3 stack with SiLU and strided
    downsampling, mean+max pooling, instead of one 7x7 layer with max/min pooling).
    Input `[N, 1, H, W]` in [0, 1]; output `[N, 1]` quality."""

    lower_better = False

    def __init__(self, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
        )
        self.head = nn.Sequential(nn.Linear(4 * width, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, x):
        h = self.features(x)
        # mean pooling sees global haze and blur; max pooling sees isolated defects (impulses)
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))


def prompted_digit(prompt: str) -> int:
    """The digit a prompt asks for: its last digit character or number word ("a thick handwritten 7",
    "a seven"); a prompt naming none is a ValueError (prompt agreement is undefined for it)."""
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    found = [int(w) if w.isdigit() else words.index(w) for w in re.findall(r"\b(?:[0-9]|" + "|".join(words) + r")\b", prompt.lower())]
    if not found:
        raise ValueError(f"prompt agreement: the prompt {prompt!r} names no digit")
    return found[-1]


class DigitsPromptAgreement(nn.Module):
    """The digits classifier's probability that the image shows the digit its prompt names: a
    prompt-conditioned reward stand-in (image-text agreement), higher is better. Input `[N, 1, H, W]`
    in [0, 1]."""

    lower_better = False
    prompt_conditioned = True

    def __init__(self):
        super().__init__()
        from eval.digits_classifier import DigitsClassifier

        self.classifier = DigitsClassifier()

    def load_state_dict(self, state, strict: bool = True):
        return self.classifier.load_state_dict(state, strict)

    def forward(self, x, prompts):
        wanted = torch.tensor([prompted_digit(p) for p in prompts], device=x.device)
        probs = self.classifier(x * 2 - 1).softmax(dim=1)
        return probs.gather(1, wanted[:, None])


class DigitsPromptAccuracy(DigitsPromptAgreement):
    """1 where the digits classifier's top class is the prompted digit, else 0: the digits-t2i
    preset's CLIP-score stand-in for evaluation (image-text agreement as a rate). A step function
    has no gradient, so no objective may train against it (`trainable` is False)."""

    trainable = False

    def forward(self, x, prompts):
        wanted = torch.tensor([prompted_digit(p) for p in prompts], device=x.device)
        return (self.classifier(x * 2 - 1).argmax(dim=1) == wanted).float()[:, None]


LOCAL_ARCHS = {"digits_heldout_iqa": DigitsHeldoutIQA, "digits_prompt_agreement": DigitsPromptAgreement,
               "digits_prompt_accuracy": DigitsPromptAccuracy}


class UnreadableFileError(ValueError):
    """A file that exists but cannot be read as what it should be (corrupt, truncated, another format)."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from `.safetensors`, or a `.pth`/`.pt` holding tensors only (pyiqa keeps them under 'params').
    A corrupt or foreign file is an `UnreadableFileError` naming it (the reader's own reason kept)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("params", state)
    except Exception as error:  # noqa: BLE001 - any failure to parse is this file's fault; its reason is kept
        reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        raise UnreadableFileError(f"{path}: not a readable weights file ({type(error).__name__}: {reason})") from None


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


class SpecError(ValueError):
    """A bad quality model spec; `option` names the offending part (`metric.weights`)."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option}: {message}")
        self.option, self.message = option, message


def check_quality_spec(spec, option: str) -> None:
    """Config-time check of a quality model spec: a pyiqa name pyiqa knows, or {arch, weights} with
    a weights file that exists. Loads nothing."""
    if isinstance(spec, str):
        from eval.prompt_rewards import PROMPT_REWARDS

        if spec not in pyiqa_metric_names() and spec not in PROMPT_REWARDS:
            raise SpecError(option, f"unknown quality model {spec!r}: not a pyiqa metric (see pyiqa.list_models()) nor one of "
                                    f"{', '.join(PROMPT_REWARDS)}")
        return
    if not isinstance(spec, dict) or set(spec) - {"arch", "weights", "name"} or not {"arch", "weights"} <= set(spec):
        raise SpecError(option, f"expected a pyiqa metric name or {{arch, weights}}, got {spec!r}")
    if spec["arch"] not in LOCAL_ARCHS and spec["arch"] not in pyiqa_metric_names():
        raise SpecError(f"{option}.arch", f"unknown architecture {spec['arch']!r}: neither a pyiqa metric nor one of {', '.join(LOCAL_ARCHS)}")
    if not Path(spec["weights"]).is_file():
        raise SpecError(f"{option}.weights", f"file not found: {spec['weights']}")


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


def quality_spearman(model: QualityModel, images: torch.Tensor, family: dict, severities=(0.0, 0.25, 0.5, 0.75, 1.0), seed: int = 0) -> float:
    """Spearman correlation between the model's quality and the *negated* true severity, pooled over
    every degradation in `family` at every grade (1.0: ranks quality perfectly; reported in cards)."""
    from scipy.stats import spearmanr

    from eval.degradations import degrade

    generator = torch.Generator().manual_seed(seed)
    scores, truth = [], []
    with torch.no_grad():
        for kind in family:
            for s in severities:
                severity = torch.full((len(images),), float(s))
                scores.append(model(degrade(images, kind, severity, generator)))
                truth.append(-severity)
    return float(spearmanr(torch.cat(scores).numpy(), torch.cat(truth).numpy()).statistic)


__all__ = ["QualityModel", "DigitsHeldoutIQA", "load_quality_model", "quality_spearman", "read_state_dict"]


def mean_reward(model: QualityModel, images01: torch.Tensor, prompts: list[str] | None, spec, cache_dir=None,
                batch_size: int = 250, device="cpu") -> float:
    """The mean score of `model` over a reference set (real training images, or preferred samples),
    with their prompts for a prompt-conditioned model: what `target: auto` sets a hinge target to
    (UniFL's alpha_d, the mean reward of preferred samples). Computed once per (images, prompts,
    model spec, weights file bytes) and cached as JSON under the fidelity cache folder."""
    import hashlib
    import json

    from eval import storage
    from eval.fidelity import DEFAULT_CACHE_DIR, to_uint8

    digest = hashlib.sha256()
    pixels = to_uint8(images01).contiguous()
    digest.update(str(tuple(pixels.shape)).encode())
    digest.update(pixels.numpy().tobytes())
    digest.update(json.dumps(prompts).encode())
    digest.update(json.dumps(spec, sort_keys=True).encode())
    if isinstance(spec, dict):
        digest.update(Path(spec["weights"]).read_bytes())
    location = storage.join(cache_dir or DEFAULT_CACHE_DIR, "reward-targets", f"{digest.hexdigest()[:24]}.json")
    if storage.is_file(location):
        return float(json.loads(storage.read_text(location))["mean"])
    scores = []
    with torch.no_grad():
        for start in range(0, len(images01), batch_size):
            batch = images01[start:start + batch_size].to(device)
            scores.append(model(batch, None if prompts is None else prompts[start:start + batch_size]).float().cpu())
    mean = torch.cat(scores).mean().item()
    storage.write_text(location, json.dumps({"mean": mean, "model": model.name, "images": len(images01)}) + "\n")
    return mean
