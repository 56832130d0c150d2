"""File readers shared by the converters whose annotations are MATLAB files (PF-PASCAL, PF-WILLOW).

Every failure is a :class:`~spairstore.core.errors.SourceError` naming the file relative to the dataset root.
"""
from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from spairstore.core.errors import SourceError
from spairstore.core.manifest import sha256_bytes
from spairstore.core.records import ImageRecord, Skipped

Digests = dict[str, tuple[int, str]]  #: see ``DatasetRecords.digests``


def read_source(path: Path, root: Path, digests: Digests) -> bytes:
    """The bytes of a source file, recording their size and SHA-256 for the manifest."""
    rel = path.relative_to(root).as_posix()
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SourceError(rel, f"cannot read file ({e.strerror})") from None
    digests[rel] = (len(data), sha256_bytes(data))
    return data


def source_text(path: Path, root: Path, digests: Digests) -> io.StringIO:
    """A UTF-8 text source file (e.g. a pair CSV) as a stream for :mod:`csv`, recording its digest."""
    try:
        return io.StringIO(read_source(path, root, digests).decode("utf-8-sig"), newline="")
    except UnicodeDecodeError as e:
        raise SourceError(path.relative_to(root), f"not UTF-8 text ({e})") from None


def load_mat(path: Path, root: Path, keys: tuple[str, ...], digests: Digests) -> dict[str, np.ndarray]:
    """The named variables of a MATLAB ``.mat`` file (v4 to v7.2, as the PF datasets ship them; scipy
    cannot read v7.3 HDF5 files)."""
    rel = path.relative_to(root)
    raw = read_source(path, root, digests)
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
