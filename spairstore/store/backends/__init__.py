"""Storage backends behind one interface (xarray-style pluggable backends).

A backend maps the logical schema (array paths like ``images/pixels``, JSON-valued root attributes)
onto a container format: ``hdf5`` (one file, the default) or ``zarr`` (a Zarr v3 directory, local or
remote). Writers create and fill arrays; readers list and read them and, for arrays stored
uncompressed in local files, say where their bytes lie (:class:`RawExtent`) so the reader's hot path
can read them without the library.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from ...core.errors import FeatureError, NotAStore, SpairstoreError, StoreError
from ...core.schema import FORMAT_NAME

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


class Backend:
    """A container format, after xarray's ``BackendEntrypoint``: how a store of it is recognised,
    opened, built and given a feature set. Callers ask :func:`backend_for` and never branch on the
    format themselves."""

    name: str
    suffixes: tuple[str, ...]
    #: a pack fills the store's structure in place and can resume after a kill (else: built in one go)
    resumable: bool
    #: feature sets are groups inside the store (else files beside it)
    sets_inside: bool

    def guess_can_open(self, path: str | Path) -> bool:
        """Whether an existing store at ``path`` is of this format (by content, not by name)."""
        raise NotImplementedError

    def open(self, path: str | Path) -> ArrayReader:
        """A reader of the store at ``path``."""
        raise NotImplementedError

    def build(self, path: Path, shard_bytes: int | None = None) -> ArrayWriter:
        """A writer of a new store at ``path`` (a staging path: the transaction switches it in)."""
        raise NotImplementedError

    def add_group(self, store: Path, name: str, shape: tuple[int, ...], attrs: dict[str, Any],
                  store_fingerprint: str, unit_rows: int) -> Any:
        """The :class:`~spairstore.store.feature_sets.SetWriter` that adds (or replaces) feature set
        ``name`` of ``shape`` to the local store, inside its transaction."""
        raise NotImplementedError

    def drop_group(self, store: Path, name: str) -> int:
        """Delete feature set ``name`` of the local store (call inside its transaction); returns the
        bytes it occupied on disk."""
        raise NotImplementedError

    def keep_groups(self, old: Path, new: Path) -> list[str]:
        """Before the store ``new``, built apart, replaces ``old`` (``pack``/``convert --overwrite``):
        keep old's feature sets that new has no set of that name for, where they belong to new's
        images; returns a note per set of old."""
        raise NotImplementedError


class _HDF5Backend(Backend):
    name, suffixes, resumable, sets_inside = "hdf5", (".h5", ".hdf5", ".hdf"), True, False

    def guess_can_open(self, path: str | Path) -> bool:
        p = Path(path)
        if is_url(path) or not p.is_file():
            return False
        with open(p, "rb") as f:
            return f.read(8) == _HDF5_SIGNATURE

    def open(self, path: str | Path) -> ArrayReader:
        from . import hdf5

        return hdf5.HDF5Reader(Path(path))

    def build(self, path: Path, shard_bytes: int | None = None) -> ArrayWriter:
        from . import hdf5

        return hdf5.HDF5Writer(path)

    def add_group(self, store: Path, name: str, shape: tuple[int, ...], attrs: dict[str, Any],
                  store_fingerprint: str, unit_rows: int) -> Any:
        from . import hdf5

        return hdf5.SidecarSet(store, name, shape, attrs, store_fingerprint, unit_rows)

    def drop_group(self, store: Path, name: str) -> int:
        from ..feature_sets import sidecar_path
        from ..transaction import fsync_path

        path = sidecar_path(store, name)
        if not path.is_file():
            raise FeatureError(f"{store}: feature set {name!r} is inside the store file (written by an older "
                               f"spairstore); `spairstore convert` it to a new store to drop it")
        freed = path.stat().st_size
        path.unlink()
        fsync_path(path.parent)
        return freed

    def keep_groups(self, old: Path, new: Path) -> list[str]:
        from . import hdf5

        return hdf5.keep_sets(old, new)


class _ZarrBackend(Backend):
    name, suffixes, resumable, sets_inside = "zarr", (".zarr",), False, True

    def guess_can_open(self, path: str | Path) -> bool:
        p = Path(path)
        return is_url(path) or (p / "zarr.json").is_file() or (p / ".zgroup").is_file()

    def open(self, path: str | Path) -> ArrayReader:
        from . import zarr

        return zarr.ZarrReader(path)

    def build(self, path: Path, shard_bytes: int | None = None) -> ArrayWriter:
        from . import zarr

        return zarr.ZarrWriter(path, **({} if shard_bytes is None else {"shard_bytes": shard_bytes}))

    def add_group(self, store: Path, name: str, shape: tuple[int, ...], attrs: dict[str, Any],
                  store_fingerprint: str, unit_rows: int) -> Any:
        from . import zarr

        return zarr.ZarrSet(store, name, shape, attrs)

    def drop_group(self, store: Path, name: str) -> int:
        from . import zarr

        freed = disk_bytes(Path(store) / "features" / name)
        zarr.ZarrSet(store, name, (0,), {}).drop()
        return freed

    def keep_groups(self, old: Path, new: Path) -> list[str]:
        from . import zarr

        return zarr.keep_sets(old, new)


#: the registry: format name -> backend
BACKENDS: dict[str, Backend] = {b.name: b for b in (_HDF5Backend(), _ZarrBackend())}
FORMATS = tuple(BACKENDS)


def backend_for(path: str | Path, format: str | None = None) -> Backend:
    """The backend of a store: ``format`` when given, else the one that recognises an existing store
    at ``path``, else the one its suffix names (``.h5``/``.hdf5``/``.hdf``, ``.zarr``). Remote stores
    are Zarr."""
    if format is not None:
        if format not in BACKENDS:
            raise SpairstoreError(f"unknown store format {format!r} (choose {' or '.join(FORMATS)})")
        return BACKENDS[format]
    suffix = Path(str(path).rstrip("/")).suffix.lower()
    by_suffix = next((b for b in BACKENDS.values() if suffix in b.suffixes), None)
    if is_url(path) and by_suffix is not None and not by_suffix.guess_can_open(path):
        raise StoreError(f"{path}: remote stores must be Zarr; convert it with `spairstore convert`")
    for b in BACKENDS.values():
        if b.guess_can_open(path):
            return b
    if by_suffix is None:
        if not is_url(path) and Path(path).exists():  # e.g. a dataset folder given where a store goes
            raise NotAStore(f"{path}: not a store (neither an HDF5 file nor a Zarr v3 directory)", path)
        raise StoreError(f"{path}: cannot tell the store format; name it .h5 or .zarr "
                         f"(or pass --format hdf5|zarr)")
    return by_suffix


def is_store(path: str | Path) -> bool:
    """Whether a backend recognises a store at ``path`` (its layout; the contents are not read)."""
    return any(b.guess_can_open(path) for b in BACKENDS.values())


def format_of(path: str | Path, format: str | None = None) -> str:
    """The name of the backend of a store (see :func:`backend_for`)."""
    return backend_for(path, format).name


def writer_for(path: Path, format: str | None = None, shard_bytes: int | None = None) -> ArrayWriter:
    """A writer for a new store at ``path``. ``shard_bytes`` is the Zarr shard size of hot arrays."""
    return backend_for(path, format).build(path, shard_bytes)


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
    return backend_for(path).open(path)


# -- whole stores on disk ------------------------------------------------------------------------------
def disk_bytes(path: Path) -> int:
    """Bytes a local store occupies: its file, or every file of its directory."""
    path = Path(path)
    if not path.is_dir():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name), follow_symlinks=False).st_size
            except FileNotFoundError:
                pass  # a writer's temporary file, renamed or removed since the walk listed it
    return total


def check_replaceable(path: Path) -> None:
    """Refuse, in one line, to write a store over ``path`` unless it holds a spairstore store: a file or
    folder of anything else (a model's .h5, a folder of results) is the user's, and ``--overwrite``
    replaces stores only. An empty folder holds nothing to lose."""
    if Path(path).is_dir() and not any(Path(path).iterdir()):
        return
    try:
        r = reader_for(path)
        try:
            ours = r.attrs.get("format") == FORMAT_NAME
        finally:
            r.close()
    except (SpairstoreError, OSError):
        ours = False
    if not ours:
        folder = Path(path).is_dir()
        into = f" (to write into this folder, name the store: {Path(path) / 'spair.h5'})" if folder else ""
        raise SpairstoreError(f"{path}: exists and is {'a folder' if folder else 'a file'}, not a spairstore store; a "
                              "store is written only to a new path or over another store (--overwrite): move it away "
                              f"or write elsewhere{into}")
