"""Letterbox geometry: original pixels <-> store pixels.

Coordinates are continuous ``(x, y)`` in pixels with the image's top-left corner at 0. An image of
original size ``(W, H)`` is resized, aspect preserved, so that its longer side fills the store size
``S``, and centred on a black ``S x S`` canvas. Per image the store records ``scale = (sx, sy)`` and
``offset = (ox, oy)`` with::

    p_store = p_orig * scale + offset        p_orig = (p_store - offset) / scale

``sx`` and ``sy`` differ slightly because the resized sides are rounded to whole pixels.

The point mappings (:func:`to_store`, :func:`to_original`, :func:`cell_to_store`, :func:`store_to_cell`)
take numpy arrays or torch tensors. A tensor stays a tensor on its device (no copy to the host): the
result has the points' floating dtype (an integer tensor gives torch's default float dtype), and
``scale``/``offset`` (numpy or tensors) are moved to it. torch is never imported here: a tensor is
recognised only when torch is already loaded, so the core stays importable without it.
"""
from __future__ import annotations

import sys
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

#: numpy array or torch tensor (``torch.Tensor``; not imported here).
ArrayLike = Any


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


def _tensor(x: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _float_tensor(points: ArrayLike) -> ArrayLike:
    """A torch tensor as floating point, on its device (integer cells -> the default float dtype)."""
    return points if points.is_floating_point() else points.to(sys.modules["torch"].get_default_dtype())


def _on(points: ArrayLike, *values: ArrayLike) -> list[ArrayLike]:
    """``values`` (numpy, tensors, scalars) as tensors of ``points``' device and dtype."""
    torch = sys.modules["torch"]
    return [torch.as_tensor(v, dtype=points.dtype, device=points.device) for v in values]


def to_store(points: ArrayLike, scale: ArrayLike, offset: ArrayLike) -> ArrayLike:
    """Original pixels -> store pixels. ``points`` (..., 2) x,y; scale/offset broadcast against it."""
    if _tensor(points):
        points = _float_tensor(points)
        scale, offset = _on(points, scale, offset)
        return points * scale + offset
    return np.asarray(points) * scale + offset


def to_original(points: ArrayLike, scale: ArrayLike, offset: ArrayLike) -> ArrayLike:
    """Store pixels -> original pixels (the inverse of :func:`to_store`)."""
    if _tensor(points):
        points = _float_tensor(points)
        scale, offset = _on(points, scale, offset)
        return (points - offset) / scale
    return (np.asarray(points) - offset) / scale


def cell_to_store(cells: ArrayLike, geometry: dict, image_size: int) -> ArrayLike:
    """Feature-map cells ``(..., 2)`` as ``(col, row)`` -> store pixels ``(x, y)`` of the cells' centres.

    ``geometry`` is a feature set's attributes: the store's ``S x S`` pixels are resized to
    ``input_size`` before the backbone, each cell spans ``stride`` input pixels, and the centre of cell
    0 lies at ``cell_offset * stride`` (0.5 = patch centre). numpy gives float64.
    """
    c = _float_tensor(cells) if _tensor(cells) else np.asarray(cells, dtype=np.float64)
    return (c + float(geometry["cell_offset"])) * float(geometry["stride"]) * image_size / float(geometry["input_size"])


def store_to_cell(points: ArrayLike, geometry: dict, image_size: int) -> ArrayLike:
    """Store pixels ``(..., 2)`` (x, y) -> integer cell ``(col, row)`` (int64) whose centre is nearest,
    clipped to the map (``geometry["width"]``, ``geometry["height"]``). Inverse of :func:`cell_to_store`
    on centres. Non-finite points are the caller's to mask (their cell is meaningless)."""
    hi = (int(geometry["width"]) - 1, int(geometry["height"]) - 1)
    tensor = _tensor(points)
    if tensor:  # float64 (where the device has it) so that torch and numpy round the same points alike
        points = points.double() if points.device.type != "mps" else _float_tensor(points)
    else:
        points = np.asarray(points, dtype=np.float64)
    c = points * float(geometry["input_size"]) / image_size / float(geometry["stride"]) - float(geometry["cell_offset"])
    if tensor:
        upper = sys.modules["torch"].tensor(hi, dtype=c.dtype, device=c.device)
        return c.round().clamp(min=0).minimum(upper).long()
    return np.clip(np.rint(c), 0, np.array(hi)).astype(np.int64)


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
