"""Training checkpoints: written atomically, read without unpickling anything.

    step_000100/
      model/              full: a diffusers pipeline folder (loads with load_base_model);
                          lora: adapter_model.safetensors + adapter_config.json (the adapter only);
                          either way cascade/ when a term adds a module to the model (Cas-DM)
      ema.safetensors     EMA of the trainable weights (when enabled)
      optimizer.pt        AdamW state          } torch.save of tensors and numbers only,
      objective.pt        terms' own state     } read back with weights_only=True
      rng.safetensors     torch's CPU RNG state; every draw derives from (seed, rank, step) anyway
      state.json          step, world size, finetune mode
      config.json         the resolved run config
      metrics.json        the evaluation at this step (what the sweep's selection reads)
      per_sample.safetensors  what the evaluation measured of each sample (features, scores): its intervals
      samples.png         a grid of the evaluation's first samples

The folder is written under a temporary name and renamed into place, so a crash mid-write never
leaves a half checkpoint that a resume would pick up.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from trainers.common.errors import UnreadableCheckpointError, last_line
from trainers.common.layout import (  # noqa: F401 - the layout's, imported from here by the trainer
    CHECKPOINT_CONFIG,
    CHECKPOINT_GLOB,
    CHECKPOINT_METRICS,
    CHECKPOINT_PER_SAMPLE,
    CHECKPOINT_SAMPLES,
    checkpoint_name,
)
from trainers.common.storage import publish_folder

if TYPE_CHECKING:
    from trainers.models import DiffusionModel


def _lora_settings(model_config) -> dict:
    return {"rank": model_config.lora_rank, "alpha": model_config.lora_alpha or model_config.lora_rank,
            "targets": list(model_config.lora_targets), "weights_dtype": model_config.weights_dtype}


def write_checkpoint(directory: str | Path, *, step: int, model: torch.nn.Module, base: DiffusionModel, config, optimizer,
                     ema=None, objective=None, world_size: int = 1, metrics: dict | None = None, samples=None,
                     per_sample: dict[str, torch.Tensor] | None = None) -> Path:
    from trainers.denoiser.cascade import CascadedDenoiser
    from trainers.models import save_base_model

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    # What samples: the model with every module a term adds to it (the Cas-DM head).
    denoiser = objective.wrap_for_sampling(model, base.scheduler.config) if objective is not None else model
    try:
        if config.model.finetune == "lora":
            (tmp / "model").mkdir()
            save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if "lora_" in k},
                      tmp / "model" / "adapter_model.safetensors")
            (tmp / "model" / "adapter_config.json").write_text(json.dumps({"base": config.model.base, **_lora_settings(config.model)}, indent=2))
            if isinstance(denoiser, CascadedDenoiser):
                denoiser.save(tmp / "model" / "cascade")
        else:
            save_base_model(dataclasses.replace(base, denoiser=denoiser), tmp / "model")
        if ema is not None:
            save_file({k: v.contiguous().cpu() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(objective.state_dict() if objective is not None else {}, tmp / "objective.pt")
        save_file({"torch_cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": world_size, "finetune": config.model.finetune}))
        (tmp / CHECKPOINT_CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if metrics is not None:
            (tmp / CHECKPOINT_METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
        if per_sample:
            save_file(per_sample, tmp / CHECKPOINT_PER_SAMPLE)
        if samples is not None and len(samples):
            from torchvision.utils import save_image

            save_image(samples, tmp / CHECKPOINT_SAMPLES, nrow=8, padding=1)
        publish_folder(tmp, directory)  # a re-run of the same step after a restart replaces it
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_checkpoint(directory: str | Path, *, model: torch.nn.Module, optimizer, ema=None, objective=None, device="cpu") -> int:
    """Restore a run's state in place; returns the step the checkpoint was taken after. Any failure
    is an `UnreadableCheckpointError` naming the folder (the trainer then tries an older one)."""
    directory = Path(directory)
    try:
        return _read_checkpoint(directory, model=model, optimizer=optimizer, ema=ema, objective=objective, device=device)
    except Exception as error:  # noqa: BLE001 - whatever broke, this folder cannot be resumed from
        raise UnreadableCheckpointError(f"checkpoint {directory}: {last_line(error, with_type=True)[:300]}") from error


def verify_checkpoint(directory: str | Path) -> None:
    """The checkpoint loads as a model, with tensors of the model's shapes; else an UnreadableCheckpointError naming it."""
    try:
        load_checkpoint_model(directory)
    except Exception as error:  # noqa: BLE001 - whatever broke, it cannot be selected or exported
        raise UnreadableCheckpointError(f"checkpoint {directory}: {last_line(error, with_type=True)[:300]}") from None


def _read_checkpoint(directory: Path, *, model, optimizer, ema, objective, device) -> int:
    state_file = directory / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"not a training checkpoint (no state.json): {directory}")
    state = json.loads(state_file.read_text())
    weights = _model_weights(directory / "model", state["finetune"])
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or (state["finetune"] == "full" and missing):
        raise ValueError(f"checkpoint {directory} does not match the model ({len(missing)} missing, {len(unexpected)} unexpected weights)")
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=device, weights_only=True))
    if ema is not None:
        ema.load_state_dict(load_file(directory / "ema.safetensors", device=str(device)))
    if objective is not None:
        objective.load_state_dict(torch.load(directory / "objective.pt", map_location=device, weights_only=True))
    torch.set_rng_state(load_file(directory / "rng.safetensors")["torch_cpu"])
    return int(state["step"])


def _model_weights(model_dir: Path, finetune: str) -> dict[str, torch.Tensor]:
    """The trained weights named as the trainable model names them: the adapter's; or a UNet's, or a flow
    transformer's under `transformer.` (FlowTransformer holds it there), read from every shard."""
    if finetune == "lora":
        return load_file(model_dir / "adapter_model.safetensors")
    folder, prefix = (model_dir / "unet", "") if (model_dir / "unet").is_dir() else (model_dir / "transformer", "transformer.")
    shards = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no weights in {folder}")
    return {prefix + name: tensor for shard in shards for name, tensor in load_file(shard).items()}


def load_checkpoint_model(directory: str | Path, device="cpu", use_ema: bool = True, weights_dtype: str | None = None) -> DiffusionModel:
    """A checkpoint as a ready-to-sample model: the full pipeline, or the base with the adapter
    loaded; with `use_ema` and an EMA file, the averaged weights; with a `cascade/`, the Cas-DM head.
    A LoRA checkpoint's base loads in the dtype it trained on, or in `weights_dtype` when given."""
    from trainers.denoiser.cascade import CascadedDenoiser, core_denoiser
    from trainers.lora import add_lora
    from trainers.models import load_base_model

    directory = Path(directory)
    model_dir = directory / "model" if (directory / "model").is_dir() else directory
    if not model_dir.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {directory}")
    adapter = model_dir / "adapter_config.json"
    if adapter.is_file():
        settings = json.loads(adapter.read_text())
        model = load_base_model(settings["base"], device, weights_dtype or settings.get("weights_dtype", "fp32"))
        add_lora(model.denoiser, settings["rank"], settings["alpha"], settings["targets"])
        model.denoiser.load_state_dict(load_file(model_dir / "adapter_model.safetensors", device=str(device)), strict=False)
        if (model_dir / "cascade").is_dir():
            model.denoiser = CascadedDenoiser.load(model_dir / "cascade", model.denoiser, model.scheduler.config)
    else:
        model = load_base_model(model_dir, device)
    ema_file = directory / "ema.safetensors"
    if use_ema and ema_file.is_file():
        weights = load_file(ema_file, device=str(device))
        missing, unexpected = core_denoiser(model.denoiser).load_state_dict(weights, strict=False)
        if unexpected:
            raise ValueError(f"checkpoint {directory}: the EMA does not match the model ({len(unexpected)} unexpected weights)")
    model.denoiser.requires_grad_(False).eval()
    return model
