"""Pack canonical records into a store: ``spairstore pack``.

The store is built at a temporary path beside the output and renamed into place at the end, so a
killed pack leaves the old store (or nothing) at the output path, never a half-written file.
Images stream through one at a time: peak memory does not grow with the dataset.
"""
from __future__ import annotations

import io
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

import converters

from . import __version__
from .backends import disk_bytes, format_of, staged, writer_for
from .errors import SourceError, SpairstoreError
from .geometry import letterbox, letterbox_params
from .manifest import build_manifest, sha256_bytes
from .records import DatasetRecords, ImageRecord, PairRecord
from .schema import BLOB_FIELDS, FORMAT_NAME, FORMAT_VERSION, PAIR_LABELS, PAYLOAD_FIELDS, image_fields

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class PackSummary:
    """What a pack wrote."""

    path: Path
    dataset: str
    images: int
    pairs: dict[str, int]
    field_bytes: dict[str, int]  #: payload bytes per field
    file_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
        lines = [
            f"packed {self.dataset} into {self.path} in {self.seconds:.1f} s ({mib(self.file_bytes)})",
            f"  images: {self.images:,}",
            "  pairs:  " + ", ".join(f"{s} {n:,}" for s, n in self.pairs.items()),
            "  fields: " + ", ".join(f"{k} {mib(v)}" for k, v in self.field_bytes.items()),
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _tqdm_wrapper(enabled: bool) -> Callable[[Iterable[Any], str, int], Iterable[Any]]:
    return lambda it, desc, total: tqdm(it, desc=desc, total=total, unit="file", disable=not enabled,
                                        leave=False, dynamic_ncols=True)


def _ordered_map(fn: Callable[[T], R], items: list[T], workers: int, window: int = 32) -> Iterator[R]:
    """``map`` over a thread pool, in order, with at most ``window`` results in flight (bounded memory).

    Decoding and resizing release the GIL in Pillow, so two threads use both cores.
    """
    with ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(fn, x) for x in items[:window]]
        for i in range(len(items)):
            result = pending[i].result()
            if i + window < len(items):
                pending.append(pool.submit(fn, items[i + window]))
            pending[i] = None  # type: ignore[call-overload]
            yield result


def _open_image(data: bytes, rel: Path) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Image.DecompressionBombError as e:
        raise SourceError(rel, f"image too large to decode safely ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SourceError(rel, f"cannot decode image ({e})") from None
    return img


@dataclass
class _Decoded:
    """One image's payloads, CRC-32s and source digests, computed on a worker thread."""

    image_bytes: bytes
    pixels: np.ndarray
    mask_bytes: bytes
    mask: np.ndarray | None
    crc: dict[str, int]
    digests: dict[str, tuple[int, str]]


def _decode(rec: ImageRecord, root: Path, size: int) -> _Decoded:
    rel = rec.image_path.relative_to(root)
    data = rec.image_path.read_bytes()
    img = _open_image(data, rel)
    if img.size != (rec.width, rec.height):
        raise SourceError(rel, f"image is {img.width}x{img.height} but annotated as {rec.width}x{rec.height}")
    pixels = letterbox(img.convert("RGB"), size, Image.Resampling.BILINEAR)
    crc = {"pixels": zlib.crc32(pixels), "image_blob": zlib.crc32(data), "mask": 0, "mask_blob": 0}
    digests = {rel.as_posix(): (len(data), sha256_bytes(data))}
    if rec.mask_path is None:
        return _Decoded(data, pixels, b"", None, crc, digests)
    mrel = rec.mask_path.relative_to(root)
    mdata = rec.mask_path.read_bytes()
    m = _open_image(mdata, mrel)
    if m.mode not in ("L", "P"):
        raise SourceError(mrel, f"mask must be a class-index PNG (mode L or P), got mode {m.mode}")
    if m.size != img.size:
        raise SourceError(mrel, f"mask is {m.width}x{m.height} but its image is {img.width}x{img.height}")
    mask = letterbox(m, size, Image.Resampling.NEAREST)
    crc.update(mask=zlib.crc32(mask), mask_blob=zlib.crc32(mdata))
    digests[mrel.as_posix()] = (len(mdata), sha256_bytes(mdata))
    return _Decoded(data, pixels, mdata, mask, crc, digests)


def _image_tables(records: DatasetRecords, size: int, splits: list[str], pose_names: list[str]) -> dict[str, np.ndarray]:
    ims = records.images
    boxes = [letterbox_params(im.width, im.height, size) for im in ims]
    cat = {c: i for i, c in enumerate(records.categories)}
    pose = {p: i for i, p in enumerate(pose_names)}
    index = records.image_index()
    used = np.zeros(len(ims), dtype=np.uint8)
    for s, split in enumerate(splits):
        for p in records.pairs[split]:
            used[index[p.src]] |= 1 << s
            used[index[p.trg]] |= 1 << s
    names = [im.name.encode() for im in ims]
    return {
        "name": np.array(names, dtype=f"S{max(map(len, names), default=1)}"),
        "category": np.array([cat[im.category] for im in ims], dtype=np.int16),
        "size": np.array([(im.width, im.height) for im in ims], dtype=np.int32).reshape(-1, 2),
        "scale": np.array([b.scale for b in boxes], dtype=np.float64).reshape(-1, 2),
        "offset": np.array([b.offset for b in boxes], dtype=np.float64).reshape(-1, 2),
        "bbox": np.array([im.bbox for im in ims], dtype=np.float32).reshape(-1, 4),
        "keypoints": np.stack([im.keypoints for im in ims]).astype(np.float32),
        "azimuth": np.array([im.azimuth for im in ims], dtype=np.int8),
        "pose": np.array([pose[im.pose] for im in ims], dtype=np.int8),
        "truncated": np.array([im.truncated for im in ims], dtype=np.int8),
        "occluded": np.array([im.occluded for im in ims], dtype=np.int8),
        "difficult": np.array([im.difficult for im in ims], dtype=np.int8),
        "depth": np.array([im.depth for im in ims], dtype=np.int8),
        "splits": used,
    }


def _pair_table(pairs: list[PairRecord], records: DatasetRecords, width: int) -> dict[str, np.ndarray]:
    index = records.image_index()
    cat = {c: i for i, c in enumerate(records.categories)}
    n = len(pairs)
    kps_ids = np.full((n, width), -1, dtype=np.int16)
    src_kps = np.full((n, width, 2), np.nan, dtype=np.float32)
    trg_kps = np.full((n, width, 2), np.nan, dtype=np.float32)
    for j, p in enumerate(pairs):
        k = len(p.kps_ids)
        kps_ids[j, :k], src_kps[j, :k], trg_kps[j, :k] = p.kps_ids, p.src_kps, p.trg_kps
    stems = [p.stem.encode() for p in pairs]
    table = {
        "pair_id": np.array([p.pair_id for p in pairs], dtype=np.int32),
        "stem": np.array(stems, dtype=f"S{max(map(len, stems), default=1)}"),
        "category": np.array([cat[p.category] for p in pairs], dtype=np.int16),
        "src": np.array([index[p.src] for p in pairs], dtype=np.int32),
        "trg": np.array([index[p.trg] for p in pairs], dtype=np.int32),
        "n_kps": np.array([len(p.kps_ids) for p in pairs], dtype=np.int16),
        "kps_ids": kps_ids,
        "src_kps": src_kps,
        "trg_kps": trg_kps,
        "small": np.array([p.small for p in pairs], dtype=bool),
    }
    for label in PAIR_LABELS:
        table[label] = np.array([getattr(p, label) for p in pairs], dtype=np.int8)
    return table


def write_store(records: DatasetRecords, out: Path, size: int = 512, progress: bool = False,
                format: str | None = None, shard_bytes: int | None = None) -> dict[str, int]:
    """Write ``records`` as a new store at ``out`` (which must not exist). Returns payload bytes per field.

    ``format`` is ``hdf5`` or ``zarr`` (default: from the suffix of ``out``); ``shard_bytes`` sets the
    Zarr shard size of hot arrays. Callers wanting atomic replacement use :func:`pack`, which writes to
    a temporary path first.
    """
    if size < 8:
        raise SpairstoreError(f"store size must be at least 8 pixels, got {size}")
    root = records.root
    n = len(records.images)
    has_masks = any(im.mask_path is not None for im in records.images)
    splits = list(records.pairs)
    pose_names = sorted({im.pose for im in records.images})
    blob_sizes = {
        "image": np.array([im.image_path.stat().st_size for im in records.images], dtype=np.int64),
        "mask": np.array([im.mask_path.stat().st_size if im.mask_path else 0 for im in records.images], dtype=np.int64),
    }
    offsets = {k: np.concatenate([[0], np.cumsum(v)]).astype(np.int64) for k, v in blob_sizes.items()}
    w = writer_for(out, format, shard_bytes)
    try:
        fields = {f.path: f for f in image_fields(size, records.num_keypoints)}
        for name in ("images/pixels", "images/mask"):
            f = fields[name]
            rows = n if (name != "images/mask" or has_masks) else 0
            w.create(name, (rows, *f.row_shape), f.dtype)
        for k in BLOB_FIELDS:
            w.create(f"images/{k}_blob", (int(offsets[k][-1]),), np.dtype(np.uint8))
            w.put(f"images/{k}_offsets", offsets[k])
        crc = {k: np.zeros(n, dtype=np.uint32) for k in PAYLOAD_FIELDS}
        digests = dict(records.digests)
        decode = lambda rec: _decode(rec, root, size)  # noqa: E731
        bar = tqdm(total=n, desc="images", unit="img", disable=not progress, dynamic_ncols=True)
        for i, (rec, d) in enumerate(zip(records.images, _ordered_map(decode, records.images, workers=2))):
            for k, data, path in (("image", d.image_bytes, rec.image_path), ("mask", d.mask_bytes, rec.mask_path)):
                if len(data) != blob_sizes[k][i]:
                    raise SourceError(path.relative_to(root), "file changed size while packing")
                w.write(f"images/{k}_blob", int(offsets[k][i]), np.frombuffer(data, dtype=np.uint8))
            w.write("images/pixels", i, d.pixels[None])
            if d.mask is not None:
                w.write("images/mask", i, d.mask[None])
            for k, v in d.crc.items():
                crc[k][i] = v
            digests.update(d.digests)
            bar.update()
        bar.close()
        for k, v in crc.items():
            w.put(f"images/crc32_{k}", v)
        for k, v in _image_tables(records, size, splits, pose_names).items():
            w.put(f"images/{k}", v)
        width = max([1] + [len(p.kps_ids) for ps in records.pairs.values() for p in ps])
        for split, pairs in records.pairs.items():
            for k, v in _pair_table(pairs, records, width).items():
                w.put(f"pairs/{split}/{k}", v)
        w.put("categories", np.array([c.encode() for c in records.categories], dtype="S32"))
        sources = list(tqdm(records.sources, desc="manifest", unit="file", disable=not progress, leave=False))
        for k, v in build_manifest(root, sources, digests).items():
            w.put(f"manifest/{k}", v)
        w.set_attrs({
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
                "source_root": str(root),
                "size": size,
                "letterbox": "centred, black padding",
                "resample": {"pixels": "bilinear", "mask": "nearest"},
            },
            "created_by": f"spairstore {__version__}",
            **({"keypoint_flip": records.keypoint_flip} if records.keypoint_flip else {}),
        })
    finally:
        w.close()
    return {
        "pixels": n * size * size * 3,
        "mask": (n if has_masks else 0) * size * size,
        "image_blob": int(offsets["image"][-1]),
        "mask_blob": int(offsets["mask"][-1]),
    }


def pack(src: str | Path, out: str | Path, size: int = 512, dataset: str | None = None,
         overwrite: bool = False, progress: bool = False, format: str | None = None,
         shard_bytes: int | None = None) -> PackSummary:
    """Read the dataset at ``src`` (layout detected unless ``dataset`` names it) and pack it into a store at
    ``out``, letterboxing pixels and masks to ``size x size``.

    ``format`` is ``hdf5`` (one file) or ``zarr`` (a Zarr v3 directory); by default the suffix of ``out``
    decides (``.h5``, ``.zarr``). ``shard_bytes`` is the Zarr shard size of hot arrays (default 64 MiB).
    An existing ``out`` is replaced only with ``overwrite=True``, and only once the new store is complete.
    """
    t0 = time.perf_counter()
    out = Path(out)
    with staged(out, overwrite) as tmp:
        format = format_of(out, format)
        records = converters.read(Path(src), dataset, progress=_tqdm_wrapper(progress))
        field_bytes = write_store(records, tmp, size=size, progress=progress, format=format,
                                  shard_bytes=shard_bytes)
    return PackSummary(
        path=out, dataset=records.dataset, images=len(records.images),
        pairs={s: len(p) for s, p in records.pairs.items()}, field_bytes=field_bytes,
        file_bytes=disk_bytes(out), seconds=time.perf_counter() - t0, notes=records.notes,
    )
