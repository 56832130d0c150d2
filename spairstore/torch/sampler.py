"""Sampling: :class:`ShardSampler`, ``DistributedSampler``'s contract, deterministic and resumable."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ..core.errors import SpairstoreError


class ShardSampler(Sampler[int]):
    """Indices ``0..n-1`` of one epoch for one rank, with the contract of ``DistributedSampler``.

    The epoch's order is a permutation drawn from ``(seed, epoch)`` (or ``0..n-1`` without ``shuffle``),
    the same in every process; rank ``r`` of ``world_size`` takes every ``world_size``-th index from
    position ``r``, so the ranks' shards are disjoint and together cover each index exactly once. Shards
    then differ in length by at most one; ``pad=True`` repeats the epoch's first indices until every rank
    has the same count (``DistributedSampler``'s default, which DDP needs for equal step counts).
    ``rank``/``world_size`` default to ``torch.distributed``'s when it is initialised, else 0 and 1.

    Resuming mid-epoch: ``set_epoch(epoch, start)`` skips the first ``start`` indices of this rank's shard.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, pad: bool = False):
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.world_size = int(world_size if world_size is not None else (torch.distributed.get_world_size() if dist else 1))
        self.rank = int(rank if rank is not None else (torch.distributed.get_rank() if dist else 0))
        if not 0 <= self.rank < self.world_size:
            raise SpairstoreError(f"rank {self.rank} is not in 0..{self.world_size - 1}")
        self.n, self.shuffle, self.seed, self.pad = int(n), shuffle, int(seed), pad
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def order(self) -> np.ndarray:
        """This rank's whole shard of the current epoch (before skipping ``start``)."""
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n) if self.shuffle else np.arange(self.n)
        if self.pad and self.n % self.world_size:
            extra = self.world_size - self.n % self.world_size
            order = np.concatenate([order, np.resize(order, extra)]) if self.n else order
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:].tolist())

    @property
    def num_samples(self) -> int:
        """Length of this rank's whole shard of an epoch."""
        return -(-self.n // self.world_size) if self.pad else len(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)
