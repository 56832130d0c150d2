"""A synthetic SPair-71k, written in the dataset's native layout and byte format.

:func:`synthesize` writes ``JPEGImages/``, ``Segmentation/``, ``ImageAnnotation/``, ``PairAnnotation/``
and ``Layout/`` exactly as the real dataset lays them out (and, with ``unseen``, an SPair-U layer), so every tool that reads SPair-71k (our
converter included) can be exercised, benchmarked and demonstrated without the real data.

The images carry signal, so that matching on features beats the identity mapping. Each category has a
fixed 3D template (:mod:`converters.synth.render`): an ellipsoid body with a head, a skeleton of limbs
and a category-specific set of keypoint slots on the body's surface. Each keypoint slot is drawn as a
marker of its own (fill colour, shape, inner dot) that looks the same in every image, whatever the view.
Per image, the template is seen from one of the 8 azimuth bins (yaw, plus a little elevation and in-plane roll), at a random position
and scale, over a textured, noisy background. Some objects run off the frame (truncated: the keypoints
outside become null, the box is clipped), some are partly hidden by an occluder patch (occluded: the
keypoints under it become null), and keypoints on the far side of the body are null too.

All coordinates are original image pixels, ``(x, y)`` order: a keypoint ``[x, y]`` is the pixel at
column ``x``, row ``y`` on which its marker is centred; boxes are VOC ``[x1, y1, x2, y2]``, 1-based
inclusive, the extent of the object's visible pixels (those of the segmentation mask).

Output is a pure function of the arguments: the same seed gives the same bytes (fixed JPEG quality,
no timestamps, no dependence on the order files are written in).
"""
from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from converters.spair71k import CATEGORIES, NUM_KEYPOINTS, SPLITS, pair_annotation
from converters.voc import CLASS_INDEX, palette

from .render import SynthSummary, check_args, jpeg, place, stable_seed, template, view

__all__ = ["SynthSummary", "synthesize", "MIN_IMAGES_PER_CATEGORY", "MAX_IMAGES_PER_CATEGORY"]

#: Fewest images per category: every split needs two images to hold a pair.
MIN_IMAGES_PER_CATEGORY = 6
#: Most images per category (the VOC-like name space must stay far from exhausted).
MAX_IMAGES_PER_CATEGORY = 1000

#: Share of a category's images in val and test (the rest is trn); 100 images give 55 / 18 / 27.
_SPLIT_SHARE = {"val": 0.18, "test": 0.27}
#: Share of a split's pairs listed in Layout/small (real: 10,652 of 53,340 trn, about 20 %).
_SMALL_SHARE = 0.2
#: The real dataset has 23 names shared by two categories among 1,800 images.
_DUPLICATE_RATE = 23 / 1800
_YEARS = (2007, 2008, 2009, 2010, 2011)
_YEAR_WEIGHTS = (0.1, 0.3, 0.25, 0.25, 0.1)

#: Keypoint slots used per category: the real dataset's counts, capped at 20 so markers stay apart.
_NUM_SLOTS = {
    "aeroplane": 20, "bicycle": 12, "bird": 17, "boat": 14, "bottle": 10, "bus": 20, "car": 20,
    "cat": 15, "chair": 14, "cow": 20, "dog": 16, "horse": 20, "motorbike": 13, "person": 20,
    "pottedplant": 9, "sheep": 20, "train": 18, "tvmonitor": 16,
}
#: pose string of each azimuth bin when the pose is specified (as in the real annotations).
_POSE_OF_AZIMUTH = ("Frontal", "Left", "Left", "Rear", "Rear", "Right", "Right", "Frontal")
_P_UNSPECIFIED = 0.35
_P_TRUNCATED = 0.22
_P_OCCLUDED = 0.2
_P_DIFFICULT = 0.01
_MIN_VISIBLE = 3


def _render(category: str, name: str, year: int, seed: int) -> tuple[bytes, bytes, dict[str, Any]]:
    """Draw one image; returns (JPEG bytes, mask PNG bytes, ImageAnnotation dict)."""
    tpl = template(category, _NUM_SLOTS[category])
    rng = np.random.default_rng(stable_seed("image", seed, category, name))
    if rng.random() < 0.7:  # landscape, like most VOC photos
        w, h = 500, int(rng.integers(280, 401))
    else:
        w, h = int(rng.integers(300, 401)), 500
    azimuth = int(rng.integers(8))
    # Bins are 45 degrees wide and centred on multiples of 45 (bin 0 = frontal).
    v = view(tpl, rng, w, h, math.radians(azimuth * 45 + rng.uniform(-18, 18)))
    difficult = int(rng.random() < _P_DIFFICULT)
    pose = "Unspecified" if rng.random() < _P_UNSPECIFIED else _POSE_OF_AZIMUTH[azimuth]
    drawn = place(v, rng, CLASS_INDEX[category], _P_TRUNCATED, _P_OCCLUDED, _MIN_VISIBLE)
    mask_p = Image.frombytes("P", drawn.mask.size, drawn.mask.tobytes())
    mask_p.putpalette(palette())
    png = io.BytesIO()
    mask_p.save(png, "PNG")

    x0, y0, x1, y1 = drawn.mask.getbbox()  # exclusive right/bottom, 0-based
    kps: dict[str, list[int] | None] = {str(s): None for s in range(NUM_KEYPOINTS)}
    for i, slot in enumerate(tpl.slots):
        if drawn.visible[i]:
            kps[str(slot)] = [int(drawn.keypoints[i, 0]), int(drawn.keypoints[i, 1])]
    ann = {
        "filename": f"{name}.jpg",
        "src_database": f"The VOC{year} Database",
        "src_annotation": f"PASCAL VOC{year}",
        "src_image": "flickr",
        "image_width": w,
        "image_height": h,
        "image_depth": 3,
        "category": category,
        "pose": pose,
        "truncated": drawn.truncated,
        "occluded": drawn.occluded,
        "difficult": difficult,
        "bndbox": [x0 + 1, y0 + 1, x1, y1],  # VOC: 1-based, inclusive
        "kps": kps,
        "azimuth_id": azimuth,
    }
    return jpeg(drawn.image), png.getvalue(), ann


def _names(categories: Sequence[str], n: int, seed: int) -> dict[str, list[tuple[str, int]]]:
    """VOC-like (name, year) per category: unique within a category; a few names shared by two
    categories, like the real dataset's 23, because image keys are (category, name)."""
    rng = np.random.default_rng(stable_seed("names", seed))
    total = n * len(categories)
    # Draw all names without replacement from a 5-year x 8999-number space: no accidental clashes.
    per_year = 8999
    p = np.repeat(np.asarray(_YEAR_WEIGHTS) / per_year, per_year)
    picks = rng.choice(len(_YEARS) * per_year, size=total, replace=False, p=p / p.sum())
    chosen = [(_YEARS[int(i) // per_year], int(i) % per_year + 1) for i in picks]
    out = {c: [(f"{y}_{num:06d}", y) for y, num in chosen[i * n:(i + 1) * n]] for i, c in enumerate(categories)}
    if len(categories) >= 2:
        shared: set[str] = set()
        for _ in range(max(1, round(total * _DUPLICATE_RATE))):
            a, b = (categories[int(i)] for i in rng.choice(len(categories), 2, replace=False))
            free_a = [e for e in out[a] if e[0] not in shared]
            slots_b = [i for i, e in enumerate(out[b]) if e[0] not in shared]
            if not free_a or not slots_b:
                continue
            entry = free_a[int(rng.integers(len(free_a)))]
            out[b][slots_b[int(rng.integers(len(slots_b)))]] = entry
            shared.add(entry[0])
    return out


def _split_sizes(n: int) -> dict[str, int]:
    val = max(2, round(n * _SPLIT_SHARE["val"]))
    test = max(2, round(n * _SPLIT_SHARE["test"]))
    return {"trn": n - val - test, "val": val, "test": test}


#: SPair-U-like new keypoints: new slot i is the midpoint of the template's slots i and i + 2 (a point
#: on the object between two known parts, where neither existing slot is), visible when both are.
_UNSEEN = 6


def unseen_annotation(ann: dict[str, Any]) -> dict[str, Any]:
    """The ExtraImageAnnotation of an image: its annotation with ``kps`` replaced by :data:`_UNSEEN` new
    points (slot i = the midpoint of slots i and i + 2, rounded to whole pixels; null unless both shown)."""
    kps: dict[str, Any] = {str(k): None for k in range(NUM_KEYPOINTS)}
    for i in range(_UNSEEN):
        a, b = ann["kps"][str(i)], ann["kps"][str(i + 2)]
        if a is not None and b is not None:
            kps[str(i)] = [round((a[0] + b[0]) / 2), round((a[1] + b[1]) / 2)]
    return {**ann, "kps": kps}


def synthesize(out_dir: str | Path, images_per_category: int = 12, categories: Sequence[str] | None = None,
               seed: int = 0, progress: bool = False, unseen: bool = False) -> SynthSummary:
    """Write a synthetic SPair-71k into ``out_dir`` (created; must not exist or be empty).

    ``images_per_category`` images for each of ``categories`` (default all 18; written in the dataset's
    sorted order whatever order is given). The default (12) takes a few seconds; 100 gives the real
    dataset's scale (1,800 images, about 71k pairs).

    Splits are image-disjoint, about 55 / 18 / 27 % of each category's images in trn / val / test.
    Pairs are every ordered pair of distinct images of a category within a split that share at least
    one visible keypoint, both directions. Pair ids follow the real dataset's numbering, found on the
    real files: in each split a counter runs over all ordered (source, target) candidates, category by
    category (sorted), sources then targets in name order, starting at 0; self-pairs take an id,
    pairs without a common keypoint take none. Ids therefore start at 1 and have a gap at every
    self-pair.

    ``unseen`` also writes an SPair-U layer: ``ExtraImageAnnotation/<cat>/<name>.json`` for every image
    (:func:`unseen_annotation`) and ``ExtraPairAnnotation/test/<stem>.json`` for each test pair whose
    images share a new keypoint, built by the dataset's pair rule with the pair's own id and stem.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    cats = check_args(out_dir, images_per_category, categories, seed, CATEGORIES, MIN_IMAGES_PER_CATEGORY,
                      MAX_IMAGES_PER_CATEGORY, "two images per split")
    n = int(images_per_category)
    names = _names(cats, n, int(seed))

    out_dir.mkdir(parents=True, exist_ok=True)
    for sub in ("JPEGImages", "Segmentation", "ImageAnnotation"):
        for c in cats:
            (out_dir / sub / c).mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (out_dir / "PairAnnotation" / split).mkdir(parents=True, exist_ok=True)
    for layout in ("large", "small"):
        (out_dir / "Layout" / layout).mkdir(parents=True, exist_ok=True)

    anns: dict[tuple[str, str], dict[str, Any]] = {}
    bar = tqdm(total=n * len(cats), desc="synth images", unit="img", disable=not progress)
    for c in cats:
        for name, year in names[c]:
            jpg, png, ann = _render(c, name, year, int(seed))
            (out_dir / "JPEGImages" / c / f"{name}.jpg").write_bytes(jpg)
            (out_dir / "Segmentation" / c / f"{name}.png").write_bytes(png)
            (out_dir / "ImageAnnotation" / c / f"{name}.json").write_text(json.dumps(ann), encoding="ascii")
            anns[(c, name)] = ann
            if unseen:
                extra = out_dir / "ExtraImageAnnotation" / c
                extra.mkdir(parents=True, exist_ok=True)
                (extra / f"{name}.json").write_text(json.dumps(unseen_annotation(ann)), encoding="ascii")
            bar.update()
    bar.close()

    # Image-disjoint splits: a seeded shuffle of each category's images.
    sizes = _split_sizes(n)
    members: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
    for c in cats:
        order = [names[c][int(i)][0] for i in np.random.default_rng(stable_seed("split", seed, c)).permutation(n)]
        at = 0
        for s in SPLITS:
            members[s][c] = sorted(order[at:at + sizes[s]])
            at += sizes[s]

    # Visible keypoint slots as bit sets: a pair exists when the two sets intersect.
    bits = {key: sum(1 << int(k) for k, v in a["kps"].items() if v is not None) for key, a in anns.items()}
    counts: dict[str, int] = {}
    total_candidates = sum(len(members[s][c]) ** 2 for s in SPLITS for c in cats)
    bar = tqdm(total=total_candidates, desc="synth pairs", unit="pair", disable=not progress)
    for split in SPLITS:
        pair_dir = out_dir / "PairAnnotation" / split
        stems: list[str] = []
        next_id = 0
        for c in cats:
            imgs = members[split][c]
            for a in imgs:
                for b in imgs:
                    if a == b:
                        next_id += 1  # the real data spends an id on every self-pair
                    elif bits[(c, a)] & bits[(c, b)]:
                        pair = pair_annotation(anns[(c, a)], anns[(c, b)], next_id)
                        next_id += 1
                        (pair_dir / f"{pair['filename']}.json").write_text(json.dumps(pair), encoding="ascii")
                        stems.append(pair["filename"])
                        if unseen and split == "test":
                            _write_unseen_pair(out_dir, anns[(c, a)], anns[(c, b)], pair)
                bar.update(len(imgs))
        # Layout files end every line with "\n", the last included, as the real ones do.
        (out_dir / "Layout" / "large" / f"{split}.txt").write_text("".join(s + "\n" for s in stems))
        pick = np.random.default_rng(stable_seed("small", seed, split)).random(len(stems)) < _SMALL_SHARE
        (out_dir / "Layout" / "small" / f"{split}.txt").write_text(
            "".join(s + "\n" for s, p in zip(stems, pick) if p))
        counts[split] = len(stems)
    bar.close()
    return SynthSummary(out_dir=out_dir, images=len(anns), pairs=counts, seconds=time.perf_counter() - start)


def _write_unseen_pair(out_dir: Path, src: dict[str, Any], trg: dict[str, Any], pair: dict[str, Any]) -> None:
    """SPair-U's file for ``pair`` (same id and stem) where its images share a new keypoint."""
    extra = pair_annotation(unseen_annotation(src), unseen_annotation(trg), pair["pair_id"])
    if extra["kps_ids"]:
        folder = out_dir / "ExtraPairAnnotation" / "test"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{pair['filename']}.json").write_text(json.dumps(extra), encoding="ascii")
