"""Batch memory: where a batch's payloads are read into, and how a worker's batch reaches the main process.

A fresh buffer of tens of MB costs a page fault per 4 KiB page, which can take longer than reading the
batch into it. So batch memory is reused:

- in the main process, from a :class:`BufferPool` (a buffer is free again once no tensor uses it);
- in a DataLoader worker, from a ring of shared-memory *slots* (files in ``/dev/shm``, created on demand,
  at most :data:`RING` per worker, each mapped once by the worker and once by the main process). The
  batch's tensors are read straight into a slot; :func:`ship` makes the collated batch pickle as
  ``(slot, offset, shape, dtype)`` references (small tensors by value), so nothing is copied and no new
  shared memory is made per batch. The main process rebuilds the tensors over its mapping of the slot
  and, when the last of them dies, clears the slot's *held* byte; the worker reuses a slot only when its
  own tensors over it are gone and that byte is clear. With no free slot (a training loop keeping many
  batches alive), a batch falls back to fresh shared memory: slower, never wrong.

A worker unlinks its slot files when it exits (the main process's mappings keep the memory until its
tensors are gone). A worker killed outright leaves its files (``/dev/shm/spairstore-<pid>-*``) behind;
the next worker to start removes every such file whose process is gone.
"""
from __future__ import annotations

import mmap
import os
import secrets
import threading
import weakref
from collections.abc import Callable
from multiprocessing import util
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

#: ``alloc(shape, dtype) -> tensor``: where batch payloads are read into.
Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]

RING = 6  #: most slots per worker: batches in flight (prefetch), held by the consumer, being read
_SHM = "/dev/shm"
_HEADER = 64  #: bytes before a slot's payload; byte 0 is 1 while the main process holds a batch in it
_ALIGN = 64
_BY_VALUE = 1 << 16  #: tensors up to this many bytes outside a slot are pickled by value, not as shared memory


def shared_alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new tensor in shared memory (as ``default_collate`` makes them in a DataLoader worker), so that
    sending the batch to the main process does not copy it again."""
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return int(np.prod(shape)) * dtype.itemsize


class BufferPool:
    """Batch buffers reused once no tensor or array made from them is alive any more.

    A buffer is handed out as a numpy view wrapped by ``torch.from_numpy``: every tensor sharing the
    memory keeps that view alive, so a dead weak reference to it means the buffer is free again. At most
    ``keep`` buffers are retained; beyond that, allocations are plain.
    """

    def __init__(self, keep: int = 16):
        self.keep = keep
        self._pool: list[tuple[np.ndarray, weakref.ref | None]] = []
        self._lock = threading.Lock()  # a Loader reads ahead in a thread

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            return self._alloc(shape, dtype)

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = _nbytes(shape, dtype)
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


class _Slot:
    """One shared-memory file of a worker's ring, mapped in this (the worker) process."""

    def __init__(self, capacity: int):
        self.path = f"{_SHM}/spairstore-{os.getpid()}-{secrets.token_hex(6)}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, _HEADER + capacity)
            self.map = mmap.mmap(fd, _HEADER + capacity)
        finally:
            os.close(fd)
        self.capacity = capacity
        self.address = 0  # of the payload, set by the first batch
        self.batch: weakref.ref | None = None  # the current batch's root array; dead = no tensor of ours left
        _SLOTS[self.path] = self

    def free(self) -> bool:
        # Our tensors first: they die only after ship() has set the held byte, so this order cannot miss it.
        return (self.batch is None or self.batch() is None) and self.map[0] == 0

    def unlink(self) -> None:
        _SLOTS.pop(self.path, None)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


_SLOTS: dict[str, _Slot] = {}  # this worker's slots, by path


class _SlotBatch:
    """``alloc`` for one batch: consecutive, aligned pieces of a slot; what does not fit goes to fresh
    shared memory and is remembered, so the ring's next slot is large enough."""

    def __init__(self, ring: _Ring, slot: _Slot | None):
        self.ring, self.slot, self.used = ring, slot, 0
        if slot is not None:
            base = np.frombuffer(slot.map, dtype=np.uint8, count=slot.capacity, offset=_HEADER)
            slot.batch = weakref.ref(base)
            self.root = torch.from_numpy(base)  # every piece is a view of it: alive while any piece is
            slot.address = self.root.data_ptr()

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = _nbytes(shape, dtype)
        start = -(-self.used // _ALIGN) * _ALIGN
        self.used = start + n
        self.ring.want = max(self.ring.want, self.used)
        if self.slot is None or self.used > self.slot.capacity:
            return shared_alloc(shape, dtype)
        return self.root[start:start + n].view(dtype).view(shape)


class _Ring:
    """A worker's slots. A slot too small for the batches seen so far is replaced once it is free."""

    def __init__(self) -> None:
        self.slots: list[_Slot] = []
        self.want = 0  # bytes the largest batch so far needed
        util.Finalize(self, _unlink_all, args=(self.slots,), exitpriority=0)  # when the worker exits
        sweep_dead_slots()

    def batch(self) -> _SlotBatch:
        for k, s in enumerate(self.slots):
            if s.free():
                if s.capacity >= self.want:
                    return _SlotBatch(self, s)
                s.unlink()
                self.slots[k] = _Slot(self.want)
                return _SlotBatch(self, self.slots[k])
        if self.want and len(self.slots) < RING:
            self.slots.append(_Slot(self.want))
            return _SlotBatch(self, self.slots[-1])
        return _SlotBatch(self, None)  # the first batch (size unknown) or every slot in use


def _unlink_all(slots: list[_Slot]) -> None:
    for s in slots:
        s.unlink()


def sweep_dead_slots() -> list[str]:
    """Remove the slot files of workers that no longer run (killed before they could unlink them);
    returns their paths. A mapping of such a file stays valid: only the name goes."""
    removed = []
    for name in os.listdir(_SHM) if os.path.isdir(_SHM) else ():
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != "spairstore" or not parts[1].isdecimal():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # alive (or a reused pid: left alone)
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        try:
            os.unlink(f"{_SHM}/{name}")
            removed.append(f"{_SHM}/{name}")
        except FileNotFoundError:
            pass
    return removed


class BatchMemory:
    """Where a dataset reads its batches: :meth:`batch` gives the ``alloc`` for one batch -- a slot of
    this worker's ring in a DataLoader worker, this process's :class:`BufferPool` elsewhere. Pickles
    empty: each process makes its own."""

    def __init__(self) -> None:
        self._pool: BufferPool | None = None
        self._ring: _Ring | None = None
        self._pid = 0

    def batch(self) -> Alloc:
        if self._pid != os.getpid():  # a forked child starts its own
            self._pool = self._ring = None
            self._pid = os.getpid()
        if get_worker_info() is not None:
            if not os.path.isdir(_SHM):
                return shared_alloc
            if self._ring is None:
                self._ring = _Ring()
            return self._ring.batch()
        if self._pool is None:
            self._pool = BufferPool()
        return self._pool.alloc

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]


def ship(batch: dict[str, Any]) -> dict[str, Any]:
    """In a DataLoader worker: ``batch`` as a dict that pickles its slot tensors by reference (see the
    module docstring) and unpickles, in the main process, to a plain dict of tensors. Elsewhere: ``batch``."""
    return _Shipped(batch) if get_worker_info() is not None else batch


def _find_slot(t: torch.Tensor) -> tuple[_Slot, int] | None:
    if not t.is_contiguous() or t.device.type != "cpu":
        return None
    p = t.data_ptr()
    for s in _SLOTS.values():
        if s.address and s.address <= p and p + t.nbytes <= s.address + s.capacity:
            return s, p - s.address
    return None


class _Shipped(dict):
    """A worker's collated batch on its way to the main process."""

    def __reduce__(self) -> tuple[Callable[..., dict[str, Any]], tuple[Any, ...]]:
        items: list[tuple[str, str, Any]] = []
        for k, v in self.items():
            found = _find_slot(v) if isinstance(v, torch.Tensor) else None
            if found is not None:
                slot, offset = found
                slot.map[0] = 1  # held by the main process from now until its tensors die
                items.append((k, "slot", (slot.path, slot.capacity, offset, str(v.dtype)[6:], tuple(v.shape))))
            elif isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.nbytes <= _BY_VALUE:
                items.append((k, "value", v.numpy()))
            else:
                items.append((k, "object", v))
        return _receive, (items,)


class _Mappings:
    """The main process's mappings of workers' slots, kept while their files exist, so that a slot's
    pages are mapped (and faulted in) once, not once per batch."""

    def __init__(self) -> None:
        self.maps: dict[str, mmap.mmap] = {}
        self.lock = threading.Lock()  # batches are unpickled in the DataLoader's pin-memory thread too

    def get(self, path: str, size: int) -> mmap.mmap:
        with self.lock:
            m = self.maps.get(path)
            if m is None or len(m) != size:
                for p in [p for p in self.maps if not os.path.exists(p)]:  # slots of workers gone or replaced
                    del self.maps[p]
                fd = os.open(path, os.O_RDWR)
                try:
                    m = self.maps[path] = mmap.mmap(fd, size)
                finally:
                    os.close(fd)
            return m


_MAPPINGS = _Mappings()


def _receive(items: list[tuple[str, str, Any]]) -> dict[str, Any]:
    """Rebuild a shipped batch in the main process (see :class:`_Shipped`)."""
    out: dict[str, Any] = {}
    roots: dict[str, torch.Tensor] = {}
    for k, kind, v in items:
        if kind == "slot":
            path, capacity, offset, dtype, shape = v
            root = roots.get(path)
            if root is None:
                m = _MAPPINGS.get(path, _HEADER + capacity)
                base = np.frombuffer(m, dtype=np.uint8, count=capacity, offset=_HEADER)
                weakref.finalize(base, m.__setitem__, 0, 0)  # the batch's last tensor gone: slot free
                root = roots[path] = torch.from_numpy(base)
            dt = getattr(torch, dtype)
            out[k] = root[offset:offset + _nbytes(shape, dt)].view(dt).view(shape)
        elif kind == "value":
            out[k] = torch.from_numpy(v)
        else:
            out[k] = v
    return out
