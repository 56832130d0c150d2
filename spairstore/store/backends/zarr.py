"""Zarr v3 backend: a directory (or any fsspec URL), hot arrays sharded with one record per chunk.

Hot arrays (created with :meth:`ZarrWriter.create`) are chunked one row per chunk (1-D blobs:
:data:`BLOB_CHUNK` bytes per chunk), uncompressed, and grouped into shards of about ``shard_bytes``
each: one file per shard keeps the file count low while every record stays addressable on its own.
Small tables are single-chunk, Zstandard-compressed arrays. Root attributes are native JSON; each
array carries its schema description (``doc``, ``frame``, ``units``, ``padding``, ``bits``). The
metadata of every array is consolidated into the root ``zarr.json`` so a remote store opens without
listing directories (plain HTTP servers cannot list).

Reading: :meth:`ZarrReader.extent` parses the shard indexes of a local hot array once and returns
where each record lies, for the reader's ``os.pread``/``mmap`` hot path; everything else, and every
remote array, is read through zarr-python, a batch of rows per call.
"""
from __future__ import annotations

import asyncio
import json
import math
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation
from zarr.core.sync import sync

from ...core.errors import FeatureError, StoreError
from ...core.schema import FORMAT_NAME, describe
from ..feature_sets import check_complete, crc32_rows, images_fingerprint, kept_notes
from ..transaction import RowFlags, Transaction, fsync_paths, link_or_copy, remove, target_lock
from . import RawExtent, is_url

#: Default shard size of hot arrays. Larger shards mean fewer files; a shard is also the unit one
#: writer process owns when several write at once, and the most the writer buffers per array.
SHARD_BYTES = 64 << 20
#: Chunk of 1-D hot arrays (the concatenated original files): small enough that a remote read of one
#: JPEG fetches little more than the JPEG.
BLOB_CHUNK = 256 << 10
_MISSING = np.uint64(2**64 - 1)  # shard-index entry of a chunk never written


@contextmanager
def _quiet() -> Iterator[None]:
    # Fixed-length byte strings and consolidated metadata are zarr v3 extensions; zarr warns about
    # both on every use although they read back exactly with zarr-python.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"zarr\.")
        warnings.filterwarnings("ignore", message=".*(not part|unstable|Consolidated).*")
        yield


def shard_rows(shape: tuple[int, ...], dtype: np.dtype, shard_bytes: int) -> tuple[int, int]:
    """``(rows per chunk, rows per shard)`` of a hot array: one record per chunk (1-D arrays:
    :data:`BLOB_CHUNK` bytes), as many whole chunks per shard as fit in ``shard_bytes`` (at least one)."""
    row_bytes = math.prod(shape[1:]) * np.dtype(dtype).itemsize
    chunk = max(1, min(BLOB_CHUNK // row_bytes, shape[0])) if len(shape) == 1 else 1
    per_shard = max(1, shard_bytes // (row_bytes * chunk))
    per_shard = min(per_shard, max(1, math.ceil(shape[0] / chunk)))  # no shard larger than the array
    return chunk, chunk * per_shard


def _hot_spec(shape: tuple[int, ...], dtype: np.dtype, chunk: int, shard: int) -> dict[str, Any]:
    """``create_array`` arguments of a hot array: ``chunk`` rows per chunk, ``shard`` rows per shard, raw bytes."""
    # The shard index goes first so records do not start page-aligned: copying a page-aligned record
    # into a page-aligned buffer hits 4K aliasing in memcpy (measured here: 1.8x slower).
    return dict(shape=tuple(shape), dtype=np.dtype(dtype), chunks=(chunk, *shape[1:]),
                shards={"shape": (shard, *shape[1:]), "index_location": "start"}, compressors=None,
                filters=None, fill_value=0,
                config={"write_empty_chunks": True})  # every record present: the raw path finds them all


def _table_spec(data: np.ndarray) -> dict[str, Any]:
    """``create_array`` arguments of a small table: one chunk, zarr's default (Zstandard) compression."""
    return dict(data=data, chunks=tuple(max(1, n) for n in data.shape) or None)


class _ShardBuffer:
    """Gathers the rows of one shard and writes them to Zarr together.

    Writing part of a shard makes zarr read, decode and rewrite the whole shard; rows arriving one by
    one (as ``pack`` writes them) would cost a shard rewrite each. Runs of rows written are flushed
    when a write moves to another shard, and at :meth:`flush`.
    """

    def __init__(self, array: zarr.Array):
        self.array = array
        self.rows = array.shards[0]
        self.shard = -1
        self.buf = np.empty(0)
        self.spans: list[tuple[int, int]] = []  # row ranges of the buffer written so far

    def write(self, start: int, data: np.ndarray) -> None:
        i = 0
        while i < len(data):
            row = start + i
            shard = row // self.rows
            if shard != self.shard:
                self.flush()
                n = min(self.rows, self.array.shape[0] - shard * self.rows)
                self.shard, self.buf = shard, np.empty((n, *self.array.shape[1:]), dtype=self.array.dtype)
            first = row - shard * self.rows
            n = min(len(data) - i, len(self.buf) - first)
            self.buf[first:first + n] = data[i:i + n]
            self.spans.append((first, first + n))
            i += n

    def flush(self) -> None:
        base = self.shard * self.rows
        runs: list[list[int]] = []
        for a, b in sorted(self.spans):
            if runs and a <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], b)
            else:
                runs.append([a, b])
        for a, b in runs:
            self.array[base + a:base + b] = self.buf[a:b]
        self.shard, self.buf, self.spans = -1, np.empty(0), []


class ZarrWriter:
    """Writes a new Zarr v3 store directory (see the module docstring for the layout)."""

    def __init__(self, path: Path, shard_bytes: int = SHARD_BYTES):
        if shard_bytes < 1:
            raise StoreError(f"{path}: shard size must be positive, got {shard_bytes} bytes")
        self.path = Path(path)
        self.shard_bytes = shard_bytes
        with _quiet():
            self._g = zarr.open_group(str(self.path), mode="w-", zarr_format=3)
        self._buffers: dict[str, _ShardBuffer] = {}

    def create(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
        with _quiet():
            a = self._g.create_array(name, **_hot_spec(shape, dtype, *shard_rows(shape, dtype, self.shard_bytes)))
        self._buffers[name] = _ShardBuffer(a)

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        with _quiet():
            self._buffers[name].write(start, np.asarray(data))

    def put(self, name: str, data: np.ndarray) -> None:
        data = np.asarray(data)
        with _quiet():
            self._g.create_array(name, **_table_spec(data))

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        """Root attributes, then every array's description from the schema."""
        with _quiet():
            self._g.attrs.update(attrs)
            for name, a in self._g.members(max_depth=None):
                if isinstance(a, zarr.Array):
                    a.attrs.update(describe(name, attrs))

    def close(self) -> None:
        with _quiet():
            for b in self._buffers.values():
                b.flush()
            self._buffers = {}
            zarr.consolidate_metadata(str(self.path))


def _enclosing_store(path: Path) -> Path | None:
    """The spairstore Zarr store a local group or array node lies inside (a parent whose root node
    says so), or None."""
    for up in path.resolve().parents:
        try:
            node = json.loads((up / "zarr.json").read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(node, dict) and node.get("attributes", {}).get("format") == FORMAT_NAME:
            return up
    return None


class ZarrReader:
    """Reads a Zarr store from a local directory or an fsspec URL (read-only)."""

    def __init__(self, path: str | Path):
        self.remote = is_url(path)
        self.path = str(path) if self.remote else Path(path)
        if not self.remote and (self.path / ".zgroup").is_file() and not (self.path / "zarr.json").is_file():
            # Refused before zarr walks it: its v2 reader's failures leave asyncio tasks warning at exit.
            raise StoreError(f"{self.path}: a Zarr v2 store; spairstore reads Zarr v3 only")
        inside = None if self.remote else _enclosing_store(self.path)
        if inside is not None:
            raise StoreError(f"{self.path}: not a store but a part of the store {inside}: open that")
        try:
            with _quiet():
                self._g = zarr.open_group(str(self.path), mode="r", zarr_format=3)
                self.attrs = dict(self._g.attrs)
                self._arrays = {k: v for k, v in self._g.members(max_depth=None) if isinstance(v, zarr.Array)}
        except ImportError as e:
            raise StoreError(f"{self.path}: reading this URL needs an fsspec driver ({e}); "
                             f"pip install 'spairstore[remote]' (plus s3fs/gcsfs for s3:// / gs://)") from None
        except (FileNotFoundError, KeyError, ValueError, OSError, TypeError) as e:
            raise StoreError(f"{self.path}: not a readable Zarr store ({type(e).__name__}: {e})") from None
        except Exception as e:  # zarr and fsspec raise their own types for missing or broken stores
            if type(e).__module__.split(".")[0] not in ("zarr", "fsspec", "aiohttp"):
                raise
            raise StoreError(f"{self.path}: not a readable Zarr store ({type(e).__name__}: {e})") from None

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {k: (tuple(a.shape), np.dtype(a.dtype)) for k, a in self._arrays.items()}

    def _array(self, name: str) -> zarr.Array:
        try:
            return self._arrays[name]
        except KeyError:
            raise StoreError(f"{self.path}: no array {name}") from None

    def read(self, name: str, index: Any = ()) -> np.ndarray:
        a = self._array(name)
        try:
            with _quiet():
                if isinstance(index, np.ndarray):
                    return _read_rows(a, index)
                return np.asarray(a[index] if index != () else a[...])
        except (OSError, ValueError) as e:
            # a server that ignores Range sends whole shard files, which then fail their chunks' CRC-32C
            hint = ("; does the server honour HTTP range requests? (`python -m http.server` does not)"
                    if self.remote and "checksum" in str(e).lower() else "")
            raise StoreError(f"{self.path}: cannot read {name} ({e}){hint}") from None

    def extent(self, name: str) -> RawExtent | None:
        """Where each chunk of a local, uncompressed, row-chunked array lies (shard indexes read once)."""
        if self.remote:
            return None
        a = self._array(name)
        shape, dtype = tuple(a.shape), np.dtype(a.dtype)
        codecs = a.metadata.codecs
        sharded = len(codecs) == 1 and isinstance(codecs[0], ShardingCodec)
        outer = tuple(a.metadata.chunk_grid.chunk_shape)
        inner = tuple(codecs[0].chunk_shape) if sharded else outer
        plain = codecs[0].codecs if sharded else codecs
        if (math.prod(shape) == 0 or not _raw_bytes(plain, dtype) or inner[1:] != shape[1:]
                or outer[1:] != shape[1:] or a.metadata.fill_value != 0):
            return None
        chunk_bytes = math.prod(inner) * dtype.itemsize
        n_chunks = math.ceil(shape[0] / inner[0])
        per_shard = outer[0] // inner[0]
        files, file_ids, offsets = [], np.zeros(n_chunks, np.int32), np.full(n_chunks, -1, np.int64)
        for s in range(math.ceil(shape[0] / outer[0])):
            f = self.path / name / a.metadata.encode_chunk_key((s,) + (0,) * (len(shape) - 1))
            first, last = s * per_shard, min(n_chunks, (s + 1) * per_shard)
            if not f.is_file():
                continue  # never written: zeros
            if sharded:
                where = _shard_index(f, per_shard, codecs[0], chunk_bytes)
                if where is None:
                    return None
                offsets[first:last] = where[:last - first]
            elif f.stat().st_size == chunk_bytes:
                offsets[first] = 0
            else:
                return None
            file_ids[first:last] = len(files)
            files.append(f)
        return RawExtent(tuple(files), file_ids, offsets, inner[0], shape, dtype)

    def close(self) -> None:
        self._arrays = {}


def _read_rows(a: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (sorted) of ``a`` in one library call: each run of consecutive rows is one slice,
    all fetched concurrently (remote: parallel range requests). zarr's own ``oindex`` would read and
    index whole shards."""
    if not len(rows):
        return np.empty((0, *a.shape[1:]), dtype=a.dtype)
    cut = np.flatnonzero(np.diff(rows) != 1) + 1
    starts, stops = rows[np.r_[0, cut]], rows[np.r_[cut - 1, len(rows) - 1]] + 1

    async def fetch() -> list[Any]:
        aa = a.async_array
        return await asyncio.gather(*(aa.getitem(slice(int(i), int(j))) for i, j in zip(starts, stops)))

    return np.concatenate([np.asarray(p) for p in sync(fetch())])


def _raw_bytes(codecs: tuple[Any, ...], dtype: np.dtype) -> bool:
    """The chunk encoding is the array's bytes as numpy holds them in this process."""
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return False
    endian = codecs[0].endian
    return dtype.itemsize == 1 or endian is None or endian.value == ("little" if np.little_endian else "big")


def _shard_index(file: Path, n: int, codec: ShardingCodec, chunk_bytes: int) -> np.ndarray | None:
    """Byte offsets of the ``n`` chunks of a shard file (-1 = not written), or None if the index is in
    an encoding this reader does not parse or disagrees with the file (then zarr-python reads it)."""
    ic = codec.index_codecs
    if not (len(ic) == 2 and isinstance(ic[0], BytesCodec) and isinstance(ic[1], Crc32cCodec)
            and (ic[0].endian is None or ic[0].endian.value == "little")):
        return None
    size = file.stat().st_size
    nbytes = 16 * n + 4
    if size < nbytes:
        return None
    with open(file, "rb") as f:
        f.seek(0 if codec.index_location == ShardingCodecIndexLocation.start else size - nbytes)
        raw = f.read(nbytes)
    if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
        return None
    index = np.frombuffer(raw[:-4], dtype="<u8").reshape(n, 2)
    missing = (index[:, 0] == _MISSING) & (index[:, 1] == _MISSING)
    present = index[~missing]
    if (present[:, 1] != chunk_bytes).any() or (present[:, 0] + present[:, 1] > size).any():
        return None
    return np.where(missing, -1, index[:, 0].astype(np.int64))


# -- a group of arrays added to an existing local store by several processes at once -----------------
# zarr reaches a node only through the group nodes (zarr.json files) above it: an array created at
# ``features/<name>/data`` while ``features/<name>`` has no group node is invisible to readers (which
# list the root's consolidated metadata) and to re-consolidation, until publish() writes that node.


def _shard_rows_of(a: zarr.Array) -> int:
    return int((a.shards or a.chunks)[0])


def shard_rows_of(store: Path, name: str) -> int:
    """Rows per shard (per chunk where unsharded) of array ``name`` of a local store."""
    with _quiet():
        return _shard_rows_of(zarr.open_array(str(Path(store) / name), mode="r"))


class UnlistedArray:
    """A hot array under a group of an existing local store that has no group node yet (see above).

    Several processes may fill it at once, each writing whole shards: a shard is one file, so no two
    processes write the same file. Readers do not see it until :func:`publish`.
    """

    def __init__(self, store: Path, name: str):
        self.path = Path(store) / name
        with _quiet():
            # write_empty_chunks is a run-time setting, not stored: a shard of all-zero maps is a file too
            self._a = zarr.open_array(str(self.path), mode="r+").with_config({"write_empty_chunks": True})
        self.shape: tuple[int, ...] = tuple(self._a.shape)
        self.dtype = np.dtype(self._a.dtype)
        self.shard_rows = _shard_rows_of(self._a)

    @classmethod
    def create(cls, store: Path, name: str, shape: tuple[int, ...], dtype: np.dtype, shard_rows: int) -> UnlistedArray:
        """Create it (one row per chunk, ``shard_rows`` rows per shard), replacing whatever is at its path."""
        path = Path(store) / name
        if (path.parent / "zarr.json").exists():
            raise StoreError(f"{path.parent}: a listed group; unpublish it before adding unlisted arrays")
        remove(path)
        with _quiet():
            zarr.create_array(str(path), **_hot_spec(shape, dtype, 1, shard_rows))
        return cls(store, name)

    @classmethod
    def find(cls, store: Path, name: str) -> UnlistedArray | None:
        """The array if it exists and zarr can open it, else None."""
        if not (Path(store) / name / "zarr.json").is_file():
            return None
        try:
            return cls(store, name)
        except (OSError, ValueError, KeyError, TypeError):  # a damaged node (zarr's errors are ValueErrors)
            return None

    def write_shard(self, shard: int, data: np.ndarray) -> None:
        """Every row of shard ``shard`` (``data``), written as one file (zarr writes a temporary file and
        renames it) and synced to disk with the directories leading to it."""
        start = shard * self.shard_rows
        if len(data) != min(self.shard_rows, self.shape[0] - start):
            raise StoreError(f"{self.path}: shard {shard} has {min(self.shard_rows, self.shape[0] - start)} "
                             f"rows, got {len(data)}")
        with _quiet():
            self._a[start:start + len(data)] = data  # a whole shard: encoded without reading the old file
        f = self.path / self._a.metadata.encode_chunk_key((shard,) + (0,) * (len(self.shape) - 1))
        fsync_paths([f, *(d for d in f.parents if d.is_relative_to(self.path))])

    def read(self, start: int, stop: int) -> np.ndarray:
        with _quiet():
            return np.asarray(self._a[start:stop])


def _set_attrs(store: Path, attrs: dict[str, Any]) -> None:
    with _quiet():
        zarr.open_group(str(store), mode="r+").attrs.update(attrs)  # keeps the consolidated metadata
    fsync_paths([store / "zarr.json", store])


def _consolidate(store: Path) -> None:
    with _quiet():
        zarr.consolidate_metadata(str(store))
    fsync_paths([store / "zarr.json", store])


def publish(store: Path, group: str, tables: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Make ``group`` of the local store visible with its unlisted arrays and ``tables`` (small arrays
    written now), then update the root attributes with ``attrs``.

    Every step replaces files atomically and is synced before the next: the tables and group nodes, the
    consolidated metadata in the root ``zarr.json`` (readers see the arrays from here on), the root
    attributes last. After a crash the group is unseen or seen without the attributes that name it;
    publishing again completes it.
    """
    store = Path(store)
    top = store / group
    nodes = [top, *(d for d in top.parents if d.is_relative_to(store) and d != store)]
    with _quiet():
        for name, data in tables.items():
            zarr.create_array(str(top / name), overwrite=True, **_table_spec(data))
        for node in reversed(nodes):  # top down
            if not (node / "zarr.json").is_file():
                zarr.create_group(str(node))
        for array in (d for d in top.iterdir() if (d / "zarr.json").is_file()):
            zarr.open_array(str(array), mode="r+").attrs.update(describe(f"{group}/{array.name}", attrs))
    fsync_paths([*top.rglob("*"), *nodes, store])
    _consolidate(store)
    _set_attrs(store, attrs)


def unpublish(store: Path, group: str, attrs: dict[str, Any]) -> None:
    """Delete ``group`` of the local store after updating the root attributes with ``attrs`` (which
    should no longer name it): attributes, group node, consolidated metadata, files, in that order, so
    that after a crash the attributes never name a group readers cannot see."""
    store = Path(store)
    _set_attrs(store, attrs)
    (store / group / "zarr.json").unlink(missing_ok=True)
    if (store / group).is_dir():
        fsync_paths([store / group])
    _consolidate(store)
    remove(store / group)


def keep_sets(old: Path, new: Path) -> list[str]:
    """Carry the feature sets of the store ``old`` over into the store ``new`` that is to replace it
    (``pack``/``convert --overwrite``), where both hold the same images
    (:func:`~spairstore.store.feature_sets.images_fingerprint`) and ``new`` has no set of that name: their
    files are hard-linked (copied across file systems) and published in ``new``. Returns what became of
    each set, for the notes (:func:`~spairstore.store.feature_sets.kept_notes`)."""
    if not (old / "zarr.json").is_file():
        return []
    o, n = ZarrReader(old), ZarrReader(new)
    try:
        sets = dict(o.attrs.get("feature_sets", {}))
        have = dict(n.attrs.get("feature_sets", {}))
        same = bool(sets) and all(r.attrs.get("format") == FORMAT_NAME for r in (o, n)) and len(
            {images_fingerprint(r) for r in (o, n)}) == 1
    finally:
        o.close()
        n.close()
    fates: dict[str, str] = {}
    for name, attrs in sets.items():
        if name in have:
            fates[name] = "replaced"
        elif not same:
            fates[name] = "other images"
        elif not (old / "features" / name / "zarr.json").is_file():
            fates[name] = "damaged"
        else:
            shutil.copytree(old / "features" / name, new / "features" / name, copy_function=link_or_copy)
            have[name] = attrs
            publish(new, f"features/{name}", {}, {"feature_sets": dict(have)})
            fates[name] = "kept"
    return kept_notes(fates)


class ZarrSet:
    """Stages feature set ``name`` of the local Zarr store at ``store`` straight into its array
    ``features/<name>/data``: processes write whole shards (one file each) while no group node lists
    the array; the commit adds the CRC-32s, the group nodes, the consolidated metadata and, last, the
    attributes (:func:`publish`), so readers see the whole set or none of it. Units are shards, as many
    rows as a shard of the pixels."""

    whole_units = True

    def __init__(self, store: Path, name: str, shape: tuple[int, ...], attrs: dict[str, Any]):
        self.store, self.name, self.shape, self.attrs = Path(store), name, tuple(shape), attrs
        self.array_name = f"features/{name}/data"
        self.unit_rows = shard_rows_of(self.store, "images/pixels")

    def prepare(self, tx: Transaction, replace: bool) -> np.ndarray:
        """Hide and delete the set if ``replace`` (it is published) or if a crashed commit left it listed
        but incomplete; make sure the array is there with the right shape (else create it, forgetting
        the staged rows); return the rows of the shards with missing rows, whole."""
        with target_lock(self.store):
            listed = (self.store / "features" / self.name / "zarr.json").is_file()
            if replace or (listed and (~tx.done(self.shape[0])).any()):
                unpublish(self.store, f"features/{self.name}", {"feature_sets": self._sets(drop=True)})
                tx.forget_parts()
            a = UnlistedArray.find(self.store, self.array_name)
            if a is None or a.shape != self.shape or a.dtype != np.float16:
                a = UnlistedArray.create(self.store, self.array_name, self.shape, np.dtype(np.float16),
                                         self.unit_rows)
                tx.forget_parts()
        shards = np.unique(np.flatnonzero(~tx.done(self.shape[0])) // a.shard_rows)
        rows = (shards[:, None] * a.shard_rows + np.arange(a.shard_rows)).ravel()
        return rows[rows < self.shape[0]]

    def sink(self, tx: Transaction, part: int, sync_seconds: float) -> _ShardSink:
        # A shard file is durable (synced) once written: its rows need nothing more before their flags.
        return _ShardSink(UnlistedArray(self.store, self.array_name), tx.flags(part, self.shape[0],
                                                                               sync_seconds=sync_seconds))

    def commit(self, tx: Transaction) -> None:
        check_complete(tx, self.shape[0])
        a = UnlistedArray(self.store, self.array_name)
        crc = np.concatenate([crc32_rows(a.read(start, start + a.shard_rows))
                              for start in range(0, a.shape[0], a.shard_rows)] or [np.zeros(0, np.uint32)])
        with target_lock(self.store):
            publish(self.store, f"features/{self.name}", {"crc32": crc},
                    {"feature_sets": {**self._sets(), self.name: self.attrs}})

    def drop(self) -> None:
        """Delete the set (attributes first: never named while half gone)."""
        with target_lock(self.store):
            unpublish(self.store, f"features/{self.name}", {"feature_sets": self._sets(drop=True)})

    def _sets(self, drop: bool = False) -> dict[str, Any]:
        r = ZarrReader(self.store)
        try:
            sets = dict(r.attrs.get("feature_sets", {}))
        finally:
            r.close()
        if drop:
            sets.pop(self.name, None)
        return sets


class _ShardSink:
    """Gathers one process's maps shard by shard (its batches never straddle shards, and it writes
    whole shards) and writes each shard whole, then flags its rows."""

    def __init__(self, array: UnlistedArray, flags: RowFlags):
        self.array, self.flags = array, flags
        self.shard, self.start, self.filled = -1, 0, 0
        self.buf = np.empty(0)

    def __call__(self, rows: np.ndarray, maps: np.ndarray) -> None:
        a = self.array
        if maps.dtype != a.dtype or maps.shape[1:] != a.shape[1:]:
            raise FeatureError(f"{a.path}: got maps {maps.dtype} {maps.shape[1:]}, the set holds "
                               f"{a.dtype} {a.shape[1:]}")
        shard = int(rows[0]) // a.shard_rows
        if shard != self.shard:
            self.shard, self.start, self.filled = shard, shard * a.shard_rows, 0
            self.buf = np.empty((min(a.shard_rows, a.shape[0] - self.start), *a.shape[1:]), dtype=a.dtype)
        self.buf[rows - self.start] = maps
        self.filled += len(rows)
        if self.filled == len(self.buf):
            a.write_shard(shard, self.buf)
            self.flags.written(np.arange(self.start, self.start + len(self.buf)))

    def close(self) -> None:
        self.flags.close()
