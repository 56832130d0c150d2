"""The AP-10K semantic-correspondence benchmark (Zhang et al., "Telling Left from Right", CVPR 2024), as
GeoAware-SC builds it from AP-10K's COCO-style keypoint annotations (Yu et al., NeurIPS 2021).

::

    ImageAnnotation/<family>/<species>/<id>.json    one animal: width, height, bbox [x, y, w, h],
                                                    keypoints [x1, y1, v1, ..., x17, y17, v17], iscrowd
    JPEGImages/<family>/<species>/<id>.jpg
    PairAnnotation/<split>/<src id>-<trg id>:<species>.json                  intra-species pairs
    PairAnnotation/<split>_cross_species/<src id>-<trg id>:<family>.json     (val, test)
    PairAnnotation/<split>_cross_family/<src id>-<trg id>:all.json           (val, test)

A pair file holds ``src_json_path`` and ``trg_json_path``, the two image annotations as GeoAware-SC
wrote them (e.g. ``data/ap-10k/ImageAnnotation/Felidae/cat/<id>.json``; the part from
``ImageAnnotation/`` on is used). Everything in a store keeps AP-10K's own numbers: keypoints in
original pixels (x, y), 17 slots in AP-10K's order (:data:`KEYPOINTS`), ``v`` 0 = not annotated
(stored as NaN), 1 or 2 = annotated. The COCO box ``[x, y, w, h]`` is stored as ``x1, y1, x2, y2 =
x, y, x + w, y + h`` (the store's box convention), so the evaluator's bbox threshold ``max(x2 - x1,
y2 - y1)`` is AP-10K's ``max(w, h)``.

The benchmark's rules (:func:`split_images`, :func:`benchmark_pairs`), applied here in sorted order so
that they are reproducible (the original walked the directories in file-system order):

* images marked ``iscrowd`` and images with fewer than 3 annotated keypoints are left out;
* per species, in sorted name order: the last 30 images are ``test``, the 20 before them ``val``, the
  rest ``trn``;
* a pair needs at least 3 keypoints annotated in both images;
* intra-species pairs: every ordered pair of two images of a species in the split (``trn``: at most
  50 per image of the species, sampled); cross-species pairs (``val``/``test``): ordered pairs of
  images of two species of one family, at most 400 / 900 per family; cross-family pairs: ordered
  pairs of images of two families, at most 20 / 30 per ordered family pair. Samples are uniform,
  without replacement, drawn by ``numpy.random.default_rng([42, split, subset])`` (the split's and the
  subset's indices) group by group in sorted order, and kept in (source, target) order.

With ``PairAnnotation/`` present its pairs are read (the frozen list a user evaluated, checked against
the rules that do not depend on order); without it the pair list is built by the rules above and the
notes say so. A store's pair ids number each split's pairs from 1 in the order intra-species,
cross-species, cross-family, each sorted by (suffix, file stem); the ``subset`` column says which (see
:data:`SUBSETS`), ``pair_list_sha256`` hashes the list, and each species' family is the store's
``category_groups["family"]``. A pair's category is its source image's species.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from spairstore.core.errors import SourceError
from spairstore.core.records import ImageRecord, PairRecord

from ._common import NUMBER, border, image_header, integer, plain_name, require
from .base import Converter, Item

#: AP-10K's 17 keypoints in its annotation order (0-based here; the AP-10K README numbers them from 1).
KEYPOINTS = (
    "left_eye", "right_eye", "nose", "neck", "root_of_tail", "left_shoulder", "left_elbow", "left_front_paw",
    "right_shoulder", "right_elbow", "right_front_paw", "left_hip", "left_knee", "left_back_paw", "right_hip",
    "right_knee", "right_back_paw",
)
NUM_KEYPOINTS = len(KEYPOINTS)
#: Mirror-image keypoints as (left, right) slot pairs; the others (nose, neck, root of tail) lie on the
#: symmetry plane. The pairs of ``AP10K_FLIP`` in GeoAware-SC's ``utils/utils_geoware.py``.
FLIP_PAIRS = ((0, 1), (5, 8), (6, 9), (7, 10), (11, 14), (12, 15), (13, 16))
#: Groups of same-type parts for the geometry-aware subset, in AP-10K's slot numbering: ``AP10K_GEO_AWARE``
#: of GeoAware-SC's ``utils/utils_geoware.py``. A keypoint counts when a group holding it has at least 2
#: members visible in the target, so singletons never count. The eyes are two singletons there (written
#: ``0,1,`` in the list, not ``[0,1]``), as in its SPair-71k groups: kept so, to match its numbers.
GEO_AWARE_GROUPS: tuple[tuple[int, ...], ...] = (
    (0,), (1,),  # eyes
    (2,), (3,), (4,),  # nose, neck, root of tail
    (5, 8),  # shoulders
    (6, 9, 12, 15),  # elbows and knees
    (7, 10, 13, 16),  # front and back paws
    (11, 14),  # hips
)
SPLITS = ("trn", "val", "test")
#: The pair subsets, in pair-id order: ``PairRecord.subset`` indexes them.
SUBSETS = ("intra-species", "cross-species", "cross-family")
#: Folder of a split's pairs of each subset, below ``PairAnnotation/``.
SUBSET_FOLDERS = ("{split}", "{split}_cross_species", "{split}_cross_family")
#: Images per species taken from the end of the sorted list for each split (the rest is ``trn``).
SPLIT_SIZES = {"test": 30, "val": 20}
MIN_KEYPOINTS = 3  #: annotated keypoints an image needs, and keypoints a pair's images share
#: Most pairs per group: intra-species ``trn`` per image of the species; cross-species per family;
#: cross-family per ordered family pair.
TRN_PAIRS_PER_IMAGE = 50
CAPS = {"cross-species": {"val": 400, "test": 900}, "cross-family": {"val": 20, "test": 30}}
SEED = 42
IMAGE_KEYS = ("width", "height", "bbox", "keypoints")


def flip_permutation() -> list[int]:
    """Keypoint slots under a horizontal flip: slot ``k`` of the mirrored image shows the part of slot
    ``perm[k]`` of the original (an involution over the 17 slots)."""
    perm = list(range(NUM_KEYPOINTS))
    for left, right in FLIP_PAIRS:
        perm[left], perm[right] = right, left
    return perm


def pair_stem(src_name: str, trg_name: str, suffix: str) -> str:
    """GeoAware-SC's pair file stem: ``<src id>-<trg id>:<suffix>``, the suffix the species (intra-species),
    the family (cross-species) or ``all`` (cross-family)."""
    return f"{src_name}-{trg_name}:{suffix}"


# ----------------------------------------------------------------------------------------------
# The benchmark's rules
# ----------------------------------------------------------------------------------------------
def split_images(names: Sequence[str]) -> dict[str, list[str]]:
    """A species' images (names, any order) by split: sorted, the last 30 ``test``, the 20 before ``val``,
    the rest ``trn`` (fewer images fill ``test`` first, then ``val``)."""
    ordered = sorted(names)
    test, val = SPLIT_SIZES["test"], SPLIT_SIZES["val"]
    cut = max(0, len(ordered) - test)
    return {"trn": ordered[:max(0, cut - val)], "val": ordered[max(0, cut - val):cut], "test": ordered[cut:]}


class Planned(NamedTuple):
    """One pair of the benchmark, as the rules make it."""

    subset: int  #: index into :data:`SUBSETS`
    suffix: str  #: species, family or ``all``
    src: tuple[str, str]  #: image key (species, name)
    trg: tuple[str, str]

    @property
    def stem(self) -> str:
        return pair_stem(self.src[1], self.trg[1], self.suffix)


def canonical_order(pairs: list[Planned]) -> list[Planned]:
    """Pairs in the order pair ids follow: by subset, then suffix, then file stem."""
    return sorted(pairs, key=lambda p: (p.subset, p.suffix, p.stem))


def benchmark_pairs(visible: Mapping[tuple[str, str], np.ndarray], family: Mapping[str, str]
                    ) -> dict[str, list[Planned]]:
    """The benchmark's pairs of each split, in :func:`canonical_order`, from the kept images.

    ``visible``: image key ``(species, name)`` -> bool ``(17,)``, the keypoints annotated in the image;
    ``family``: species -> family.
    """
    by_species: dict[str, list[str]] = {}
    for species, name in visible:
        by_species.setdefault(species, []).append(name)
    splits = {s: split_images(names) for s, names in by_species.items()}
    out = {}
    for split in SPLITS:
        members = {s: [(s, n) for n in parts[split]] for s, parts in sorted(splits.items()) if parts[split]}
        intra = [(s, keys, keys) for s, keys in members.items()]
        pairs = (_sampled(visible, intra, 0, split, TRN_PAIRS_PER_IMAGE, per_source=True) if split == "trn"
                 else _sampled(visible, intra, 0, split, None))
        if split != "trn":
            families: dict[str, list[str]] = {}
            for s in members:
                families.setdefault(family[s], []).append(s)
            groups = [(f, [k for s in species for k in members[s]]) for f, species in sorted(families.items())]
            cross = [(f, keys, keys) for f, keys in groups if len(families[f]) > 1]
            pairs += _sampled(visible, cross, 1, split, CAPS["cross-species"][split])
            both = [("all", a, b) for fa, a in groups for fb, b in groups if fa != fb]
            pairs += _sampled(visible, both, 2, split, CAPS["cross-family"][split])
        out[split] = canonical_order(pairs)
    return out


def _sampled(visible: Mapping[tuple[str, str], np.ndarray], groups: list[tuple[str, list, list]], subset: int,
             split: str, cap: int | None, per_source: bool = False) -> list[Planned]:
    """The valid pairs of each group ``(suffix, sources, targets)`` (different images of different species
    for the cross subsets, at least 3 shared keypoints): all of them where ``cap`` is None, else at most
    ``cap`` per group, or ``cap`` per source image with ``per_source``."""
    rng = np.random.default_rng([SEED, SPLITS.index(split), subset])
    out = []
    for suffix, srcs, trgs in groups:
        a = np.stack([visible[k] for k in srcs]).astype(np.int32)
        b = np.stack([visible[k] for k in trgs]).astype(np.int32)
        ok = a @ b.T >= MIN_KEYPOINTS
        if subset == 0:
            np.fill_diagonal(ok, False)  # sources and targets are the same images: no self-pairs
        elif subset == 1:
            ok &= np.array([s[0] for s in srcs])[:, None] != np.array([t[0] for t in trgs])[None, :]
        hits = np.flatnonzero(ok)
        limit = None if cap is None else cap * len(srcs) if per_source else cap
        if limit is not None and len(hits) > limit:
            hits = np.sort(rng.choice(hits, limit, replace=False))
        out += [Planned(subset, suffix, srcs[i], trgs[j]) for i, j in zip(*np.unravel_index(hits, ok.shape))]
    return out


# ----------------------------------------------------------------------------------------------
# Reading a root
# ----------------------------------------------------------------------------------------------
def _annotation_key(value: Any, what: str, rel: str) -> tuple[str, str, str]:
    """``(family, species, name)`` of an image annotation path as a pair file gives it: the part from the
    last ``ImageAnnotation/`` on must be ``<family>/<species>/<name>.json``, each a plain name."""
    if not isinstance(value, str) or "ImageAnnotation/" not in value.replace("\\", "/"):
        raise SourceError(rel, f"{what} must be a path to ImageAnnotation/<family>/<species>/<id>.json, got {value!r}")
    parts = value.replace("\\", "/").rsplit("ImageAnnotation/", 1)[1].split("/")
    if len(parts) != 3 or not all(map(plain_name, parts)) or not parts[2].endswith(".json"):
        raise SourceError(rel, f"{what} {value!r} does not name ImageAnnotation/<family>/<species>/<id>.json")
    return parts[0], parts[1], parts[2][:-len(".json")]


class AP10K(Converter):
    """The AP-10K correspondence benchmark (splits ``trn``, ``val``, ``test``; see the module docstring)."""

    name = "ap10k"
    title = "AP-10K"
    article = "an"
    layout = ("ImageAnnotation/<family>/<species>/<id>.json", "JPEGImages/<family>/<species>/")
    subset_names = SUBSETS
    num_keypoints = NUM_KEYPOINTS

    def image_items(self) -> list[Item[ImageRecord]]:
        ann = self.root / "ImageAnnotation"
        self.family: dict[str, str] = {}
        self.excluded: Counter[str] = Counter()
        items = []
        for fam in sorted(p for p in ann.iterdir() if p.is_dir()):
            for folder in sorted(p for p in fam.iterdir() if p.is_dir()):
                files = sorted(folder.glob("*.json"))
                if folder.name in self.family:
                    error = SourceError(self.rel(folder), f"species {folder.name!r} is also a species of family "
                                                          f"{self.family[folder.name]!r}")
                    if self.policy.on_error == "fail":
                        raise error
                    for p in files:
                        self.policy.skip("image", f"{folder.name}/{p.stem}", SourceError(self.rel(p), error.reason))
                    continue
                self.family[folder.name] = fam.name
                items += [Item(f"{folder.name}/{p.stem}", partial(self._read_image, fam.name, folder.name, p),
                               self.rel(p)) for p in files]
        self.categories = sorted(self.family)
        self.category_groups = {"family": [self.family[s] for s in self.categories]}
        return items

    def keypoint_flip(self) -> dict[str, list[int]]:
        return {c: flip_permutation() for c in self.categories}

    def keypoint_groups(self) -> dict[str, list[list[int]]]:
        # singletons never count, so the store keeps the groups of two or more
        return {c: [list(g) for g in GEO_AWARE_GROUPS if len(g) >= 2] for c in self.categories}

    def _read_image(self, family: str, species: str, path: Path) -> ImageRecord | None:
        rel = self.rel(path)
        ann = self.load_json(rel)
        require(ann, IMAGE_KEYS, rel)
        width = integer(ann["width"], "width", rel, lo=1)
        height = integer(ann["height"], "height", rel, lo=1)
        kps = ann["keypoints"]
        if type(kps) is not list or len(kps) != 3 * NUM_KEYPOINTS or not all(
                type(v) in NUMBER and math.isfinite(v) for v in kps):
            raise SourceError(rel, f"keypoints must be {3 * NUM_KEYPOINTS} numbers (x, y, v per keypoint), "
                                   f"got {kps!r:.80}")
        xyv = np.array(kps, dtype=np.float64).reshape(NUM_KEYPOINTS, 3)
        if not np.isin(xyv[:, 2], (0, 1, 2)).all():
            raise SourceError(rel, f"keypoint visibility v must be 0, 1 or 2, got {sorted(set(xyv[:, 2].tolist()))}")
        shown = xyv[:, 2] > 0
        kx, ky = xyv[:, 0], xyv[:, 1]
        # Annotators click on the edge or a pixel past it: kept with a note, as in the other datasets.
        m = border(width, height)
        far = shown & ~((kx >= -m) & (kx <= width + m) & (ky >= -m) & (ky <= height + m))
        if far.any():
            k = int(np.flatnonzero(far)[0])
            raise SourceError(rel, f"keypoint {k} ({KEYPOINTS[k]}) at {xyv[k, :2].tolist()} lies outside the "
                                   f"{width}x{height} image")
        if (shown & ~((kx >= 0) & (kx <= width) & (ky >= 0) & (ky <= height))).any():
            self.remark(f"keypoints up to {m:g} px outside their image (kept as annotated)", rel)
        box = ann["bbox"]
        if type(box) is not list or len(box) != 4 or not all(type(v) in NUMBER and math.isfinite(v) for v in box):
            raise SourceError(rel, f"bbox must be [x, y, w, h] numbers (COCO), got {box!r}")
        x, y, w, h = (float(v) for v in box)
        if w <= 0 or h <= 0 or x < -m or y < -m or x + w > width + m or y + h > height + m:
            raise SourceError(rel, f"bbox {box} ([x, y, w, h]) is empty or reaches outside the {width}x{height} image")
        if x < 0 or y < 0 or x + w > width or y + h > height:
            self.remark(f"bboxes up to {m:g} px outside their image (kept as annotated)", rel)
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1) or isinstance(crowd, float):
            raise SourceError(rel, f"iscrowd must be 0 or 1, got {crowd!r}")
        if crowd:
            self.excluded["crowd"] += 1
            return None
        if shown.sum() < MIN_KEYPOINTS:
            self.excluded["few"] += 1
            return None
        image_path = self.root / "JPEGImages" / family / species / f"{path.stem}.jpg"
        iw, ih, depth = image_header(image_path, self.root, rel)
        if (iw, ih) != (width, height):
            raise SourceError(self.rel(image_path), f"image is {iw}x{ih} but annotated as {width}x{height} in {rel}")
        points = np.where(shown[:, None], xyv[:, :2], np.nan).astype(np.float32)
        return ImageRecord(category=species, name=path.stem, image_path=image_path, mask_path=None,
                           width=width, height=height, bbox=(x, y, x + w, y + h), keypoints=points, depth=depth)

    def _visible(self) -> dict[tuple[str, str], np.ndarray]:
        return {k: np.isfinite(im.keypoints).all(1) for k, im in self.images.items()}

    def pair_items(self) -> Iterator[tuple[str, list[Item[PairRecord]]]]:
        if self.excluded:
            self.notes.append(f"left out by the benchmark's rules: {self.excluded['crowd']:,} crowd images and "
                              f"{self.excluded['few']:,} images with fewer than {MIN_KEYPOINTS} annotated keypoints")
        pair_dir = self.root / "PairAnnotation"
        if not pair_dir.is_dir():
            self.notes.append("no PairAnnotation/: built the benchmark's pair list by its rules (sorted order, "
                              "seed 42; see converters/ap10k.py)")
            for split, planned in benchmark_pairs(self._visible(), self.family).items():
                yield split, [Item(f"{split}/{p.stem}", partial(self._pair, split, i, p), "")
                              for i, p in enumerate(planned, start=1)]
            return
        for split in SPLITS:
            files = []
            for subset, folder in enumerate(SUBSET_FOLDERS):
                d = pair_dir / folder.format(split=split)
                if d.is_dir():
                    files += sorted(((subset, f.stem.rpartition(":")[2], f.stem), f) for f in d.glob("*.json"))
            if not files:
                self.notes.append(f"split {split!r} absent (no PairAnnotation/{split}/): not packed")
                continue
            yield split, [Item(f"{split}/{stem}", partial(self._read_pair, split, i, subset, f), self.rel(f))
                          for i, ((subset, _, stem), f) in enumerate(files, start=1)]

    def _read_pair(self, split: str, pair_id: int, subset: int, path: Path) -> PairRecord:
        rel = self.rel(path)
        ann = self.load_json(rel)
        require(ann, ("src_json_path", "trg_json_path"), rel)
        keys = []
        for side in ("src", "trg"):
            fam, species, name = _annotation_key(ann[f"{side}_json_path"], f"{side}_json_path", rel)
            if self.family.get(species, fam) != fam:
                raise SourceError(rel, f"{side}_json_path puts species {species!r} in family {fam!r}, "
                                       f"ImageAnnotation/ in {self.family[species]!r}")
            if (species, name) not in self.images:
                why = self.skipped_images.get(f"{species}/{name}")
                raise SourceError(rel, f"{side}_json_path names image {species}/{name}, which "
                                  + (f"was skipped: {why.reason}" if why else
                                     "the benchmark leaves out (crowd, or fewer than 3 keypoints) or does not have"))
            keys.append((species, name))
        src, trg = keys
        if src == trg:
            self.remark("pairs of an image with itself (kept)", rel)
        suffix = (src[0], self.family[src[0]], "all")[subset]
        planned = Planned(subset, suffix, src, trg)
        if path.stem != planned.stem:
            raise SourceError(rel, f"file name and content disagree: its images make the {SUBSETS[subset]} pair "
                                   f"{planned.stem!r}")
        same_species, same_family = src[0] == trg[0], self.family[src[0]] == self.family[trg[0]]
        if (same_species, same_family) != ((True, True), (False, True), (False, False))[subset]:
            raise SourceError(rel, f"a pair of the {SUBSETS[subset]} subset (its folder), but it joins {src[0]} "
                                   f"({self.family[src[0]]}) and {trg[0]} ({self.family[trg[0]]})")
        return self._pair(split, pair_id, planned, rel)

    def _pair(self, split: str, pair_id: int, p: Planned, path: str = "") -> PairRecord:
        src, trg = self.images[p.src], self.images[p.trg]
        ids = np.flatnonzero(np.isfinite(src.keypoints).all(1) & np.isfinite(trg.keypoints).all(1))
        if len(ids) < MIN_KEYPOINTS:
            raise SourceError(path or p.stem, f"its images share {len(ids)} annotated keypoints; a pair needs at "
                                              f"least {MIN_KEYPOINTS}")
        return PairRecord(
            split=split, pair_id=pair_id, stem=p.stem, category=src.category, src=src.key, trg=trg.key,
            kps_ids=ids.astype(np.int16), src_kps=src.keypoints[ids], trg_kps=trg.keypoints[ids],
            subset=p.subset, path=path,
        )
