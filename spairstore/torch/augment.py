"""Augmentation hooks that keep keypoints, boxes and the store -> original mapping consistent.

An augmentation is any callable ``augment(view, rng)`` that edits one :class:`View` in place; a dataset
calls it for each image of a sample with a generator seeded from ``(seed, epoch, index)``. Every built-in
hook updates the view's ``scale``/``offset`` along with its pixels, so ``p_orig = (p - offset) / scale``
still maps a point of the augmented image back to the original image. None is applied by default.

>>> PairDataset(path, "trn", augment=Compose(HFlip(0.5), RandomCrop(0.5)))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from ..core.errors import SpairstoreError


@dataclass
class View:
    """One image of a sample as an augmentation sees it; every coordinate in store pixels (x, y)."""

    pixels: np.ndarray | None  #: uint8 (S, S, 3), edited in place; None when not read
    mask: np.ndarray | None  #: uint8 (S, S), edited in place; None when not read
    ids: np.ndarray  #: (n,) keypoint slot ids
    points: np.ndarray  #: (n, 2) keypoints
    bbox: np.ndarray  #: (4,) x1, y1, x2, y2
    scale: np.ndarray  #: (2,) with offset: p_store = p_orig * scale + offset
    offset: np.ndarray  #: (2,)
    size: int  #: S, the side of the square frame
    flip_permutation: np.ndarray | None  #: the image category's slot permutation under a horizontal flip
    flipped: bool = False


class Augment(Protocol):
    def __call__(self, view: View, rng: np.random.Generator) -> None: ...


def needs_keypoint_flip(augment: Augment) -> bool:
    """Whether ``augment`` relabels keypoint slots by the store's left/right permutation."""
    return bool(getattr(augment, "needs_keypoint_flip", False))


class HFlip:
    """Mirror the image left-right with probability ``p``. Keypoint slots are relabelled by the category's
    left/right permutation (the left eye of the mirrored image is the right eye of the original), so a
    store without that table refuses it when the dataset is made."""

    needs_keypoint_flip = True

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, view: View, rng: np.random.Generator) -> None:
        if rng.random() >= self.p:
            return
        if view.flip_permutation is None:
            raise SpairstoreError("HFlip needs the store's left/right keypoint permutation (keypoint_flip)")
        s = view.size
        for a in (view.pixels, view.mask):
            if a is not None:
                a[:] = a[:, ::-1].copy()
        # x -> S - x on the continuous frame (pixel edges at integers, see spairstore.core.geometry).
        view.points = np.stack([s - view.points[:, 0], view.points[:, 1]], axis=1)
        view.ids = view.flip_permutation[view.ids]
        x1, y1, x2, y2 = view.bbox
        view.bbox = np.array([s - x2, y1, s - x1, y2])
        view.scale = view.scale * (-1.0, 1.0)
        view.offset = np.array([s - view.offset[0], view.offset[1]])
        view.flipped = not view.flipped


class RandomCrop:
    """With probability ``p``, crop a random square that contains the object's box and resize it back to
    ``S x S`` (pixels bilinear, mask nearest). The side is drawn between the box's longer side (at least
    ``min_fraction * S``) and ``S``; the square stays inside the frame. Without a box (PF-WILLOW), the
    keypoints' extent stands in for it."""

    def __init__(self, p: float = 0.5, min_fraction: float = 0.5):
        if not 0 < min_fraction <= 1:
            raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
        self.p, self.min_fraction = p, min_fraction

    def __call__(self, view: View, rng: np.random.Generator) -> None:
        if rng.random() >= self.p:
            return
        s = view.size
        box = view.bbox
        if not np.isfinite(box).all():
            pts = view.points[np.isfinite(view.points).all(axis=1)]
            box = np.concatenate([pts.min(axis=0), pts.max(axis=0)]) if len(pts) else np.array([0.0, 0.0, s, s])
        x1, y1, x2, y2 = np.clip(box, 0, s)
        side = rng.uniform(min(s, max(x2 - x1, y2 - y1, self.min_fraction * s)), s)
        # The square's corner c satisfies c <= box start, c + side >= box end, 0 <= c <= s - side.
        x0 = rng.uniform(max(0.0, x2 - side), min(x1, s - side))
        y0 = rng.uniform(max(0.0, y2 - side), min(y1, s - side))
        box = (x0, y0, x0 + side, y0 + side)
        for a, resample in ((view.pixels, Image.Resampling.BILINEAR), (view.mask, Image.Resampling.NEAREST)):
            if a is not None:
                a[:] = np.asarray(Image.fromarray(a).resize((s, s), resample, box=box))
        k = s / side
        corner = np.array([x0, y0])
        view.points = (view.points - corner) * k
        view.bbox = ((view.bbox.reshape(2, 2) - corner) * k).reshape(4)
        view.scale = view.scale * k
        view.offset = (view.offset - corner) * k


class Compose:
    """Apply augmentations in order."""

    def __init__(self, *augments: Augment):
        self.augments = augments
        self.needs_keypoint_flip = any(needs_keypoint_flip(a) for a in augments)

    def __call__(self, view: View, rng: np.random.Generator) -> None:
        for a in self.augments:
            a(view, rng)
