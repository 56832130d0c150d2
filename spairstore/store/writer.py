"""Pack canonical records into a store: ``spairstore pack``.

Crash safety. A pack builds the store in a staging folder beside the output, ``.<OUT name>.staging/``
(the same path every time, locked while a pack uses it), and renames the finished file into place:
a pack killed at any moment leaves the old store, or nothing, at the output path. It runs in steps:

1. read the source (converter), check every image and mask (read, identify, size, decode), hash
   every source file; bad items fail the pack or, with ``on_error="skip"``, are left out and listed;
2. write the store's *structure* -- every array allocated, every table and attribute written -- and
   close it; ``plan.json`` records the digest of that structure;
3. fill the payload rows (pixels, masks, original bytes) in place without the HDF5 library, and
   every few rows commit: fsync the file, then append those rows' CRC-32s to ``rows.crc`` and fsync it;
4. write the CRC arrays, fsync, rename into place, remove the staging folder.

``resume=True`` redoes step 1 (the same sources give the same structure digest) and continues step 3
after the last committed row; the result equals an uninterrupted pack byte for byte. A Zarr store
(a directory) is built in one go at a temporary path instead, and renamed into place when complete:
it is crash-safe the same way, but not resumable. Images stream through a bounded window: peak
memory does not grow with the dataset.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..core.errors import SpairstoreError
from ..core.manifest import build_manifest
from ..core.records import (
    DatasetRecords,
    ErrorPolicy,
    OnError,
    PairRecord,
    Skipped,
    pair_list_sha256,
    report_skipped,
)
from ..core.schema import (
    BLOB_FIELDS,
    FORMAT_NAME,
    FORMAT_VERSION,
    PAYLOAD_FIELDS,
    Encoding,
    crc_array,
    encode_table,
    field_of_array,
    image_fields,
)
from ..core.tables import brief, mib
from ..core.version import __version__
from .backends import (
    ArrayWriter,
    RawExtent,
    RowWriter,
    backend_for,
    check_replaceable,
    disk_bytes,
    mark_complete,
    reader_for,
    row_writer_for,
    writer_for,
)
from .images import ImageCheck, check_images, decode_image, ordered_map
from .transaction import Transaction, disk_full, through_link, write_atomic


@dataclass(frozen=True)
class PackSummary:
    """What a pack wrote."""

    path: Path
    dataset: str
    images: int
    pairs: dict[str, int]
    field_bytes: dict[str, int]  #: payload bytes per field, by the names Store.read takes
    file_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)  #: bad source items left out (also in the store)

    def __str__(self) -> str:
        lines = [
            f"packed {self.dataset} into {self.path} in {self.seconds:.1f} s ({mib(self.file_bytes)})",
            f"  images: {self.images:,}",
            "  pairs:  " + ", ".join(f"{s} {n:,}" for s, n in self.pairs.items()),
            "  fields: " + ", ".join(f"{k} {mib(v)}" for k, v in self.field_bytes.items()),
        ]
        lines += [f"  note: {brief(n)}" for n in self.notes]
        if self.skipped:
            kinds = {k: sum(s.kind == k for s in self.skipped) for k in ("image", "pair")}
            lines.append(f"  skipped {kinds['image']:,} images and {kinds['pair']:,} pairs "
                         f"(`spairstore info {self.path} --skipped` lists each):")
            lines += [f"    {ln}" for ln in report_skipped(self.skipped)]
        return "\n".join(lines)


#: Payload bytes between commits (fsync of the store, then of the CRC journal): each fsync stalls the
#: pack while the disk catches up, so commits are few; a resume redoes at most this much.
COMMIT_BYTES = 256 << 20


def _image_tables(records: DatasetRecords, enc: Encoding) -> dict[str, np.ndarray]:
    """The image columns the schema encodes from records (names, categories, geometry, labels, splits)."""
    table = encode_table("images", records.images, enc, {"S": enc.size, "K": records.num_keypoints})
    ims = records.images
    if any(im.extra_keypoints is not None for im in ims):  # SPair-U's layer; NaN for an image without it
        table["extra_keypoints"] = np.stack([np.full_like(im.keypoints, np.nan) if im.extra_keypoints is None
                                             else im.extra_keypoints for im in ims]).astype(np.float32)
    return table


def _pair_table(pairs: list[PairRecord], enc: Encoding, width: int) -> dict[str, np.ndarray]:
    """A split's pair table as the schema encodes it, keypoint columns padded to ``width``."""
    return encode_table("pairs", pairs, enc, {"M": width})

@dataclass
class _Structure:
    """Everything of a store but its payload rows and their CRC-32s: what step 2 writes."""

    hot: dict[str, tuple[tuple[int, ...], np.dtype]]  #: payload arrays allocated now, filled in step 3
    tables: dict[str, np.ndarray]
    attrs: dict[str, Any]
    offsets: dict[str, np.ndarray]  #: blob kind -> (N + 1,) byte offsets

    @cached_property
    def digest(self) -> str:
        """SHA-256 of everything step 2 writes: equal digests, equal structures."""
        h = hashlib.sha256(json.dumps([self.attrs, {k: [v[0], str(v[1])] for k, v in self.hot.items()}],
                                      sort_keys=True).encode())
        for k in sorted(self.tables):
            v = np.ascontiguousarray(self.tables[k])
            h.update(f"{k} {v.dtype.str} {v.shape}".encode())
            if v.size:  # an empty table (a split all of whose pairs were skipped) has no bytes to view
                h.update(memoryview(v).cast("B"))
        return h.hexdigest()

    #: The per-record CRC-32 arrays, filled in step 4.
    crc_arrays = tuple(crc_array(f"images/{k}") for k in PAYLOAD_FIELDS)

    def sources(self) -> dict[str, str]:
        """Source path -> SHA-256, from the manifest."""
        path, sha = (np.char.decode(self.tables[f"manifest/{k}"], "utf-8").tolist() for k in ("path", "sha256"))
        return dict(zip(path, sha))


def _structure(records: DatasetRecords, checks: list[ImageCheck], size: int, on_error: OnError) -> _Structure:
    n = len(records.images)
    has_masks = any(c.mask is not None for c in checks)
    sizes = {"image": [c.image.size for c in checks], "mask": [c.mask.size if c.mask else 0 for c in checks]}
    offsets = {k: np.concatenate([[0], np.cumsum(v, dtype=np.int64)]).astype(np.int64) for k, v in sizes.items()}
    fields = {f.path: f for f in image_fields(size, records.num_keypoints)}
    hot = {name: ((n if name != "images/mask" or has_masks else 0, *fields[name].row_shape), fields[name].np_dtype)
           for name in ("images/pixels", "images/mask")}
    hot |= {f"images/{k}_blob": ((int(offsets[k][-1]),), np.dtype(np.uint8)) for k in BLOB_FIELDS}
    splits = list(records.pairs)
    pose_names = sorted({im.pose for im in records.images})
    tables = {f"images/{k}_offsets": offsets[k] for k in BLOB_FIELDS}
    enc = Encoding.of(records, size, pose_names)
    tables |= {f"images/{k}": v for k, v in _image_tables(records, enc).items()}
    width = max([1] + [len(p.kps_ids) for ps in records.pairs.values() for p in ps])
    for split, pairs in records.pairs.items():
        tables |= {f"pairs/{split}/{k}": v for k, v in _pair_table(pairs, enc, width).items()}
    tables |= encode_table("categories", records.categories, enc)
    digests = dict(records.digests)
    for im, c in zip(records.images, checks):
        for path, f in ((im.image_path, c.image), (im.mask_path, c.mask)):
            if path is not None and f is not None:
                digests[path.relative_to(records.root).as_posix()] = (f.size, f.sha256)
    tables |= {f"manifest/{k}": v for k, v in build_manifest(records.root, records.sources, digests).items()}
    attrs = {
        "format": FORMAT_NAME,
        "format_version": "%d.%d" % FORMAT_VERSION,
        "dataset": records.dataset,
        "image_size": size,
        "num_keypoints": records.num_keypoints,
        "splits": splits,
        "pose_names": pose_names,
        "notes": records.notes,
        "build_config": {
            "dataset": records.dataset,
            "source_root": str(records.root),
            "categories": records.category_filter or "all",
            "size": size,
            "letterbox": "centred, black padding",
            "resample": {"pixels": "bilinear", "mask": "nearest"},
            "on_error": on_error,
        },
        "created_by": f"spairstore {__version__}",
        "table_crc32": {k: zlib.crc32(np.ascontiguousarray(v)) for k, v in tables.items()},
        "skipped": [s.to_json() for s in records.skipped],
        **({"keypoint_flip": records.keypoint_flip} if records.keypoint_flip else {}),
        "pair_list_sha256": {s: pair_list_sha256(s, ((p.pair_id, p.src, p.trg) for p in records.pairs[s]))
                             for s in splits},
        **({"subset_names": records.subset_names} if records.subset_names else {}),
        **({"category_groups": records.category_groups} if records.category_groups else {}),
        **({"keypoint_groups": records.keypoint_groups} if records.keypoint_groups else {}),
    }
    return _Structure(hot, tables, attrs, offsets)


def _create(w: ArrayWriter, st: _Structure, crc_arrays: bool) -> None:
    """Step 2 into an open writer: hot arrays allocated (with the CRC arrays, to be filled in place,
    when ``crc_arrays``), tables and attributes written."""
    for name, (shape, dtype) in st.hot.items():
        w.create(name, shape, dtype)
    if crc_arrays:
        for name in st.crc_arrays:
            w.create(name, (len(st.offsets["image"]) - 1,), np.dtype(np.uint32))
    for name, v in st.tables.items():
        w.put(name, v)
    w.set_attrs(st.attrs)


def _write_structure(path: Path, st: _Structure) -> dict[str, RawExtent | None]:
    """Step 2 of an HDF5 store: the whole store but its payload rows, closed, marked unfinished and
    durable. Returns where the hot arrays' bytes lie, for step 3."""
    w = writer_for(path, "hdf5")
    try:
        _create(w, st, crc_arrays=True)
    finally:
        w.close()
    r = reader_for(path)
    try:
        extents = {name: r.extent(name) for name in (*st.hot, *st.crc_arrays)}
    finally:
        r.close()
    mark_complete(path, False)
    return extents


#: One committed row in the journal: the CRC-32 of each payload record.
_CRC_ROW = np.dtype([(k, "<u4") for k in PAYLOAD_FIELDS])


class _Journal:
    """``rows.crc`` of a staging folder: the CRC-32s of the payload rows committed so far. A commit
    makes the rows durable first, then appends their entries (and makes those durable). Commits run on
    a thread of their own: an fsync waits for the disk, and the pack goes on decoding meanwhile."""

    def __init__(self, path: Path, n: int):
        self.path = path
        with open(path, "a+b") as f:
            f.seek(0)
            self.done = min(n, os.fstat(f.fileno()).st_size // _CRC_ROW.itemsize)
            self.crc = np.frombuffer(f.read(self.done * _CRC_ROW.itemsize), dtype=_CRC_ROW)
            f.truncate(self.done * _CRC_ROW.itemsize)  # drop a torn last entry
        self._pool = ThreadPoolExecutor(1)
        self._pending: Future[None] | None = None

    def _commit(self, rows: RowWriter, entries: np.ndarray, upto: int) -> None:
        rows.flush()  # every row below ``upto`` was written before this commit was started
        with open(self.path, "ab") as f:
            f.write(entries.tobytes())
            f.flush()
            os.fsync(f.fileno())
        self.done = upto

    def commit(self, rows: RowWriter, crc: np.ndarray, upto: int, wait: bool = False) -> bool:
        """Commit rows ``done:upto`` in the background; False (nothing started) while the previous
        commit runs, unless ``wait``, which also waits for this one to finish."""
        if self._pending is not None:
            if not (wait or self._pending.done()):
                return False
            self._pending.result()
        self._pending = self._pool.submit(self._commit, rows, crc[self.done:upto].copy(), upto)
        if wait:
            self._pending.result()
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _write_rows(rows: RowWriter | ArrayWriter, records: DatasetRecords, checks: list[ImageCheck],
                st: _Structure, size: int, progress: bool, journal: _Journal | None = None) -> np.ndarray:
    """Step 3: decode every image after the journal's last commit and write its payload rows,
    committing every :data:`COMMIT_BYTES`. Returns every row's CRC-32s."""
    n = len(records.images)
    crc = np.zeros(n, dtype=_CRC_ROW)
    done = 0 if journal is None else journal.done
    if journal is not None:
        crc[:done] = journal.crc
    bar = tqdm(total=n, initial=done, desc="images", unit="img", disable=not progress, dynamic_ncols=True)
    decode = lambda i: decode_image(records.images[i], checks[i], records.root, size)  # noqa: E731
    with ordered_map(decode, list(range(done, n)), workers=2) as decoded:
        pending = 0
        for i, d in zip(range(done, n), decoded):
            for k, data in (("image", d.image_bytes), ("mask", d.mask_bytes)):
                rows.write(f"images/{k}_blob", int(st.offsets[k][i]), np.frombuffer(data, dtype=np.uint8))
            rows.write("images/pixels", i, d.pixels[None])
            if d.mask is not None:
                rows.write("images/mask", i, d.mask[None])
            crc[i] = tuple(d.crc[k] for k in PAYLOAD_FIELDS)
            bar.update()
            pending += d.pixels.nbytes + len(d.image_bytes) + len(d.mask_bytes)
            pending += 0 if d.mask is None else d.mask.nbytes
            if journal is not None and pending >= COMMIT_BYTES and journal.commit(rows, crc, i + 1):
                pending = 0
    if journal is not None:
        journal.commit(rows, crc, n, wait=True)
    bar.close()
    return crc


def _pack_hdf5(staging: _Staging, records: DatasetRecords, checks: list[ImageCheck], st: _Structure,
               size: int, progress: bool) -> None:
    """Steps 3 and 4 of an HDF5 pack whose structure is staged: rows, CRC arrays, then the file is
    marked complete and renamed into place."""
    rows = row_writer_for(staging.store, staging.extents())
    journal = _Journal(staging.journal, len(records.images))
    try:
        crc = _write_rows(rows, records, checks, st, size, progress, journal)
        for k in PAYLOAD_FIELDS:
            rows.write(crc_array(f"images/{k}"), 0, crc[k].astype(np.uint32))
        rows.flush()
    finally:
        journal.close()
        rows.close()
    mark_complete(staging.store, True)
    staging.tx.switch(staging.store)


def _pack_at_once(tx: Transaction, fmt: str, shard_bytes: int | None, records: DatasetRecords,
                  checks: list[ImageCheck], st: _Structure, size: int, progress: bool) -> list[str]:
    """A store built in one go in the transaction's staging folder and switched into place (Zarr), with
    the feature sets of the store it replaces where its images are the same; returns notes."""
    tmp = tx.dir / f"store{tx.target.suffix}"
    backend = backend_for(tmp, fmt)
    w = backend.build(tmp, shard_bytes)
    try:
        _create(w, st, crc_arrays=False)
        crc = _write_rows(w, records, checks, st, size, progress)
        for k in PAYLOAD_FIELDS:
            w.put(crc_array(f"images/{k}"), crc[k].astype(np.uint32))
    finally:
        w.close()
    notes = backend.keep_groups(tx.target, tmp) if tx.target.exists() else []
    tx.switch(tmp)
    return notes


class _Staging:
    """An HDF5 pack's part of its ``pack`` transaction (:mod:`.transaction`): the staged store file
    ``store.h5``, ``plan.json`` (where its hot arrays lie: the structure is complete once it exists)
    and the CRC journal ``rows.crc``. The transaction's settings are the structure's digest, build
    options and source digests, so a resume continues only the very pack that was interrupted."""

    def __init__(self, tx: Transaction):
        self.tx, self.out, self.dir = tx, tx.target, tx.dir
        self.store = self.dir / f"store{self.out.suffix}"
        self.plan = self.dir / "plan.json"
        self.journal = self.dir / "rows.crc"

    def extents(self) -> dict[str, RawExtent | None]:
        plan = json.loads(self.plan.read_text())
        return {k: None if v is None else RawExtent.contiguous(self.store, v[0], tuple(v[1]), np.dtype(v[2]))
                for k, v in plan.items()}

    def difference(self, old: dict[str, Any], new: dict[str, Any]) -> str:
        """What differs between the staged pack's settings and these: a build option or a source file."""
        o, n = old.get("build_config", {}), new["build_config"]
        for k in n:
            if o.get(k) != n[k]:
                return f"{k} was {o.get(k)!r}, now {n[k]!r}"
        changed = sorted(set(old.get("sources", {}).items()) ^ set(new["sources"].items()))
        if changed:
            return f"source file {changed[0][0]} changed"
        return "the store it would write changed (another spairstore version?)"

    def prepare(self, st: _Structure, resume: bool) -> list[str]:
        """Stage the structure ``st``: keep the staged one of an interrupted pack when it is exactly
        ``st`` (resume), else write it. Returns notes for the summary."""
        settings = {"structure": st.digest, "build_config": st.attrs["build_config"], "sources": st.sources()}
        refuse = lambda d: SpairstoreError(  # noqa: E731
            f"cannot resume the pack into {self.out}: {d} since it was interrupted; pack again without --resume "
            "to start over")
        if self.tx.begin(settings, describe=self.difference, refuse=refuse) and self.plan.exists():
            return [f"resumed an interrupted pack from {self.dir}"]
        self.tx.reset()  # nothing staged, or killed before its structure was complete
        extents = _write_structure(self.store, st)
        self.journal.write_bytes(b"")
        write_atomic(self.plan, json.dumps({k: None if e is None else [int(e.offsets[0]), list(e.shape), e.dtype.str]
                                            for k, e in extents.items()}).encode())
        return ["nothing to resume: packed from the start"] if resume else []


#: Reads the source into canonical records: ``read(progress, on_error)``, ``progress(iterable, description,
#: total)`` wrapping its long loops. A pack calls it once (a resume calls it again to check the sources).
SourceReader = Callable[[Callable[[Iterable[Any], str, int], Iterable[Any]], OnError], DatasetRecords]


def _hot_bytes(st: _Structure) -> int:
    """Bytes of the per-image arrays, stored uncompressed: what the store needs on disk, tables aside."""
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in st.hot.values())


def _read_and_check(read: SourceReader, size: int, on_error: OnError, progress: bool
                    ) -> tuple[DatasetRecords, list[ImageCheck], _Structure]:
    """Step 1, and the structure it determines."""
    wrap = lambda it, desc, total: tqdm(it, desc=desc, total=total, unit="file", disable=not progress,  # noqa: E731
                                        leave=False, dynamic_ncols=True)
    records = read(wrap, on_error)
    records, checks = check_images(records, on_error, progress)
    return records, checks, _structure(records, checks, size, on_error)


def write(read: SourceReader, out: str | Path, size: int = 512, overwrite: bool = False, progress: bool = False,
          format: str | None = None, shard_bytes: int | None = None, on_error: OnError = "fail",
          resume: bool = False) -> PackSummary:
    """Pack the records ``read`` returns into a store at ``out``, letterboxing pixels and masks to
    ``size x size`` (:func:`spairstore.sources.pack` reads a dataset folder with its converter).

    ``format`` is ``hdf5`` (one file) or ``zarr`` (a Zarr v3 directory); by default the suffix of ``out``
    decides (``.h5``, ``.zarr``). ``shard_bytes`` is the Zarr shard size of hot arrays (default 64 MiB).
    An existing ``out`` is replaced only with ``overwrite=True``, and only once the new store is complete.
    ``on_error="skip"`` leaves bad images and pairs out instead of failing, and lists each with its
    reason in the summary and in the store's ``skipped`` attribute. ``resume=True`` continues an HDF5
    pack of the same sources and options that was interrupted (killed, Ctrl-C) from its staging folder.
    """
    t0 = time.perf_counter()
    out = through_link(out)
    ErrorPolicy(on_error)  # validates the choice before any work
    if size < 8:
        raise SpairstoreError(f"store size must be at least 8 pixels, got {size}")
    if out.exists():
        check_replaceable(out)
        if not overwrite:
            raise SpairstoreError(f"{out} exists; pass --overwrite (overwrite=True) to replace it")
    if not out.parent.is_dir():
        raise SpairstoreError(f"{out.parent}: output directory does not exist")
    backend = backend_for(out, format)
    notes: list[str] = []
    tx = Transaction.open(out, "pack", who="pack")
    if not backend.resumable:
        if resume:
            notes.append(f"--resume continues HDF5 packs only: this {backend.name} store was packed from the start")
        try:
            tx.discard()  # a killed Zarr pack's staging: not resumable, swept
            records, checks, st = _read_and_check(read, size, on_error, progress)
            tx.reserve(_hot_bytes(st), "the store", staged=0)
            notes += _pack_at_once(tx, backend.name, shard_bytes, records, checks, st, size, progress)
        except OSError as e:
            if disk_full(e):
                raise SpairstoreError(f"{out}: the disk filled up while packing; nothing of it was kept "
                                      "(a Zarr pack starts over): make room and run the command again") from None
            raise
        finally:
            tx.finish()
    else:
        staging = _Staging(tx)
        try:
            if tx.staged_settings() is not None and not resume:
                tx.discard()
                notes.append("discarded the staging data of an interrupted pack (pass --resume to continue one)")
            records, checks, st = _read_and_check(read, size, on_error, progress)
            tx.reserve(_hot_bytes(st), "the store")
            notes += staging.prepare(st, resume)
            _pack_hdf5(staging, records, checks, st, size, progress)
        except SpairstoreError:
            if resume:
                tx.close()  # keep what an earlier run staged: it may still be resumed
            else:
                tx.finish()
            raise
        except BaseException as e:
            tx.close()  # interrupted: the staging data stays for --resume
            if disk_full(e):
                raise SpairstoreError(f"{out}: the disk filled up while packing; the images packed so far are kept "
                                      f"in {tx.dir}: make room and run the same command with --resume, or delete "
                                      "that folder") from None
            raise
        tx.finish()
    field_bytes = {field_of_array(k) or k: int(np.prod(shape)) * dtype.itemsize for k, (shape, dtype) in st.hot.items()}
    return PackSummary(
        path=out, dataset=records.dataset, images=len(records.images),
        pairs={s: len(p) for s, p in records.pairs.items()}, field_bytes=field_bytes,
        file_bytes=disk_bytes(out), seconds=time.perf_counter() - t0, notes=records.notes + notes,
        skipped=records.skipped,
    )
