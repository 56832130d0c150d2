"""Reading a store: :func:`open` returns a :class:`Store`.

Small tables (image metadata, pair tables, categories, manifest) are loaded into RAM as numpy arrays
when the store is opened. Payloads (pixels, masks, original bytes) are read through ``np.memmap`` at
the byte offsets the backend reports, created lazily in each process, so a Store is safe to use after
``fork`` and pickles (as its path) for ``spawn``. Arrays a backend cannot locate as plain bytes
(chunked or compressed) are read through the backend library instead.

A store file is trusted only after checks: its layout must match :mod:`spairstore.schema` (every
field's dtype and shape), its offsets and indices must stay inside what they index, and every
memory-mapped extent must lie inside the file; anything else is a :class:`StoreError`.
A Store keeps the file it opened open: when a new version is packed to the same path (an atomic
rename), readers go on reading the old file until they open the store again.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import geometry
from .backends import ArrayReader, RawExtent, reader_for
from .errors import StoreError
from .schema import FORMAT_NAME, FORMAT_VERSION, PAYLOAD_FIELDS, check_layout, check_tables


class Table(Mapping[str, np.ndarray]):
    """Columns of equal length, by name or attribute (``table.pair_id``). Strings are decoded to ``str``."""

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

    def __len__(self) -> int:
        return len(self._columns)

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


class Store:
    """An opened store. Image rows ``i`` index every ``images/*`` array; pair rows index a split's table.

    Attributes:
        images: per-image :class:`Table` (``name``, ``category``, ``size`` (W, H original pixels),
            ``scale``/``offset`` (original -> store pixels), ``bbox`` and ``keypoints`` in original
            pixels (x, y; NaN = absent), labels, ``splits`` bitmask, CRCs).
        categories: category names; ``images.category`` and pair ``category`` index into it.
        splits: names of the packed splits.
        image_size: side ``S`` of the square store frame, in store pixels.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self._pid = os.getpid()
        self._maps: dict[str, np.ndarray] = {}
        self._backend: ArrayReader | None = None
        for _ in range(3):
            # Pin the file first, then check the tables came from that same file: a pack may
            # rename a new version into place at any moment.
            self._file = self._pin()
            try:
                backend = reader_for(self.path)
                try:
                    self._load(backend)
                finally:
                    backend.close()
            except BaseException:
                self.close()
                raise
            #: (device, inode) of the file this Store reads: a new version renamed into place differs
            self._opened = None if self._file is None else _identity(os.fstat(self._file.fileno()))
            if self._opened is None or self._identity() == self._opened:
                return
            self.close()
        raise StoreError(f"{self.path}: the store kept being replaced while it was opened")

    def _pin(self) -> io.BufferedReader | None:
        try:
            return io.open(self.path, "rb") if self.path.is_file() else None
        except OSError:
            return None  # the backend says why

    def _identity(self) -> tuple[int, int] | None:
        try:
            return _identity(os.stat(self.path))
        except OSError:
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
            raise StoreError(f"{self.path}: not a spairstore store (format attribute {attrs.get('format')!r})")
        version = str(attrs.get("format_version", ""))
        try:
            major = int(version.split(".")[0])
        except ValueError:
            raise StoreError(f"{self.path}: unreadable format version {version!r}") from None
        if major > FORMAT_VERSION[0]:
            raise StoreError(f"{self.path}: store format {version} is newer than this spairstore reads "
                             f"({FORMAT_VERSION[0]}.x); upgrade spairstore")
        self.shapes = backend.shapes()
        problems = check_layout(self.shapes, attrs)
        if not problems:
            hot = {f"images/{f}" for f in PAYLOAD_FIELDS} | {k for k in self.shapes if k.startswith("features/")}
            tables = {k: backend.read(k) for k in self.shapes if k not in hot}
            problems = check_tables(tables, self.shapes, attrs)
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise StoreError(f"{self.path}: {problems[0]}{more}")
        self.attrs: dict[str, Any] = dict(attrs)
        self.dataset: str = attrs["dataset"]
        self.image_size: int = int(attrs["image_size"])
        self.splits: list[str] = list(attrs["splits"])
        self.pose_names: list[str] = list(attrs["pose_names"])
        self.extents: dict[str, RawExtent | None] = {k: backend.extent(k) for k in hot if k in self.shapes}
        self._check_extents()
        self.images = Table(_group(tables, "images/"))
        self.categories: list[str] = [str(c) for c in _decode_strings(tables["categories"])]
        self._pairs = {s: Table(_group(tables, f"pairs/{s}/")) for s in self.splits}
        self.manifest = Table(_group(tables, "manifest/"))
        self.feature_sets: dict[str, dict[str, Any]] = {
            k: v for k, v in attrs.get("feature_sets", {}).items() if f"features/{k}/data" in self.shapes}
        self._image_rows = {(self.categories[c], str(nm)): i
                            for i, (c, nm) in enumerate(zip(self.images.category, self.images.name))}

    def _check_extents(self) -> None:
        """Every memory-mapped array must lie inside its file: a map past the end of a (truncated)
        file would kill the reading process with SIGBUS instead of raising."""
        for name, ext in self.extents.items():
            if ext is None:
                continue
            nbytes = int(np.prod(ext.shape, dtype=np.int64)) * ext.dtype.itemsize
            size = (os.fstat(self._file.fileno()) if self._pinned(ext) else os.stat(ext.file)).st_size
            if ext.offset < 0 or ext.offset + nbytes > size:
                raise StoreError(f"{self.path}: {name} ({nbytes:,} bytes at offset {ext.offset:,}) lies past "
                                 f"the end of {ext.file.name} ({size:,} bytes); the file is truncated or damaged")

    def _pinned(self, ext: RawExtent) -> bool:
        return self._file is not None and Path(ext.file) == self.path

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "identity": self._opened}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]
        if state.get("identity") is not None and self._opened != tuple(state["identity"]):
            self.close()
            raise StoreError(f"{self.path} was replaced by a new version since this Store was opened; "
                             "open the store again (e.g. recreate the dataset) to read the new version")

    # -- payload access -----------------------------------------------------------------------------
    def _array(self, name: str) -> np.ndarray | None:
        """The payload array memory-mapped in this process, or None if it must go through the backend."""
        if self._pid != os.getpid():  # forked: mappings and handles belong to the parent
            self._maps, self._backend, self._pid = {}, None, os.getpid()
        a = self._maps.get(name)
        if a is None:
            ext = self.extents.get(name)
            shape = self.shapes[name][0]
            if ext is None and int(np.prod(shape)) != 0:
                return None
            source = self._file if ext is not None and self._pinned(ext) else ext.file if ext is not None else None
            a = (np.memmap(source, dtype=ext.dtype, mode="r", offset=ext.offset, shape=ext.shape)
                 if ext is not None else np.empty(shape, dtype=self.shapes[name][1]))
            self._maps[name] = a
        return a

    def _read(self, name: str, index: Any) -> np.ndarray:
        a = self._array(name)
        if a is not None:
            return np.array(a[index])
        if self._backend is None:
            self._backend = reader_for(self.path)
        return self._backend.read(name, index)

    @staticmethod
    def _row_array(field: str) -> str:
        return f"{field}/data" if field.startswith("features/") else f"images/{field}"

    def read(self, field: str, rows: np.ndarray | list[int], out: np.ndarray | None = None) -> np.ndarray:
        """Image rows of a per-image array for a batch, in the given order, into ``out`` if given.

        ``field`` is ``pixels`` (uint8 (B, S, S, 3)), ``mask`` (uint8 (B, S, S)) or ``features/<name>``
        (float16 (B, C, h, w)). Each distinct row is read once, in storage order, then scattered.
        """
        rows = np.asarray(rows, dtype=np.int64)
        name = self._row_array(field)
        if name not in self.shapes:
            raise StoreError(f"{self.path}: no field {field!r}")
        shape = self.shapes[name][0]
        if out is None:
            out = np.empty((len(rows), *shape[1:]), dtype=self.shapes[name][1])
        uniq, inverse = np.unique(rows, return_inverse=True)
        a = self._array(name)
        if a is not None:
            for j, r in enumerate(uniq):
                out[inverse == j] = a[r]
        else:
            out[:] = self._read(name, uniq)[inverse]
        return out

    def _check_row(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"image row {i} out of range for {len(self)} images")
        return int(i) % len(self)

    def pixels(self, i: int) -> np.ndarray:
        """Letterboxed RGB pixels of image row ``i``: uint8 (S, S, 3), store pixels."""
        return self._read("images/pixels", self._check_row(i))

    def mask(self, i: int) -> np.ndarray:
        """Letterboxed class-index mask of image row ``i``: uint8 (S, S); 0 is background/padding."""
        if self.shapes["images/mask"][0][0] == 0:
            raise StoreError(f"{self.path}: this store has no masks")
        return self._read("images/mask", self._check_row(i))

    def _blob(self, kind: str, i: int) -> bytes:
        i = self._check_row(i)
        off = self.images[f"{kind}_offsets"]
        return self._read(f"images/{kind}_blob", slice(int(off[i]), int(off[i + 1]))).tobytes()

    def image_bytes(self, i: int) -> bytes:
        """The original image file of row ``i`` (JPEG for SPair-71k), byte for byte."""
        return self._blob("image", i)

    jpeg_bytes = image_bytes

    def mask_bytes(self, i: int) -> bytes:
        """The original mask PNG of row ``i``, byte for byte (empty if the dataset has no masks)."""
        return self._blob("mask", i)

    def features(self, name: str, i: int) -> np.ndarray:
        """Feature map of image row ``i`` from feature set ``name``: float16 (C, h, w). Its geometry
        (cell -> pixels) is ``feature_sets[name]``; see :func:`spairstore.geometry.cell_to_store`."""
        if name not in self.feature_sets:
            raise StoreError(f"{self.path}: no feature set {name!r} (store has {', '.join(self.feature_sets) or 'none'})")
        return self._read(f"features/{name}/data", self._check_row(i))

    # -- tables and lookups -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.images["name"])

    def pairs(self, split: str) -> Table:
        """The pair table of ``split``: ``pair_id``, ``stem``, ``category``, ``src``/``trg`` image rows,
        ``n_kps``, ``kps_ids`` (-1 padded), ``src_kps``/``trg_kps`` (original pixels, NaN padded),
        ``viewpoint``, ``scale``, ``truncation``, ``occlusion``, ``mirror``, ``flip``, ``small``."""
        try:
            return self._pairs[split]
        except KeyError:
            raise StoreError(f"{self.path}: no split {split!r} (store has {', '.join(self.splits)})") from None

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
        """Rows ``start:stop`` of the stored array at path ``name`` (e.g. ``images/pixels``, or the
        bytes of ``images/image_blob``), exactly as stored: hot arrays come from the memory map."""
        if name not in self.shapes:
            raise StoreError(f"{self.path}: no array {name!r}")
        return self._read(name, slice(start, stop))

    def close(self) -> None:
        self._maps = {}
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        if getattr(self, "_file", None) is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        pairs = ", ".join(f"{s}: {self.pairs(s).rows}" for s in self.splits)
        return f"<spairstore.Store {self.path.name}: {self.dataset}, {len(self)} images, pairs {{{pairs}}}>"


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def open(path: str | Path) -> Store:  # noqa: A001 - mirrors h5py.File / zarr.open
    """Open the store at ``path`` for reading."""
    return Store(path)
