"""Collation: :class:`Samples` (a batch read whole, seen as a list of samples) and :func:`collate`.

``Dataset.__getitems__`` returns :class:`Samples`: the batch is read in one go into batch tensors, and
the object is also a sequence of per-sample dicts (views of row ``j`` of each tensor). So both collate
functions work on it: ``torch.utils.data.default_collate`` stacks the samples (a copy, as for any
map-style dataset), :func:`collate` hands the pre-read batch over as it is (no copy). Both give equal
tensors, leaf by leaf, because every per-sample field has a fixed shape: keypoints are padded to the
store's ``K`` slots with NaN (``kps_valid`` marks the real ones).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np
from torch.utils.data import default_collate

from ..core.errors import SpairstoreError
from .memory import ship

Batch = dict[str, Any]


class Samples(Sequence[Batch]):
    """A batch read whole (``block``: tensors with the batch dimension first, lists for byte fields),
    seen as the sequence of its samples; :func:`collate` unwraps it, ``default_collate`` stacks it."""

    def __init__(self, block: Batch):
        self.block = block
        self._samples: list[Batch] | None = None

    def __len__(self) -> int:
        return len(self.block["index"])

    @overload
    def __getitem__(self, j: int) -> Batch: ...
    @overload
    def __getitem__(self, j: slice) -> list[Batch]: ...

    def __getitem__(self, j: int | slice) -> Batch | list[Batch]:
        if isinstance(j, str):
            raise TypeError(f"Samples is the sequence of a batch's samples; for the batch's {j!r} use "
                            "dataset.fetch(indices) or spairstore.collate(samples)")
        if self._samples is None:  # made once: default_collate walks the samples once per key
            self._samples = [{k: v[i] for k, v in self.block.items()} for i in range(len(self))]
        return self._samples[j]

    def __iter__(self) -> Iterator[Batch]:
        return iter(self[:])


def pad_keypoints(ids: Sequence[np.ndarray], src: Sequence[np.ndarray], trg: Sequence[np.ndarray],
                  width: int) -> dict[str, np.ndarray]:
    """Per-sample correspondences (slot ids (n,), points (n, 2)) -> ``kps_ids`` (B, width) -1 padded,
    ``kps_valid`` (B, width), ``n_kps`` (B,) and ``src_kps``/``trg_kps`` (B, width, 2) NaN padded."""
    n = np.array([len(i) for i in ids], dtype=np.int64)
    kps_ids = np.full((len(n), width), -1, dtype=np.int64)
    pts = np.full((2, len(n), width, 2), np.nan, dtype=np.float32)
    for j, k in enumerate(n):
        kps_ids[j, :k] = ids[j]
        pts[0, j, :k], pts[1, j, :k] = src[j], trg[j]
    return {"kps_ids": kps_ids, "kps_valid": kps_ids >= 0, "n_kps": n, "src_kps": pts[0], "trg_kps": pts[1]}


def collate(samples: Samples | Batch | Sequence[Batch]) -> Batch:
    """``collate_fn`` for a DataLoader over a spairstore dataset: the fast path.

    :class:`Samples` (what ``__getitems__`` returns) gives its pre-read batch without a copy (in a worker,
    by reference to the worker's shared memory: :func:`~spairstore.torch.memory.ship`); a batch dict
    passes through; a list of single samples (``dataset[i]``, e.g. through a ``ConcatDataset``) is
    stacked by ``default_collate``, to the same keys, dtypes and shapes."""
    if isinstance(samples, Samples):
        return ship(samples.block)
    if isinstance(samples, dict):
        return ship(samples)
    if not samples:
        raise SpairstoreError("cannot collate an empty list of samples")
    return default_collate(list(samples))
