"""The one seed scheme of the project."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, stream: str, index: int = 0, rank: int = 0) -> int:
    """Every random draw of training and evaluation is seeded from (seed, stream, index, rank), e.g.
    ("step", micro-batch index, rank) for a step's noise, ("data order", epoch) for an epoch's
    permutation, ("sampling", batch) for evaluation noise. Hashed, so that streams never share a
    seed and nearby indices give unrelated generators."""
    digest = hashlib.sha256(f"{seed}/{stream}/{index}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: what torch's manual_seed takes
