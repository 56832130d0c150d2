"""SPair-71k (Min, Lee, Ponce, Cho 2019) in its native layout.

::

    JPEGImages/<cat>/<name>.jpg          Segmentation/<cat>/<name>.png (VOC class indices)
    ImageAnnotation/<cat>/<name>.json    PairAnnotation/{trn,val,test}/<pair stem>.json
    Layout/{large,small}/{trn,val,test}.txt

This module knows the file formats and the dataset's own rules (difficulty labels, pair files); it
reads a root into :class:`~spairstore.records.DatasetRecords` and validates as it goes, naming the file
at fault. Nothing else in spairstore parses SPair files.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from spairstore.errors import SourceError
from spairstore.manifest import sha256_bytes
from spairstore.records import DatasetRecords, ImageRecord, PairRecord

NAME = "spair71k"
CATEGORIES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor",
)
#: PASCAL VOC class index of each category, as written in the Segmentation PNGs.
VOC_CLASS_INDEX = {
    "aeroplane": 1, "bicycle": 2, "bird": 3, "boat": 4, "bottle": 5, "bus": 6, "car": 7, "cat": 8,
    "chair": 9, "cow": 10, "diningtable": 11, "dog": 12, "horse": 13, "motorbike": 14, "person": 15,
    "pottedplant": 16, "sheep": 17, "sofa": 18, "train": 19, "tvmonitor": 20,
}
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


def pair_stem(pair_id: int, src_name: str, trg_name: str, category: str) -> str:
    return f"{pair_id:06d}-{src_name}-{trg_name}:{category}"


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
def detect(root: Path) -> bool:
    """True when ``root`` looks like a SPair-71k root."""
    return (root / "ImageAnnotation").is_dir() and (root / "PairAnnotation").is_dir()


def _load_json(path: Path | str, rel: Path | str, digests: dict[str, tuple[int, str]]) -> dict[str, Any]:
    """Parse a JSON object, recording the size and SHA-256 of the very bytes parsed for the manifest."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        digests[str(rel)] = (len(raw), sha256_bytes(raw))
        data = json.loads(raw)
    except FileNotFoundError:
        raise SourceError(rel, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(rel, f"malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise SourceError(rel, "expected a JSON object")
    return data


def _require(data: Mapping[str, Any], keys: Iterable[str], rel: Path | str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise SourceError(rel, f"missing key(s) {', '.join(missing)}")


def _int(value: Any, what: str, rel: Path | str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SourceError(rel, f"{what} must be an integer, got {value!r}")
    return value


def _points(value: Any, what: str, rel: Path | str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float32).reshape(-1, 2)
    except (TypeError, ValueError):
        raise SourceError(rel, f"{what} must be a list of [x, y] points") from None
    return arr


def _bbox(value: Any, what: str, rel: Path | str) -> tuple[float, float, float, float]:
    if not isinstance(value, list) or len(value) != 4 or not all(isinstance(v, (int, float)) for v in value):
        raise SourceError(rel, f"{what} must be [x1, y1, x2, y2], got {value!r}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _read_image(root: Path, category: str, ann_path: Path, has_masks: bool,
                digests: dict[str, tuple[int, str]]) -> ImageRecord:
    rel = ann_path.relative_to(root).as_posix()
    ann = _load_json(ann_path, rel, digests)
    _require(ann, IMAGE_KEYS, rel)
    if ann["category"] != category:
        raise SourceError(rel, f"category {ann['category']!r} does not match its folder {category!r}")
    name = _stem(ann["filename"])
    if name != ann_path.stem:
        raise SourceError(rel, f"filename {ann['filename']!r} does not match the annotation file name")
    kps = ann["kps"]
    if not isinstance(kps, dict) or set(kps) != {str(i) for i in range(NUM_KEYPOINTS)}:
        raise SourceError(rel, f"kps must be a dict with keys '0'..'{NUM_KEYPOINTS - 1}'")
    points = np.full((NUM_KEYPOINTS, 2), np.nan, dtype=np.float32)
    for k, v in kps.items():
        if v is not None:
            points[int(k)] = _points(v, f"kps[{k!r}]", rel)[0]
    image_path = root / "JPEGImages" / category / ann["filename"]
    if not image_path.is_file():
        raise SourceError(image_path.relative_to(root), f"image file not found (annotated in {rel})")
    mask_path = root / "Segmentation" / category / f"{name}.png"
    if has_masks and not mask_path.is_file():
        raise SourceError(mask_path.relative_to(root), f"segmentation mask not found (annotated in {rel})")
    return ImageRecord(
        category=category,
        name=name,
        image_path=image_path,
        mask_path=mask_path if has_masks else None,
        width=_int(ann["image_width"], "image_width", rel),
        height=_int(ann["image_height"], "image_height", rel),
        bbox=_bbox(ann["bndbox"], "bndbox", rel),
        keypoints=points,
        azimuth=_int(ann["azimuth_id"], "azimuth_id", rel),
        pose=str(ann["pose"]),
        truncated=_int(ann["truncated"], "truncated", rel),
        occluded=_int(ann["occluded"], "occluded", rel),
        difficult=_int(ann["difficult"], "difficult", rel),
        depth=_int(ann["image_depth"], "image_depth", rel),
    )


def _read_layout(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _stem(filename: Any) -> str:
    return str(filename).rsplit(".", 1)[0]


def _read_pair(
    root: Path, split: str, stem: str, index: Mapping[tuple[str, str], ImageRecord], small: set[str],
    digests: dict[str, tuple[int, str]],
) -> PairRecord:
    # 71k of these per pack: plain strings here, pathlib's overhead would dominate the parse.
    rel = f"PairAnnotation/{split}/{stem}.json"
    ann = _load_json(f"{root}/{rel}", rel, digests)
    _require(ann, PAIR_KEYS, rel)
    category = ann["category"]
    if category not in CATEGORIES:
        raise SourceError(rel, f"unknown category {category!r}")
    keys = []
    for side in ("src", "trg"):
        key = (category, _stem(ann[f"{side}_imname"]))
        image = index.get(key)
        if image is None:
            raise SourceError(rel, f"{side}_imname {ann[f'{side}_imname']!r} names no image annotation "
                                   f"in ImageAnnotation/{category}/")
        size = ann[f"{side}_imsize"]
        if list(size[:2]) != [image.width, image.height]:
            raise SourceError(rel, f"{side}_imsize {size} disagrees with the image annotation "
                                   f"({image.width}x{image.height})")
        keys.append(key)
    ids = ann["kps_ids"]
    if not isinstance(ids, list) or not all(isinstance(i, str) and i.isdigit() for i in ids):
        raise SourceError(rel, "kps_ids must be a list of keypoint id strings")
    kps_ids = np.array([int(i) for i in ids], dtype=np.int16)
    if kps_ids.size and kps_ids.max() >= NUM_KEYPOINTS:
        raise SourceError(rel, f"kps_ids {ids} name a keypoint id >= {NUM_KEYPOINTS}")
    src_kps = _points(ann["src_kps"], "src_kps", rel)
    trg_kps = _points(ann["trg_kps"], "trg_kps", rel)
    if not (len(src_kps) == len(trg_kps) == len(kps_ids)):
        raise SourceError(rel, f"{len(kps_ids)} kps_ids but {len(src_kps)} src_kps and {len(trg_kps)} trg_kps")
    return PairRecord(
        split=split,
        pair_id=_int(ann["pair_id"], "pair_id", rel),
        stem=stem,
        category=category,
        src=keys[0],
        trg=keys[1],
        kps_ids=kps_ids,
        src_kps=src_kps,
        trg_kps=trg_kps,
        viewpoint=_int(ann["viewpoint_variation"], "viewpoint_variation", rel),
        scale=_int(ann["scale_variation"], "scale_variation", rel),
        truncation=_int(ann["truncation"], "truncation", rel),
        occlusion=_int(ann["occlusion"], "occlusion", rel),
        mirror=_int(ann["mirror"], "mirror", rel),
        small=stem in small,
    )


def read(root: Path, progress: Callable[[Iterable[Any], str, int], Iterable[Any]] | None = None) -> DatasetRecords:
    """Read a SPair-71k root into canonical records.

    Pairs of a split are the files its ``Layout/large/<split>.txt`` lists, in that order (all files of
    ``PairAnnotation/<split>/`` sorted by pair id where the layout is absent). Splits whose
    ``PairAnnotation`` folder is absent are skipped and named in ``notes``.

    ``progress(iterable, description, total)`` wraps the long loops (e.g. a tqdm bar).
    """
    root = Path(root).resolve()
    wrap = progress or (lambda it, desc, total: it)
    if not detect(root):
        raise SourceError(root, "not a SPair-71k root (needs ImageAnnotation/ and PairAnnotation/)")
    notes: list[str] = []
    sources: list[Path] = []
    digests: dict[str, tuple[int, str]] = {}
    has_masks = (root / "Segmentation").is_dir()
    if not has_masks:
        notes.append("no Segmentation/ folder: the store has no masks")

    ann_dir = root / "ImageAnnotation"
    unknown = sorted(p.name for p in ann_dir.iterdir() if p.is_dir() and p.name not in CATEGORIES)
    if unknown:
        raise SourceError(ann_dir.relative_to(root) / unknown[0], "unknown category folder")
    categories = [c for c in CATEGORIES if (ann_dir / c).is_dir()]
    ann_files = [p for c in categories for p in sorted((ann_dir / c).glob("*.json"))]
    images = [
        _read_image(root, p.parent.name, p, has_masks, digests)
        for p in wrap(ann_files, "image annotations", len(ann_files))
    ]
    sources += ann_files
    index = {im.key: im for im in images}

    pairs: dict[str, list[PairRecord]] = {}
    for split in SPLITS:
        split_dir = root / "PairAnnotation" / split
        if not split_dir.is_dir():
            notes.append(f"split {split!r} absent (no PairAnnotation/{split}/): not packed")
            continue
        layout_path = root / "Layout" / "large" / f"{split}.txt"
        present = {f[:-5] for f in os.listdir(split_dir) if f.endswith(".json")}
        stems = _read_layout(layout_path)
        if stems is None:
            stems = sorted(present, key=lambda s: (int(s.split("-", 1)[0]), s))
        else:
            sources.append(layout_path)
            for s in stems:
                if s not in present:
                    raise SourceError(layout_path.relative_to(root), f"line {s!r} names no file in PairAnnotation/{split}/")
        small_path = root / "Layout" / "small" / f"{split}.txt"
        small_stems = _read_layout(small_path)
        if small_stems is not None:
            sources.append(small_path)
        small = set(small_stems or ())
        recs = [_read_pair(root, split, st, index, small, digests) for st in wrap(stems, f"{split} pairs", len(stems))]
        seen: dict[int, str] = {}
        for r in recs:
            if r.pair_id in seen:
                raise SourceError(Path("PairAnnotation") / split / f"{r.stem}.json",
                                  f"duplicate pair_id {r.pair_id} (also in {seen[r.pair_id]}.json)")
            seen[r.pair_id] = r.stem
        pairs[split] = recs
        sources += [split_dir / f"{st}.json" for st in stems]
    if not pairs:
        raise SourceError(root / "PairAnnotation", "no split folder (trn, val, test) found")
    sources += [im.image_path for im in images]
    sources += [im.mask_path for im in images if im.mask_path is not None]
    return DatasetRecords(
        dataset=NAME, root=root, categories=categories, num_keypoints=NUM_KEYPOINTS,
        images=images, pairs=pairs, sources=sources, notes=notes, digests=digests,
        keypoint_flip={c: flip_permutation(c) for c in categories},
    )
