"""A synthetic AP-10K correspondence benchmark, in the layout GeoAware-SC writes (see :mod:`converters.ap10k`).

:func:`synthesize` writes ``ImageAnnotation/<family>/<species>/<id>.json`` (one animal per image, COCO
style: ``width``, ``height``, ``bbox`` ``[x, y, w, h]``, ``keypoints`` ``[x1, y1, v1, ...]`` over AP-10K's
17 keypoints, ``num_keypoints``, ``iscrowd``), ``JPEGImages/<family>/<species>/<id>.jpg`` and the pair
files of every subset, ``PairAnnotation/<split>[_cross_species|_cross_family]/<src>-<trg>:<suffix>.json``
holding ``src_json_path`` / ``trg_json_path`` as GeoAware-SC wrote them (``data/ap-10k/ImageAnnotation/...``).

Images are drawn with :mod:`converters.synth.render`: each species is an object template of its own, and
each of the 17 keypoint slots a marker that looks the same in every species, so nearest-neighbour
matching on features beats the identity mapping within and across species. Visibility is AP-10K's:
``v = 2`` for a keypoint that shows (facing the camera, in the frame, not under an occluder), else
``v = 0`` with ``x = y = 0``. A few images are crowd images (``iscrowd`` 1) and a few show fewer than 3
keypoints, so the benchmark's exclusions have something to leave out. The pair list is made by the
benchmark's own rules (:func:`converters.ap10k.benchmark_pairs`) over the images it keeps.

All coordinates are original image pixels, ``(x, y)``: a keypoint is the pixel its marker is centred
on. Output is a pure function of the arguments: the same seed gives the same bytes.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from converters.ap10k import NUM_KEYPOINTS, SUBSET_FOLDERS, benchmark_pairs

from .render import SynthSummary, check_args, jpeg, place, stable_seed, template, view

#: The families and species written: a few of AP-10K's own (23 families, 54 species), among them a
#: family of one species (no cross-species pairs) and a species name with a space.
FAMILIES: dict[str, tuple[str, ...]] = {
    "Bovidae": ("argali sheep", "cow"),
    "Canidae": ("dog", "fox", "wolf"),
    "Felidae": ("cat", "lion"),
    "Hippopotamidae": ("hippo",),
}
SPECIES = tuple(sorted(s for group in FAMILIES.values() for s in group))
FAMILY_OF = {s: f for f, group in FAMILIES.items() for s in group}
#: Written unless ``categories`` says otherwise: three families, one of them of a single species.
DEFAULT_SPECIES = ("cat", "dog", "fox", "hippo", "lion")
#: Fewest images per species (a split needs two kept images to hold a pair); most (ids stay sparse).
MIN_IMAGES_PER_SPECIES = 6
MAX_IMAGES_PER_SPECIES = 2000
#: Shares of each species' images left out by the benchmark's rules: crowd, and fewer than 3 keypoints.
_CROWD_SHARE = 0.04
_FEW_SHARE = 0.03
_P_TRUNCATED = 0.15
_P_OCCLUDED = 0.25
#: Prefix of the annotation paths in pair files, as GeoAware-SC's notebook wrote them.
_JSON_PREFIX = "data/ap-10k/ImageAnnotation"


def _ids(n: int, seed: int) -> list[int]:
    """``n`` distinct AP-10K-like image ids, in no particular order (the benchmark sorts file names)."""
    rng = np.random.default_rng(stable_seed("ids", seed))
    return [int(i) + 1 for i in rng.choice(10 * n, size=n, replace=False)]


def _render(species: str, image_id: int, seed: int, exclusion: str) -> tuple[bytes, dict[str, Any]]:
    """One image of ``species``: JPEG bytes and its annotation. ``exclusion`` ``crowd`` marks it a crowd
    image, ``few`` keeps only 2 keypoints annotated, ``""`` neither."""
    tpl = template(f"ap10k:{species}", NUM_KEYPOINTS)
    rng = np.random.default_rng(stable_seed("image", seed, species, image_id))
    w, h = (int(rng.integers(320, 417)), int(rng.integers(240, 321))) if rng.random() < 0.7 else \
        (int(rng.integers(240, 321)), int(rng.integers(320, 417)))
    v = view(tpl, rng, w, h, rng.uniform(0, 2 * math.pi))
    drawn = place(v, rng, 1, _P_TRUNCATED, _P_OCCLUDED, 3)
    visible = drawn.visible.copy()
    if exclusion == "few":  # the annotator marked two keypoints only
        visible[rng.permutation(np.flatnonzero(visible))[2:]] = False
    x0, y0, x1, y1 = drawn.mask.getbbox()  # exclusive right/bottom, 0-based
    kps: list[int] = []
    for k in range(NUM_KEYPOINTS):
        kps += [int(drawn.keypoints[k, 0]), int(drawn.keypoints[k, 1]), 2] if visible[k] else [0, 0, 0]
    ann = {
        "id": image_id, "image_id": image_id, "file_name": f"{image_id:017d}.jpg", "width": w, "height": h,
        "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "area": float((x1 - x0) * (y1 - y0)),
        "keypoints": kps, "num_keypoints": int(visible.sum()), "iscrowd": int(exclusion == "crowd"),
    }
    return jpeg(drawn.image), ann


def synthesize(out_dir: str | Path, images_per_category: int = 60, categories: Sequence[str] | None = None,
               seed: int = 0, progress: bool = False) -> SynthSummary:
    """Write a synthetic AP-10K benchmark into ``out_dir`` (created; must not exist or be empty).

    ``images_per_category`` images for each species of ``categories`` (default :data:`DEFAULT_SPECIES`;
    any of :data:`SPECIES`). The default, 60 per species, gives each of the 5 species 30 test, 20 val
    and about 6 trn images once the benchmark's exclusions are made (the benchmark takes the last 30
    and 20 before them; fewer images leave ``trn``, then ``val``, empty): 300 images, about 9,000 pairs,
    a few seconds.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    species = check_args(out_dir, images_per_category, DEFAULT_SPECIES if categories is None else categories,
                         seed, SPECIES, MIN_IMAGES_PER_SPECIES, MAX_IMAGES_PER_SPECIES, "two images per split")
    n, seed = int(images_per_category), int(seed)
    ids = iter(_ids(n * len(species), seed))
    out_dir.mkdir(parents=True, exist_ok=True)

    visible: dict[tuple[str, str], np.ndarray] = {}
    bar = tqdm(total=n * len(species), desc="synth images", unit="img", disable=not progress)
    for s in species:
        rel = f"{FAMILY_OF[s]}/{s}"
        for sub in ("ImageAnnotation", "JPEGImages"):
            (out_dir / sub / rel).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(stable_seed("exclusions", seed, s))
        crowd, few = round(_CROWD_SHARE * n), round(_FEW_SHARE * n)
        exclusions = rng.permutation(["crowd"] * crowd + ["few"] * few + [""] * (n - crowd - few))
        for exclusion in exclusions:
            image_id = next(ids)
            jpg, ann = _render(s, image_id, seed, str(exclusion))
            name = f"{image_id:017d}"
            (out_dir / "JPEGImages" / rel / f"{name}.jpg").write_bytes(jpg)
            (out_dir / "ImageAnnotation" / rel / f"{name}.json").write_text(json.dumps(ann), encoding="ascii")
            if not exclusion:
                visible[(s, name)] = np.array(ann["keypoints"][2::3]) > 0
            bar.update()
    bar.close()

    counts: dict[str, int] = {}
    for split, pairs in benchmark_pairs(visible, FAMILY_OF).items():
        for p in pairs:
            folder = out_dir / "PairAnnotation" / SUBSET_FOLDERS[p.subset].format(split=split)
            folder.mkdir(parents=True, exist_ok=True)
            paths = {side: f"{_JSON_PREFIX}/{FAMILY_OF[k[0]]}/{k[0]}/{k[1]}.json" for side, k in
                     (("src_json_path", p.src), ("trg_json_path", p.trg))}
            (folder / f"{p.stem}.json").write_text(json.dumps(paths), encoding="ascii")
        counts[split] = len(pairs)
    empty = [split for split in ("trn", "val") if not counts.get(split)]
    notes = (f"no {' or '.join(empty)} pairs: the benchmark's rule takes each species' last 30 images (after its "
             f"exclusions) for test and the 20 before them for val, so {n} images per species leave "
             f"{' and '.join(empty)} empty; the default, 60, gives each species about 6 trn images",) if empty else ()
    return SynthSummary(out_dir=out_dir, images=n * len(species), pairs=counts, seconds=time.perf_counter() - start,
                        notes=notes)
