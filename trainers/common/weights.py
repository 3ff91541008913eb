"""Reading a weights file without unpickling it."""

from __future__ import annotations

from pathlib import Path

import torch

from trainers.common.errors import UnreadableFileError, last_line


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from `.safetensors`, or a `.pth`/`.pt` holding tensors only (pyiqa keeps them under 'params'),
    read with `weights_only=True`. A corrupt or foreign file is an `UnreadableFileError` naming it
    (the reader's own reason kept)."""
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
        raise UnreadableFileError(f"{path}: not a readable weights file ({last_line(error, with_type=True)})") from None
