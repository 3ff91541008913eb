"""The digits stand-ins' networks: architectures the project trains itself on scikit-learn's digits
(`acpo assets build`) and ships as safetensors under assets/. Each is named for what it is; none
is presented as the hub model it stands in for.

- `DigitsClassifier`: the FID feature extractor's network ("classifier FID", eval/digits_fid.py),
  and the prompt-agreement stand-ins built on it.
- `DigitsHeldoutIQA`: the held-out quality model (`eval.heldout_quality` of the digits preset).
- `DigitsPromptAgreement` / `DigitsPromptAccuracy`: digits-t2i's prompt-conditioned reward / CLIP-score stand-ins.
- `DigitsSegmenter`: PeFL segmentation's offline segmenter (objectives/segmenters.py).

Architectures only (and reading their weights): importing this pulls nothing above the bottom layer.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from trainers.common.weights import read_state_dict

FEATURE_DIM = 128


class DigitsClassifier(nn.Module):
    """Input `[N, 1, 16, 16]` in [-1, 1]. `features` is the 128-d penultimate layer, `forward` gives logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU(),
        )
        self.logits = nn.Linear(FEATURE_DIM, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.logits(self.features(x))


def load_digits_classifier(path: str | Path, device="cpu") -> DigitsClassifier:
    model = DigitsClassifier()
    model.load_state_dict(read_state_dict(path))
    return model.to(device).eval().requires_grad_(False)


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


class DigitsSegmenter(nn.Module):
    """A two-level U-Net: `[N, 1, 16, 16]` in [0, 1] -> `[N, 11, 16, 16]` logits (0: background,
    1 + d: stroke of digit d). The digit needs the whole image, so the bottleneck sees 8x8 context
    through two dilated convolutions."""

    classes = 11

    def __init__(self, width: int = 32):
        super().__init__()
        self.encode = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU())
        self.bottleneck = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=2, dilation=2), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=4, dilation=4), nn.SiLU(),
            nn.ConvTranspose2d(2 * width, width, 2, stride=2), nn.SiLU())
        self.decode = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, self.classes, 1))

    def forward(self, x):
        skip = self.encode(x * 2 - 1)
        return self.decode(torch.cat([skip, self.bottleneck(skip)], dim=1))
