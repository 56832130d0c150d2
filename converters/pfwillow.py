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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from spairstore.core.errors import SourceError
from spairstore.core.manifest import sha256_file
from spairstore.core.records import DatasetRecords, ErrorPolicy, ImageRecord, OnError, PairRecord

from ._common import Digests, image_header, load_mat, named_image, source_text
from .spair71k import pair_stem

NAME = "pfwillow"
NUM_KEYPOINTS = 10
SPLIT = "test"
PAIR_CSV = "test_pairs_pf.csv"
_COLUMNS = 2 + 4 * NUM_KEYPOINTS  #: of PAIR_CSV
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


@dataclass(frozen=True)
class _Listed:
    """One pair of the pair list: a CSV row, or one of the published list built from the annotations."""

    pair_id: int  #: position in the list, from 1 (a skipped pair leaves its id unused)
    src: tuple[str, str]  #: image key (class folder, name)
    trg: tuple[str, str]
    path: str  #: the CSV, relative to the dataset root; "" for a built pair
    where: tuple[str, str]  #: how the list names the source and the target, for messages
    kps: tuple[np.ndarray, np.ndarray] | None  #: (10, 2) source and target keypoints from the CSV, or None


def _pair(p: _Listed, src: ImageRecord, trg: ImageRecord) -> PairRecord:
    """A test pair over the 10 keypoint slots (the CSV's, else the images'), keeping those annotated in both."""
    src_kps, trg_kps = p.kps if p.kps is not None else (src.keypoints, trg.keypoints)
    ids = np.flatnonzero(np.isfinite(src_kps).all(1) & np.isfinite(trg_kps).all(1)).astype(np.int16)
    return PairRecord(
        split=SPLIT, pair_id=p.pair_id, stem=pair_stem(p.pair_id, src.name, trg.name, src.category),
        category=src.category, src=src.key, trg=trg.key, kps_ids=ids,
        src_kps=src_kps[ids].astype(np.float32), trg_kps=trg_kps[ids].astype(np.float32), path=p.path,
    )


def _csv_pairs(root: Path, path: Path, digests: Digests, policy: ErrorPolicy) -> list[_Listed]:
    """The pairs ``test_pairs_pf.csv`` lists, in its order; a bad row raises or is skipped by ``policy``
    (a bad header always raises)."""
    rel = path.relative_to(root)
    pairs: list[_Listed] = []
    with source_text(path, root, digests) as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or len(header) != _COLUMNS or header[:2] != ["imageA", "imageB"]:
            raise SourceError(rel, f"expected header imageA, imageB, XA1..XA{NUM_KEYPOINTS}, YA.., XB.., YB.. "
                                   f"({_COLUMNS} columns), got {header!r}")
        pair_id = 0
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            pair_id += 1
            p = policy.attempt("pair", f"{SPLIT}/line {line}", lambda: _csv_row(row, rel, line, pair_id))
            if p is not None:
                pairs.append(p)
    return pairs


def _csv_row(row: list[str], rel: Path, line: int, pair_id: int) -> _Listed:
    if len(row) != _COLUMNS:
        raise SourceError(rel, f"line {line}: {len(row)} columns, expected {_COLUMNS} "
                               f"(2 images and {NUM_KEYPOINTS} x, y per image)")
    paths = [PurePosixPath(cell.replace("\\", "/")) for cell in row[:2]]
    src, trg = ((p.parent.name, p.stem) for p in paths)  # image key: (class folder, name)
    if src[0] != trg[0]:
        raise SourceError(rel, f"line {line}: source and target are in different class folders")
    try:
        xa, ya, xb, yb = np.asarray(row[2:], dtype=np.float64).reshape(4, NUM_KEYPOINTS)
    except ValueError:
        raise SourceError(rel, f"line {line}: keypoint coordinates must be numbers") from None
    return _Listed(pair_id, src, trg, rel.as_posix(), (f"line {line}: {row[0]!r}", f"line {line}: {row[1]!r}"),
                   (np.stack([xa, ya], 1), np.stack([xb, yb], 1)))


def published_pairs(keys: list[tuple[str, str]]) -> list[_Listed]:
    """Every ordered pair (source != target) of the images of each class folder, in the order of
    ``keys`` (class folder, name), numbered from 1: the published list (10 x 9 pairs per class, 900 in all)."""
    by_class: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for k in keys:
        by_class[k[0]].append(k)
    pairs: list[_Listed] = []
    for ks in by_class.values():
        for src in ks:
            for trg in ks:
                if src != trg:
                    n = len(pairs) + 1
                    pairs.append(_Listed(n, src, trg, "", (f"published pair {n}",) * 2, None))
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


def read(root: Path, progress: Callable[[Iterable[Any], str, int], Iterable[Any]] | None = None,
         on_error: OnError = "fail") -> DatasetRecords:
    """Read a PF-WILLOW root into canonical records (split ``test``).

    Pairs are those of ``test_pairs_pf.csv`` (in ``root`` or ``PF-dataset/``) with its keypoints; where
    the CSV is absent the published list is rebuilt from the annotations (:func:`published_pairs`)
    and ``notes`` says so. Pair ids are positions in the list. A bad ``.mat``, image or CSV row raises
    :class:`SourceError` naming the file, or with ``on_error="skip"`` leaves the image or pair (and
    every pair using a left-out image) out and lists it in ``skipped``; a bad CSV header always raises.
    ``progress(iterable, description, total)`` wraps the long loops.
    """
    root = Path(root).resolve()
    policy = ErrorPolicy(on_error)
    wrap = progress or (lambda it, desc, total: it)
    data = _data_dir(root)
    if data is None:
        raise SourceError(root, f"not a PF-WILLOW root (needs {DATA_DIR}/<class>(<subset>)/<name>.png + .mat)")
    classes = _class_dirs(data)
    mats = [m for c in classes for m in sorted(c.glob("*.mat"))]
    digests: Digests = {}
    images = []
    for m in wrap(mats, "annotations", len(mats)):
        im = policy.attempt("image", f"{m.parent.name}/{m.stem}", lambda: _read_image(root, m, digests))
        if im is not None:
            images.append(im)
    index = {im.key: im for im in images}
    skipped = {s.key: s for s in policy.skipped if s.kind == "image"}
    notes = [n for n in (_duplicates_note(images),) if n]
    sources = [m for m in mats if (m.parent.name, m.stem) in index]
    csv_path = next((p for p in (root / PAIR_CSV, data / PAIR_CSV) if p.is_file()), None)
    if csv_path is not None:
        listed = _csv_pairs(root, csv_path, digests, policy)
        sources.append(csv_path)
    else:
        listed = published_pairs([(m.parent.name, m.stem) for m in mats])
        notes.append(f"no {PAIR_CSV}: built the published pair list from the annotations, all {len(listed)} "
                     f"ordered pairs (source != target) within each of the {len(classes)} class folders, "
                     "folders and images in name order, pair ids 1.. in that order")
    pairs = []
    for p in listed:
        found = policy.attempt(
            "pair", f"{SPLIT}/{pair_stem(p.pair_id, p.src[1], p.trg[1], p.src[0])}",
            lambda: [named_image(index, skipped, k, p.path or None, w) for k, w in zip((p.src, p.trg), p.where)])
        if found is not None:
            pairs.append(_pair(p, *found))
    if not pairs:
        raise SourceError(csv_path.relative_to(root) if csv_path else root, "no pairs")
    sources += [im.image_path for im in images]
    return DatasetRecords(
        dataset=NAME, root=root, categories=[c.name for c in classes], num_keypoints=NUM_KEYPOINTS,
        images=images, pairs={SPLIT: pairs}, sources=sources, notes=notes, skipped=policy.skipped, digests=digests,
    )
