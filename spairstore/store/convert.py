"""Copy a store into another container format: ``spairstore convert`` (HDF5 <-> Zarr), lossless.

Every array is copied with its dtype and shape, every root attribute with its JSON value; hot arrays
stay hot (uncompressed, raw-readable) in the new format. The source may be remote (a Zarr URL). The new
store is built in the staging folder of a ``convert`` transaction (:mod:`.transaction`) and switched
into place: a kill leaves the old store or the new one at ``dst``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..core.errors import SpairstoreError, StoreError
from ..core.schema import FORMAT_NAME, is_hot
from ..core.tables import mib
from .backends import (
    ArrayReader,
    ArrayWriter,
    RawExtent,
    backend_for,
    check_replaceable,
    disk_bytes,
    is_url,
    writer_for,
)
from .feature_sets import set_attrs, sidecar_dir, sidecar_path
from .reader import Store
from .transaction import Transaction, disk_full, remove, through_link

#: Rows of a hot array copied per step: bounded memory whatever the store size.
BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class ConvertSummary:
    src: str
    dst: Path
    format: str
    arrays: int
    file_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)  #: what became of the sets of the store replaced

    def __str__(self) -> str:
        return "\n".join([f"converted {self.src} into {self.dst} ({self.format}, {self.arrays} arrays, "
                          f"{mib(self.file_bytes)}) in {self.seconds:.1f} s", *(f"  note: {n}" for n in self.notes)])


def copy_arrays(r: ArrayReader, w: ArrayWriter, skip: Callable[[str], bool] = lambda name: False,
                progress: Callable[[int], object] | None = None, hot: bool = False) -> None:
    """Copy every array of ``r`` that ``skip`` does not name into ``w``: tables whole, hot arrays (all
    arrays, with ``hot``) in blocks of rows (bounded memory). ``progress`` is called with the bytes of
    each array copied."""
    for name, (shape, dtype) in r.shapes().items():
        if skip(name):
            continue
        if not (hot or is_hot(name)):
            w.put(name, r.read(name))
        else:
            w.create(name, shape, dtype)
            step = max(1, BLOCK_BYTES // max(1, math.prod(shape[1:]) * dtype.itemsize))
            for start in range(0, shape[0], step):
                w.write(name, start, r.read(name, slice(start, start + step)))
        if progress is not None:
            progress(math.prod(shape) * dtype.itemsize)


class _StoreArrays:
    """An opened :class:`Store` as an :class:`ArrayReader`: every array it sees, the feature sets beside
    an HDF5 store included, with their attributes in ``feature_sets``."""

    def __init__(self, store: Store):
        self.store = store
        self.attrs = dict(store.attrs)
        if store.feature_sets or "feature_sets" in store.attrs:
            self.attrs["feature_sets"] = store.feature_sets

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return self.store.shapes

    def read(self, name: str, index: Any = ()) -> np.ndarray:
        n = self.store.shapes[name][0][0]
        part = slice(0, n) if index == () else index
        return np.array(self.store.array(name, *part.indices(n)[:2]))

    def extent(self, name: str) -> RawExtent | None:
        return self.store.extents.get(name)

    def close(self) -> None:
        self.store.close()


def _write_sidecars(r: _StoreArrays, store: Path) -> None:
    """Each feature set of ``r`` as a sidecar file beside the HDF5 store ``store`` (not yet written)."""
    sets = r.store.feature_sets
    if not sets:
        return
    sidecar_dir(store).mkdir()
    for name, attrs in sets.items():
        w = writer_for(sidecar_path(store, name), "hdf5")
        try:
            copy_arrays(r, w, skip=lambda a, name=name: not a.startswith(f"features/{name}/"), hot=True)
            w.set_attrs(set_attrs(name, attrs, r.store.fingerprint))
        finally:
            w.close()


def convert(src: str | Path, dst: str | Path, format: str | None = None, overwrite: bool = False,
            shard_bytes: int | None = None, progress: bool = False) -> ConvertSummary:
    """Write the store at ``src`` (local path or Zarr URL) as a new store at ``dst``, in ``format``
    (default: from the suffix of ``dst``). Replaces ``dst`` only with ``overwrite=True``, and only once
    the copy is complete. ``shard_bytes`` is the Zarr shard size of hot arrays.

    Feature sets come along: into the Zarr store's groups, or (to HDF5) as feature-set files beside the
    new store (``<dst>.features/<name>.h5``), as ``spairstore features`` writes them. Those of the store
    replaced that ``src`` has no set of that name for are kept where made from the same images (as a
    ``pack --overwrite`` keeps them); the summary's notes say what became of each.
    """
    t0 = time.perf_counter()
    if is_url(dst):
        raise SpairstoreError(f"{dst}: convert writes local stores only (remote stores are read-only)")
    dst = through_link(dst)
    if not is_url(src) and Path(src).resolve() == dst.resolve():
        raise SpairstoreError(f"{dst}: source and destination are the same store")
    if dst.exists():
        check_replaceable(dst)
        if not overwrite:
            raise SpairstoreError(f"{dst} exists; pass --overwrite (overwrite=True) to replace it")
    backend = backend_for(dst, format)
    format = backend.name
    r = _StoreArrays(Store(src))
    try:
        if r.attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{src}: not a spairstore store (format attribute {r.attrs.get('format')!r})")
        shapes = r.shapes()
        total = sum(math.prod(s) * d.itemsize for s, d in shapes.values())
        tx = Transaction.open(dst, "convert", who="convert", error=SpairstoreError)
        try:
            tx.discard()  # not resumable: what a killed convert staged is swept, never resumed
            tx.begin({"src": str(src)})
            tx.reserve(total, "the converted store", staged=0)
        except BaseException:
            tx.finish()
            raise
        try:
            tmp = tx.dir / f"store{dst.suffix}"
            inline = backend.sets_inside
            with tqdm(total=total, desc="convert", unit="B", unit_scale=True, disable=not progress,
                      dynamic_ncols=True) as bar:
                w = writer_for(tmp, format, shard_bytes)
                try:
                    copy_arrays(r, w, skip=lambda a: not inline and a.startswith("features/"), progress=bar.update)
                    w.set_attrs(r.attrs if inline or "feature_sets" not in r.attrs
                                else {**r.attrs, "feature_sets": {}})
                finally:
                    w.close()
                if not inline:
                    _write_sidecars(r, tmp)
            notes = backend.keep_groups(dst, tmp) if dst.exists() and backend.guess_can_open(dst) else []
            with_sets = sidecar_dir(tmp).is_dir()
            if with_sets:
                tx.switch(sidecar_dir(tmp), sidecar_dir(dst))  # sets of these images: valid beside either store
            tx.switch(tmp, dst)
            if not with_sets and not inline:
                remove(sidecar_dir(dst))  # an empty folder: keep_groups kept every set file
            tx.finish()
        except BaseException as e:
            tx.finish()  # (Ctrl-C, an error) a convert starts over anyway: give the space back
            if not disk_full(e):
                raise
            raise SpairstoreError(f"{dst}: the disk filled up while converting; nothing of it was kept: make room "
                                  "and run the command again") from None
    finally:
        r.close()
    return ConvertSummary(str(src), dst, format, len(shapes), disk_bytes(dst), time.perf_counter() - t0, notes)
