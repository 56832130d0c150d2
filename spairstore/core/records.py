"""Canonical records: what every converter produces and the writer consumes.

All coordinates here are in *original image pixels*, ``(x, y)`` order, exactly as the source
annotation gives them (SPair-71k bounding boxes stay VOC 1-based inclusive). Missing keypoints are NaN.
"""
from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np

from .errors import SourceError, SpairstoreError

T = TypeVar("T")
OnError = Literal["fail", "skip"]
ON_ERROR_CHOICES = ("fail", "skip")


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
    #: (K, 2) float32 keypoints of a second annotation of the image (SPair-U's unseen keypoints), original
    #: pixels, NaN absent; None where the dataset has no such layer
    extra_keypoints: np.ndarray | None = None

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
    #: index into ``DatasetRecords.subset_names`` (AP-10K: intra-species, cross-species, cross-family); -1 none
    subset: int = -1
    path: str = ""  #: the file that defines the pair, relative to the dataset root (for messages)

    @property
    def key(self) -> tuple[str, int]:
        return (self.split, self.pair_id)


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
    skipped: list[Skipped] = field(default_factory=list)  #: bad items left out (``on_error="skip"``)
    #: (size, SHA-256) of source files the converter hashed as it parsed them, by POSIX path relative to
    #: ``root``; the writer hashes the rest.
    digests: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: category -> slot permutation under a horizontal flip (slot k of the mirrored image shows the part
    #: of slot ``perm[k]``); None where the dataset has no left/right keypoint semantics.
    keypoint_flip: dict[str, list[int]] | None = None
    #: category -> groups of same-type keypoint slots (e.g. a car's four wheels; two or more slots each,
    #: the dataset's numbering): GeoAware-SC's geometry-aware subset. Empty where the dataset has none.
    keypoint_groups: dict[str, list[list[int]]] = field(default_factory=dict)
    #: grouping name -> the group of each category, in ``categories`` order (AP-10K: ``family``)
    category_groups: dict[str, list[str]] = field(default_factory=dict)
    #: names of the pair subsets ``PairRecord.subset`` indexes; empty where the dataset has none
    subset_names: list[str] = field(default_factory=list)
    #: mask values ``0..mask_classes - 1`` are the dataset's classes (255 too: VOC's void outline); other
    #: values get a note. 0: not checked.
    mask_classes: int = 0
    #: the categories ``pack --categories`` kept (of a root with more), None for all of them
    category_filter: list[str] | None = None

    def image_index(self) -> dict[tuple[str, str], int]:
        return {im.key: i for i, im in enumerate(self.images)}

    def without_images(self, bad: dict[tuple[str, str], Skipped]) -> DatasetRecords:
        """These records less the images keyed in ``bad`` and every pair using one; all of them (the
        images' reasons as given, the pairs' naming their image) are appended to ``skipped``."""
        if not bad:
            return self
        skipped = [*self.skipped, *bad.values()]
        pairs: dict[str, list[PairRecord]] = {}
        for split, recs in self.pairs.items():
            pairs[split] = []
            for p in recs:
                hit = bad.get(p.src) or bad.get(p.trg)
                if hit is None:
                    pairs[split].append(p)
                else:
                    skipped.append(Skipped("pair", f"{split}/{p.stem}", p.path or hit.path,
                                           f"uses image {hit.key}, which was skipped: {hit.reason}"))
        dropped = {im.image_path for im in self.images if im.key in bad}
        dropped |= {im.mask_path for im in self.images if im.key in bad and im.mask_path is not None}
        return replace(
            self, images=[im for im in self.images if im.key not in bad], pairs=pairs, skipped=skipped,
            sources=[p for p in self.sources if p not in dropped],
            digests={k: v for k, v in self.digests.items() if self.root / k not in dropped},
        )


def pair_list_sha256(split: str, pairs: Iterable[tuple[int, tuple[str, str], tuple[str, str]]]) -> str:
    """SHA-256 of a split's ordered pair list: one UTF-8 line ``<split>\\t<pair id>\\t<src category>/<src
    name>\\t<trg category>/<trg name>\\n`` per ``(pair_id, src key, trg key)``, in the split's order. Equal
    hashes mean the same pairs of the same images in the same order (``pair_list_sha256`` attribute)."""
    h = hashlib.sha256()
    for pair_id, (sc, sn), (tc, tn) in pairs:
        h.update(f"{split}\t{int(pair_id)}\t{sc}/{sn}\t{tc}/{tn}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Skipped:
    """A source item left out of a store because it is bad (``pack --on-error skip``)."""

    kind: str  #: ``image`` or ``pair``
    key: str  #: ``category/name`` of an image, ``split/stem`` of a pair
    path: str  #: the file at fault, relative to the dataset root
    reason: str

    def __str__(self) -> str:
        return f"{self.kind} {self.key}: {self.path}: {self.reason}"

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "key": self.key, "path": self.path, "reason": self.reason}

    @classmethod
    def from_json(cls, d: dict) -> Skipped:
        """The inverse of :meth:`to_json`, tolerant of what an untrusted store's attribute holds."""
        return cls(*(str(d.get(k, "")) for k in ("kind", "key", "path", "reason")))

    @property
    def cause(self) -> str:
        """The reason less its particulars (names, numbers, quoted values, details in parentheses), so
        that items left out for the same cause count together."""
        if "which was skipped" in self.reason:
            return "uses an image that was skipped"
        text = re.sub(r"\s*\(.*\)|'[^']*'|\"[^\"]*\"", "", self.reason)
        return re.sub(r"\s+", " ", re.sub(r"-?\d+(\.\d+)?", "N", text)).strip(" ,:")


def report_skipped(skipped: list[Skipped], every: int = 10, examples: int = 3) -> list[str]:
    """Lines saying what was left out: each item when there are at most ``every``, else a count per kind
    and cause (most frequent first) with its first ``examples`` items."""
    if len(skipped) <= every:
        return [str(s) for s in skipped]
    groups = Counter((s.kind, s.cause) for s in skipped)
    lines = []
    for (kind, cause), n in groups.most_common():
        items = [s for s in skipped if (s.kind, s.cause) == (kind, cause)]
        if n == 1:
            lines.append(str(items[0]))
            continue
        lines.append(f"{n:,} {kind}s: {cause}, e.g.")
        lines += [f"  {s}" for s in items[:examples]]
    return lines


class ErrorPolicy:
    """What a converter or the writer does with a bad source item: ``fail`` raises its
    :class:`SourceError`; ``skip`` records it in :attr:`skipped` and goes on without the item."""

    def __init__(self, on_error: OnError = "fail"):
        if on_error not in ON_ERROR_CHOICES:
            raise SpairstoreError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
        self.on_error = on_error
        self.skipped: list[Skipped] = []

    def attempt(self, kind: str, key: str, fn: Callable[[], T]) -> T | None:
        """``fn()``, or None when it raised a SourceError and the policy is to skip."""
        try:
            return fn()
        except SourceError as e:
            if self.on_error == "fail":
                raise
            self.skipped.append(Skipped(kind, key, e.path, e.reason))
            return None

    def skip(self, kind: str, key: str, error: SourceError) -> None:
        """Record a bad item found outside :meth:`attempt` (raises under ``fail``)."""
        if self.on_error == "fail":
            raise error
        self.skipped.append(Skipped(kind, key, error.path, error.reason))
