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

from ...core.errors import FeatureError, StoreError
from ...core.schema import ROOT_ATTRS, describe
from ..feature_sets import (
    check_complete,
    crc32_rows,
    images_fingerprint,
    kept_notes,
    set_attrs,
    sidecar_dir,
    sidecar_path,
)
from ..transaction import Transaction, fsync_path, link_or_copy, write_atomic
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


def keep_sets(old: Path, new: Path) -> list[str]:
    """Before the staged store ``new`` replaces the HDF5 store ``old`` (``convert --overwrite``; a pack
    leaves the set files in place): hard-link each set file beside ``old`` that ``new`` has no set of
    that name for beside ``new``, so no set file is lost -- one made from other images stays, refused
    by the new store, as after a repack. Returns a note per set (:func:`~..feature_sets.kept_notes`)."""
    files = sorted(sidecar_dir(old).glob("*.h5"))
    if not files:
        return []
    r = HDF5Reader(new)
    try:
        mine = images_fingerprint(r)
    finally:
        r.close()
    fates = {}
    for file in files:
        name = file.stem
        if sidecar_path(new, name).exists():
            fates[name] = "replaced"
            continue
        try:
            r = HDF5Reader(file)
            theirs = r.attrs.get("store_fingerprint")
            r.close()
        except StoreError:
            theirs = None
        sidecar_dir(new).mkdir(exist_ok=True)
        link_or_copy(file, sidecar_path(new, name))
        fates[name] = "kept" if theirs == mine else "refused"
    fsync_path(sidecar_dir(new))
    return kept_notes(fates)


# -- a feature set in its own file beside the store (see spairstore.store.feature_sets) --------------
class SidecarSet:
    """Stages feature set ``name`` of the HDF5 store at ``store`` as the file ``set.h5`` of its
    transaction: the whole structure first (data and CRC arrays allocated, attributes written; marked
    unfinished, so it never opens as a set), then each process writes its rows in place at the data
    array's offset; the commit fills the CRCs, marks the file finished and renames it to
    ``<store>.features/<name>.h5``. The maps are written once: the cost of adding a set is the set."""

    whole_units = False  # rows are written in place, each flagged on its own

    def __init__(self, store: Path, name: str, shape: tuple[int, ...], attrs: dict[str, Any],
                 store_fingerprint: str, unit_rows: int):
        self.store, self.name, self.shape = Path(store), name, tuple(shape)
        self.attrs, self.fingerprint, self.unit_rows = attrs, store_fingerprint, unit_rows
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * 2

    def _files(self, tx: Transaction) -> tuple[Path, Path]:
        return tx.dir / "set.h5", tx.dir / "layout.json"

    def prepare(self, tx: Transaction, replace: bool) -> np.ndarray:
        """The old set stays readable until the commit replaces it, so ``replace`` needs nothing now."""
        file, layout = self._files(tx)
        if not layout.exists():  # structure not complete: nothing staged is usable
            tx.forget_parts()
            w = HDF5Writer(file)
            try:
                w.create(f"features/{self.name}/data", self.shape, np.dtype(np.float16))
                w.create(f"features/{self.name}/crc32", self.shape[:1], np.dtype(np.uint32))
                w.set_attrs(set_attrs(self.name, self.attrs, self.fingerprint))
            finally:
                w.close()
            r = HDF5Reader(file)
            try:
                offsets = {k: int(r.extent(f"features/{self.name}/{k}").offsets[0]) for k in ("data", "crc32")}
            finally:
                r.close()
            mark_complete(file, False)
            write_atomic(layout, json.dumps(offsets).encode())
        return np.flatnonzero(~tx.done(self.shape[0]))

    def _offset(self, tx: Transaction, array: str) -> int:
        return int(json.loads(self._files(tx)[1].read_text())[array])

    def sink(self, tx: Transaction, part: int, sync_seconds: float) -> _SidecarSink:
        return _SidecarSink(self, tx, part, sync_seconds)

    def commit(self, tx: Transaction) -> None:
        check_complete(tx, self.shape[0])
        file = self._files(tx)[0]
        data = np.memmap(file, dtype=np.float16, mode="r", offset=self._offset(tx, "data"), shape=self.shape)
        step = max(1, (64 << 20) // max(1, self.row_bytes))
        crc = np.concatenate([crc32_rows(data[i:i + step]) for i in range(0, self.shape[0], step)]
                             or [np.zeros(0, np.uint32)])
        del data
        fd = os.open(file, os.O_WRONLY)
        try:
            _pwrite(fd, crc, self._offset(tx, "crc32"))
            os.fsync(fd)
        finally:
            os.close(fd)
        mark_complete(file, True)
        folder = sidecar_dir(self.store)
        folder.mkdir(exist_ok=True)
        fsync_path(folder.parent)
        tx.switch(file, sidecar_path(self.store, self.name))


class _SidecarSink:
    """One process's rows, written with ``os.pwrite`` into the staged set's data array."""

    def __init__(self, target: SidecarSet, tx: Transaction, part: int, sync_seconds: float):
        self.target = target
        self._base = target._offset(tx, "data")
        self._fd = os.open(target._files(tx)[0], os.O_WRONLY)
        try:
            self.flags = tx.flags(part, target.shape[0], durable=lambda: os.fdatasync(self._fd),
                                  sync_seconds=sync_seconds)
        except BaseException:
            os.close(self._fd)
            raise

    def __call__(self, rows: np.ndarray, maps: np.ndarray) -> None:
        t = self.target
        if maps.dtype != np.float16 or maps.shape[1:] != t.shape[1:]:
            raise FeatureError(f"{t.store}: got maps {maps.dtype} {maps.shape[1:]} for feature set {t.name!r}, "
                               f"which holds float16 {t.shape[1:]}")
        rows = np.asarray(rows, dtype=np.int64)
        maps = np.ascontiguousarray(maps)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
            _pwrite(self._fd, maps[a:b], self._base + int(rows[a]) * t.row_bytes)
        self.flags.written(rows)

    def close(self) -> None:
        try:
            self.flags.close()
        finally:
            os.close(self._fd)
