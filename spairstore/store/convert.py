"""Copy a store into another container format: ``spairstore convert`` (HDF5 <-> Zarr), lossless.

Every array is copied with its dtype and shape, every root attribute with its JSON value; hot arrays
stay hot (uncompressed, raw-readable) in the new format. The source may be remote (a Zarr URL).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ..core.errors import SpairstoreError, StoreError
from ..core.schema import FORMAT_NAME, is_hot
from .backends import ArrayReader, ArrayWriter, disk_bytes, format_of, is_url, reader_for, staged, writer_for

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

    def __str__(self) -> str:
        return (f"converted {self.src} into {self.dst} ({self.format}, {self.arrays} arrays, "
                f"{self.file_bytes / 2**20:,.1f} MiB) in {self.seconds:.1f} s")


def copy_arrays(r: ArrayReader, w: ArrayWriter, skip: Callable[[str], bool] = lambda name: False,
                progress: Callable[[int], object] | None = None) -> None:
    """Copy every array of ``r`` that ``skip`` does not name into ``w``: tables whole, hot arrays in
    blocks of rows (bounded memory). ``progress`` is called with the bytes of each array copied."""
    for name, (shape, dtype) in r.shapes().items():
        if skip(name):
            continue
        if not is_hot(name):
            w.put(name, r.read(name))
        else:
            w.create(name, shape, dtype)
            step = max(1, BLOCK_BYTES // max(1, math.prod(shape[1:]) * dtype.itemsize))
            for start in range(0, shape[0], step):
                w.write(name, start, r.read(name, slice(start, start + step)))
        if progress is not None:
            progress(math.prod(shape) * dtype.itemsize)


def convert(src: str | Path, dst: str | Path, format: str | None = None, overwrite: bool = False,
            shard_bytes: int | None = None, progress: bool = False) -> ConvertSummary:
    """Write the store at ``src`` (local path or Zarr URL) as a new store at ``dst``, in ``format``
    (default: from the suffix of ``dst``). Replaces ``dst`` only with ``overwrite=True``, and only once
    the copy is complete. ``shard_bytes`` is the Zarr shard size of hot arrays."""
    t0 = time.perf_counter()
    if is_url(dst):
        raise SpairstoreError(f"{dst}: convert writes local stores only (remote stores are read-only)")
    dst = Path(dst)
    if not is_url(src) and Path(src).resolve() == dst.resolve():
        raise SpairstoreError(f"{dst}: source and destination are the same store")
    r = reader_for(src)
    try:
        if r.attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{src}: not a spairstore store (format attribute {r.attrs.get('format')!r})")
        with staged(dst, overwrite) as tmp:
            format = format_of(dst, format)
            shapes = r.shapes()
            total = sum(math.prod(s) * d.itemsize for s, d in shapes.values())
            bar = tqdm(total=total, desc="convert", unit="B", unit_scale=True, disable=not progress,
                       dynamic_ncols=True)
            w = writer_for(tmp, format, shard_bytes)
            try:
                copy_arrays(r, w, progress=bar.update)
                w.set_attrs(r.attrs)
            finally:
                w.close()
                bar.close()
    finally:
        r.close()
    return ConvertSummary(str(src), dst, format, len(shapes), disk_bytes(dst), time.perf_counter() - t0)
