"""Checks and file readers shared by several converters: JSON field validation (SPair-71k, AP-10K),
MATLAB files (PF-PASCAL, PF-WILLOW), image headers, and naming the image a pair refers to.

Every failure is a :class:`~spairstore.core.errors.SourceError` naming the file relative to the dataset root.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from PIL import Image

from spairstore.core.errors import SourceError
from spairstore.core.records import ImageRecord, Skipped

#: JSON number types (``bool`` is not one of them, although it subclasses int).
NUMBER = (int, float)


# -- JSON fields ---------------------------------------------------------------------------------------
def require(data: Mapping[str, Any], keys: Iterable[str], rel: str) -> None:
    """Every key of ``keys`` is in the JSON object ``data`` of file ``rel``."""
    missing = [k for k in keys if k not in data]
    if missing:
        raise SourceError(rel, f"missing key(s) {', '.join(missing)}")


#: The widest integer column a store holds (image rows, pair ids, sizes): int32.
INT32 = (-(2**31), 2**31 - 1)


def integer(value: Any, what: str, rel: str, lo: int | None = None, hi: int | None = None) -> int:
    """A JSON integer (not a bool), within ``lo..hi`` where given and always within int32, so that no
    value overflows (or wraps in) the column it is stored in."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SourceError(rel, f"{what} must be an integer, got {value!r:.40}")
    lo_, hi_ = max(INT32[0], INT32[0] if lo is None else lo), min(INT32[1], INT32[1] if hi is None else hi)
    if not lo_ <= value <= hi_:
        bounds = f"at least {lo_}" if hi is None and value < lo_ else f"in {lo_}..{hi_}"
        raise SourceError(rel, f"{what} must be {bounds}, got {value if len(str(value)) < 24 else 'a huge number'}")
    return value


def keypoint_id(value: Any, what: str, rel: str, slots: int) -> int:
    """A keypoint id written as a decimal string (``"7"``), naming one of ``slots`` slots. Only ASCII
    digits: ``str.isdigit`` also accepts superscripts and other scripts' digits, which ``int`` rejects."""
    if not (isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 6):
        raise SourceError(rel, f"{what} must be keypoint id strings like '7', got {value!r:.40}")
    k = int(value)
    if k >= slots:
        raise SourceError(rel, f"{what} names keypoint id {k}, but there are {slots} slots (0..{slots - 1})")
    return k


def string(value: Any, what: str, rel: str) -> str:
    if not isinstance(value, str):
        raise SourceError(rel, f"{what} must be a string, got {value!r}")
    return value


def file_name(value: Any, what: str, rel: str) -> str:
    """A bare file name: anything with a path component could reach outside the dataset root."""
    name = string(value, what, rel)
    if not plain_name(name):
        raise SourceError(rel, f"{what} {name!r} is not a plain file name (path components could escape "
                               f"the dataset root)")
    return name


def plain_name(name: str) -> bool:
    """Whether ``name`` is one path component that stays inside its folder."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def border(width: int, height: int) -> float:
    """How far outside its image (original pixels) a keypoint may lie and still be kept, with a note:
    annotators click on the edge (x = width), or a pixel or two past it; further out is not a point of
    this image."""
    return max(2.0, 0.01 * max(width, height))


def points(value: Any, what: str, rel: str, width: int, height: int,
           note: Callable[[str, str], None] | None = None) -> np.ndarray:
    """A list of finite [x, y] points (original pixels) of a ``width x height`` image: 0 <= x <= width,
    or at most :func:`border` outside, which is kept and reported through ``note(what, rel)``.
    (Plain Python: for a few points per file it is several times faster than numpy.)"""
    if type(value) is not list:
        raise SourceError(rel, f"{what} must be a list of [x, y] points, got {value!r:.80}")
    m = border(width, height)
    for p in value:
        if type(p) is not list or len(p) != 2 or type(p[0]) not in NUMBER or type(p[1]) not in NUMBER:
            raise SourceError(rel, f"{what} must be a list of [x, y] number pairs, got {p!r:.80} in it")
        if not (0 <= p[0] <= width and 0 <= p[1] <= height):  # NaN fails too
            if not (-m <= p[0] <= width + m and -m <= p[1] <= height + m):
                raise SourceError(rel, f"{what}: point {p} lies outside the {width}x{height} image")
            if note is not None:
                note(f"keypoints up to {m:g} px outside their image (kept as annotated)", rel)
    return np.array(value, dtype=np.float32).reshape(-1, 2)


# -- other files -----------------------------------------------------------------------------------------
def load_mat(raw: bytes, rel: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named variables of a MATLAB ``.mat`` file's bytes (v4 to v7.2, as the PF datasets ship them;
    scipy cannot read v7.3 HDF5 files)."""
    try:
        data = scipy.io.loadmat(io.BytesIO(raw), variable_names=keys)
    except Exception as e:  # noqa: BLE001 - scipy raises anything from MatReadError to IndexError on bad bytes
        raise SourceError(rel, f"cannot read .mat file ({e})") from None
    missing = [k for k in keys if k not in data]
    if missing:
        raise SourceError(rel, f"missing variable(s) {', '.join(missing)}")
    return data


def image_header(path: Path, root: Path, named_in: str) -> tuple[int, int, int]:
    """``(width, height, channels)`` of an image file, from its header only (no decoding)."""
    rel = path.relative_to(root)
    if not path.is_file():
        raise SourceError(rel, f"image file not found (named by {named_in})")
    try:
        with Image.open(path) as im:
            return im.width, im.height, len(im.getbands())
    except (OSError, SyntaxError, ValueError) as e:
        raise SourceError(rel, f"cannot read image header ({e})") from None


def named_image(index: Mapping[tuple[str, str], ImageRecord], skipped: Mapping[str, Skipped],
                key: tuple[str, str], path: str | None, where: str) -> ImageRecord:
    """The image keyed ``key`` that a pair names, or a SourceError saying it was skipped (and why) or
    is not annotated. The error names ``path`` (the pair list), or the skipped image's file where None;
    its reason starts with ``where`` (e.g. ``line 3: 'a.jpg'``). ``skipped``: by ``category/name``."""
    image = index.get(key)
    if image is not None:
        return image
    name = "/".join(key)
    hit = skipped.get(name)
    if hit is None:
        raise SourceError(path or name, f"{where} names no annotated image")
    raise SourceError(path or hit.path, f"{where} names image {name}, which was skipped: {hit.reason}")
