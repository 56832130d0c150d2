"""Extract backbone features for every image of a store: ``spairstore features``.

Three steps, each reusable on its own:

1. :func:`extract_rows` runs a :class:`FeatureExtractor` over given image rows in batches and hands each
   batch of float16 maps to a *sink* (any callable ``sink(rows, maps)``), so other writers (e.g. one
   process per GPU, each with its own rows) reuse the same loop.
2. :class:`Staging` is the sink for a store file: a sidecar folder beside the store,
   ``<store>.features-<name>.partial/``, holding ``meta.json`` (the run's settings), ``data.f16`` (raw
   ``(N, C, h, w)`` float16, row-major) and ``done.u8`` (one flag per image row). Rows are written as
   they come; every ``sync_seconds`` (and at the end) the written rows are synced to disk and only then
   flagged (and the flags synced), so after a kill, even of the machine, every flagged row is complete
   and a re-run with the same settings extracts only the unflagged rows.
3. :func:`commit` writes the finished set into a copy of the store (every other array and attribute
   copied as they are) and moves the copy over the store (:func:`spairstore.backends.staged`). The store
   itself is never written in place: until the rename it is the old store, after it the new one;
   readers that opened the old one keep reading it.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..backends import format_of, is_url, reader_for, remove, staged, writer_for
from ..convert import BLOCK_BYTES, copy_arrays
from ..errors import FeatureError
from ..reader import Store
from .backbones import FeatureExtractor

Sink = Callable[[np.ndarray, np.ndarray], None]
"""Receives ``(rows int64 (B,), maps float16 (B, C, h, w))`` for each extracted batch."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: attributes that must match for a run to resume another one's staged rows
_RESUME_KEYS = ("backbone", "layers", "weights_sha256", "weights", "input_size", "normalization", "stride",
                "cell_offset", "width", "height", "channels", "dtype")


def extract_rows(store: Store, extractor: FeatureExtractor, rows: Sequence[int] | np.ndarray, sink: Sink,
                 batch_size: int = 16, progress: bool = False, desc: str = "features") -> int:
    """Extract the feature maps of image ``rows`` of ``store`` in batches of ``batch_size``, in the order
    given, handing each batch to ``sink``. Returns the number of images extracted."""
    rows = np.asarray(rows, dtype=np.int64)
    if batch_size < 1:
        raise FeatureError(f"batch size must be at least 1, got {batch_size}")
    bar = tqdm(total=len(rows), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
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


class Staging:
    """The resumable sidecar of one feature set being extracted for a store file (see the module doc).

    Open it with :meth:`open`; it holds an exclusive lock on the folder until :meth:`close`.
    """

    #: seconds between syncs (each sync waits for the disk: once per batch cost ~0.4 s on a busy VM)
    sync_seconds = 2.0

    def __init__(self, path: Path, meta: dict[str, Any], lock_fd: int):
        self.path = path
        self.meta = meta
        self._lock_fd = lock_fd
        self.rows = int(meta["rows"])
        self.row_shape = tuple(meta["row_shape"])
        self.row_bytes = int(np.prod(self.row_shape)) * 2
        self._data_fd = os.open(path / "data.f16", os.O_RDWR)
        self._done_fd = os.open(path / "done.u8", os.O_RDWR)
        self.done = np.frombuffer(os.pread(self._done_fd, self.rows, 0), dtype=np.uint8).astype(bool)
        self._pending: list[np.ndarray] = []  # rows written but not yet synced and flagged
        self._synced = time.monotonic()
        if len(self.done) != self.rows or os.fstat(self._data_fd).st_size != self.rows * self.row_bytes:
            os.close(self._data_fd)
            os.close(self._done_fd)
            raise FeatureError(f"{path}: staged files have the wrong size; delete the folder to start over")

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
            if old is None or not _same_run(old, meta):
                (path / "meta.json").unlink(missing_ok=True)  # the folder is "fresh" until meta.json exists
                size = int(meta["rows"]) * int(np.prod(meta["row_shape"])) * 2
                for name, n in (("data.f16", size), ("done.u8", int(meta["rows"]))):
                    with open(path / name, "wb") as f:
                        f.truncate(n)  # sparse; zero flags
                        os.fsync(f.fileno())
                _write_json(path / "meta.json", meta)
            else:
                meta = old
            return cls(path, meta, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    def missing(self) -> np.ndarray:
        """Image rows not staged yet, ascending."""
        return np.flatnonzero(~self.done)

    def write(self, rows: np.ndarray, maps: np.ndarray) -> None:
        """Stage ``maps`` (float16 (B, C, h, w)) for image ``rows``; a :data:`Sink`."""
        if maps.dtype != np.float16 or maps.shape[1:] != self.row_shape:
            raise FeatureError(f"{self.path}: got maps {maps.dtype} {maps.shape[1:]}, staging holds "
                               f"float16 {self.row_shape}")
        rows = np.asarray(rows, dtype=np.int64)
        maps = np.ascontiguousarray(maps)
        for pos, row, n in _runs(rows):
            os.pwrite(self._data_fd, maps[pos:pos + n].data, row * self.row_bytes)
        self._pending.append(rows)
        if time.monotonic() - self._synced >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Make the written rows durable, then flag them done."""
        if self._pending:
            rows = np.sort(np.concatenate(self._pending))
            os.fdatasync(self._data_fd)  # rows on disk before their flags say so
            for _, row, n in _runs(rows):
                os.pwrite(self._done_fd, b"\x01" * n, row)
            os.fdatasync(self._done_fd)
            self.done[rows] = True
            self._pending = []
        self._synced = time.monotonic()

    def data(self) -> np.ndarray:
        """The staged maps, memory-mapped read-only: float16 (N, C, h, w)."""
        return np.memmap(self.path / "data.f16", dtype=np.float16, mode="r", shape=(self.rows, *self.row_shape))

    def close(self) -> None:
        """Flag the rows written so far, close the files and release the lock."""
        try:
            self.sync()
        finally:
            for fd in (self._data_fd, self._done_fd, self._lock_fd):
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
            done = int(np.count_nonzero(np.fromfile(d / "done.u8", dtype=np.uint8)))
        except (OSError, ValueError):
            meta, done = {}, 0
        name = d.name[len(store_path.name) + len(".features-"):-len(".partial")]
        out[name] = {"path": str(d), "done": done, "images": meta.get("rows"),
                     "backbone": meta.get("attrs", {}).get("backbone")}
    return out


@contextmanager
def _store_lock(store_path: Path) -> Iterator[None]:
    """Serialise commits to one store (each rewrites the whole store, so two at once would lose one)."""
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
    if not staging.done.all():
        raise FeatureError(f"{staging.path}: {int((~staging.done).sum())} images not extracted yet")
    data = staging.data()
    crc = np.zeros(len(data), dtype=np.uint32)
    with _store_lock(store_path):
        _remove_dead_partials(store_path)
        r = reader_for(store_path)
        try:
            sets = {**r.attrs.get("feature_sets", {}), name: attrs}
            with staged(store_path, overwrite=True) as tmp:
                w = writer_for(tmp, format_of(store_path))
                try:
                    copy_arrays(r, w, skip=lambda a: a.startswith(f"features/{name}/"))
                    w.create(f"features/{name}/data", data.shape, np.dtype(np.float16))
                    step = max(1, BLOCK_BYTES // staging.row_bytes)
                    for start in range(0, len(data), step):
                        block = np.ascontiguousarray(data[start:start + step])
                        w.write(f"features/{name}/data", start, block)
                        crc[start:start + len(block)] = [zlib.crc32(row) for row in block]
                    w.put(f"features/{name}/crc32", crc)
                    w.set_attrs({**r.attrs, "feature_sets": sets})
                finally:
                    w.close()
        finally:
            r.close()
            del data


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
    device: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 2

    def __str__(self) -> str:
        n = self.shape[0]
        rate = f", {self.extracted / self.seconds:.1f} img/s on {self.device}" if self.extracted and self.seconds else ""
        resumed = f" ({n - self.extracted:,} resumed from an earlier run)" if self.extracted < n else ""
        return (f"feature set {self.name!r} in {self.store}: {self.backbone} {', '.join(self.layers)}\n"
                f"  maps   float16 {self.shape[1:]} x {n:,} images = {self.nbytes / 2**20:,.1f} MiB\n"
                f"  run    {self.extracted:,} images extracted in {self.seconds:.1f} s{rate}{resumed}")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def extract_features(store_path: str | Path, backbone: str = "efficientnet-lite0",
                     layers: Sequence[str | int] | None = None, input_size: int | None = None,
                     batch_size: int = 16, device: str | None = None, weights: str | Path | None = None,
                     name: str | None = None, overwrite: bool = False, progress: bool = False) -> FeatureSummary:
    """Run ``backbone`` over every image of the store at ``store_path`` and add the maps as feature set
    ``name`` (default: the backbone's name). Resumes an interrupted run with the same settings.

    An existing set ``name`` is replaced, and an unfinished run with other settings discarded, only with
    ``overwrite``. See :class:`~spairstore.features.backbones.FeatureExtractor` for the other arguments.
    """
    if is_url(store_path):
        raise FeatureError(f"{store_path}: remote stores are read-only; extract into a local copy "
                           f"(spairstore convert) instead")
    store_path = Path(store_path).resolve()
    name = name or backbone
    if not _NAME.match(name):
        raise FeatureError(f"feature set name {name!r}: use letters, digits, '_', '-' and '.' (at most 64)")
    device = device or default_device()
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FeatureError(f"unknown device {device!r} (use cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FeatureError("--device cuda: no CUDA device is available here")
    with Store(store_path) as store:
        if name in store.feature_sets and not overwrite:
            raise FeatureError(f"{store_path}: feature set {name!r} exists; pass --overwrite to replace it")
        extractor = FeatureExtractor(backbone, layers, input_size=input_size, image_size=store.image_size,
                                     weights=weights, device=device)
        attrs = extractor.attrs()
        row_shape = [extractor.channels, extractor.size, extractor.size]
        meta = {"name": name, "store": store_fingerprint(store), "rows": len(store), "row_shape": row_shape,
                "attrs": attrs}
        staging = Staging.open(staging_dir(store_path, name), meta, restart=overwrite)
        try:
            todo = staging.missing()
            t0 = time.perf_counter()
            extract_rows(store, extractor, todo, staging.write, batch_size=batch_size, progress=progress,
                         desc=f"features {name}")
            staging.sync()
            seconds = time.perf_counter() - t0
            commit(store_path, name, staging.meta["attrs"], staging)
            shutil.rmtree(staging.path)
        finally:
            staging.close()
    return FeatureSummary(store=store_path, name=name, backbone=backbone, layers=attrs["layers"],
                          shape=(len(staging.done), *row_shape), extracted=len(todo), seconds=seconds,
                          device=str(dev))
