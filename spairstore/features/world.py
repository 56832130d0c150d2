"""The processes of one ``spairstore features`` run: this process alone, or those ``torchrun`` started.

``torchrun --nproc-per-node N -m spairstore features ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in their environment; :meth:`World.from_env` joins them in a
``torch.distributed`` group (NCCL when the processes run on CUDA devices, else Gloo). Two collective
steps are all the extraction needs, and both carry errors, so that a user error in one process stops
every process with the same message instead of leaving the others waiting: :meth:`World.first`
(the first process does something, e.g. prepare or commit, and every process gets its result) and
:meth:`World.each` (every process does its part; all learn whether every part succeeded).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from ..core.errors import FeatureError, SpairstoreError

T = TypeVar("T")

#: How long a process waits for the others at a collective step. Processes that finish their share
#: early wait for the slowest one; a process that dies is reported by torchrun, which stops the rest.
WAIT = timedelta(hours=24)


def _describe(e: Exception) -> str:
    return str(e) if isinstance(e, SpairstoreError) else f"{type(e).__name__}: {e}"


class World:
    """``rank`` of ``size`` processes; ``local_rank`` is the process's index on its machine (its GPU)."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, owns_group: bool = False):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self._owns_group = owns_group

    @classmethod
    def from_env(cls, device_type: str) -> World:
        """This process alone, or its place among the processes torchrun started (joining their
        process group, or using the one the caller initialised). ``device_type`` ``cuda`` pins the
        process to GPU ``LOCAL_RANK`` and uses NCCL; otherwise Gloo."""
        if dist.is_available() and dist.is_initialized():
            rank, size, owns = dist.get_rank(), dist.get_world_size(), False
        else:
            size = int(os.environ.get("WORLD_SIZE", "1"))
            if size <= 1:
                return cls()
            if "RANK" not in os.environ:
                raise FeatureError(f"WORLD_SIZE is {size} but RANK is not set; start the processes with torchrun")
            rank, owns = int(os.environ["RANK"]), True
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device_type == "cuda":
            if local >= torch.cuda.device_count():
                raise FeatureError(f"process with LOCAL_RANK {local} has no GPU ({torch.cuda.device_count()} visible): "
                                   f"start at most one process per GPU")
            torch.cuda.set_device(local)
        if owns:
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=WAIT)
        return cls(rank, size, local, owns)

    def first(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by the first process only; every process returns its result or raises its
        error (the first process its own exception, the others a :class:`FeatureError` saying it)."""
        if self.size == 1:
            return fn()
        error: Exception | None = None
        box: list[object] = [None]
        if self.rank == 0:
            try:
                box[0] = (True, fn())
            except Exception as e:
                error, box[0] = e, (False, _describe(e))
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        ok, value = box[0]  # type: ignore[misc]
        if not ok:
            raise FeatureError(str(value))
        return value  # type: ignore[return-value]

    def each(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by every process; if it failed in any, every process raises: the failed ones
        their own exception, the others a :class:`FeatureError` naming the failed processes."""
        if self.size == 1:
            return fn()
        result, error, message = None, None, None
        try:
            result = fn()
        except Exception as e:
            error, message = e, _describe(e)
        messages: list[str | None] = [None] * self.size
        dist.all_gather_object(messages, message)
        if error is not None:
            raise error
        failed = [f"process {k} of {self.size}: {m}" for k, m in enumerate(messages) if m is not None]
        if failed:
            raise FeatureError("; ".join(failed))
        return result  # type: ignore[return-value]

    def close(self) -> None:
        """Leave the process group if :meth:`from_env` joined it."""
        if self._owns_group:
            dist.destroy_process_group()
            self._owns_group = False
