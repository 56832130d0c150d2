"""Storage backends behind one interface (xarray-style pluggable backends).

A backend maps the logical schema (array paths like ``images/pixels``, JSON-valued root attributes)
onto a container format. Writers create and fill arrays; readers list and read them and, for arrays
stored contiguous and unfiltered, say where their bytes lie so the reader's hot path can memory-map
them without the library.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np


class RawExtent(NamedTuple):
    """Where an array's bytes lie: a plain file, a byte offset, the array's shape and dtype."""

    file: Path
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype


class ArrayWriter(Protocol):
    def create(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """A contiguous, unfiltered array, written later in row ranges."""

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        """Rows ``start:start + len(data)`` of an array made by :meth:`create`."""

    def put(self, name: str, data: np.ndarray) -> None:
        """A whole array at once."""

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        """Root attributes; values are JSON-serialisable."""

    def close(self) -> None: ...


class RowWriter(Protocol):
    """Fills rows of the hot arrays of a store whose structure is complete and closed, at the extents
    its reader reported, such that a process killed at any moment leaves the structure intact (only
    unwritten rows missing)."""

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        """Rows ``start:start + len(data)`` of a hot array."""

    def flush(self) -> None:
        """Make every row written so far durable (fsync)."""

    def close(self) -> None: ...


class ArrayReader(Protocol):
    attrs: dict[str, Any]

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Every array path with its shape and dtype."""

    def read(self, name: str, index: Any = ()) -> np.ndarray:
        """An array, or ``index`` of it (numpy basic or sorted integer indexing)."""

    def extent(self, name: str) -> RawExtent | None:
        """The array's raw byte location, or None where it is chunked, filtered or unallocated."""

    def close(self) -> None: ...


def is_hdf5(path: Path) -> bool:
    return Path(path).suffix.lower() in (".h5", ".hdf5", ".hdf")


def writer_for(path: Path) -> ArrayWriter:
    """A writer for a new store at ``path`` (the format follows the suffix)."""
    from . import hdf5

    return hdf5.HDF5Writer(path)


def row_writer_for(path: Path, extents: dict[str, RawExtent | None]) -> RowWriter:
    """A :class:`RowWriter` for the closed structure of a store at ``path``."""
    from . import hdf5

    return hdf5.HDF5RowWriter(path, extents)


def mark_complete(path: Path, complete: bool) -> None:
    """Durably make the store at ``path`` openable (``complete``) or not: a store being filled in
    place must never open as if it were finished."""
    from . import hdf5

    hdf5.mark_complete(path, complete)


def reader_for(path: Path) -> ArrayReader:
    """A reader for an existing store at ``path``."""
    from . import hdf5

    return hdf5.HDF5Reader(path)
