"""Reading a store: :func:`open` returns a :class:`Store`.

Small tables are loaded into RAM as numpy arrays: image metadata and categories when the store is
opened, a split's pair table and the manifest on first use (a DataLoader worker needs neither).
Payloads (pixels, masks, original bytes, features) are read from memory maps of the files at the
byte offsets the backend reports (:class:`~spairstore.store.backends.RawExtent`:
one contiguous extent in HDF5, one location per record in a sharded Zarr store). A Store is safe to
use after ``fork`` and pickles (as its path and the :attr:`~Store.identity` it read) for ``spawn``.
Arrays a backend cannot locate as plain bytes (compressed, or remote) are read through the backend
library instead, one call per batch.

A store is trusted only after checks: its layout must match :mod:`spairstore.core.schema` (every field's
dtype and shape), its offsets and indices must stay inside what they index, and every extent read
raw must lie inside its file; anything else is a :class:`StoreError`.

A Store reads the version it opened until it is opened again. It keeps an HDF5 store's file (and each
set file beside it) open and maps it through that descriptor; it maps every payload file of a Zarr
store when it opens, because a pack ``--overwrite`` or a replaced feature set puts new files where the
old ones were, which a later open by path would mix with the old offsets. A copy unpickled in another
process refuses, on the first read of an array, files that are not the versions the original read.
"""
from __future__ import annotations

import errno
import io
import math
import mmap
import os
import resource
import time
import zlib
from collections.abc import Callable, ItemsView, Iterator, KeysView
from pathlib import Path
from typing import Any

import numpy as np

from ..core import geometry
from ..core.errors import StoreError
from ..core.schema import (
    ADDED_PAIR_LABELS,
    FIELD_ARRAYS,
    FORMAT_NAME,
    FORMAT_VERSION,
    check_layout,
    check_pair_table,
    check_tables,
    field_name,
    is_hot,
)
from .backends import ArrayReader, RawExtent, disk_bytes, is_url, reader_for
from .feature_sets import SIDECAR_FORMAT, fingerprint, sidecar_dir
from .transaction import recover

#: Bound on what a store's tables may declare (see :meth:`Store._check_table_sizes`): generous for real
#: stores, whose tables are a small share of their bytes and compress less than 10x.
TABLE_RATIO = 16
TABLE_FLOOR = 256 * 2**20


class Table:
    """Columns of equal length, by name or attribute (``table.pair_id``). Strings are decoded to ``str``.

    Like a data frame: ``len(table)`` is its number of rows, ``table.columns`` its column names (also what
    iterating, ``keys()`` and ``in`` go over)."""

    def __init__(self, columns: dict[str, np.ndarray]):
        self._columns = columns

    def __getitem__(self, key: str) -> np.ndarray:
        return self._columns[key]

    def __getattr__(self, key: str) -> np.ndarray:
        try:
            return self._columns[key]
        except KeyError:
            raise AttributeError(key) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._columns)

    def __contains__(self, key: object) -> bool:
        return key in self._columns

    def keys(self) -> KeysView[str]:
        return self._columns.keys()

    def items(self) -> ItemsView[str, np.ndarray]:
        return self._columns.items()

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self._columns)

    def __len__(self) -> int:
        return self.rows

    @property
    def rows(self) -> int:
        return len(next(iter(self._columns.values()))) if self._columns else 0

    def __repr__(self) -> str:
        return f"Table({self.rows} rows: {', '.join(self._columns)})"


def _decode_strings(a: np.ndarray) -> np.ndarray:
    return np.char.decode(a, "utf-8") if a.dtype.kind == "S" else a


def _group(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: _decode_strings(v) for k, v in arrays.items()
            if k.startswith(prefix) and "/" not in k[len(prefix):]}


class _RawArray:
    """An array read from the plain files of its :class:`RawExtent` through one read-only memory map
    per file (uint8, from ``open_map(path)``), asked for on first use in the reading process."""

    def __init__(self, ext: RawExtent, open_map: Callable[[Path], np.ndarray]):
        self.ext = ext
        self.row_shape = ext.shape[1:]
        self.row_bytes = math.prod(self.row_shape) * ext.dtype.itemsize
        self._files: dict[int, np.ndarray] = {}
        self._open_map = open_map

    def _file(self, k: int) -> np.ndarray:
        m = self._files.get(k)
        if m is None:
            m = self._files[k] = self._open_map(Path(self.ext.files[k]))
        return m

    def _piece(self, c: int, start: int, stop: int) -> np.ndarray:
        n = stop - start
        off = int(self.ext.offsets[c])
        if off < 0:  # chunk never written
            return np.zeros((n, *self.row_shape), self.ext.dtype)
        off += (start - c * self.ext.chunk_rows) * self.row_bytes
        k = int(self.ext.file_ids[c])
        b = self._file(k)[off:off + n * self.row_bytes]
        if len(b) != n * self.row_bytes:
            raise StoreError(f"{self.ext.files[k]}: truncated (rows {start}:{stop} lie past its end)")
        return b.view(self.ext.dtype).reshape(n, *self.row_shape)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``: a read-only view of the mapping where they lie in one chunk, else a copy."""
        if stop <= start:
            return np.empty((0, *self.row_shape), self.ext.dtype)
        cr = self.ext.chunk_rows
        first, last = start // cr, (stop - 1) // cr
        if first == last:
            return self._piece(first, start, stop)
        return np.concatenate([self._piece(c, max(start, c * cr), min(stop, (c + 1) * cr))
                               for c in range(first, last + 1)])


class Store:
    """An opened store. Image rows ``i`` index every ``images/*`` array; pair rows index a split's table.

    Attributes:
        images: per-image :class:`Table` (``name``, ``category``, ``size`` (W, H original pixels),
            ``scale``/``offset`` (original -> store pixels), ``bbox`` and ``keypoints`` in original
            pixels (x, y; NaN = absent), labels, ``splits`` bitmask, CRCs).
        categories: category names; ``images.category`` and pair ``category`` index into it.
        keypoint_flip: int64 (C, K), per category index the keypoint slot permutation under a horizontal
            flip (slot k of the mirrored image shows the part of slot ``keypoint_flip[c, k]``), or None
            where the dataset has no left/right table.
        splits: names of the packed splits.
        image_size: side ``S`` of the square store frame, in store pixels.
    """

    def __init__(self, path: str | Path):
        #: a local ``Path``, or the URL string of a remote (read-only) Zarr store
        self.path: Path | str = path if is_url(path) else Path(path).resolve()
        self._pid = os.getpid()
        self._maps: dict[str, _RawArray] = {}
        self._backend: ArrayReader | None = None
        #: feature-set files beside an HDF5 store (path -> open file), see :meth:`_load_sidecars`
        self._sidecars: dict[Path, io.BufferedReader] = {}
        #: maps of a directory store's payload files, made at open (see :meth:`_pin_payloads`)
        self._mapped: dict[Path, np.ndarray] = {}
        #: version of every payload file read raw (path -> :func:`_file_version`), at open
        self._versions: dict[Path, tuple[int, ...]] = {}
        #: the versions an earlier Store on this path read (see :meth:`require_identity`)
        self._expected: dict[str, Any] = {}
        if isinstance(self.path, Path) and not self.path.exists():
            try:
                recover(self.path)  # a directory switch a killed process left half done
            except OSError:
                pass  # cannot write here: the open below says what is missing
        for attempt in range(10):
            # Pin the file (or note the directory's root node) first, then check the tables and maps
            # came from that same version: a pack or a feature-set commit may replace it at any moment.
            time.sleep(0.05 * attempt)  # let a commit that overlapped the last attempt finish (2.25 s in all)
            self._file = self._pin()
            listing = self._listing()
            try:
                backend = reader_for(self.path)
                try:
                    self._load(backend)
                finally:
                    backend.close()
            except Exception as e:
                same = self._same_version(listing)
                self.close()
                if not same:
                    continue  # read across a replacement (a file gone, an index of the old one): again
                if isinstance(e, FileNotFoundError):
                    raise StoreError(f"{self.path}: {e.filename} is missing") from None
                raise
            except BaseException:
                self.close()
                raise
            #: (device, inode) of the store file or local directory this Store reads; None for a URL
            self._opened = _identity(os.fstat(self._file.fileno())) if self._file is not None else self._path_identity()
            if self._same_version(listing):
                return
            self.close()
        raise StoreError(f"{self.path}: the store kept being replaced while it was opened")

    def _pin(self) -> io.BufferedReader | None:
        if not isinstance(self.path, Path) or not self.path.is_file():
            return None
        try:
            return io.open(self.path, "rb")
        except OSError:
            return None  # the backend says why

    def _same_version(self, listing: tuple[int, ...] | None) -> bool:
        """Whether the path still holds the version this open started on: the pinned file (HDF5), or
        a root node of the ``listing`` version (a directory store)."""
        if self._file is not None:
            return self._path_identity() == _identity(os.fstat(self._file.fileno()))
        return self._listing() == listing

    def _listing(self) -> tuple[int, ...] | None:
        """Version of a local directory store's root node (``zarr.json``), which every pack, feature-set
        commit and drop rewrites; None otherwise."""
        if not isinstance(self.path, Path) or self._file is not None:
            return None
        try:
            return _file_version(os.stat(self.path / "zarr.json"))
        except OSError:
            return None

    def _path_identity(self) -> tuple[int, int] | None:
        try:
            return _identity(os.stat(self.path))
        except (OSError, TypeError):
            return None

    # -- opening --------------------------------------------------------------------------------
    def _load(self, backend: ArrayReader) -> None:
        try:
            self._load_checked(backend)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as e:
            raise StoreError(f"{self.path}: malformed store ({type(e).__name__}: {e})") from None

    def _load_checked(self, backend: ArrayReader) -> None:
        attrs = backend.attrs
        if attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{self.path}: not a spairstore store ({self._not_a_store(attrs)})")
        version = str(attrs.get("format_version", ""))
        try:
            major = int(version.split(".")[0])
        except ValueError:
            raise StoreError(f"{self.path}: unreadable format version {version!r}") from None
        if major > FORMAT_VERSION[0]:
            raise StoreError(f"{self.path}: store format {version} is newer than this spairstore reads "
                             f"({FORMAT_VERSION[0]}.x); upgrade spairstore")
        self.shapes = backend.shapes()
        problems = check_layout(self.shapes, attrs) or self._check_table_sizes()
        if not problems:
            lazy = ("pairs/", "manifest/")
            tables = {k: backend.read(k) for k in self.shapes if not is_hot(k) and not k.startswith(lazy)}
            problems = check_tables(tables, self.shapes, attrs)
        self._refuse(problems)
        self.attrs: dict[str, Any] = dict(attrs)
        self.dataset: str = attrs["dataset"]
        self.image_size: int = int(attrs["image_size"])
        self.splits: list[str] = list(attrs["splits"])
        self.pose_names: list[str] = list(attrs["pose_names"])
        self.extents: dict[str, RawExtent | None] = {k: backend.extent(k) for k in self.shapes if is_hot(k)}
        self.images = Table(_group(tables, "images/"))
        self.categories: list[str] = [str(c) for c in _decode_strings(tables["categories"])]
        self._tables: dict[str, Table] = {}
        self.feature_sets: dict[str, dict[str, Any]] = {
            k: v for k, v in attrs.get("feature_sets", {}).items() if f"features/{k}/data" in self.shapes}
        #: CRC-32 of each image's feature map per feature set (uint32 (N,)), where the writer stored them
        self.feature_crc32: dict[str, np.ndarray] = {
            k: tables[f"features/{k}/crc32"] for k in self.feature_sets if f"features/{k}/crc32" in tables}
        #: feature-set files beside the store that belong to other images (name -> why), not listed above
        self.stale_feature_sets: dict[str, str] = {}
        if self._file is not None:
            self._load_sidecars()
        self._pin_payloads()
        self._check_extents()
        self.keypoint_flip: np.ndarray | None = self._flip_table(attrs.get("keypoint_flip"))
        self._image_rows = {(self.categories[c], str(nm)): i
                            for i, (c, nm) in enumerate(zip(self.images.category, self.images.name))}

    def _not_a_store(self, attrs: dict[str, Any]) -> str:
        """What the path is instead, where it is a set's file (a part of a Zarr store is told by its
        backend)."""
        if attrs.get("format") == SIDECAR_FORMAT and isinstance(self.path, Path) \
                and self.path.parent.name.endswith(".features"):
            store = self.path.parent.with_name(self.path.parent.name.removesuffix(".features"))
            return f"the file of feature set {attrs.get('name')!r} of the store {store}: open that"
        return f"format attribute {attrs.get('format')!r}"

    @property
    def fingerprint(self) -> str:
        """Identifies this store's images (count, frame size, pixel CRC-32s); a feature set made from
        them carries it (:func:`spairstore.store.feature_sets.fingerprint`)."""
        return fingerprint(len(self.images["name"]), self.image_size, self.images["crc32_pixels"])

    def _load_sidecars(self) -> None:
        """Add the feature sets stored in their own files beside an HDF5 store
        (``<store>.features/<name>.h5``, see :mod:`spairstore.store.feature_sets`). Each file is opened
        and kept open (readers keep the version they opened, like the store file) and must belong to
        this store's images; one that does not is listed in :attr:`stale_feature_sets` instead. A
        sidecar set replaces a set of the same name inside the store file."""
        folder = sidecar_dir(Path(self.path))
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.h5")):
            try:
                f = io.open(path, "rb")  # noqa: SIM115 - kept open while the Store reads the set
            except FileNotFoundError:
                continue  # dropped since the folder was listed
            try:
                problem = self._load_sidecar(path, f)
            except StoreError as e:  # said of the descriptor path it was opened by: name the file once
                problem = str(e).removeprefix(f"{_fd_path(f, path)}: ")
            if problem:
                f.close()
                self.stale_feature_sets[path.stem] = f"{path}: {problem}"
            else:
                self._sidecars[path] = f

    def _pin_payloads(self) -> None:
        """Note the version of every payload file read raw, mapping now those no descriptor pins (a
        directory store's shard files): the Store then keeps reading them when new files are put where
        they were."""
        pinned = self._pinned()
        self._versions, self._mapped = {}, {}
        files = {Path(f) for ext in self.extents.values() if ext is not None for f in ext.files}
        _allow_open_files(len(files - pinned.keys()))
        for file in sorted(files):
            if file in pinned:
                self._versions[file] = _file_version(os.fstat(pinned[file]))
                continue
            try:
                fd = os.open(file, os.O_RDONLY)  # FileNotFoundError: see __init__
                try:
                    st = os.fstat(fd)
                    self._versions[file] = _file_version(st)
                    self._mapped[file] = (np.frombuffer(mmap.mmap(fd, 0, access=mmap.ACCESS_READ), np.uint8)
                                          if st.st_size else np.zeros(0, np.uint8))
                finally:
                    os.close(fd)
            except OSError as e:
                if e.errno != errno.EMFILE:
                    raise
                raise StoreError(f"{self.path}: mapping its {len(files)} payload files needs more open files than "
                                 f"this process may have (`ulimit -n` {resource.getrlimit(resource.RLIMIT_NOFILE)[0]});"
                                 " raise the limit, or convert the store with larger shards") from None

    def misplaced_feature_sets(self) -> dict[str, Path]:
        """Feature-set files made from this store's images but lying in another ``*.features`` folder
        beside it, as when the store was renamed or copied without its own folder: name -> file (sets
        this store has are left out). Empty for Zarr and URL stores, whose sets are inside them."""
        if self._file is None:
            return {}
        own = sidecar_dir(Path(self.path))
        out: dict[str, Path] = {}
        for path in sorted(own.parent.glob("*.features/*.h5")):
            if path.parent == own or path.stem in self.feature_sets or path.stem in out:
                continue
            try:
                r = reader_for(path)
            except (OSError, StoreError):
                continue  # not an HDF5 file: not a set at all
            try:
                if r.attrs.get("format") == SIDECAR_FORMAT and r.attrs.get("store_fingerprint") == self.fingerprint:
                    out[path.stem] = path
            finally:
                r.close()
        return out

    def _load_sidecar(self, path: Path, f: io.BufferedReader) -> str | None:
        """Load one sidecar set (``f`` is ``path`` opened); returns what is wrong with it, if anything."""
        name = path.stem
        r = reader_for(_fd_path(f, path))
        try:
            if r.attrs.get("format") != SIDECAR_FORMAT or r.attrs.get("name") != name:
                return f"not a feature-set file of set {name!r} (format {r.attrs.get('format')!r})"
            if r.attrs.get("store_fingerprint") != self.fingerprint:
                return ("made from other images than this store's (the store was repacked, or the file comes from "
                        f"another store); delete it (`spairstore features {self.path} --drop {name}`), or extract "
                        "the set again with --overwrite")
            data, crc = f"features/{name}/data", f"features/{name}/crc32"
            shapes = r.shapes()
            n = len(self.images["name"])
            if (shapes.get(data, ((), None))[1] != np.float16 or len(shapes[data][0]) != 4
                    or shapes[data][0][0] != n or shapes.get(crc) != ((n,), np.dtype(np.uint32))):
                return f"holds {shapes.get(data)} maps and {shapes.get(crc)} CRCs, expected float16 ({n}, C, h, w) and ({n},)"
            attrs = r.attrs.get("feature_set")
            if not isinstance(attrs, dict):
                return "has no feature_set attribute"
            extents = {k: r.extent(k) for k in (data, crc)}
            if None in extents.values():
                return "its arrays are not contiguous (spairstore writes them so); extract the set again"
            crc32 = r.read(crc)
        finally:
            r.close()
        for k, e in extents.items():
            self.shapes[k] = (e.shape, e.dtype)
            self.extents[k] = e._replace(files=(path,))
        self.feature_sets[name] = attrs
        self.feature_crc32[name] = crc32
        return None

    def _check_table_sizes(self) -> list[str]:
        """Tables are read whole into memory, so what they declare must fit what the store can hold: a
        chunked, compressed array never written costs nothing on disk but its full size in RAM. Their
        decoded size (text as ``str``: 4 bytes a character) may be at most ``TABLE_RATIO`` times the
        store's bytes on disk (at least ``TABLE_FLOOR``; a URL store gets ``TABLE_FLOOR``)."""
        def decoded(shape: tuple[int, ...], dtype: np.dtype) -> int:
            return math.prod(shape) * dtype.itemsize * (5 if dtype.kind == "S" else 1)

        tables = {k: decoded(*v) for k, v in self.shapes.items() if not is_hot(k)}
        if sum(tables.values()) <= TABLE_FLOOR:
            return []  # within the floor: no need to walk a directory store's files for its size
        on_disk = disk_bytes(self.path) if isinstance(self.path, Path) else 0
        budget = max(TABLE_FLOOR, TABLE_RATIO * on_disk)
        if sum(tables.values()) <= budget:
            return []
        name = max(tables, key=tables.__getitem__)
        return [f"{name} declares {self.shapes[name][0]} {self.shapes[name][1]} ({tables[name] / 2**20:,.0f} MiB "
                f"in memory); the tables of a store of {on_disk / 2**20:,.1f} MiB may take at most "
                f"{budget / 2**20:,.0f} MiB, so it is damaged or hostile"]

    def _refuse(self, problems: list[str]) -> None:
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise StoreError(f"{self.path}: {problems[0]}{more}")

    def _check_extents(self) -> None:
        """Every array read raw must lie inside its files: a map read past the end of a (truncated)
        file would kill the reading process with SIGBUS instead of raising."""
        sizes: dict[Path, int] = {}
        for name, ext in self.extents.items():
            if ext is None:
                continue
            row = math.prod(ext.shape[1:]) * ext.dtype.itemsize
            rows = np.minimum(ext.chunk_rows, ext.shape[0] - np.arange(len(ext.offsets)) * ext.chunk_rows)
            ends = ext.offsets + rows * row
            for k, file in enumerate(ext.files):
                mine = (ext.file_ids == k) & (ext.offsets >= 0)
                if not mine.any():
                    continue
                if file not in sizes:
                    sizes[file] = self._versions[Path(file)][2]
                end = int(ends[mine].max())
                if end > sizes[file]:
                    raise StoreError(f"{self.path}: {name} (up to byte {end:,} of {Path(file).name}) lies past the "
                                     f"end of the file ({sizes[file]:,} bytes); it is truncated or damaged")

    def _flip_table(self, table: dict[str, list[int]] | None) -> np.ndarray | None:
        if table is None:
            return None
        k = self.images["keypoints"].shape[1]
        try:
            perm = np.array([table[c] for c in self.categories], dtype=np.int64).reshape(len(self.categories), k)
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"{self.path}: keypoint_flip attribute must map every category to {k} slots") from None
        if not (np.sort(perm, axis=1) == np.arange(k)).all():
            raise StoreError(f"{self.path}: keypoint_flip attribute holds a row that is not a permutation")
        return perm

    @property
    def identity(self) -> dict[str, Any]:
        """Which version of the store this Store reads, fixed at open: ``file``, (device, inode) of an
        HDF5 store file or a Zarr store's directory (None for a URL); ``files``, (device, inode, size,
        mtime in ns) of each payload file read straight from disk; ``feature_sets``, the set names. Packs
        and feature-set commits write new files, never into old ones, so another identity means another
        version."""
        return {"file": self._opened, "files": dict(self._versions), "feature_sets": list(self.feature_sets)}

    def require_identity(self, identity: dict[str, Any] | None) -> None:
        """Hold this Store to ``identity``, the :attr:`identity` of an earlier Store on this path (None:
        nothing to check): a store file of another version raises :class:`StoreError` now (closing this
        Store); a payload file or feature set of another version raises when it is first read."""
        if identity is None:
            return
        if identity["file"] is not None and self._opened != tuple(identity["file"]):
            self.close()
            raise StoreError(f"{self.path} was replaced by a new version since it was first opened here; "
                             "open the store again (rebuild the dataset) to read the new version")
        self._expected = identity

    def _require_versions(self, name: str, ext: RawExtent) -> None:
        expected = self._expected.get("files", {})
        for file in map(Path, ext.files):
            if expected.get(file, self._versions.get(file)) != self._versions.get(file):
                what = f"feature set {name.split('/')[1]!r}" if name.startswith("features/") else name
                raise StoreError(f"{self.path}: {what} was replaced since the store was first opened here "
                                 f"({_shown(file, self.path)} is a new file); open the store again (rebuild the "
                                 "dataset) to read the new version")

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "identity": self.identity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]
        self.require_identity(state.get("identity"))

    # -- payload access -----------------------------------------------------------------------------
    def _raw(self, name: str) -> _RawArray | None:
        """The payload array read straight from its files in this process, or None if it must go
        through the backend library (compressed or remote)."""
        self._after_fork()
        a = self._maps.get(name)
        if a is None:
            ext = self.extents.get(name)
            if ext is None:
                return None
            self._require_versions(name, ext)
            a = self._maps[name] = _RawArray(ext, self._open_map)
        return a

    def _open_map(self, path: Path) -> np.ndarray:
        """A read-only uint8 map of payload file ``path``: the one made at open, else one made now
        through the descriptor pinned at open, else (a closed Store reading on) by path, if the file
        there is still the version this Store opened."""
        m = self._mapped.get(path)
        if m is not None:
            return m
        pinned = self._pinned().get(path)
        fd = os.open(path, os.O_RDONLY) if pinned is None else pinned
        try:
            if pinned is None and _file_version(os.fstat(fd)) != self._versions.get(path):
                raise StoreError(f"{path}: not the file this store read when it was opened (it was replaced "
                                 "since); open the store again")
            return np.frombuffer(mmap.mmap(fd, 0, access=mmap.ACCESS_READ), np.uint8)
        finally:
            if pinned is None:
                os.close(fd)

    def _pinned(self) -> dict[Path, int]:
        """Descriptors of the files this Store opened (store file, sidecar sets), by path."""
        out = {p: f.fileno() for p, f in self._sidecars.items()}
        if self._file is not None:
            out[Path(self.path)] = self._file.fileno()
        return out

    def _after_fork(self) -> None:
        if self._pid != os.getpid():  # forked: mappings and handles belong to the parent
            self._maps, self._backend, self._pid = {}, None, os.getpid()

    def _library(self) -> ArrayReader:
        self._after_fork()
        if self._backend is None:
            # The very file this Store opened, even where a new version was renamed over its path since.
            if self._file is None and self._opened is not None and self._path_identity() != self._opened:
                raise StoreError(f"{self.path} was replaced by a new version since this Store opened it (tables "
                                 "it had not read yet are gone with the old one); open the store again")
            self._backend = reader_for(self.path if self._file is None else _fd_path(self._file, Path(self.path)))
        return self._backend

    def _rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a payload array (read-only; may be a view of a file mapping)."""
        a = self._raw(name)
        if a is not None:
            return a.rows(start, stop)
        return self._library().read(name, slice(start, stop))

    @staticmethod
    def _row_array(field: str) -> str:
        """The array a per-image field (one spelling, see :func:`field_name`) is read from."""
        return f"{field}/data" if field.startswith("features/") else FIELD_ARRAYS.get(field, "")

    def read(self, field: str, rows: np.ndarray | list[int], out: np.ndarray | None = None,
             check: bool = False) -> np.ndarray:
        """Image rows of a per-image array for a batch, in the given order, into ``out`` if given.

        ``field`` is ``pixels`` (uint8 (B, S, S, 3)), ``mask`` (uint8 (B, S, S)) or ``features/<name>``
        (float16 (B, C, h, w)); old spellings (``images/pixels``, ``features:<name>``) warn and work.
        Each distinct row is read once, in storage order, straight into ``out`` (repeats are copied from
        there); a store read through its library (compressed or remote) gets one library call per batch.
        ``check``: each distinct row must match the CRC-32 the store holds for it (else
        :class:`StoreError` naming the row), as evaluation reads; costs about a pass over the bytes.
        """
        out = self._read(field, rows, out)
        if check:
            self._check_crc(field_name(field), np.asarray(rows, dtype=np.int64), out)
        return out

    def _check_crc(self, field: str, rows: np.ndarray, got: np.ndarray) -> None:
        stored = (self.feature_crc32.get(field[len("features/"):]) if field.startswith("features/")
                  else self.images[f"crc32_{field}"])
        if stored is None:
            return  # a set written without CRCs: nothing to check against
        if got.dtype != self.shapes[self._row_array(field)][1]:
            raise TypeError(f"check=True needs out of the stored dtype {self.shapes[self._row_array(field)][1]}, "
                            f"got {got.dtype}")
        seen: set[int] = set()
        for k, r in enumerate(rows.tolist()):
            if r in seen:
                continue
            seen.add(r)
            crc = zlib.crc32(np.ascontiguousarray(got[k]))
            if crc != int(stored[r]):
                key = f"{self.categories[self.images.category[r]]}/{self.images.name[r]}"
                raise StoreError(f"{self.path}: {field} of image row {r} ({key}) is damaged: its CRC-32 is "
                                 f"{crc:08x}, the store holds {int(stored[r]):08x}; `spairstore verify "
                                 f"{self.path}` lists every damaged record")

    def _read(self, field: str, rows: np.ndarray | list[int], out: np.ndarray | None) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise TypeError(f"rows must be a 1-d sequence of image rows, got shape {rows.shape} "
                            "(one row i: read(field, [i]))")
        field = field_name(field)
        name = self._row_array(field)
        if name not in self.shapes or field in ("image_bytes", "mask_bytes"):
            if field.startswith("features/"):
                self.feature_set(field[len("features/"):])
            raise StoreError(f"{self.path}: no field {field!r} to read by rows; the store has pixels, mask"
                             + "".join(f", features/{n}" for n in self.feature_sets))
        shape = self.shapes[name][0]
        if out is None:
            out = np.empty((len(rows), *shape[1:]), dtype=self.shapes[name][1])
        uniq, inverse = np.unique(rows, return_inverse=True)
        if len(uniq) and (uniq[0] < 0 or uniq[-1] >= shape[0]):
            raise IndexError(f"image rows {uniq[0]}..{uniq[-1]} out of range for {shape[0]} rows of {field}")
        a = self._raw(name)
        if a is None:
            if len(uniq):
                out[:] = self._library().read(name, uniq)[inverse]
            return out
        placed: dict[int, int] = {}  # row -> batch position it was read into
        for k in np.argsort(rows, kind="stable").tolist():  # storage order
            r = int(rows[k])
            if r in placed:
                out[k] = out[placed[r]]
            else:
                out[k] = a.rows(r, r + 1)[0]
                placed[r] = k
        return out

    def feature_set(self, name: str) -> dict[str, Any]:
        """The geometry and provenance of feature set ``name`` (``feature_sets[name]``: ``input_size``,
        ``stride``, ``cell_offset``, ..., see :mod:`spairstore.core.geometry`). A :class:`StoreError`
        says why there is none: no set of that name, or its file refused (:attr:`stale_feature_sets`)."""
        if name in self.feature_sets:
            return self.feature_sets[name]
        if name in self.stale_feature_sets:
            raise StoreError(f"feature set {name!r} refused: {self.stale_feature_sets[name]}")
        if name in self._expected.get("feature_sets", ()):
            raise StoreError(f"{self.path}: feature set {name!r} was dropped since the store was first opened "
                             "here; open the store again (rebuild the dataset)")
        has = f"store has {', '.join(self.feature_sets) or 'none'}"
        found = self.misplaced_feature_sets().get(name)
        if found is not None:
            raise StoreError(f"{self.path}: no feature set {name!r} ({has}); {found} is one made from this store's "
                             f"images (the store renamed or copied without its folder?): move or copy "
                             f"{found.parent.name} to {sidecar_dir(Path(self.path))}")
        raise StoreError(f"{self.path}: no feature set {name!r} ({has})")

    def _check_row(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"image row {i} out of range for {len(self)} images")
        return int(i) % len(self)

    def pixels(self, i: int) -> np.ndarray:
        """Letterboxed RGB pixels of image row ``i``: uint8 (S, S, 3), store pixels."""
        i = self._check_row(i)
        return self._rows("images/pixels", i, i + 1)[0].copy()

    def mask(self, i: int) -> np.ndarray:
        """Letterboxed class-index mask of image row ``i``: uint8 (S, S); 0 is background/padding."""
        if self.shapes["images/mask"][0][0] == 0:
            raise StoreError(f"{self.path}: this store has no masks")
        i = self._check_row(i)
        return self._rows("images/mask", i, i + 1)[0].copy()

    def _blob(self, kind: str, i: int) -> bytes:
        i = self._check_row(i)
        off = self.images[f"{kind}_offsets"]
        return self._rows(f"images/{kind}_blob", int(off[i]), int(off[i + 1])).tobytes()

    def image_bytes(self, i: int) -> bytes:
        """The original image file of row ``i`` (JPEG for SPair-71k), byte for byte."""
        return self._blob("image", i)

    jpeg_bytes = image_bytes

    def mask_bytes(self, i: int) -> bytes:
        """The original mask PNG of row ``i``, byte for byte (empty if the dataset has no masks)."""
        return self._blob("mask", i)

    def features(self, name: str, i: int) -> np.ndarray:
        """Feature map of image row ``i`` from feature set ``name``: float16 (C, h, w). Its geometry
        (cell -> pixels) is :meth:`feature_set`; see :func:`spairstore.core.geometry.cell_to_store`."""
        self.feature_set(name)
        i = self._check_row(i)
        return self._rows(f"features/{name}/data", i, i + 1)[0].copy()

    # -- tables and lookups -------------------------------------------------------------------------
    def _table(self, prefix: str) -> Table:
        """The arrays directly under ``prefix`` (e.g. ``pairs/trn/``), read on first use (a pair table's
        indices checked then)."""
        t = self._tables.get(prefix)
        if t is None:
            names = [k for k in self.shapes if k.startswith(prefix) and "/" not in k[len(prefix):]]
            columns = {k[len(prefix):]: self._library().read(k) for k in names}
            if prefix.startswith("pairs/"):
                self._refuse(check_pair_table(prefix.split("/")[1], columns, len(self), len(self.categories),
                                              int(self.attrs["num_keypoints"]),
                                              len(self.attrs.get("subset_names", []))))
                for label, (_, value) in ADDED_PAIR_LABELS.items():  # a store of an older minor version
                    columns.setdefault(label, np.full(len(columns["pair_id"]), value, dtype=np.int8))
            try:
                t = self._tables[prefix] = Table({k: _decode_strings(v) for k, v in columns.items()})
            except UnicodeDecodeError as e:
                raise StoreError(f"{self.path}: {prefix} holds text that is not UTF-8 ({e})") from None
        return t

    def __len__(self) -> int:
        return len(self.images["name"])

    def pairs(self, split: str) -> Table:
        """The pair table of ``split``: ``pair_id``, ``stem``, ``category``, ``src``/``trg`` image rows,
        ``n_kps``, ``kps_ids`` (-1 padded), ``src_kps``/``trg_kps`` (original pixels, NaN padded),
        ``viewpoint``, ``scale``, ``truncation``, ``occlusion``, ``mirror``, ``flip``, ``small``, ``subset``
        (index into the ``subset_names`` attribute, -1 none)."""
        if split not in self.splits:
            raise StoreError(f"{self.path}: no split {split!r} (store has {', '.join(self.splits)})")
        return self._table(f"pairs/{split}/")

    @property
    def manifest(self) -> Table:
        """Every source file packed: ``path`` (relative to the source root), ``size``, ``sha256``."""
        return self._table("manifest/")

    def image_row(self, category: str, name: str) -> int:
        """Row of the image keyed ``(category, name)``."""
        try:
            return self._image_rows[(category, name)]
        except KeyError:
            raise StoreError(f"{self.path}: no image {category}/{name}") from None

    def pair_row(self, split: str, pair_id: int) -> int:
        """Row of pair ``pair_id`` in ``split``'s table."""
        hits = np.flatnonzero(self.pairs(split).pair_id == pair_id)
        if not len(hits):
            raise StoreError(f"{self.path}: no pair {pair_id} in split {split!r}")
        return int(hits[0])

    def pair_keypoints(self, split: str, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(kps_ids, src_kps, trg_kps)`` of a pair without padding; points in original pixels (x, y)."""
        t = self.pairs(split)
        n = int(t.n_kps[row])
        return t.kps_ids[row, :n], t.src_kps[row, :n], t.trg_kps[row, :n]

    def to_store(self, points: np.ndarray, i: int | np.ndarray) -> np.ndarray:
        """Original pixels of image row(s) ``i`` -> store pixels; ``points`` (..., 2) in x, y order."""
        return geometry.to_store(points, self.images.scale[i], self.images.offset[i])

    def to_original(self, points: np.ndarray, i: int | np.ndarray) -> np.ndarray:
        """Store pixels of image row(s) ``i`` -> original pixels; ``points`` (..., 2) in x, y order."""
        return geometry.to_original(points, self.images.scale[i], self.images.offset[i])

    def field_bytes(self) -> dict[str, int]:
        """Stored bytes of every array."""
        return {k: int(np.prod(s)) * np.dtype(d).itemsize for k, (s, d) in self.shapes.items()}

    def array(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the stored array at path ``name`` (e.g. ``images/pixels``, or bytes of
        ``images/image_blob``), exactly as stored; hot arrays are read raw where they can be."""
        if name not in self.shapes:
            raise StoreError(f"{self.path}: no array {name!r}")
        return self._rows(name, start, stop)

    def close(self) -> None:
        """Release the Store's files and maps. It may still be read afterwards: it then opens its files
        by path again, as long as they are the versions it opened (else :class:`StoreError`)."""
        self._maps, self._mapped = {}, {}
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None
        for f in self._sidecars.values():
            f.close()
        self._sidecars = {}

    def __del__(self) -> None:
        # A Store kept for a dataset's lifetime closes with it, without a ResourceWarning.
        if getattr(self, "_sidecars", None) is not None:
            self.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        # From the shapes read at open: a repr reads nothing (no pair table loaded, no file touched).
        pairs = ", ".join(f"{s}: {self.shapes[f'pairs/{s}/pair_id'][0][0]}" for s in self.splits)
        name = self.path.name if isinstance(self.path, Path) else self.path
        return f"<spairstore.Store {name}: {self.dataset}, {len(self)} images, pairs {{{pairs}}}>"


def _fd_path(f: io.BufferedReader, path: Path) -> Path:
    """A path that opens the very file ``f`` has open (where /proc exists), else ``path``."""
    return Path(f"/proc/self/fd/{f.fileno()}") if os.path.isdir("/proc/self/fd") else path


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _shown(file: Path, store: Path | str) -> str:
    """``file`` as a user finds it: inside a directory store, its path there; else its name."""
    return str(file.relative_to(store)) if isinstance(store, Path) and file.is_relative_to(store) else file.name


def _allow_open_files(n: int) -> None:
    """Raise this process's soft limit on open files towards the hard one where ``n`` more (each memory
    map holds a descriptor) would come near it, as a store of many shards needs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and n + 512 > soft:  # 512: what else the process may hold open
        want = n + 1024 if hard == resource.RLIM_INFINITY else min(hard, n + 1024)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass  # e.g. macOS caps it below an unlimited hard limit: mapping then says what to do


def _file_version(st: os.stat_result) -> tuple[int, int, int, int]:
    # The inode alone may be reused by a file written after the old one was deleted.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def open(path: str | Path) -> Store:  # noqa: A001 - mirrors h5py.File / zarr.open
    """Open the store at ``path`` for reading: an HDF5 file, a Zarr directory, or a Zarr store at a URL
    (``http(s)://``, ``s3://``, ``gs://``, any fsspec protocol whose driver is installed; read-only)."""
    return Store(path)
