"""Batches on a device: :class:`Loader`.

The loader samples with a :class:`~spairstore.torch.sampler.ShardSampler` (deterministic per ``(seed, epoch)``,
sharded by rank, resumable mid-epoch), reads whole batches from a :class:`~spairstore.PairDataset` or
:class:`~spairstore.ImageDataset` -- also through ``Subset`` (``random_split``) -- and sample by sample
from any other map-style dataset (``ConcatDataset``, your own), and hands them over on ``device``:

- ``num_workers=0`` (the fast path for a store: reads are memory copies that release the GIL): a
  background thread reads the next batches while the current one is used; on CUDA it reads straight
  into page-locked (pinned) host buffers, reused once their copy to the GPU has finished.
- ``num_workers>0``: a ``torch.utils.data.DataLoader`` with worker processes (``fork``, ``spawn`` or
  ``forkserver``), for costly augmentations, started once and kept across epochs (each batch carries
  its epoch to them: :class:`EpochBatch`); batches reach this process through the workers' reused
  shared memory (:mod:`.memory`); on CUDA each batch is copied into pinned buffers first.

Copies to the GPU are ``non_blocking``; pixels travel as uint8 (4x less traffic than float) and are
converted and normalised on the device: ``*_pixels`` uint8 (B, S, S, 3) become ``*_image`` float32
(B, 3, S, S) in channels-last memory, ``(x / 255 - mean) / std``.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from ..core.device import resolve_device
from ..core.errors import SpairstoreError
from .collate import Batch, Samples, collate
from .memory import Alloc, BufferPool
from .sampler import ShardSampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pinned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Page-locked host memory from torch's caching host allocator, which hands a block out again only
    once the ``non_blocking`` copies that read it have completed: a reused ring of pinned buffers."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def _batched(dataset: Any) -> bool:
    """Whether ``dataset`` reads whole batches: a spairstore dataset, or a ``Subset`` of one."""
    return hasattr(dataset, "fetch") or (isinstance(dataset, Subset) and _batched(dataset.dataset))


def _fetch(dataset: Any, indices: list[int], alloc: Alloc | None) -> Batch:
    """The batch ``indices`` of ``dataset``: read whole where it (or what a ``Subset`` selects from) is a
    spairstore dataset, else its samples collated."""
    if hasattr(dataset, "fetch"):
        return dataset.fetch(indices, alloc)
    if isinstance(dataset, Subset) and _batched(dataset.dataset):
        return _fetch(dataset.dataset, [int(dataset.indices[i]) for i in indices], alloc)
    return collate([dataset[i] for i in indices])


def _set_epoch(dataset: Any, epoch: int) -> None:
    """``set_epoch`` of ``dataset``, or of every dataset a ``Subset`` or ``ConcatDataset`` wraps."""
    if isinstance(dataset, Subset):
        _set_epoch(dataset.dataset, epoch)
    elif isinstance(dataset, ConcatDataset):
        for d in dataset.datasets:
            _set_epoch(d, epoch)
    elif hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def _tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor in it: a spairstore batch dict, or the lists, tuples
    and dicts another dataset's samples collate into."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: _tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        items = [_tensors(v, fn) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)  # a namedtuple too
    return batch


class _Source(Dataset):
    """A dataset as the loader reads it, in this process or in a worker: batches through :func:`_fetch`,
    and each batch's epoch (:class:`EpochBatch`) set on every spairstore dataset inside first."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        _set_epoch(self.dataset, epoch)

    def fetch(self, indices: Sequence[int], alloc: Alloc | None = None) -> Batch:
        return _fetch(self.dataset, list(indices), alloc)

    def __getitems__(self, indices: Sequence[int]) -> Samples | list[Any]:
        epoch = getattr(indices, "epoch", None)
        if epoch is not None:
            self.set_epoch(epoch)
        if _batched(self.dataset):
            return Samples(self.fetch(indices))
        return [self.dataset[i] for i in indices]  # the worker's collate stacks them


class EpochBatch(list):
    """A batch's indices and the epoch they belong to. Persistent workers hold the copy of the dataset
    made when they started, so the epoch (which seeds augmentations) travels with each batch; a
    dataset's ``__getitems__`` takes it from here."""

    def __init__(self, indices: Sequence[int], epoch: int):
        super().__init__(indices)
        self.epoch = epoch


class _Plan:
    """Batch sampler of a Loader's persistent DataLoader: the batches of the epoch in progress."""

    def __init__(self) -> None:
        self.batches: list[EpochBatch] = []

    def __iter__(self) -> Iterator[EpochBatch]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _prefetched(fetch: Callable[[list[int]], Any], batches: list[list[int]], depth: int) -> Iterator[Any]:
    """``fetch(b)`` for each batch, computed ``depth`` batches ahead by a background thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def work() -> None:
        try:
            for b in batches:
                if stop.is_set():
                    return
                put(fetch(b))
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            put(e)
        put(done)

    t = threading.Thread(target=work, name="spairstore-prefetch", daemon=True)
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join()


class Loader:
    """Iterate a dataset in batches on ``device``; one ``for`` loop is one epoch (of this rank).

    Args:
        dataset: a :class:`~spairstore.PairDataset` or :class:`~spairstore.ImageDataset`, or a
            ``Subset`` of one (read in whole batches as well), or any map-style dataset of same-shape
            samples (``ConcatDataset``, your own: read sample by sample and stacked).
        batch_size: samples per batch; the last batch of an epoch may be shorter unless ``drop_last``.
        shuffle, seed, rank, world_size, pad: the :class:`~spairstore.torch.sampler.ShardSampler` (rank and
            world size default to ``torch.distributed``'s). ``pad=True`` gives every rank the same
            number of samples, as DDP needs.
        num_workers: 0 reads in a background thread of this process; more uses DataLoader workers
            started with ``multiprocessing_context`` (``fork``, ``spawn``, ``forkserver``; None: torch's default).
        prefetch: batches read ahead (per worker with workers).
        device: ``cpu`` or ``cuda[:i]``.
        normalize: turn ``*_pixels`` into normalised float ``*_image`` on the device with ``mean``/``std``
            (per channel, for values in [0, 1]); False keeps uint8 pixels.

    ``set_epoch(e)`` reshuffles (same order for the same ``(seed, e)`` whatever the worker count) and
    seeds the dataset's augmentations. ``state_dict()`` / ``load_state_dict()`` resume mid-epoch: a loop
    left early (or a restored state) continues with the first batch not yet handed out; a finished
    epoch starts over. A state saved once an epoch's loop has finished is the next epoch's start, so an
    end-of-epoch checkpoint resumes without repeating the epoch it followed.
    """

    def __init__(self, dataset: Any, batch_size: int = 32, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, rank: int | None = None, world_size: int | None = None, pad: bool = False,
                 num_workers: int = 0, multiprocessing_context: str | None = None, prefetch: int = 2,
                 device: str | torch.device = "cpu", normalize: bool = True,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        if batch_size < 1 or prefetch < 1 or num_workers < 0:
            raise SpairstoreError("batch_size and prefetch must be >= 1 and num_workers >= 0")
        self.device = resolve_device(device)
        self.dataset = dataset
        self._source = _Source(dataset)
        self.sampler = ShardSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, pad=pad)
        self.batch_size, self.drop_last = int(batch_size), drop_last
        self.num_workers, self.multiprocessing_context, self.prefetch = num_workers, multiprocessing_context, prefetch
        self.normalize = normalize
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(shape).to(self.device) * 255
        self._std = torch.tensor(std, dtype=torch.float32).view(shape).to(self.device) * 255
        self._pool = BufferPool() if self.device.type == "cpu" else None  # normalised CPU images
        self._done = 0  # batches of the current epoch handed out
        self._finished = False  # the last loop ran the current epoch to its end
        self._plan = _Plan()
        self._workers: DataLoader | None = None  # made on the first epoch with workers, then kept

    def __repr__(self) -> str:
        sm = self.sampler
        rank = f", rank {sm.rank} of {sm.world_size}" if sm.world_size > 1 else ""
        workers = f", {self.num_workers} workers" if self.num_workers else ""
        return (f"Loader({self.dataset!r}: batch_size {self.batch_size}, {len(self):,} batches per epoch"
                f"{', shuffled' if sm.shuffle else ''}{rank}{workers}, device {self.device}, epoch {self.epoch})")

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Make ``epoch`` the current epoch, from its beginning -- unless it is the current one already:
        then the position is kept, so that a restored :meth:`state_dict` survives the usual
        ``for epoch in ...: loader.set_epoch(epoch)`` loop."""
        if epoch != self.sampler.epoch:
            self._done, self._finished = 0, False
        self.sampler.set_epoch(epoch)
        self._source.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches in one whole epoch of this rank."""
        n = self.sampler.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def state_dict(self) -> dict[str, int]:
        """Where this loader stands: epoch and batches handed out (after a finished epoch: the next
        epoch, none), with what fixes the order."""
        s = self.sampler
        epoch, done = (s.epoch + 1, 0) if self._finished else (s.epoch, self._done)
        return {"epoch": epoch, "batches": done, "seed": s.seed, "batch_size": self.batch_size,
                "rank": s.rank, "world_size": s.world_size, "samples": s.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`; the next loop starts at its first batch not handed out."""
        mine = self.state_dict()
        for k in ("seed", "batch_size", "rank", "world_size", "samples"):
            if state[k] != mine[k]:
                raise SpairstoreError(f"cannot resume: saved {k}={state[k]} but this loader has {k}={mine[k]}")
        self.sampler.set_epoch(state["epoch"])
        self._source.set_epoch(state["epoch"])
        self._done, self._finished = int(state["batches"]), False

    def _batches(self) -> list[list[int]]:
        self.sampler.set_epoch(self.sampler.epoch, start=self._done * self.batch_size)
        idx = list(self.sampler)
        batches = [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[Batch]:
        self._finished = False
        batches = self._batches()
        cuda = self.device.type == "cuda"
        if self.num_workers == 0:
            source: Iterator[Batch] = _prefetched(
                lambda b: self._source.fetch(b, alloc=_pinned if cuda else None), batches, self.prefetch)
        else:
            if self._workers is None:
                self._workers = DataLoader(self._source, batch_sampler=self._plan, num_workers=self.num_workers,
                                           collate_fn=collate, multiprocessing_context=self.multiprocessing_context,
                                           prefetch_factor=self.prefetch, persistent_workers=True)
            self._plan.batches = [EpochBatch(b, self.epoch) for b in batches]
            source = (_tensors(b, torch.Tensor.pin_memory) if cuda else b for b in self._workers)
        try:
            for batch in source:
                out = self._to_device(batch)
                self._done += 1
                yield out
            self._done, self._finished = 0, True
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def _to_device(self, batch: Batch) -> Batch:
        out = _tensors(batch, lambda t: t.to(self.device, non_blocking=True))
        if self.normalize and isinstance(out, dict):
            for k in [k for k in out if k.endswith("pixels")]:
                x = out.pop(k).permute(0, 3, 1, 2)  # NCHW view of NHWC memory (channels-last)
                if self._pool is None:
                    y = x.float()
                else:
                    b, c, h, w = x.shape
                    y = self._pool.alloc((b, h, w, c), torch.float32).permute(0, 3, 1, 2).copy_(x)
                out[k[:-len("pixels")] + "image"] = y.sub_(self._mean).div_(self._std)
        return out
