"""Storage backends behind one interface (xarray-style pluggable backends).

A backend maps the logical schema (array paths like ``images/pixels``, JSON-valued root attributes)
onto a container format: ``hdf5`` (one file, the default) or ``zarr`` (a Zarr v3 directory, local or
remote). Writers create and fill arrays; readers list and read them and, for arrays stored
uncompressed in local files, say where their bytes lie (:class:`RawExtent`) so the reader's hot path
can read them without the library.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from ...core.errors import SpairstoreError, StoreError

FORMATS = ("hdf5", "zarr")
_SUFFIXES = {".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5", ".zarr": "zarr"}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class RawExtent(NamedTuple):
    """Where an uncompressed array's bytes lie in plain local files.

    Axis 0 is cut into chunks of ``chunk_rows`` rows. Chunk ``c`` holds rows ``c * chunk_rows`` up to
    the next chunk (trailing axes whole, C order) from byte ``offsets[c]`` of ``files[file_ids[c]]``;
    ``offsets[c] == -1`` marks a chunk never written, which reads as zeros. A contiguous array (HDF5)
    is the one-chunk case; a sharded Zarr array has one chunk per record.
    """

    files: tuple[Path, ...]
    file_ids: np.ndarray  #: int32 (chunks,)
    offsets: np.ndarray  #: int64 (chunks,), bytes
    chunk_rows: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @classmethod
    def contiguous(cls, file: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> RawExtent:
        return cls((Path(file),), np.zeros(1, np.int32), np.array([offset], np.int64), max(1, shape[0]),
                   tuple(shape), np.dtype(dtype))


class ArrayWriter(Protocol):
    def create(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        """A hot array (uncompressed, readable as raw bytes), written later in row ranges."""

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
        """An array, or ``index`` of it (numpy basic indexing, or a sorted integer array of rows)."""

    def extent(self, name: str) -> RawExtent | None:
        """The array's raw byte location, or None where it is compressed, remote or unallocated."""

    def close(self) -> None: ...


def is_url(path: str | Path) -> bool:
    """A remote location (``http://``, ``s3://``, any fsspec protocol) rather than a local path."""
    return isinstance(path, str) and "://" in path


def format_of(path: str | Path, format: str | None = None) -> str:
    """The backend of a store: ``format`` when given, else what an existing local store holds, else
    the suffix (``.h5``/``.hdf5``/``.hdf`` -> hdf5, ``.zarr`` -> zarr). Remote stores are Zarr."""
    if format is not None:
        if format not in FORMATS:
            raise SpairstoreError(f"unknown store format {format!r} (choose {' or '.join(FORMATS)})")
        return format
    if is_url(path):
        if _SUFFIXES.get(Path(str(path).rstrip("/")).suffix.lower()) == "hdf5":
            raise StoreError(f"{path}: remote stores must be Zarr; convert it with `spairstore convert`")
        return "zarr"
    p = Path(path)
    if (p / "zarr.json").is_file() or (p / ".zgroup").is_file():
        return "zarr"
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(8) == _HDF5_SIGNATURE:
                return "hdf5"
    try:
        return _SUFFIXES[p.suffix.lower()]
    except KeyError:
        raise StoreError(f"{path}: cannot tell the store format; name it .h5 or .zarr "
                              f"(or pass --format hdf5|zarr)") from None


def writer_for(path: Path, format: str | None = None, shard_bytes: int | None = None) -> ArrayWriter:
    """A writer for a new store at ``path``. ``shard_bytes`` is the Zarr shard size of hot arrays."""
    if format_of(path, format) == "zarr":
        from . import zarr

        return zarr.ZarrWriter(path, **({} if shard_bytes is None else {"shard_bytes": shard_bytes}))
    from . import hdf5

    return hdf5.HDF5Writer(path)


def row_writer_for(path: Path, extents: dict[str, RawExtent | None]) -> RowWriter:
    """A :class:`RowWriter` for the closed structure of an HDF5 store at ``path`` (Zarr stores are
    written in one go: see ``writer.pack``)."""
    from . import hdf5

    return hdf5.HDF5RowWriter(path, extents)


def mark_complete(path: Path, complete: bool) -> None:
    """Durably make the HDF5 store at ``path`` openable (``complete``) or not: a store being filled in
    place must never open as if it were finished."""
    from . import hdf5

    hdf5.mark_complete(path, complete)


def reader_for(path: str | Path) -> ArrayReader:
    """A reader for an existing store at a local ``path`` or a URL."""
    if format_of(path) == "zarr":
        from . import zarr

        return zarr.ZarrReader(path)
    from . import hdf5

    return hdf5.HDF5Reader(Path(path))


# -- whole stores on disk ------------------------------------------------------------------------------
def disk_bytes(path: Path) -> int:
    """Bytes a local store occupies: its file, or every file of its directory."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
