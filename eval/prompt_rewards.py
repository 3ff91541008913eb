"""Prompt-conditioned human-preference reward models, loaded from their published sources, each as a
module `(images [N, 3, H, W] in [0, 1], prompts) -> [N]` scores (higher: preferred) that keeps the
graph, so a reward term can backpropagate through it (ReFL, UniFL's decoupled rewards).

- `imagereward`: ImageReward-v1.0 (Xu et al. 2023) through its package (`pip install image-reward`),
  scored with `score_gard`, the differentiable path ImageReward's own ReFL trains with.
- `pickscore`: PickScore_v1 (Kirstain et al. 2023) through transformers: the CLIP-H processor's
  tokenizer, `logit_scale * cos(image, text)`, as the model card computes it.
- `hpsv2`: HPS v2.1 (Wu et al. 2023) through open_clip (`pip install open-clip-torch`): ViT-H-14 with
  the HPS checkpoint from the hub (`xswu/HPSv2`), `100 * cos(image, text)` as the hpsv2 package
  scores it. The checkpoint is a torch pickle: it is read with `weights_only=True`.

Images are resized to 224 px (bicubic, differentiable) and normalized with CLIP's statistics here,
instead of each package's PIL preprocessing, so gradients reach the pixels. Every loader needs the
network on first use; offline it fails naming the model and what to install or download.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(images01: torch.Tensor, size: int = 224) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> CLIP's input: resized to `size` (bicubic), normalized."""
    x = F.interpolate(images01, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipPreference(nn.Module):
    """`scale * cos(image embedding, prompt embedding)` of a transformers CLIPModel and its tokenizer
    (PickScore's scoring; any CLIP checkpoint scored this way)."""

    def __init__(self, model, tokenizer, scale: float | None = None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.scale = scale  # None: the model's own logit_scale.exp() (PickScore)

    def forward(self, images01: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        text = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(images01.device)
        image_embeds = self.model.get_image_features(pixel_values=clip_pixels(images01, self.model.config.vision_config.image_size))
        text_embeds = self.model.get_text_features(**text)
        image_embeds = getattr(image_embeds, "pooler_output", image_embeds)  # transformers 5 may return an output object
        text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
        cosine = F.cosine_similarity(image_embeds, text_embeds, dim=-1)
        return cosine * (self.model.logit_scale.exp() if self.scale is None else self.scale)


class _ImageReward(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images01, prompts):
        text = self.model.blip.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        text = text.to(images01.device)
        return self.model.score_gard(text.input_ids, text.attention_mask, clip_pixels(images01)).reshape(-1)


class _OpenClipPreference(nn.Module):
    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def forward(self, images01, prompts):
        image = F.normalize(self.model.encode_image(clip_pixels(images01)), dim=-1)
        text = F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(images01.device)), dim=-1)
        return 100 * (image * text).sum(dim=-1)


def _load_imagereward(device):
    try:
        import ImageReward
    except ImportError:
        raise RuntimeError("imagereward needs the ImageReward package: pip install image-reward") from None
    return _ImageReward(ImageReward.load("ImageReward-v1.0", device=str(device)))


def _load_pickscore(device):
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    model = AutoModel.from_pretrained("yuvalkirstain/PickScore_v1", use_safetensors=None)
    return ClipPreference(model.to(device).eval(), processor.tokenizer)


def _load_hpsv2(device):
    try:
        import open_clip
    except ImportError:
        raise RuntimeError("hpsv2 needs open_clip: pip install open-clip-torch") from None
    from huggingface_hub import hf_hub_download

    model = open_clip.create_model("ViT-H-14", pretrained=None)
    checkpoint = torch.load(hf_hub_download("xswu/HPSv2", "HPS_v2.1_compressed.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint.get("state_dict", checkpoint))
    return _OpenClipPreference(model.to(device).eval(), open_clip.get_tokenizer("ViT-H-14"))


PROMPT_REWARDS = {"imagereward": _load_imagereward, "pickscore": _load_pickscore, "hpsv2": _load_hpsv2}


def load_prompt_reward(name: str, device="cpu") -> nn.Module:
    """One of `PROMPT_REWARDS`, frozen; a failure to get it is a one-line RuntimeError naming it."""
    if name not in PROMPT_REWARDS:
        raise ValueError(f"unknown prompt-conditioned reward {name!r} (known: {', '.join(PROMPT_REWARDS)})")
    try:
        net = PROMPT_REWARDS[name](device)
    except RuntimeError:
        raise
    except Exception as error:  # noqa: BLE001 - offline, a missing package or file: the one line the user needs
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RuntimeError(f"could not load the {name} reward model (needs its weights from the hub): {first}") from None
    return net.requires_grad_(False).eval()
