"""Canonical records: what every converter produces and the writer consumes.

All coordinates here are in *original image pixels*, ``(x, y)`` order, exactly as the source
annotation gives them (SPair-71k bounding boxes stay VOC 1-based inclusive). Missing keypoints are NaN.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ImageRecord:
    """One annotated image. Its key is ``(category, name)``: the same VOC file name can occur in two
    categories with different annotations."""

    category: str
    name: str  #: file stem, e.g. ``2008_002719``
    image_path: Path  #: absolute path of the source image file (JPEG or PNG)
    mask_path: Path | None  #: absolute path of the class-index segmentation PNG, if the dataset has one
    width: int  #: original width in pixels, as annotated
    height: int  #: original height in pixels, as annotated
    bbox: tuple[float, float, float, float]  #: x1, y1, x2, y2 in original pixels (NaN if none)
    keypoints: np.ndarray  #: (K, 2) float32, original pixels, NaN where the keypoint is absent
    azimuth: int = -1  #: SPair azimuth bin 0..7, -1 unknown
    pose: str = ""
    truncated: int = -1
    occluded: int = -1
    difficult: int = -1
    depth: int = 3  #: channels as annotated

    @property
    def key(self) -> tuple[str, str]:
        return (self.category, self.name)


@dataclass(frozen=True)
class PairRecord:
    """One source→target pair. Its key is ``(split, pair_id)``; pair ids restart in every split."""

    split: str
    pair_id: int
    stem: str  #: the source's name for the pair (SPair file stem, e.g. ``000001-a-b:aeroplane``)
    category: str
    src: tuple[str, str]  #: image key of the source image
    trg: tuple[str, str]  #: image key of the target image
    kps_ids: np.ndarray  #: (n,) int16 keypoint slot ids, in the pair's order
    src_kps: np.ndarray  #: (n, 2) float32, original source pixels
    trg_kps: np.ndarray  #: (n, 2) float32, original target pixels
    viewpoint: int = -1  #: 0 easy, 1 medium, 2 hard; -1 unknown
    scale: int = -1  #: 0 easy, 1 medium, 2 hard; -1 unknown
    truncation: int = -1  #: 0 none, 1 source, 2 target, 3 both; -1 unknown
    occlusion: int = -1  #: 0 none, 1 source, 2 target, 3 both; -1 unknown
    mirror: int = 0
    flip: int = 0  #: PF-PASCAL training flag
    small: bool = False  #: member of the dataset's small layout


@dataclass
class DatasetRecords:
    """Everything a converter read from one dataset root, ready for the writer."""

    dataset: str  #: converter name, e.g. ``spair71k``
    root: Path
    categories: list[str]
    num_keypoints: int  #: keypoint slots per image (30 for SPair-71k)
    images: list[ImageRecord]
    pairs: dict[str, list[PairRecord]]  #: split name -> pairs in source order
    sources: list[Path]  #: every source file read (absolute), for the manifest
    notes: list[str] = field(default_factory=list)  #: things the user should hear (missing splits, ...)
    #: (size, SHA-256) of source files the converter hashed as it parsed them, by POSIX path relative to
    #: ``root``; the writer hashes the rest.
    digests: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: category -> slot permutation under a horizontal flip (slot k of the mirrored image shows the part
    #: of slot ``perm[k]``); None where the dataset has no left/right keypoint semantics.
    keypoint_flip: dict[str, list[int]] | None = None

    def image_index(self) -> dict[tuple[str, str], int]:
        return {im.key: i for i, im in enumerate(self.images)}
