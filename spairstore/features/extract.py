"""Extract backbone features for every image of a store: ``spairstore features``, in one process or in
several at once (``torchrun --nproc-per-node N -m spairstore features ...``).

The pieces, each reusable on its own:

1. :func:`extract_rows` runs an :class:`~.backbones.Extractor` over given image rows in batches and hands each
   batch of float16 maps to a *sink* (any callable ``sink(rows, maps)``). Batches never straddle a
   *unit* (a block of rows: a Zarr shard, or ``batch_size`` rows), so the same rows always form the same
   batches, whichever process runs them. That matters: on CPU an image's map varies in its last bits
   with the other images of its batch, so equal batches are what makes a run of N processes bitwise
   equal to a run of one.
2. :class:`Staging` is the resumable sidecar folder beside the store,
   ``<store>.features-<name>.partial/``: ``meta.json`` (the run's settings) and, per writer process
   ``k``, ``done-<k>.u8`` (one flag per image row) and, for HDF5 stores, ``data-<k>.f16`` (raw
   ``(N, C, h, w)`` float16, sparse: only the rows ``k`` wrote). A :class:`StagingPart` writes one
   process's rows as they come and, every ``sync_seconds`` (and at the end), syncs them to disk and only
   then flags (and syncs the flags), so after a kill, even of the machine, every flagged row is complete
   and a re-run with the same settings extracts only the rest, with any number of processes.
3. The commit. HDF5 (:func:`commit`): a copy of the store with the set added (every other array and
   attribute copied as they are) replaces the store (:func:`spairstore.store.backends.staged`); the store
   itself is never written in place. Zarr: the processes write their rows straight into the store's
   array ``features/<name>/data``, one whole shard at a time (a shard is one file; processes take whole
   shards, so no two write the same file), while no group node names the array and readers cannot see
   it; the commit then adds the CRC-32s, the group nodes, the consolidated metadata and, last, the
   attributes (:func:`spairstore.store.backends.zarr.publish`), so readers see the whole set or none of it.

Several processes (:mod:`.world`): the first prepares (checks, the staging's lock, the Zarr array) and
deals the units with missing rows out round robin; each process extracts its units into its own staging
part (files) or shards (Zarr); the first commits when every part succeeded.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..core.device import resolve_device
from ..core.errors import FeatureError
from ..store.backends import format_of, is_url, reader_for, remove, staged, writer_for
from ..store.backends.zarr import UnlistedArray, publish, shard_rows_of, unpublish
from ..store.convert import BLOCK_BYTES, copy_arrays
from ..store.reader import Store
from .backbones import Extractor, FeatureExtractor, Flipped
from .user import UserExtractor, default_set_name, is_factory_spec
from .world import World

Sink = Callable[[np.ndarray, np.ndarray], None]
"""Receives ``(rows int64 (B,), maps float16 (B, C, h, w))`` for each extracted batch."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: attributes that must match for a run to resume another one's staged rows
_RESUME_KEYS = ("backbone", "layers", "weights_sha256", "weights", "input_size", "normalization", "stride",
                "cell_offset", "width", "height", "channels", "dtype")


def _batches(rows: np.ndarray, batch_size: int, unit_rows: int | None) -> Iterator[np.ndarray]:
    """``rows`` in order, cut at every change of unit (``row // unit_rows``), then into ``batch_size``."""
    cuts = np.flatnonzero(np.diff(rows // unit_rows) != 0) + 1 if unit_rows and len(rows) else []
    for run in np.split(rows, cuts):
        for start in range(0, len(run), batch_size):
            yield run[start:start + batch_size]


def extract_rows(store: Store, extractor: Extractor, rows: Sequence[int] | np.ndarray, sink: Sink,
                 batch_size: int = 16, progress: bool = False, desc: str = "features",
                 unit_rows: int | None = None) -> int:
    """Extract the feature maps of image ``rows`` of ``store`` in batches of up to ``batch_size``, in
    the order given, handing each batch to ``sink``. With ``unit_rows``, no batch holds rows of two
    units (``row // unit_rows``). Returns the number of images extracted."""
    rows = np.asarray(rows, dtype=np.int64)
    if batch_size < 1:
        raise FeatureError(f"batch size must be at least 1, got {batch_size}")
    bar = tqdm(total=len(rows), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for batch in _batches(rows, batch_size, unit_rows):
            maps = extractor(store.read("pixels", batch)).half()
            if not torch.isfinite(maps).all():
                raise FeatureError(f"{store.path}: feature values of image rows {batch.min()}..{batch.max()} "
                                   f"are not finite in float16 (overflow)")
            sink(batch, maps.cpu().numpy())
            bar.update(len(batch))
    finally:
        bar.close()
    return len(rows)


def staging_dir(store_path: Path, name: str) -> Path:
    """The sidecar folder of an unfinished feature set ``name`` of the store at ``store_path``."""
    return store_path.with_name(f"{store_path.name}.features-{name}.partial")


def store_fingerprint(store: Store) -> str:
    """Identifies the store's images (count, frame size, pixel CRCs): staged rows belong to it only."""
    h = hashlib.sha256(f"{len(store)} {store.image_size}".encode())
    h.update(np.ascontiguousarray(store.images["crc32_pixels"]).tobytes())
    return h.hexdigest()[:32]


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _runs(rows: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """``(position in rows, first row, count)`` of each run of consecutive rows."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
        yield int(a), int(rows[a]), int(b - a)


def _crc32_rows(block: np.ndarray) -> list[int]:
    return [zlib.crc32(row) for row in np.ascontiguousarray(block)]


class Staging:
    """The resumable sidecar of one feature set being extracted for a store (see the module doc).

    The process that runs the extraction alone, or the first of several, opens it with :meth:`open`
    and holds an exclusive lock on the folder until :meth:`close`; the others :meth:`attach` to it.
    Each writing process writes through its own :meth:`part`.
    """

    #: seconds between syncs (each sync waits for the disk: once per batch cost ~0.4 s on a busy VM)
    sync_seconds = 2.0

    def __init__(self, path: Path, meta: dict[str, Any], lock_fd: int | None = None):
        self.path = path
        self.meta = meta
        self._lock_fd = lock_fd
        self.rows = int(meta["rows"])
        self.row_shape = tuple(meta["row_shape"])
        self.row_bytes = int(np.prod(self.row_shape)) * 2

    @classmethod
    def open(cls, path: Path, meta: dict[str, Any], restart: bool = False) -> Staging:
        """Resume the staging at ``path`` if its settings equal ``meta``'s, else start it afresh.

        Staged rows made with other settings are discarded only with ``restart``; otherwise that is an
        error, so a typo in the options cannot throw away hours of extraction.
        """
        path.mkdir(exist_ok=True)
        lock_fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise FeatureError(f"{path}: another `spairstore features` run is extracting this feature set") from None
        try:
            old = json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else None
            if old is not None and not _same_run(old, meta) and not restart:
                raise FeatureError(
                    f"{path}: an unfinished run of feature set {meta['name']!r} used other settings "
                    f"({_diff(old, meta)}); re-run with those settings to resume it, or pass --overwrite "
                    f"to discard it")
            if old is not None and _same_run(old, meta):
                return cls(path, old, lock_fd)
            (path / "meta.json").unlink(missing_ok=True)  # the folder is "fresh" until meta.json exists
            staging = cls(path, meta, lock_fd)
            staging.reset()
            _write_json(path / "meta.json", meta)
            return staging
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def attach(cls, path: Path) -> Staging:
        """The staging that the first process of this run opened (and locked) with :meth:`open`."""
        return cls(path, json.loads((path / "meta.json").read_text()))

    def reset(self) -> None:
        """Forget every staged row: delete every part's files."""
        for f in self.path.iterdir():
            if f.name not in ("lock", "meta.json"):
                f.unlink()

    def _flag_files(self) -> Iterator[tuple[str, Path]]:
        for f in sorted(self.path.glob("done-*.u8")):
            yield f.name[len("done-"):-len(".u8")], f

    def done(self) -> np.ndarray:
        """Which image rows are staged, by any part: bool (N,), read from the flag files."""
        done = np.zeros(self.rows, dtype=bool)
        for _, f in self._flag_files():
            flags = np.fromfile(f, dtype=np.uint8)
            if len(flags) != self.rows:
                raise FeatureError(f"{f}: has {len(flags)} flags for {self.rows} images; delete {self.path} "
                                   f"to start over")
            done |= flags.astype(bool)
        return done

    def missing(self) -> np.ndarray:
        """Image rows not staged yet, ascending."""
        return np.flatnonzero(~self.done())

    def part(self, index: int, data: bool = True) -> StagingPart:
        """Part ``index`` (one per writing process; created if new), with a data file unless ``data`` is
        False (the rows are written elsewhere, e.g. into a Zarr store)."""
        return StagingPart(self, index, data)

    def staged(self, start: int, stop: int) -> np.ndarray:
        """The staged maps of rows ``start:stop``, gathered from the parts' data files: float16 (n, C, h, w)."""
        out = np.zeros((stop - start, *self.row_shape), dtype=np.float16)
        for k, f in self._flag_files():
            flags = np.fromfile(f, dtype=np.uint8, count=stop - start, offset=start).astype(bool)
            if flags.any():
                data = np.memmap(self.path / f"data-{k}.f16", dtype=np.float16, mode="r",
                                 shape=(self.rows, *self.row_shape))
                out[flags] = data[start:stop][flags]
                del data
        return out

    def close(self) -> None:
        """Release the lock (the first process)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class StagingPart:
    """One writing process's files in a :class:`Staging`: ``done-<k>.u8`` and maybe ``data-<k>.f16``."""

    def __init__(self, staging: Staging, index: int, data: bool = True):
        self.staging = staging
        files = {"done": (staging.path / f"done-{index}.u8", staging.rows)}
        if data:
            files["data"] = (staging.path / f"data-{index}.f16", staging.rows * staging.row_bytes)
        fds = {}
        try:
            for key, (path, size) in files.items():
                if not path.exists():
                    tmp = path.with_name(path.name + ".tmp")
                    with open(tmp, "wb") as f:
                        f.truncate(size)  # sparse; zero flags
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                fds[key] = os.open(path, os.O_RDWR)
                if os.fstat(fds[key]).st_size != size:
                    raise FeatureError(f"{path}: staged file has the wrong size; delete {staging.path} to "
                                       f"start over")
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        self._done_fd, self._data_fd = fds["done"], fds.get("data")
        self._pending: list[np.ndarray] = []  # rows written but not yet synced and flagged
        self._synced = time.monotonic()

    def write(self, rows: np.ndarray, maps: np.ndarray) -> None:
        """Stage ``maps`` (float16 (B, C, h, w)) for image ``rows`` in this part's data file; a :data:`Sink`."""
        st = self.staging
        if maps.dtype != np.float16 or maps.shape[1:] != st.row_shape:
            raise FeatureError(f"{st.path}: got maps {maps.dtype} {maps.shape[1:]}, staging holds "
                               f"float16 {st.row_shape}")
        rows = np.asarray(rows, dtype=np.int64)
        maps = np.ascontiguousarray(maps)
        for pos, row, n in _runs(rows):
            os.pwrite(self._data_fd, maps[pos:pos + n].data, row * st.row_bytes)
        self.written(rows)

    def written(self, rows: np.ndarray) -> None:
        """Flag ``rows`` at the next sync: their maps are in this part's data file, or already durable
        elsewhere."""
        self._pending.append(np.asarray(rows, dtype=np.int64))
        if time.monotonic() - self._synced >= self.staging.sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Make the written rows durable, then flag them done."""
        if self._pending:
            rows = np.sort(np.concatenate(self._pending))
            if self._data_fd is not None:
                os.fdatasync(self._data_fd)  # rows on disk before their flags say so
            for _, row, n in _runs(rows):
                os.pwrite(self._done_fd, b"\x01" * n, row)
            os.fdatasync(self._done_fd)
            self._pending = []
        self._synced = time.monotonic()

    def close(self) -> None:
        """Flag the rows written so far and close the files."""
        try:
            self.sync()
        finally:
            for fd in (self._done_fd, self._data_fd):
                if fd is not None:
                    os.close(fd)


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a.get("store") == b.get("store") and a.get("row_shape") == b.get("row_shape")
            and all(a.get("attrs", {}).get(k) == b["attrs"].get(k) for k in _RESUME_KEYS))


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    if old.get("store") != new.get("store"):
        return "staged for a store with other images"
    keys = [k for k in _RESUME_KEYS if old.get("attrs", {}).get(k) != new["attrs"].get(k)]
    return ", ".join(f"{k} {old.get('attrs', {}).get(k)!r} there, {new['attrs'].get(k)!r} now" for k in keys)


def partial_feature_sets(store_path: str | Path) -> dict[str, dict[str, Any]]:
    """Unfinished feature sets staged beside the store: name -> ``{"path", "done", "images", "backbone"}``."""
    store_path = Path(store_path).resolve()
    out = {}
    for d in sorted(store_path.parent.glob(f"{glob.escape(store_path.name)}.features-*.partial")):
        try:
            meta = json.loads((d / "meta.json").read_text())
            done = int(np.count_nonzero(Staging(d, meta).done()))
        except (OSError, ValueError, KeyError, FeatureError):
            meta, done = {}, 0
        name = d.name[len(store_path.name) + len(".features-"):-len(".partial")]
        out[name] = {"path": str(d), "done": done, "images": meta.get("rows"),
                     "backbone": meta.get("attrs", {}).get("backbone")}
    return out


@contextmanager
def _store_lock(store_path: Path) -> Iterator[None]:
    """Serialise commits to one store (each rewrites the whole store, or its root metadata, so two at
    once would lose one)."""
    fd = os.open(store_path.with_name(f".{store_path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_dead_partials(store_path: Path) -> None:
    """Delete copies of the store left half-built by killed processes (``.<store>.partial-<pid>``)."""
    for p in store_path.parent.glob(f".{glob.escape(store_path.name)}.partial-*"):
        pid = p.name.rsplit("-", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            remove(p)
        except PermissionError:  # alive, someone else's
            pass


def commit(store_path: Path, name: str, attrs: dict[str, Any], staging: Staging) -> None:
    """Write a copy of the store with the fully staged set added as ``features/<name>/data`` (plus
    per-row CRC-32s in ``features/<name>/crc32``) and ``attrs`` under ``feature_sets[name]``, and move
    it over the store. An existing set of that name is replaced; every other array and attribute is
    copied as it is."""
    missing = int((~staging.done()).sum())
    if missing:
        raise FeatureError(f"{staging.path}: {missing} images not extracted yet")
    shape = (staging.rows, *staging.row_shape)
    crc = np.zeros(staging.rows, dtype=np.uint32)
    with _store_lock(store_path):
        _remove_dead_partials(store_path)
        r = reader_for(store_path)
        try:
            sets = {**r.attrs.get("feature_sets", {}), name: attrs}
            with staged(store_path, overwrite=True) as tmp:
                w = writer_for(tmp, format_of(store_path))
                try:
                    copy_arrays(r, w, skip=lambda a: a.startswith(f"features/{name}/"))
                    w.create(f"features/{name}/data", shape, np.dtype(np.float16))
                    step = max(1, BLOCK_BYTES // staging.row_bytes)
                    for start in range(0, staging.rows, step):
                        block = staging.staged(start, min(start + step, staging.rows))
                        w.write(f"features/{name}/data", start, block)
                        crc[start:start + len(block)] = _crc32_rows(block)
                    w.put(f"features/{name}/crc32", crc)
                    w.set_attrs({**r.attrs, "feature_sets": sets})
                finally:
                    w.close()
        finally:
            r.close()


def _deal(rows: np.ndarray, unit_rows: int, processes: int) -> list[np.ndarray]:
    """``rows`` (ascending) split into units (``row // unit_rows``) dealt out round robin: process ``k``
    gets units ``k, k + processes, ...``."""
    units = np.split(rows, np.flatnonzero(np.diff(rows // unit_rows) != 0) + 1) if len(rows) else []
    return [np.concatenate(units[k::processes]) if units[k::processes] else np.empty(0, np.int64)
            for k in range(processes)]


@dataclass(frozen=True)
class _Plan:
    unit_rows: int
    rows: list[np.ndarray]  #: image rows of each process


class _CopyTarget:
    """HDF5 stores (one file takes one writer): each process stages its rows in its own part's data
    file; the commit writes a copy of the store with the set (:func:`commit`). Units are batches."""

    part_data = True

    def __init__(self, store_path: Path, name: str, batch_size: int):
        self.store_path, self.name, self.unit_rows = store_path, name, batch_size

    def prepare(self, staging: Staging, replace: bool, processes: int) -> _Plan:
        return _Plan(self.unit_rows, _deal(staging.missing(), self.unit_rows, processes))

    def sink(self, part: StagingPart) -> Sink:
        return part.write

    def commit(self, staging: Staging, attrs: dict[str, Any]) -> None:
        commit(self.store_path, self.name, attrs, staging)


class _ZarrTarget:
    """Zarr stores: processes write whole shards straight into the store's (unlisted) array; the commit
    publishes it (see the module doc). Units are shards, as many rows as a shard of the pixels."""

    part_data = False

    def __init__(self, store_path: Path, name: str, shape: tuple[int, ...]):
        self.store_path, self.name, self.shape = store_path, name, shape
        self.array_name = f"features/{name}/data"

    def prepare(self, staging: Staging, replace: bool, processes: int) -> _Plan:
        """Hide and delete the set if ``replace`` (it is published) or if a crashed commit left it listed
        but incomplete; make sure the array is there with the right shape (else create it, forgetting
        the staged rows); deal out the shards with missing rows, whole."""
        with _store_lock(self.store_path):
            listed = (self.store_path / "features" / self.name / "zarr.json").is_file()
            if replace or (listed and len(staging.missing())):
                unpublish(self.store_path, f"features/{self.name}", {"feature_sets": self._sets(drop=True)})
                staging.reset()
            a = UnlistedArray.find(self.store_path, self.array_name)
            if a is None or a.shape != self.shape or a.dtype != np.float16:
                a = UnlistedArray.create(self.store_path, self.array_name, self.shape, np.dtype(np.float16),
                                         shard_rows_of(self.store_path, "images/pixels"))
                staging.reset()
        shards = np.unique(staging.missing() // a.shard_rows)
        rows = (shards[:, None] * a.shard_rows + np.arange(a.shard_rows)).ravel()
        return _Plan(a.shard_rows, _deal(rows[rows < self.shape[0]], a.shard_rows, processes))

    def sink(self, part: StagingPart) -> Sink:
        return _ShardSink(UnlistedArray(self.store_path, self.array_name), part)

    def commit(self, staging: Staging, attrs: dict[str, Any]) -> None:
        missing = int((~staging.done()).sum())
        if missing:
            raise FeatureError(f"{staging.path}: {missing} images not extracted yet")
        a = UnlistedArray(self.store_path, self.array_name)
        crc = np.concatenate([_crc32_rows(a.read(start, start + a.shard_rows))
                              for start in range(0, a.shape[0], a.shard_rows)]).astype(np.uint32)
        with _store_lock(self.store_path):
            publish(self.store_path, f"features/{self.name}", {"crc32": crc},
                    {"feature_sets": {**self._sets(), self.name: attrs}})

    def _sets(self, drop: bool = False) -> dict[str, Any]:
        r = reader_for(self.store_path)
        try:
            sets = dict(r.attrs.get("feature_sets", {}))
        finally:
            r.close()
        if drop:
            sets.pop(self.name, None)
        return sets


class _ShardSink:
    """Gathers one process's maps shard by shard (its batches never straddle shards, and it extracts
    whole shards) and writes each shard whole, then flags its rows."""

    def __init__(self, array: UnlistedArray, part: StagingPart):
        self.array, self.part = array, part
        self.shard, self.start, self.filled = -1, 0, 0
        self.buf = np.empty(0)

    def __call__(self, rows: np.ndarray, maps: np.ndarray) -> None:
        a = self.array
        shard = int(rows[0]) // a.shard_rows
        if shard != self.shard:
            self.shard, self.start, self.filled = shard, shard * a.shard_rows, 0
            self.buf = np.empty((min(a.shard_rows, a.shape[0] - self.start), *a.shape[1:]), dtype=a.dtype)
        self.buf[rows - self.start] = maps
        self.filled += len(rows)
        if self.filled == len(self.buf):
            a.write_shard(shard, self.buf)
            self.part.written(np.arange(self.start, self.start + len(self.buf)))


@dataclass(frozen=True)
class FeatureSummary:
    """What a ``spairstore features`` run did."""

    store: Path
    name: str
    backbone: str
    layers: list[str]
    shape: tuple[int, ...]  #: (N, C, h, w)
    extracted: int  #: images extracted by this run (the rest were staged by an earlier, interrupted one)
    seconds: float  #: extraction time of this run
    device: str  #: of the first process
    processes: int = 1  #: processes that extracted (torchrun)
    flipped: FeatureSummary | None = None  #: the companion set of mirrored images (``flip``)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 2

    def __str__(self) -> str:
        n = self.shape[0]
        where = self.device if self.processes == 1 else f"{self.processes} {self.device.split(':')[0]} processes"
        rate = f", {self.extracted / self.seconds:.1f} img/s on {where}" if self.extracted and self.seconds else ""
        resumed = f" ({n - self.extracted:,} resumed from an earlier run)" if self.extracted < n else ""
        return (f"feature set {self.name!r} in {self.store}: {self.backbone} {', '.join(self.layers)}\n"
                f"  maps   float16 {self.shape[1:]} x {n:,} images = {self.nbytes / 2**20:,.1f} MiB\n"
                f"  run    {self.extracted:,} images extracted in {self.seconds:.1f} s{rate}{resumed}"
                + (f"\n{self.flipped}" if self.flipped else ""))


def make_extractor(backbone: str | Callable[[], nn.Module] | nn.Module, layers: Sequence[str | int] | None = None,
                   input_size: int | None = None, image_size: int | None = None,
                   weights: str | Path | None = None, device: str = "cpu") -> Extractor:
    """The extractor ``backbone`` names: a registry backbone (:class:`FeatureExtractor`), or a user's module
    (:class:`~spairstore.features.user.UserExtractor`: ``"MODULE:FACTORY"``, a factory or a module)."""
    if not is_factory_spec(backbone):
        return FeatureExtractor(str(backbone), layers, input_size=input_size, image_size=image_size, weights=weights,
                                device=device)
    given = [opt for opt, v in (("--layers", layers), ("--weights", weights)) if v]
    if given:
        raise FeatureError(f"{' and '.join(given)} apply to registry backbones; a FACTORY() module taps and loads "
                           f"its own (--backbone {backbone})")
    extractor = UserExtractor(backbone, device=device)
    if input_size is not None and input_size != extractor.input_size:
        raise FeatureError(f"--input-size {input_size}: {extractor.spec} declares input_size {extractor.input_size} "
                           f"(leave --input-size out)")
    return extractor


def extract_features(store_path: str | Path, backbone: str | Callable[[], nn.Module] | nn.Module = "efficientnet-lite0",
                     layers: Sequence[str | int] | None = None, input_size: int | None = None,
                     batch_size: int = 16, device: str | None = None, weights: str | Path | None = None,
                     name: str | None = None, overwrite: bool = False, progress: bool = False,
                     flip: bool = False) -> FeatureSummary:
    """Run ``backbone`` over every image of the store at ``store_path`` and add the maps as feature set
    ``name``. Resumes an interrupted run with the same settings.

    ``backbone`` is a registry name (see :class:`~spairstore.features.backbones.FeatureExtractor` for
    ``layers``, ``input_size`` and ``weights``), or a user's network: ``"pkg.mod:make"``,
    ``"path/to/file.py:make"``, the factory itself or the ``torch.nn.Module`` it returns (see
    :mod:`spairstore.features.user` for the contract; ``layers`` and ``weights`` do not apply). ``name``
    defaults to the registry name, or ``<module>.<factory>`` for a user's factory.

    With ``flip``, a companion set ``<name>-flip`` also gets the maps of every store image mirrored left
    to right (see :class:`~spairstore.features.backbones.Flipped` for its frame); a set ``name`` that
    exists with the same settings is then kept, so a re-run resumes the companion.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this with the same arguments: each
    extracts its share of the images (on GPU ``LOCAL_RANK`` for ``device`` ``cuda``), and the first
    commits; every process returns the summary of the whole run.

    An existing set ``name`` is replaced, and an unfinished run with other settings discarded, only with
    ``overwrite``.
    """
    if is_url(store_path):
        raise FeatureError(f"{store_path}: remote stores are read-only; extract into a local copy "
                           f"(spairstore convert) instead")
    store_path = Path(store_path).resolve()
    if name is not None:
        _check_name(name)
    if batch_size < 1:
        raise FeatureError(f"batch size must be at least 1, got {batch_size}")
    dev = resolve_device(device)
    world = World.from_env(dev.type)
    if dev.type == "cuda" and world.size > 1:
        if dev.index is not None:
            world.close()
            raise FeatureError(f"--device {device} with {world.size} processes: each process takes the GPU of its "
                               f"LOCAL_RANK; pass --device cuda")
        dev = torch.device("cuda", world.local_rank)
    try:
        with Store(store_path) as store:
            extractor = world.each(lambda: make_extractor(
                backbone, layers, input_size=input_size, image_size=store.image_size, weights=weights,
                device=str(dev)))
            if name is None:
                name = default_set_name(extractor) if isinstance(extractor, UserExtractor) else str(backbone)
                _check_name(name)
            run = _SetRun(store, store_path, world, batch_size, dev, progress)
            summary = run(extractor, name, overwrite, keep_same=flip)
            if flip:
                flip_name = f"{name}-flip"
                _check_name(flip_name)
                summary = replace(summary, flipped=run(Flipped(extractor, of=name), flip_name, overwrite))
    finally:
        world.close()
    return summary


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise FeatureError(f"feature set name {name!r}: use letters, digits, '_', '-' and '.' (at most 64)")


@dataclass
class _SetRun:
    """Extracts one feature set of an open store with the processes of ``world``, resumably, and commits it."""

    store: Store
    store_path: Path
    world: World
    batch_size: int
    device: torch.device
    progress: bool

    def __call__(self, extractor: Extractor, name: str, overwrite: bool, keep_same: bool = False) -> FeatureSummary:
        """Extract and commit set ``name``; with ``keep_same``, a published set ``name`` with the same
        settings is kept as it is (nothing extracted)."""
        store, store_path, world, batch_size = self.store, self.store_path, self.world, self.batch_size
        attrs = extractor.attrs()
        row_shape = [extractor.channels, extractor.size, extractor.size]
        meta = {"name": name, "store": store_fingerprint(store), "rows": len(store), "row_shape": row_shape,
                "attrs": attrs}
        published = store.feature_sets.get(name)
        if keep_same and not overwrite and published is not None \
                and all(published.get(k) == attrs.get(k) for k in _RESUME_KEYS):
            return FeatureSummary(store=store_path, name=name, backbone=attrs["backbone"], layers=attrs["layers"],
                                  shape=(len(store), *row_shape), extracted=0, seconds=0.0, device=str(self.device),
                                  processes=world.size)
        staging: Staging | None = None
        target: _CopyTarget | _ZarrTarget = (
            _ZarrTarget(store_path, name, (len(store), *row_shape)) if format_of(store_path) == "zarr"
            else _CopyTarget(store_path, name, batch_size))

        def prepare() -> _Plan:
            nonlocal staging
            exists = published is not None
            if exists and not overwrite:
                raise FeatureError(f"{store_path}: feature set {name!r} exists; pass --overwrite to replace it")
            staging = Staging.open(staging_dir(store_path, name), meta, restart=overwrite)
            return target.prepare(staging, replace=exists, processes=world.size)

        try:
            plan = world.first(prepare)
            if staging is None:
                staging = Staging.attach(staging_dir(store_path, name))
            t0 = time.perf_counter()

            def extract() -> None:
                part = staging.part(world.rank, data=target.part_data)
                try:
                    extract_rows(store, extractor, plan.rows[world.rank], target.sink(part), batch_size=batch_size,
                                 progress=self.progress and world.rank == 0, unit_rows=plan.unit_rows,
                                 desc=f"features {name}" + (f" (process 0 of {world.size})" if world.size > 1 else ""))
                finally:
                    part.close()

            world.each(extract)
            seconds = time.perf_counter() - t0

            def finish() -> None:
                target.commit(staging, staging.meta["attrs"])
                shutil.rmtree(staging.path)

            world.first(finish)
        finally:
            if staging is not None:
                staging.close()
        return FeatureSummary(store=store_path, name=name, backbone=attrs["backbone"], layers=attrs["layers"],
                              shape=(meta["rows"], *row_shape), extracted=sum(map(len, plan.rows)), seconds=seconds,
                              device=str(self.device), processes=world.size)

