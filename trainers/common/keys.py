"""Content keys: a cache is keyed by what its result depends on (pixels, weights bytes, settings),
never by a name alone, so a retrained model or an edited image set misses the cache."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


class ContentKey:
    """sha256 fed piece by piece; `hex(n)` is the key."""

    def __init__(self):
        self.digest = hashlib.sha256()

    def text(self, value: str) -> ContentKey:
        self.digest.update(value.encode())
        return self

    def json(self, value) -> ContentKey:
        return self.text(json.dumps(value, sort_keys=True))

    def pixels(self, uint8: torch.Tensor) -> ContentKey:
        """Quantized images: their shape, then their bytes (so a crop is not a prefix of the whole)."""
        pixels = uint8.contiguous()
        self.text(str(tuple(pixels.shape)))
        self.digest.update(pixels.numpy().tobytes())
        return self

    def tensors(self, tensors) -> ContentKey:
        """Each tensor's shape, dtype and bytes (weights, latents)."""
        for tensor in tensors:
            t = tensor.detach().cpu().contiguous()
            self.text(f"{tuple(t.shape)}:{t.dtype}")
            self.digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return self

    def file(self, path: str | Path) -> ContentKey:
        self.digest.update(Path(path).read_bytes())
        return self

    def hex(self, length: int = 24) -> str:
        return self.digest.hexdigest()[:length]
