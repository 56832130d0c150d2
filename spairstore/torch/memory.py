"""Batch memory: where a batch's payloads are read into.

A fresh buffer of tens of MB costs a page fault per 4 KiB page, which can take longer than reading the
batch into it; batches therefore come from recycled memory (:class:`BufferPool`) in the main process,
and from shared memory in a DataLoader worker (:func:`shared_alloc`) so that the batch crosses to the
main process without another copy. :class:`BatchMemory` picks between them per process.
"""
from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

#: ``alloc(shape, dtype) -> tensor``: where batch payloads are read into.


#: ``alloc(shape, dtype) -> tensor``: where batch payloads are read into.
Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def shared_alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new tensor in shared memory (as ``default_collate`` makes them in a DataLoader worker), so that
    sending the batch to the main process does not copy it again."""
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class BufferPool:
    """Batch buffers reused once no tensor or array made from them is alive any more.

    A fresh buffer of tens of MB costs a page fault per 4 KiB page, which can take longer than reading
    the batch into it; a batch's tensors therefore come from recycled memory. A buffer is handed out
    as a numpy view wrapped by ``torch.from_numpy``: every tensor sharing the memory keeps that view
    alive, so a dead weak reference to it means the buffer is free again. At most ``keep`` buffers are
    retained; beyond that, allocations are plain.
    """

    def __init__(self, keep: int = 16):
        self.keep = keep
        self._pool: list[tuple[np.ndarray, weakref.ref | None]] = []
        self._lock = threading.Lock()  # a Loader reads ahead in a thread

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            return self._alloc(shape, dtype)

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        free = [k for k, (buf, ref) in enumerate(self._pool) if buf.nbytes >= nbytes and (ref is None or ref() is None)]
        if free:
            k = min(free, key=lambda k: self._pool[k][0].nbytes)
            buf = self._pool[k][0]
        else:
            buf, k = np.empty(max(nbytes, 1), dtype=np.uint8), len(self._pool)
            if k == self.keep:
                return torch.from_numpy(buf[:nbytes]).view(dtype).view(shape)
            self._pool.append((buf, None))
        view = buf[:nbytes]
        self._pool[k] = (buf, weakref.ref(view))
        return torch.from_numpy(view).view(dtype).view(shape)


class BatchMemory:
    """``alloc(shape, dtype)`` for batch payloads: shared memory in a DataLoader worker, a
    :class:`BufferPool` of this process elsewhere. Pickles empty: each process makes its own."""

    def __init__(self) -> None:
        self._pool: BufferPool | None = None
        self._pid = 0

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if get_worker_info() is not None:
            return shared_alloc(shape, dtype)
        if self._pool is None or self._pid != os.getpid():  # a forked child starts its own pool
            self._pool, self._pid = BufferPool(), os.getpid()
        return self._pool.alloc(shape, dtype)

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
