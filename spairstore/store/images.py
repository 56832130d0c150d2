"""Source image files for a pack: read, check and decode them, on threads, in order, in bounded memory.

Step 1 of a pack (:func:`check_images`) opens every image and mask, refuses what is not what its name
and annotation say, and hashes it; step 3 (:func:`decode_image`) decodes the very bytes step 1 checked
and letterboxes them to the store's side. See :mod:`spairstore.store.writer` for the steps.
"""
from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..core.errors import SourceError, SpairstoreError
from ..core.geometry import letterbox
from ..core.manifest import sha256_bytes
from ..core.records import DatasetRecords, ImageRecord, OnError, Skipped

T = TypeVar("T")
R = TypeVar("R")


@contextmanager
def ordered_map(fn: Callable[[T], R], items: list[T], workers: int, window: int = 32) -> Iterator[Iterator[R]]:
    """``map`` over a thread pool, in order, with at most ``window`` results in flight (bounded memory).
    A context manager, so that leaving early (an error) cancels the rest in the calling thread.

    Decoding and resizing release the GIL in Pillow, so two threads use both cores.
    """
    with ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(fn, x) for x in items[:window]]

        def results() -> Iterator[R]:
            for i in range(len(items)):
                result = pending[i].result()
                if i + window < len(items):
                    pending.append(pool.submit(fn, items[i + window]))
                pending[i] = None  # type: ignore[call-overload]
                yield result

        try:
            yield results()
        finally:
            for f in pending:
                if f is not None:
                    f.cancel()


#: Suffix -> the only image format a file with that name may hold.
_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}
#: Exceptions Pillow raises on a truncated or corrupt file while decoding.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zlib.error, Image.DecompressionBombError)
def open_image(data: bytes, rel: Path) -> Image.Image:
    """Open (not decode) an image file's bytes, refusing a format other than the one its suffix names
    and sizes past Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``)."""
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise SourceError(rel, f"image too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise SourceError(rel, "cannot decode image (not a known image format)") from None
    except _DECODE_ERRORS as e:
        raise SourceError(rel, f"cannot read image header ({e})") from None
    expected = _FORMATS.get(rel.suffix.lower())
    if expected and img.format != expected:
        raise SourceError(rel, f"holds a {img.format} image, but its name says {expected}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise SourceError(rel, f"image is {img.width}x{img.height}, more pixels than Pillow's "
                               f"decompression-bomb limit ({limit:,})")
    return img


def _load(img: Image.Image, rel: Path) -> Image.Image:
    try:
        img.load()
    except _DECODE_ERRORS as e:
        raise SourceError(rel, f"cannot decode image ({e})") from None
    return img


def _read(path: Path, root: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SourceError(path.relative_to(root), f"cannot read ({e.strerror})") from None


@dataclass(frozen=True)
class FileCheck:
    size: int  #: bytes
    crc32: int
    sha256: str


@dataclass(frozen=True)
class ImageCheck:
    image: FileCheck
    mask: FileCheck | None
    remarks: tuple[str, ...] = ()  #: oddities the user should hear of, not errors (see ``_remarks``)


#: EXIF tag of the orientation a viewer rotates the stored pixels by (1: as stored).
_ORIENTATION = 0x0112


def _remarks(img: Image.Image, rec: ImageRecord) -> tuple[str, ...]:
    """What is odd about an image that opened well: the store keeps its pixels as stored, like the
    annotations do, which a viewer honouring EXIF would show rotated; a channel count unlike the
    annotated ``image_depth``."""
    out = []
    if img.getexif().get(_ORIENTATION, 1) != 1:
        out.append("images with an EXIF rotation (packed as stored, unrotated, as annotated)")
    if len(img.getbands()) != rec.depth:
        out.append("images whose channels differ from their image_depth (kept)")
    return tuple(out)


def check_image(rec: ImageRecord, root: Path, decode: bool, mask_classes: int = 0) -> ImageCheck:
    """Step 1 for one image: its file and mask must open as what they claim and have the annotated size;
    with ``decode`` they must also decode (JPEGs at 1/8 scale: every byte is still parsed, so
    truncation shows). Without it a file that does not decode fails step 3 instead."""
    rel = rec.image_path.relative_to(root)
    data = _read(rec.image_path, root)
    img = open_image(data, rel)
    if img.size != (rec.width, rec.height):
        raise SourceError(rel, f"image is {img.width}x{img.height} but annotated as {rec.width}x{rec.height}")
    if decode:
        if img.format == "JPEG":
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
        _load(img, rel)
    image = FileCheck(len(data), zlib.crc32(data), sha256_bytes(data))
    remarks = _remarks(img, rec)
    if rec.mask_path is None:
        return ImageCheck(image, None, remarks)
    mrel = rec.mask_path.relative_to(root)
    mdata = _read(rec.mask_path, root)
    m = open_image(mdata, mrel)
    if m.mode not in ("L", "P"):
        raise SourceError(mrel, f"mask must be a class-index PNG (mode L or P), got mode {m.mode}")
    if m.size != (rec.width, rec.height):
        raise SourceError(mrel, f"mask is {m.width}x{m.height} but its image is {rec.width}x{rec.height}")
    if decode or mask_classes:
        _load(m, mrel)
    if mask_classes:
        values = np.unique(np.asarray(m))
        if ((values >= mask_classes) & (values != 255)).any():
            remarks += (f"masks with values outside the dataset's classes 0..{mask_classes - 1} and 255 (kept)",)
    return ImageCheck(image, FileCheck(len(mdata), zlib.crc32(mdata), sha256_bytes(mdata)), remarks)


@dataclass
class Decoded:
    """One image's payloads and their CRC-32s, computed on a worker thread."""

    image_bytes: bytes
    pixels: np.ndarray
    mask_bytes: bytes
    mask: np.ndarray | None
    crc: dict[str, int]


def decode_image(rec: ImageRecord, check: ImageCheck, root: Path, size: int) -> Decoded:
    """Step 3 for one image: the bytes checked in step 1, decoded and letterboxed."""
    def same_file(path: Path, expected: FileCheck) -> bytes:
        data = _read(path, root)
        if zlib.crc32(data) != expected.crc32 or len(data) != expected.size:
            raise SourceError(path.relative_to(root), "file changed while packing")
        return data

    data = same_file(rec.image_path, check.image)
    img = _load(open_image(data, rec.image_path.relative_to(root)), rec.image_path.relative_to(root))
    pixels = letterbox(img.convert("RGB"), size, Image.Resampling.BILINEAR)
    crc = {"pixels": zlib.crc32(pixels), "image_blob": check.image.crc32, "mask": 0, "mask_blob": 0}
    if rec.mask_path is None or check.mask is None:
        return Decoded(data, pixels, b"", None, crc)
    mdata = same_file(rec.mask_path, check.mask)
    m = _load(open_image(mdata, rec.mask_path.relative_to(root)), rec.mask_path.relative_to(root))
    mask = letterbox(m, size, Image.Resampling.NEAREST)
    crc.update(mask=zlib.crc32(mask), mask_blob=check.mask.crc32)
    return Decoded(data, pixels, mdata, mask, crc)


def check_images(records: DatasetRecords, on_error: OnError, progress: bool
                  ) -> tuple[DatasetRecords, list[ImageCheck]]:
    """Step 1: every image checked; bad ones raise or (skip) leave with their pairs. Only a skipping
    pack decodes here: it must know every image that stays before step 2 sizes the store, while a
    failing pack can just as well fail when step 3 decodes."""
    def attempt(rec: ImageRecord) -> ImageCheck | SourceError:
        try:
            return check_image(rec, records.root, decode=on_error == "skip", mask_classes=records.mask_classes)
        except SourceError as e:
            return e

    checks: dict[tuple[str, str], ImageCheck] = {}
    bad: dict[tuple[str, str], Skipped] = {}
    with ordered_map(attempt, records.images, workers=2) as results:
        for rec, res in tqdm(zip(records.images, results), total=len(records.images), desc="checking images",
                             unit="img", disable=not progress, leave=False, dynamic_ncols=True):
            if isinstance(res, SourceError):
                if on_error == "fail":
                    raise res
                bad[rec.key] = Skipped("image", f"{rec.category}/{rec.name}", res.path, res.reason)
            else:
                checks[rec.key] = res
    records = records.without_images(bad)
    if not records.images:
        raise SpairstoreError(f"{records.root}: nothing to pack, every image was skipped")
    kept = [checks[im.key] for im in records.images]
    seen: dict[str, list[ImageRecord]] = {}
    for rec, check in zip(records.images, kept):
        for r in check.remarks:
            seen.setdefault(r, []).append(rec)
    records.notes += [f"{len(recs):,} {what}, e.g. {recs[0].image_path.relative_to(records.root).as_posix()}"
                      for what, recs in seen.items()]
    return records, kept
