"""SPair-71k (Min, Lee, Ponce, Cho 2019) in its native layout.

::

    JPEGImages/<cat>/<name>.jpg          Segmentation/<cat>/<name>.png (VOC class indices)
    ImageAnnotation/<cat>/<name>.json    PairAnnotation/{trn,val,test}/<pair stem>.json
    Layout/{large,small}/{trn,val,test}.txt
    ExtraImageAnnotation/<cat>/<name>.json   ExtraPairAnnotation/<split>/<pair stem>.json   (SPair-U, optional)

SPair-U ("Jamais Vu", NeurIPS'25) relabels the test pairs with new keypoints in the same two formats; where
its folders are present each image's extra ``kps`` become ``images/extra_keypoints`` and the pairs of
``ExtraPairAnnotation/<split>/`` the split ``<split>-unseen`` (pair ids and stems as the files give them).

This module knows the file formats and the dataset's own rules (difficulty labels, pair files);
:class:`SPair71k` reads a root into :class:`~spairstore.core.records.DatasetRecords` and validates as it
goes, naming the file at fault. Nothing else in spairstore parses SPair files.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from spairstore.core.errors import SourceError
from spairstore.core.records import ImageRecord, PairRecord

from ._common import NUMBER, file_name, integer, keypoint_id, points, require, string
from .base import Converter, Item
from .voc import CLASSES, pair_stem

#: The 18 VOC classes of SPair-71k (all but diningtable and sofa), in the dataset's sorted order; the
#: Segmentation PNGs hold their VOC class indices (:data:`converters.voc.CLASS_INDEX`).
CATEGORIES = tuple(c for c in CLASSES if c not in ("diningtable", "sofa"))
SPLITS = ("trn", "val", "test")
NUM_KEYPOINTS = 30
#: Mirror-image keypoint slots of each category as (right, left) pairs, the object's own sides (a frontal
#: view shows the right part at the smaller x). A horizontal flip swaps the two slots of a pair; slots not
#: listed lie on the symmetry plane (nose, tail, a bottle's axis ...) and keep their id. Slot ids are the
#: real annotations' (bus leaves 8 and 9 unused, bicycle 11 and 12). Checked against the real image
#: annotations: within an image every pair puts its right part on the same side (tests/test_augment.py).
FLIP_PAIRS: dict[str, tuple[tuple[int, int], ...]] = {
    # wings, engines, tailplane, landing gear; nose, cockpit, fin and rear on the axis
    "aeroplane": ((4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17), (18, 19), (20, 21)),
    "bicycle": ((2, 3), (6, 7), (9, 10)),
    "bird": ((1, 2), (4, 5), (7, 8), (10, 11), (12, 13), (14, 15)),
    "boat": ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)),
    "bottle": ((1, 0), (3, 2), (5, 4), (7, 6), (9, 8)),
    "bus": ((0, 1), (2, 3), (5, 6), (10, 20), (11, 21), (12, 22), (13, 23), (14, 24), (15, 25), (16, 17),
            (18, 19), (26, 27), (28, 29)),
    "car": ((0, 1), (2, 3), (6, 7), (10, 20), (11, 21), (12, 22), (13, 23), (14, 24), (15, 25), (16, 17),
            (18, 19), (26, 27), (28, 29)),
    "cat": ((0, 1), (2, 3), (4, 5), (6, 7), (9, 10), (11, 12)),
    "chair": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13)),
    "cow": ((0, 1), (2, 3), (4, 5), (6, 7), (9, 10), (11, 12), (15, 16), (17, 18), (19, 20)),
    "dog": ((0, 1), (2, 3), (4, 5), (9, 10), (11, 12)),
    "horse": ((0, 1), (2, 3), (4, 5), (6, 7), (10, 11), (12, 13), (16, 17), (18, 19)),
    "motorbike": ((0, 1), (2, 3)),
    "person": ((0, 1), (2, 3), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17), (18, 19)),
    "pottedplant": ((0, 2), (4, 5), (6, 8)),
    "sheep": ((0, 1), (2, 3), (4, 5), (6, 7), (9, 10), (11, 12), (15, 16), (17, 18), (19, 20)),
    "train": ((1, 0), (3, 2), (5, 4), (7, 6), (9, 8), (11, 10), (13, 12), (15, 14), (17, 16)),
    # screen frame: outer corners/sides 0-7 and inner 8-15, clockwise from the top-left seen from the front
    "tvmonitor": ((0, 2), (6, 4), (7, 3), (8, 10), (14, 12), (15, 11)),
}
#: Same-type keypoint slots of each category (a car's four wheels, a bird's two wing tips ...), the
#: groups of GeoAware-SC's ``SPAIR_GEO_AWARE`` table (``utils/utils_geoware.py``) of two or more members,
#: in the dataset's own slot numbering (its ``11+2`` for bicycle is slot 13; bus ``8+2`` is slot 10). The
#: geometry-aware subset scores a keypoint when one of its groups shows two or more members in the target.
#: Checked against the real annotations: every slot is used, each group is closed under the flip.
GEO_AWARE_GROUPS: dict[str, tuple[tuple[int, ...], ...]] = {
    # landing gear, engines, wing tips and roots, tailplane tips and roots: left/right twins
    "aeroplane": ((4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17), (18, 19), (20, 21)),
    "bicycle": ((2, 3), (6, 7), (9, 10)),  # handles, seat-back ends, pedals
    "bird": ((1, 2), (10, 11), (12, 13), (14, 15)),  # wing tips, feet, knees, hips
    "boat": ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)),
    "bottle": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9)),  # cap, neck, shoulder, body, base: two sides each
    # mirrors, lights, plates, front fenders, wheels, rear fenders, window top and bottom corners
    "bus": ((0, 1), (2, 3, 5, 6), (4, 7), (10, 13, 20, 23), (11, 14, 21, 24), (12, 15, 22, 25), (16, 17, 26, 27),
            (18, 19, 28, 29)),
    # mirrors, lights, plates, logos, rear fenders, wheels, front fenders, window bottom and top corners
    "car": ((0, 1), (2, 3, 6, 7), (4, 8), (5, 9), (10, 13, 20, 23), (11, 14, 21, 24), (12, 15, 22, 25),
            (16, 17, 26, 27), (18, 19, 28, 29)),
    "cat": ((2, 3), (9, 10, 11, 12)),  # ears, paws
    "chair": ((0, 1), (2, 3), (4, 5, 6, 7), (8, 9), (10, 11), (12, 13)),  # cushion, legs, backrest, armrests
    "cow": ((2, 3), (9, 10, 11, 12), (15, 16, 17, 18), (19, 20)),  # ears, hooves, knees, horns
    "dog": ((2, 3), (9, 10, 11, 12)),
    "horse": ((2, 3), (10, 11, 12, 13), (16, 17, 18, 19)),
    "motorbike": ((0, 1), (2, 3)),  # mirrors, handles
    "person": ((8, 9), (10, 11), (12, 13), (14, 15), (16, 17), (18, 19)),  # shoulders ... feet
    "pottedplant": ((0, 1, 2, 3), (4, 5), (6, 8)),  # pot rim, side walls, bottom
    "sheep": ((2, 3), (9, 10, 11, 12), (15, 16, 17, 18), (19, 20)),
    "train": ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17)),
    "tvmonitor": ((0, 2, 4, 6), (1, 3, 5, 7), (8, 10, 12, 14), (9, 11, 13, 15)),  # outer/inner corners, sides
}
IMAGE_KEYS = (
    "filename", "src_database", "src_annotation", "src_image", "image_width", "image_height",
    "image_depth", "category", "pose", "truncated", "occluded", "difficult", "bndbox", "kps", "azimuth_id",
)
PAIR_KEYS = (
    "pair_id", "filename", "src_imname", "trg_imname", "src_imsize", "trg_imsize", "src_bndbox",
    "trg_bndbox", "category", "src_pose", "trg_pose", "src_kps", "trg_kps", "kps_ids", "mirror",
    "viewpoint_variation", "scale_variation", "truncation", "occlusion",
)


# ----------------------------------------------------------------------------------------------
# The dataset's rules
# ----------------------------------------------------------------------------------------------
def viewpoint_variation(src_azimuth: int, trg_azimuth: int) -> int:
    """0 easy / 1 medium / 2 hard from the circular difference d of the 8 azimuth bins
    (d <= 1, d in {2, 3}, d == 4)."""
    d = abs(src_azimuth - trg_azimuth) % 8
    d = min(d, 8 - d)
    return 0 if d <= 1 else (1 if d <= 3 else 2)


def scale_variation(src_bbox: Iterable[float], trg_bbox: Iterable[float]) -> int:
    """0 / 1 / 2 from the ratio r of the larger to the smaller bbox area (r < 2, 2 <= r < 4, r >= 4);
    areas are ``(x2 - x1) * (y2 - y1)``, as the dataset computes them."""
    a, b = ((x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in (src_bbox, trg_bbox))
    r = max(a, b) / max(min(a, b), 1e-12)
    return 0 if r < 2 else (1 if r < 4 else 2)


def flip_permutation(category: str) -> list[int]:
    """Keypoint slots under a horizontal flip: slot ``k`` of the mirrored image shows the part of slot
    ``perm[k]`` of the original (an involution over all ``NUM_KEYPOINTS`` slots)."""
    perm = list(range(NUM_KEYPOINTS))
    for right, left in FLIP_PAIRS[category]:
        perm[right], perm[left] = left, right
    return perm


def flag_pair(src_flag: int, trg_flag: int) -> int:
    """Truncation/occlusion label: 0 none, 1 source, 2 target, 3 both."""
    return int(src_flag) + 2 * int(trg_flag)


def common_keypoint_ids(src_kps: Mapping[str, Any], trg_kps: Mapping[str, Any]) -> list[str]:
    """Ids visible in both images, ascending."""
    return [k for k in sorted(src_kps, key=int) if src_kps[k] is not None and trg_kps.get(k) is not None]


def pair_annotation(src: Mapping[str, Any], trg: Mapping[str, Any], pair_id: int) -> dict[str, Any]:
    """The PairAnnotation dict the dataset derives from two ImageAnnotation dicts.

    ``json.dumps`` of the result (default separators, no trailing newline) is byte-identical to the
    real SPair-71k pair files.
    """
    ids = common_keypoint_ids(src["kps"], trg["kps"])
    category = src["category"]
    return {
        "pair_id": pair_id,
        "filename": pair_stem(pair_id, Path(src["filename"]).stem, Path(trg["filename"]).stem, category),
        "src_imname": src["filename"],
        "trg_imname": trg["filename"],
        "src_imsize": [src["image_width"], src["image_height"], src["image_depth"]],
        "trg_imsize": [trg["image_width"], trg["image_height"], trg["image_depth"]],
        "src_bndbox": src["bndbox"],
        "trg_bndbox": trg["bndbox"],
        "category": category,
        "src_pose": src["pose"],
        "trg_pose": trg["pose"],
        "src_kps": [src["kps"][k] for k in ids],
        "trg_kps": [trg["kps"][k] for k in ids],
        "kps_ids": ids,
        "mirror": 0,
        "viewpoint_variation": viewpoint_variation(src["azimuth_id"], trg["azimuth_id"]),
        "scale_variation": scale_variation(src["bndbox"], trg["bndbox"]),
        "truncation": flag_pair(src["truncated"], trg["truncated"]),
        "occlusion": flag_pair(src["occluded"], trg["occluded"]),
    }


# ----------------------------------------------------------------------------------------------
# Reading a root
# ----------------------------------------------------------------------------------------------
def _bbox(value: Any, what: str, rel: str, width: int, height: int) -> tuple[float, float, float, float]:
    """``[x1, y1, x2, y2]`` (VOC, 1-based inclusive: x2 may equal the width) inside the image."""
    if type(value) is not list or len(value) != 4 or not all(
            type(v) in NUMBER and math.isfinite(v) for v in value):
        raise SourceError(rel, f"{what} must be [x1, y1, x2, y2] numbers, got {value!r}")
    x1, y1, x2, y2 = (float(v) for v in value)
    if x1 > x2 or y1 > y2:
        raise SourceError(rel, f"{what} {value} is inverted (x1 > x2 or y1 > y2)")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise SourceError(rel, f"{what} {value} lies outside the {width}x{height} image")
    return x1, y1, x2, y2


def _stem(filename: str) -> str:
    return filename.rsplit(".", 1)[0]


class SPair71k(Converter):
    """SPair-71k in its native layout, every file it reads validated (a bad one named in the error).

    Pairs of a split are the files its ``Layout/large/<split>.txt`` lists, in that order (all files of
    ``PairAnnotation/<split>/`` sorted by pair id where the layout is absent; SPair-U's
    ``ExtraPairAnnotation/<split>/`` always so, as split ``<split>-unseen``); a pair is in the small
    layout when ``Layout/small/<split>.txt`` lists it. Splits whose ``PairAnnotation`` folder is absent
    are left out and named in the notes; so is a missing ``Segmentation/`` (the store then has no masks).
    """

    mask_classes = len(CLASSES) + 1  # Segmentation PNGs hold VOC class indices, 0 the background

    name = "spair71k"
    title = "SPair-71k"
    layout = ("ImageAnnotation/<category>/<name>.json", "PairAnnotation/")
    num_keypoints = NUM_KEYPOINTS

    def image_items(self) -> list[Item[ImageRecord]]:
        self.has_masks = (self.root / "Segmentation").is_dir()
        self.has_extra = (self.root / "ExtraImageAnnotation").is_dir()
        if not self.has_masks:
            self.notes.append("no Segmentation/ folder: the store has no masks")
        ann_dir = self.root / "ImageAnnotation"
        for folder in sorted(p for p in ann_dir.iterdir() if p.is_dir() and p.name not in CATEGORIES):
            error = SourceError(self.rel(folder), "unknown category folder")
            if self.policy.on_error == "fail":
                raise error
            for p in sorted(folder.glob("*.json")):
                self.policy.skip("image", f"{folder.name}/{p.stem}", SourceError(self.rel(p), error.reason))
        self.categories = [c for c in CATEGORIES if (ann_dir / c).is_dir()]
        return [Item(f"{c}/{p.stem}", partial(self._read_image, c, p), self.rel(p))
                for c in self.categories for p in sorted((ann_dir / c).glob("*.json"))]

    def keypoint_flip(self) -> dict[str, list[int]]:
        return {c: flip_permutation(c) for c in self.categories}

    def keypoint_groups(self) -> dict[str, list[list[int]]]:
        return {c: [list(g) for g in GEO_AWARE_GROUPS[c]] for c in self.categories}

    def _read_image(self, category: str, ann_path: Path) -> ImageRecord:
        root, rel = self.root, self.rel(ann_path)
        ann = self.load_json(rel)
        require(ann, IMAGE_KEYS, rel)
        if ann["category"] != category:
            raise SourceError(rel, f"category {ann['category']!r} does not match its folder {category!r}")
        filename = file_name(ann["filename"], "filename", rel)
        name = _stem(filename)
        if name != ann_path.stem:
            raise SourceError(rel, f"filename {filename!r} does not match the annotation file name")
        width = integer(ann["image_width"], "image_width", rel, lo=1)
        height = integer(ann["image_height"], "image_height", rel, lo=1)
        pts = self._keypoints(ann["kps"], rel, width, height)
        extra = None
        extra_path = root / "ExtraImageAnnotation" / category / ann_path.name
        if self.has_extra and extra_path.is_file():
            extra_rel = self.rel(extra_path)
            extra_ann = self.load_json(extra_rel)
            require(extra_ann, ("kps",), extra_rel)
            extra = self._keypoints(extra_ann["kps"], extra_rel, width, height)
        image_path = root / "JPEGImages" / category / filename
        if not image_path.is_file():
            raise SourceError(self.rel(image_path), f"image file not found (annotated in {rel})")
        mask_path = root / "Segmentation" / category / f"{name}.png"
        if self.has_masks and not mask_path.is_file():
            raise SourceError(self.rel(mask_path), f"segmentation mask not found (annotated in {rel})")
        return ImageRecord(
            category=category,
            name=name,
            image_path=image_path,
            mask_path=mask_path if self.has_masks else None,
            width=width,
            height=height,
            bbox=_bbox(ann["bndbox"], "bndbox", rel, width, height),
            keypoints=pts,
            azimuth=integer(ann["azimuth_id"], "azimuth_id", rel, 0, 7),
            pose=string(ann["pose"], "pose", rel),
            truncated=integer(ann["truncated"], "truncated", rel, 0, 1),
            occluded=integer(ann["occluded"], "occluded", rel, 0, 1),
            difficult=integer(ann["difficult"], "difficult", rel, 0, 1),
            depth=integer(ann["image_depth"], "image_depth", rel, lo=1),
            extra_keypoints=extra,
        )

    def _keypoints(self, kps: Any, rel: str, width: int, height: int) -> np.ndarray:
        """A ``kps`` dict (``"0".."29"`` -> ``[x, y]`` or null) as (30, 2) float32 original pixels, NaN absent."""
        if not isinstance(kps, dict) or set(kps) != {str(i) for i in range(NUM_KEYPOINTS)}:
            raise SourceError(rel, f"kps must be a dict with keys '0'..'{NUM_KEYPOINTS - 1}'")
        pts = np.full((NUM_KEYPOINTS, 2), np.nan, dtype=np.float32)
        shown = [int(k) for k, v in kps.items() if v is not None]
        pts[shown] = points([kps[str(k)] for k in shown], "kps", rel, width, height, self.remark)
        return pts

    def _read_layout(self, path: Path) -> list[str] | None:
        if not path.is_file():
            return None
        self.inside(path)
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM, as Windows editors write, is not a stem
        except (OSError, UnicodeDecodeError) as e:
            raise SourceError(self.rel(path), f"unreadable layout file ({e})") from None
        return [line.strip() for line in text.splitlines() if line.strip()]

    def _pair_stems(self, split: str, folder: str = "PairAnnotation") -> tuple[list[str], Path | None]:
        """The pair file stems of a split, in Layout order (by pair id without a layout or for SPair-U's
        ``ExtraPairAnnotation``), and the layout file."""
        split_dir = self.root / folder / split
        layout_path = self.root / "Layout" / "large" / f"{split}.txt"
        present = {f[:-5] for f in os.listdir(split_dir) if f.endswith(".json")}
        stems = self._read_layout(layout_path) if folder == "PairAnnotation" else None
        if stems is None:
            return sorted(present, key=lambda s: (int(s.split("-", 1)[0]), s)), None
        layout_rel = self.rel(layout_path)
        kept = []
        for stem in stems:
            if self.policy.attempt("pair", f"{split}/{stem}",
                                   lambda: file_name(stem, f"line {stem!r}", layout_rel)) is None:
                continue
            if stem in present:
                kept.append(stem)
            else:
                self.policy.skip("pair", f"{split}/{stem}", SourceError(
                    layout_rel, f"line {stem!r} names no file in PairAnnotation/{split}/"))
        return kept, layout_path

    def pair_items(self) -> Iterator[tuple[str, list[Item[PairRecord]]]]:
        found = False
        for split in SPLITS:
            if not (self.root / "PairAnnotation" / split).is_dir():
                self.notes.append(f"split {split!r} absent (no PairAnnotation/{split}/): not packed")
                continue
            found = True
            stems, layout_path = self._pair_stems(split)
            small_path = self.root / "Layout" / "small" / f"{split}.txt"
            small_stems = self._read_layout(small_path)
            self.sources += [p for p in (layout_path, small_path if small_stems is not None else None) if p is not None]
            small = set(small_stems or ())
            yield split, [Item(f"{split}/{stem}", partial(self._read_pair, split, stem, small),
                               f"PairAnnotation/{split}/{stem}.json") for stem in stems]
        for split in SPLITS:  # SPair-U: the same images relabelled, pairs in files of the same format
            if (self.root / "ExtraPairAnnotation" / split).is_dir():
                stems, _ = self._pair_stems(split, "ExtraPairAnnotation")
                name = f"{split}-unseen"
                folder = f"ExtraPairAnnotation/{split}"
                yield name, [Item(f"{name}/{stem}", partial(self._read_pair, name, stem, set(), folder),
                                  f"{folder}/{stem}.json") for stem in stems]
        if not found:
            raise SourceError(self.rel(self.root / "PairAnnotation"), "no split folder (trn, val, test) found")

    def _read_pair(self, split: str, stem: str, small: set[str], folder: str | None = None) -> PairRecord:
        # 71k of these per pack: plain strings, no pathlib
        rel = f"{folder or 'PairAnnotation/' + split}/{stem}.json"
        ann = self.load_json(rel)
        require(ann, PAIR_KEYS, rel)
        category = ann["category"]
        if category not in CATEGORIES:
            raise SourceError(rel, f"unknown category {category!r}")
        images = []
        for side in ("src", "trg"):
            name = _stem(file_name(ann[f"{side}_imname"], f"{side}_imname", rel))
            image = self.images.get((category, name))
            if image is None:
                why = self.skipped_images.get(f"{category}/{name}")
                raise SourceError(rel, f"{side}_imname {ann[f'{side}_imname']!r} names "
                                       + (f"image {category}/{name}, which was skipped: {why.reason}" if why else
                                          f"no image annotation in ImageAnnotation/{category}/"))
            size = ann[f"{side}_imsize"]
            if not isinstance(size, list) or len(size) != 3 or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in size):
                raise SourceError(rel, f"{side}_imsize must be [width, height, depth] integers, got {size!r}")
            if size[:2] != [image.width, image.height]:
                raise SourceError(rel, f"{side}_imsize {size} disagrees with the image annotation "
                                       f"({image.width}x{image.height})")
            if ann[f"{side}_bndbox"] != list(image.bbox):  # equal to the checked image bbox: valid
                _bbox(ann[f"{side}_bndbox"], f"{side}_bndbox", rel, image.width, image.height)
            images.append(image)
        ids = ann["kps_ids"]
        if not isinstance(ids, list):
            raise SourceError(rel, f"kps_ids must be a list of keypoint id strings, got {ids!r:.40}")
        kps_ids = np.array([keypoint_id(i, "kps_ids", rel, NUM_KEYPOINTS) for i in ids], dtype=np.int16)
        if len(set(kps_ids.tolist())) < len(kps_ids):
            self.remark("pairs that list a keypoint id twice (kept as annotated)", rel)
        if images[0].key == images[1].key:
            self.remark("pairs of an image with itself (kept)", rel)
        src_kps = points(ann["src_kps"], "src_kps", rel, images[0].width, images[0].height, self.remark)
        trg_kps = points(ann["trg_kps"], "trg_kps", rel, images[1].width, images[1].height, self.remark)
        if not (len(src_kps) == len(trg_kps) == len(kps_ids)):
            raise SourceError(rel, f"{len(kps_ids)} kps_ids but {len(src_kps)} src_kps and {len(trg_kps)} trg_kps")
        return PairRecord(
            split=split,
            pair_id=integer(ann["pair_id"], "pair_id", rel, lo=0),
            stem=stem,
            category=category,
            src=images[0].key,
            trg=images[1].key,
            kps_ids=kps_ids,
            src_kps=src_kps,
            trg_kps=trg_kps,
            viewpoint=integer(ann["viewpoint_variation"], "viewpoint_variation", rel, 0, 2),
            scale=integer(ann["scale_variation"], "scale_variation", rel, 0, 2),
            truncation=integer(ann["truncation"], "truncation", rel, 0, 3),
            occlusion=integer(ann["occlusion"], "occlusion", rel, 0, 3),
            mirror=integer(ann["mirror"], "mirror", rel, 0, 1),
            small=stem in small,
            path=rel,
        )
