"""PF-WILLOW (Ham, Cho, Schmid, Ponce: Proposal Flow, 2016) in its published layout.

::

    [PF-dataset/]<class>(<subset>)/<name>.png    RGB image (longer side 300)
    [PF-dataset/]<class>(<subset>)/<name>.mat    pts_coord: float64 (2, 10), row 0 x, row 1 y
    test_pairs_pf.csv                            imageA, imageB, XA1..XA10, YA1..YA10, XB1..XB10, YB1..YB10

``root`` is the folder holding ``PF-dataset/`` or ``PF-dataset/`` itself; the pair list may sit in
either. Each class folder (``car(G)``, ``winebottle(woC)``, ...) is one category, and each
``(class folder, name)`` one image, although some files are byte-identical copies in two subsets (the
pack summary names them). Keypoints are original pixels as annotated; the dataset has no boxes or masks.
All pairs form the split ``test``.
"""
from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from spairstore.errors import SourceError
from spairstore.manifest import sha256_file
from spairstore.records import DatasetRecords, ImageRecord, PairRecord

from ._common import Digests, image_header, load_mat, source_text
from .spair71k import pair_stem

NAME = "pfwillow"
NUM_KEYPOINTS = 10
SPLIT = "test"
PAIR_CSV = "test_pairs_pf.csv"
DATA_DIR = "PF-dataset"
_CLASS_DIR = re.compile(r"[^()/]+\([^()/]+\)")


def _class_dirs(folder: Path) -> list[Path]:
    """Class folders (``name(subset)`` holding ``.mat`` files) of ``folder``, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and _CLASS_DIR.fullmatch(p.name) and any(p.glob("*.mat")))


def _data_dir(root: Path) -> Path | None:
    return next((d for d in (root / DATA_DIR, root) if _class_dirs(d)), None)


def detect(root: Path) -> bool:
    """True when ``root`` (or its ``PF-dataset/``) holds PF-WILLOW class folders."""
    return _data_dir(root) is not None


def _read_image(root: Path, mat: Path, digests: Digests) -> ImageRecord:
    rel = mat.relative_to(root)
    pts = np.asarray(load_mat(mat, root, ("pts_coord",), digests)["pts_coord"])
    if pts.shape != (2, NUM_KEYPOINTS) or pts.dtype.kind != "f":
        raise SourceError(rel, f"pts_coord must be float (2, {NUM_KEYPOINTS}) (x row, y row), "
                               f"got {pts.dtype} {pts.shape}")
    image_path = mat.with_suffix(".png")
    width, height, depth = image_header(image_path, root, str(rel))
    return ImageRecord(
        category=mat.parent.name, name=mat.stem, image_path=image_path, mask_path=None,
        width=width, height=height, bbox=(np.nan,) * 4, keypoints=pts.T.astype(np.float32), depth=depth,
    )


def _pair(pair_id: int, src: ImageRecord, trg: ImageRecord, src_kps: np.ndarray, trg_kps: np.ndarray) -> PairRecord:
    """A test pair over the 10 keypoint slots, keeping those annotated in both images."""
    ids = np.flatnonzero(np.isfinite(src_kps).all(1) & np.isfinite(trg_kps).all(1)).astype(np.int16)
    return PairRecord(
        split=SPLIT, pair_id=pair_id, stem=pair_stem(pair_id, src.name, trg.name, src.category),
        category=src.category, src=src.key, trg=trg.key, kps_ids=ids,
        src_kps=src_kps[ids].astype(np.float32), trg_kps=trg_kps[ids].astype(np.float32),
    )


def _csv_pairs(root: Path, path: Path, index: dict[tuple[str, str], ImageRecord], digests: Digests
               ) -> list[PairRecord]:
    """The pairs ``test_pairs_pf.csv`` lists, in its order; keypoints from the CSV."""
    rel = path.relative_to(root)
    columns = 2 + 4 * NUM_KEYPOINTS
    pairs: list[PairRecord] = []
    with source_text(path, root, digests) as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or len(header) != columns or header[:2] != ["imageA", "imageB"]:
            raise SourceError(rel, f"expected header imageA, imageB, XA1..XA{NUM_KEYPOINTS}, YA.., XB.., YB.. "
                                   f"({columns} columns), got {header!r}")
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != columns:
                raise SourceError(rel, f"line {line}: {len(row)} columns, expected {columns} "
                                       f"(2 images and {NUM_KEYPOINTS} x, y per image)")
            keys = [tuple(Path(cell.replace("\\", "/")).with_suffix("").parts[-2:]) for cell in row[:2]]
            for cell, key in zip(row[:2], keys):
                if key not in index:
                    raise SourceError(rel, f"line {line}: {cell!r} names no annotated image")
            if keys[0][0] != keys[1][0]:
                raise SourceError(rel, f"line {line}: source and target are in different class folders")
            try:
                xa, ya, xb, yb = np.asarray(row[2:], dtype=np.float64).reshape(4, NUM_KEYPOINTS)
            except ValueError:
                raise SourceError(rel, f"line {line}: keypoint coordinates must be numbers") from None
            pairs.append(_pair(len(pairs) + 1, index[keys[0]], index[keys[1]],
                               np.stack([xa, ya], 1), np.stack([xb, yb], 1)))
    return pairs


def published_pairs(images: list[ImageRecord]) -> list[PairRecord]:
    """Every ordered pair (source != target) of the images of each class folder, in the order of
    ``images``, numbered from 1: the published list (10 x 9 pairs per class, 900 in all)."""
    by_class: dict[str, list[ImageRecord]] = defaultdict(list)
    for im in images:
        by_class[im.category].append(im)
    pairs: list[PairRecord] = []
    for ims in by_class.values():
        for src in ims:
            for trg in ims:
                if src is not trg:
                    pairs.append(_pair(len(pairs) + 1, src, trg, src.keypoints, trg.keypoints))
    return pairs


def _duplicates_note(images: list[ImageRecord]) -> str | None:
    groups: dict[str, list[str]] = defaultdict(list)
    for im in images:
        groups[sha256_file(im.image_path)].append(f"{im.category}/{im.name}")
    dup = [g for g in groups.values() if len(g) > 1]
    if not dup:
        return None
    return (f"{sum(map(len, dup)) - len(dup)} images are byte-identical copies of images in another subset, "
            f"stored once per (class, name): " + "; ".join(" = ".join(g) for g in dup))


def read(root: Path, progress: Callable[[Iterable[Any], str, int], Iterable[Any]] | None = None) -> DatasetRecords:
    """Read a PF-WILLOW root into canonical records (split ``test``).

    Pairs are those of ``test_pairs_pf.csv`` (in ``root`` or ``PF-dataset/``) with its keypoints; where
    the CSV is absent the published list is rebuilt from the annotations (:func:`published_pairs`)
    and ``notes`` says so. ``progress(iterable, description, total)`` wraps the long loops.
    """
    root = Path(root).resolve()
    wrap = progress or (lambda it, desc, total: it)
    data = _data_dir(root)
    if data is None:
        raise SourceError(root, f"not a PF-WILLOW root (needs {DATA_DIR}/<class>(<subset>)/<name>.png + .mat)")
    classes = _class_dirs(data)
    mats = [m for c in classes for m in sorted(c.glob("*.mat"))]
    digests: Digests = {}
    images = [_read_image(root, m, digests) for m in wrap(mats, "annotations", len(mats))]
    index = {im.key: im for im in images}
    notes = [n for n in (_duplicates_note(images),) if n]
    sources = list(mats)
    csv_path = next((p for p in (root / PAIR_CSV, data / PAIR_CSV) if p.is_file()), None)
    if csv_path is not None:
        pairs = _csv_pairs(root, csv_path, index, digests)
        sources.append(csv_path)
    else:
        pairs = published_pairs(images)
        notes.append(f"no {PAIR_CSV}: built the published pair list from the annotations, all {len(pairs)} "
                     f"ordered pairs (source != target) within each of the {len(classes)} class folders, "
                     "folders and images in name order, pair ids 1.. in that order")
    if not pairs:
        raise SourceError(csv_path.relative_to(root) if csv_path else root, "no pairs")
    sources += [im.image_path for im in images]
    return DatasetRecords(
        dataset=NAME, root=root, categories=[c.name for c in classes], num_keypoints=NUM_KEYPOINTS,
        images=images, pairs={SPLIT: pairs}, sources=sources, notes=notes, digests=digests,
    )
