"""HDF5 backend: one file, hot arrays contiguous and unfiltered, every array described by attributes.

Root attributes that are strings or integers are stored as HDF5 UTF-8 strings and integers; every
other value as JSON text, named in the root attribute ``json_attributes`` (itself a JSON list), so any
HDF5 reader parses them without guessing (stores before format 1.2 hold JSON text throughout).
Each array carries its schema description (``doc``, ``frame``, ``units``, ``padding``, ``bits``) as
UTF-8 string attributes.

Files are written in the HDF5 1.10 format, whose metadata (superblock, object headers, B-trees,
heaps) carries checksums: a corrupted file fails to open with an error instead of being misread.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ...core.errors import StoreError
from ...core.schema import ROOT_ATTRS, describe
from . import RawExtent

#: h5py/HDF5 exceptions a damaged or hostile file can raise; the reader turns them into StoreError.
#: (SystemError: h5py's visit functions wrap an HDF5 error, e.g. a metadata checksum, in it.)
_H5_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, SystemError)
_LIBVER = ("v110", "v110")
_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Written over the signature while a pack fills the file: until then it opens as nothing at all.
_UNFINISHED = b"\x89PART\r\n\x1a"


def mark_complete(path: Path, complete: bool) -> None:
    """Make a store file open (``complete``) or fail to open as HDF5 at all, durably."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, _SIGNATURE if complete else _UNFINISHED, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _text(s: str) -> np.ndarray:
    """A fixed-length UTF-8 string: it lives in the (checksummed) object header, unlike a variable-length one."""
    data = s.encode()
    return np.array(data, dtype=h5py.string_dtype("utf-8", max(1, len(data))))


def _root_attrs(raw: dict[str, Any]) -> dict[str, Any]:
    """Root attributes as written by :meth:`HDF5Writer.set_attrs`: JSON text where the schema declares
    a JSON value (or, for attributes it does not know, where ``json_attributes`` names it), else plain."""
    listed = raw.pop("json_attributes", None)
    if listed is None:  # format before 1.2: JSON text throughout
        return {k: json.loads(v) for k, v in raw.items()}
    names = set(json.loads(listed))
    out = {}
    for k, v in raw.items():
        f = ROOT_ATTRS.get(k)
        if (f.dtype == "json") if f is not None else k in names:
            out[k] = json.loads(v)
        elif isinstance(v, (bytes, str)):
            out[k] = v.decode() if isinstance(v, bytes) else v
        elif isinstance(v, np.integer):
            out[k] = int(v)
        else:
            raise TypeError(f"attribute {k!r} holds {type(v).__name__}, neither text, an integer nor JSON text")
    return out


def _pwrite(fd: int, data: np.ndarray, pos: int) -> None:
    view = memoryview(data).cast("B")
    while view:  # pwrite may write less than asked
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


class HDF5Writer:
    """Arrays made by :meth:`create` are allocated at once and never filled by HDF5, so their rows are
    written with ``os.pwrite`` at the allocated offset: no HDF5 call (nor the GIL h5py holds through
    one) on the per-image path, and decoding threads keep running while a row is written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = h5py.File(self.path, "w", libver=_LIBVER)
        self._fd = os.open(self.path, os.O_WRONLY)
        self._rows: dict[str, tuple[int, int]] = {}  # name -> (byte offset, bytes per row)

    def create(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        space = h5py.h5s.create_simple(tuple(shape))
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        dcpl.set_obj_track_times(False)  # no timestamps: the same input writes the same bytes
        parent = self._f.require_group(str(Path(name).parent)) if "/" in name else self._f
        dtype = np.dtype(dtype)
        dset = h5py.h5d.create(parent.id, Path(name).name.encode(), h5py.h5t.py_create(dtype), space, dcpl=dcpl)
        row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self._rows[name] = (dset.get_offset() or 0, row)

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        offset, row = self._rows[name]
        _pwrite(self._fd, np.ascontiguousarray(data), offset + start * row)

    def put(self, name: str, data: np.ndarray) -> None:
        self._f.create_dataset(name, data=np.asarray(data))

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        """Root attributes (see the module doc), then every array's description from the schema."""
        listed = set(json.loads(self._f.attrs["json_attributes"])) if "json_attributes" in self._f.attrs else set()
        for k, v in attrs.items():
            plain = isinstance(v, str) or _is_int(v)
            self._f.attrs.create(k, np.int64(v) if _is_int(v) else _text(v if plain else json.dumps(v)))
            listed = listed - {k} if plain else listed | {k}
        self._f.attrs.create("json_attributes", _text(json.dumps(sorted(listed))))
        names: list[str] = []
        self._f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in names:
            for k, v in describe(name, attrs).items():
                self._f[name].attrs.create(k, _text(v))

    def close(self) -> None:
        os.close(self._fd)
        self._f.flush()
        self._f.close()


class HDF5RowWriter:
    """Fills rows of the contiguous arrays of a closed store file in place, with ``os.pwrite`` at the
    ``extents`` its reader reported.

    No HDF5 call touches the file: a process killed mid-write leaves its structure intact, only some
    row bytes unwritten. :meth:`flush` makes the rows written so far durable.
    """

    def __init__(self, path: Path, extents: dict[str, RawExtent | None]):
        self._extents = extents
        self._fd = os.open(path, os.O_WRONLY)

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        ext = self._extents[name]
        if ext is None:
            if np.asarray(data).size:
                raise StoreError(f"{name}: not a contiguous array; cannot write rows in place")
            return
        data = np.ascontiguousarray(data, dtype=ext.dtype)
        if data.shape[1:] != ext.shape[1:] or start < 0 or start + len(data) > ext.shape[0]:
            raise ValueError(f"{name}: rows {start}:{start + len(data)} of shape {data.shape[1:]} "
                             f"do not fit {ext.shape}")
        row = int(np.prod(ext.shape[1:], dtype=np.int64)) * ext.dtype.itemsize
        _pwrite(self._fd, data, int(ext.offsets[0]) + start * row)

    def flush(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def _unfinished(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(_UNFINISHED)) == _UNFINISHED
    except OSError:
        return False


class HDF5Reader:
    """Reads a store file, refusing what could make a read reach outside it or crash the process."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._f = h5py.File(self.path, "r")
        except FileNotFoundError:
            raise StoreError(f"{self.path}: no such store") from None
        except _H5_ERRORS as e:
            if _unfinished(self.path):
                raise StoreError(f"{self.path}: an unfinished pack's staging file (pack --resume "
                                 "completes it)") from None
            raise StoreError(f"{self.path}: not a readable HDF5 store ({e})") from None
        try:
            self._check_references()
            self.attrs = _root_attrs(dict(self._f.attrs.items()))
        except StoreError:
            self._f.close()
            raise
        except (*_H5_ERRORS, UnicodeDecodeError) as e:
            self._f.close()
            raise StoreError(f"{self.path}: unreadable metadata ({e})") from None

    def _check_references(self) -> None:
        """Refuse external links, external storage and virtual datasets: spairstore never writes them,
        and each would make reading this file open other files (anywhere the file says)."""
        links: list[tuple[str, Any]] = []
        self._f.visititems_links(lambda name, link: links.append((name, link)))  # raising in here breaks h5py
        for name, link in links:
            if isinstance(link, h5py.ExternalLink):
                raise StoreError(f"{self.path}: {name} is an external link to {link.filename!r}; "
                                 "refusing a store that points at other files")
            obj = self._f.get(name) if isinstance(link, h5py.HardLink) else None
            if isinstance(obj, h5py.Dataset) and (obj.external or obj.is_virtual):
                target = (obj.external[0][0] if obj.external else
                          obj.virtual_sources()[0].file_name if obj.virtual_sources() else "?")
                kind = "external storage in" if obj.external else "a virtual dataset over"
                raise StoreError(f"{self.path}: {name} uses {kind} {target!r}; "
                                 "refusing a store that points at other files")

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.shape, obj.dtype)

        try:
            self._f.visititems(visit)
        except _H5_ERRORS as e:
            raise StoreError(f"{self.path}: unreadable structure ({e})") from None
        return out

    def read(self, name: str, index: Any = ()) -> np.ndarray:
        try:
            return self._f[name][index]
        except _H5_ERRORS as e:
            raise StoreError(f"{self.path}: cannot read {name} ({e})") from None

    def extent(self, name: str) -> RawExtent | None:
        try:
            d = self._f[name]
            if d.chunks is not None or d.compression is not None or d.external or d.is_virtual:
                return None
            offset = d.id.get_offset()
        except _H5_ERRORS as e:
            raise StoreError(f"{self.path}: cannot locate {name} ({e})") from None
        if offset is None:
            return None
        return RawExtent.contiguous(self.path, int(offset), tuple(d.shape), d.dtype)

    def close(self) -> None:
        self._f.close()
