"""Letterbox geometry: original pixels <-> store pixels.

Coordinates are continuous ``(x, y)`` in pixels with the image's top-left corner at 0. An image of
original size ``(W, H)`` is resized, aspect preserved, so that its longer side fills the store size
``S``, and centred on a black ``S x S`` canvas. Per image the store records ``scale = (sx, sy)`` and
``offset = (ox, oy)`` with::

    p_store = p_orig * scale + offset        p_orig = (p_store - offset) / scale

``sx`` and ``sy`` differ slightly because the resized sides are rounded to whole pixels.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image


class Letterbox(NamedTuple):
    width: int  #: resized width, store pixels
    height: int  #: resized height, store pixels
    scale: tuple[float, float]  #: sx, sy
    offset: tuple[float, float]  #: ox, oy (whole pixels of padding left/top)


def letterbox_params(width: int, height: int, size: int) -> Letterbox:
    """Where an original ``width x height`` image lands in the ``size x size`` store frame."""
    s = size / max(width, height)
    w, h = max(1, round(width * s)), max(1, round(height * s))
    return Letterbox(w, h, (w / width, h / height), ((size - w) // 2, (size - h) // 2))


def letterbox(image: Image.Image, size: int, resample: Image.Resampling) -> np.ndarray:
    """Resize ``image`` into a zero-padded ``size x size`` array (H, W[, C]) by :func:`letterbox_params`."""
    box = letterbox_params(image.width, image.height, size)
    resized = np.asarray(image.resize((box.width, box.height), resample))
    out = np.zeros((size, size) + resized.shape[2:], dtype=resized.dtype)
    ox, oy = int(box.offset[0]), int(box.offset[1])
    out[oy:oy + box.height, ox:ox + box.width] = resized
    return out


def to_store(points: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Original pixels -> store pixels. ``points`` (..., 2) x,y; scale/offset broadcast against it."""
    return np.asarray(points) * scale + offset


def to_original(points: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Store pixels -> original pixels (the inverse of :func:`to_store`)."""
    return (np.asarray(points) - offset) / scale


def cell_to_store(cells: np.ndarray, geometry: dict, image_size: int) -> np.ndarray:
    """Feature-map cells ``(..., 2)`` as ``(col, row)`` -> store pixels ``(x, y)`` of the cells' centres.

    ``geometry`` is a feature set's attributes: the store's ``S x S`` pixels are resized to
    ``input_size`` before the backbone, each cell spans ``stride`` input pixels, and the centre of cell
    0 lies at ``cell_offset * stride`` (0.5 = patch centre).
    """
    s = float(geometry["stride"])
    return (np.asarray(cells, dtype=np.float64) + float(geometry["cell_offset"])) * s * image_size / float(geometry["input_size"])


def store_to_cell(points: np.ndarray, geometry: dict, image_size: int) -> np.ndarray:
    """Store pixels ``(..., 2)`` (x, y) -> integer cell ``(col, row)`` whose centre is nearest, clipped
    to the map (``geometry["width"]``, ``geometry["height"]``). Inverse of :func:`cell_to_store` on centres."""
    s = float(geometry["stride"])
    c = np.asarray(points, dtype=np.float64) * float(geometry["input_size"]) / image_size / s - float(geometry["cell_offset"])
    hi = np.array([int(geometry["width"]) - 1, int(geometry["height"]) - 1])
    return np.clip(np.rint(c), 0, hi).astype(np.int64)


def regrid(geometry: dict, cell_stride: float) -> dict:
    """A feature set's geometry after a map-to-map op whose output cell spans ``cell_stride`` input cells
    per side (1: the same grid; 2: a stride-2 conv; 0.5: a 2x upsampling) and whose grid covers the same
    store pixels: ``stride' = stride * cell_stride``, ``width'``/``height'`` = ``width``/``height`` divided by
    ``cell_stride`` (rounded), and ``cell_offset'`` keeps the grid's top-left edge where it was,
    ``(cell_offset' - 0.5) * stride' = (cell_offset - 0.5) * stride``."""
    f = float(cell_stride)
    if not f > 0:
        raise ValueError(f"cell_stride must be positive, not {cell_stride!r}")
    if f == 1:
        return dict(geometry)
    return {**geometry, "stride": float(geometry["stride"]) * f,
            "cell_offset": 0.5 + (float(geometry["cell_offset"]) - 0.5) / f,
            "width": round(int(geometry["width"]) / f), "height": round(int(geometry["height"]) / f)}
