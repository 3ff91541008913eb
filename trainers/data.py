"""Training batches: batch `index` of rank `rank`, a pure function of (seed, index)."""

from __future__ import annotations

import torch

from eval.sampling import derive_seed
from trainers.config import ConfigError


class ShardedBatches:
    """Each epoch is one seeded permutation of the dataset, dealt round-robin to ranks, so a resumed
    run sees exactly the batches the uninterrupted run would have, and no two ranks see the same
    image in an epoch. Items are images, or (image, label or caption) pairs; a batch is
    `(images [B, C, H, W], labels or captions or None)`."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size, self.seed, self.rank, self.world_size = dataset, batch_size, seed, rank, world_size
        self.per_epoch = (len(dataset) // world_size) // batch_size
        if self.per_epoch < 1:
            raise ConfigError(f"train.batch_size: {batch_size} x {world_size} workers is more than the {len(dataset)} training images")
        self._epoch, self._order = None, None

    def __call__(self, index: int):
        epoch, i = divmod(index, self.per_epoch)
        if epoch != self._epoch:  # the same permutation on every rank: the epoch's seed has no rank in it
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "data order", epoch))
            order = torch.randperm(len(self.dataset), generator=generator)
            self._epoch, self._order = epoch, order[self.rank::self.world_size]
        items = [self.dataset[int(j)] for j in self._order[i * self.batch_size:(i + 1) * self.batch_size]]
        if isinstance(items[0], (list, tuple)):
            return torch.stack([item[0] for item in items]), [item[1] for item in items]  # digit labels or captions
        return torch.stack(items), None
