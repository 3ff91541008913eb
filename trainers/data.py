"""Training batches, and the caches that keep a GPU fed: what the loop reads each micro-step.

Batch `index` of rank `rank` is a pure function of (seed, index): each epoch is one seeded
permutation of the dataset, dealt round-robin to ranks, so a resumed run sees exactly the batches the
uninterrupted run would have, and no two ranks see the same image in an epoch. A `DataLoader` reads
them (worker processes, pinned memory, prefetch) in that order: its sampler starts at the resumed
index, and the loader returns batches in sampler order whatever its workers do.

For latent models the VAE's encoding of every training image is computed once and cached
(`LatentCache`): the moments of its latent distribution (mean, std) as safetensors, keyed by the
images' content and the VAE's weights, like the reference-feature cache of `eval/fidelity.py`. A
latent is then drawn from those moments with the step's own generator, cached or not, so a cached
run is the same run as an uncached one. Fixed captions (a template per label, a small caption set)
are encoded once per distinct caption (`PromptCache`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Sampler

from trainers.common.errors import ConfigError
from trainers.common.keys import ContentKey
from trainers.common.seeds import derive_seed
from trainers.common.storage import write_whole

LATENT_CACHE_VERSION = "1"  # bump when what the cache holds changes


class ShardedBatchSampler(Sampler):
    """Yields the dataset indices of this rank's micro-batches `start, start + 1, ..., stop - 1`."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0,
                 stop: int | None = None):
        self.size, self.batch_size, self.seed, self.rank, self.world_size = size, batch_size, seed, rank, world_size
        self.per_epoch = (size // world_size) // batch_size
        if self.per_epoch < 1:
            raise ConfigError(f"train.batch_size: {batch_size} x {world_size} workers is more than the {size} training images")
        self.start, self.stop = start, stop

    def indices(self, index: int) -> list[int]:
        epoch, i = divmod(index, self.per_epoch)
        # The same permutation on every rank: the epoch's seed has no rank in it.
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(derive_seed(self.seed, "data order", epoch)))
        return order[self.rank::self.world_size][i * self.batch_size:(i + 1) * self.batch_size].tolist()

    def __iter__(self):
        return (self.indices(index) for index in range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def collate(items: list):
    """`(images [B, ...], labels or captions as a list, or None)`, and `masks [B, R, R]` third when the
    set has them (`image_sets.WithMasks`): what the loop takes apart."""
    if isinstance(items[0], (list, tuple)):
        images, second = torch.stack([item[0] for item in items]), [item[1] for item in items]
        second = None if all(x is None for x in second) else second
        if len(items[0]) > 2:
            return images, second, torch.stack([item[2] for item in items])
        return images, second
    return torch.stack(items), None


def batch_loader(dataset: Dataset, batch_size: int, seed: int, rank: int, world_size: int, start: int, stop: int,
                 workers: int = 0, prefetch: int = 2, pin_memory: bool = False) -> DataLoader:
    """Micro-batches `start..stop-1` of this rank, read by `workers` processes (0: in this one)."""
    sampler = ShardedBatchSampler(len(dataset), batch_size, seed, rank, world_size, start, stop)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=prefetch if workers else None, persistent_workers=False)


def latent_moments(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> the VAE posterior's mean and std, stacked per image: `[N, 2, c, h, w]`."""
    with torch.no_grad():
        posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    # Contiguous: the VAE's convolutions may hand back channels-last tensors, and a UNet fed another
    # memory layout than the cached run's takes other kernels, and other bits.
    return torch.stack([posterior.mean, posterior.std], dim=1).float().contiguous()


def sample_latents(moments: torch.Tensor, vae_config, generator: torch.Generator) -> torch.Tensor:
    """One draw from the posterior (`moments` from `latent_moments`, on any device), shifted (SD3's and
    Flux's VAEs: `shift_factor`) and scaled as the denoiser was trained: with the step's generator, so
    that the cached and the uncached run draw the same."""
    mean, std = moments[:, 0], moments[:, 1]
    draw = torch.randn(mean.shape, generator=generator).to(mean.device)
    return (mean + std * draw - (vae_config.get("shift_factor") or 0.0)) * vae_config["scaling_factor"]


class EncodedDataset(Dataset):
    """The training set with each image replaced by its cached `[2, c, h, w]` latent moments, and the
    labels or captions the images came with (None for images alone)."""

    def __init__(self, moments: torch.Tensor, second: list | None):
        self.moments, self.second = moments, second

    def __len__(self) -> int:
        return len(self.moments)

    def __getitem__(self, i):
        item = self.moments[i]
        return (item, self.second[i]) if self.second is not None else item


ENCODE_PIXELS = 2**20  # pixels the VAE encodes at once when caching latents
DEFAULT_LATENT_CACHE = Path(os.environ.get("ACPO_LATENT_CACHE", Path.home() / ".cache" / "acpo" / "latents"))


def cached_latents(dataset: Dataset, vae: torch.nn.Module, device, cache_dir: str | Path | None = None, chunk: int = 32,
                   workers: int = 0, log=print) -> EncodedDataset:
    """Every training image encoded once (in chunks of `chunk`), or read from the cache when the same
    images were encoded by the same VAE before: the trials of a sweep share one encoding. The images
    are read once to key the cache, and once more to encode them on a miss."""
    reader = lambda: DataLoader(dataset, batch_size=chunk, shuffle=False, collate_fn=collate, num_workers=workers)  # noqa: E731
    content, second = ContentKey().tensors([torch.tensor([int(LATENT_CACHE_VERSION)])]), []
    for images, labels in reader():
        content.tensors([images])
        second.extend(labels or [])
    second = [x if isinstance(x, str) else int(x) for x in second] or None
    weights = ContentKey().tensors(vae.state_dict().values()).hex(64)
    key = ContentKey().text(f"{content.hex(64)}:{weights}").hex(32)
    path = Path(cache_dir or DEFAULT_LATENT_CACHE) / f"{key}.safetensors"
    if path.is_file():
        try:
            moments = load_file(path)["moments"]
            if moments.shape[:2] == (len(dataset), 2):
                return EncodedDataset(moments, second)
            log(f"[data] latent cache {path} holds {tuple(moments.shape)}, not {len(dataset)} images' moments; encoding again")
        except Exception as error:  # noqa: BLE001 - a file cut short by a killed writer: encode again, replace it
            log(f"[data] latent cache {path} unreadable ({error}); encoding again")
    # Encoded a few at a time: the encoder's activations are ~128 channels at full resolution, so 32 images
    # at 512 px (the key's chunks) would hold ~4 GiB per activation; a budget of 2^20 pixels is 4 of them.
    moments = torch.cat([latent_moments(vae, part.to(device)).cpu() for images, _ in reader()
                         for part in images.split(max(1, ENCODE_PIXELS // images[0, 0].numel()))])
    write_whole(path, lambda tmp: save_file({"moments": moments.contiguous()}, tmp))
    log(f"[data] encoded the {len(dataset)} training images once: {path}")
    return EncodedDataset(moments, second)


class PromptCache:
    """Prompt -> the text encoder's conditioning, each distinct prompt encoded alone and kept (least
    recently used dropped beyond `size`). Alone, so that a prompt's encoding has the same bits whatever
    batch it first came in: a resumed run, which fills the cache in another order, stays exact."""

    def __init__(self, encode_prompt, size: int = 2048):
        self.encode_prompt, self.size, self.rows = encode_prompt, size, OrderedDict()

    def __call__(self, prompts: list[str]) -> dict:
        for prompt in prompts:
            if prompt in self.rows:
                self.rows.move_to_end(prompt)
            else:
                self.rows[prompt] = self.encode_prompt([prompt])
                if len(self.rows) > self.size:
                    self.rows.popitem(last=False)
        return _stack([self.rows[prompt] for prompt in prompts])


def _stack(rows: list):
    """The rows' tensors concatenated along the batch, nested dicts (SDXL's added_cond_kwargs) kept."""
    if isinstance(rows[0], dict):
        return {key: _stack([row[key] for row in rows]) for key in rows[0]}
    return torch.cat(rows)
