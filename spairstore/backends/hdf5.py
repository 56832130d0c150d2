"""HDF5 backend: one file, hot arrays contiguous and unfiltered, attributes as JSON strings."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import StoreError
from . import RawExtent


class HDF5Writer:
    """Arrays made by :meth:`create` are allocated at once and never filled by HDF5, so their rows are
    written with ``os.pwrite`` at the allocated offset: no HDF5 call (nor the GIL h5py holds through
    one) on the per-image path, and decoding threads keep running while a row is written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = h5py.File(self.path, "w")
        self._fd = os.open(self.path, os.O_WRONLY)
        self._rows: dict[str, tuple[int, int]] = {}  # name -> (byte offset, bytes per row)

    def create(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        space = h5py.h5s.create_simple(tuple(shape))
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        parent = self._f.require_group(str(Path(name).parent)) if "/" in name else self._f
        dtype = np.dtype(dtype)
        dset = h5py.h5d.create(parent.id, Path(name).name.encode(), h5py.h5t.py_create(dtype), space, dcpl=dcpl)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._rows[name] = (dset.get_offset() or 0, row)

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        offset, row = self._rows[name]
        buf = np.ascontiguousarray(data)
        os.pwrite(self._fd, memoryview(buf).cast("B"), offset + start * row)

    def put(self, name: str, data: np.ndarray) -> None:
        self._f.create_dataset(name, data=np.asarray(data))

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        for k, v in attrs.items():
            self._f.attrs[k] = json.dumps(v)

    def close(self) -> None:
        os.close(self._fd)
        self._f.flush()
        self._f.close()


class HDF5Reader:
    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._f = h5py.File(self.path, "r")
        except FileNotFoundError:
            raise StoreError(f"{self.path}: no such store") from None
        except OSError as e:
            raise StoreError(f"{self.path}: not a readable HDF5 store ({e})") from None
        try:
            self.attrs = {k: json.loads(v) for k, v in self._f.attrs.items()}
        except (TypeError, ValueError, OSError) as e:
            raise StoreError(f"{self.path}: unreadable root attributes ({e})") from None

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.shape, obj.dtype)

        self._f.visititems(visit)
        return out

    def read(self, name: str, index: Any = ()) -> np.ndarray:
        try:
            return self._f[name][index]
        except (KeyError, OSError) as e:
            raise StoreError(f"{self.path}: cannot read {name} ({e})") from None

    def extent(self, name: str) -> RawExtent | None:
        d = self._f[name]
        if d.chunks is not None or d.compression is not None or d.external or d.is_virtual:
            return None
        offset = d.id.get_offset()
        if offset is None:
            return None
        return RawExtent.contiguous(self.path, int(offset), tuple(d.shape), d.dtype)

    def close(self) -> None:
        self._f.close()
