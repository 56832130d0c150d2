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
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np

from spairstore.core.errors import SourceError
from spairstore.core.manifest import sha256_file
from spairstore.core.records import ImageRecord, PairRecord

from ._common import image_header, load_mat, named_image
from .base import Converter, Item
from .voc import pair_stem

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


@dataclass(frozen=True)
class _Listed:
    """One pair of the pair list: a CSV row, or one of the published list built from the annotations."""

    pair_id: int  #: position in the list, from 1 (a skipped pair leaves its id unused)
    src: tuple[str, str]  #: image key (class folder, name)
    trg: tuple[str, str]
    path: str  #: the CSV, relative to the dataset root; "" for a built pair
    where: tuple[str, str]  #: how the list names the source and the target, for messages
    kps: tuple[np.ndarray, np.ndarray] | None  #: (10, 2) source and target keypoints from the CSV, or None


def _csv_row(row: list[str], rel: str, line: int, pair_id: int) -> _Listed:
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
    return _Listed(pair_id, src, trg, rel, (f"line {line}: {row[0]!r}", f"line {line}: {row[1]!r}"),
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


class PFWillow(Converter):
    """PF-WILLOW (split ``test``).

    Pairs are those of ``test_pairs_pf.csv`` (in the root or ``PF-dataset/``) with its keypoints; where
    the CSV is absent the published list is rebuilt from the annotations (:func:`published_pairs`) and
    the notes say so. Pair ids are positions in the list. A bad CSV header always raises, whatever the
    error policy.
    """

    name = "pfwillow"
    title = "PF-WILLOW"
    layout = ("<class>(<subset>)/<name>.mat",)
    data_dirs = (DATA_DIR, "")
    num_keypoints = NUM_KEYPOINTS

    def image_items(self) -> list[Item[ImageRecord]]:
        classes = _class_dirs(self.data)
        if not classes:  # the layout's folders only look like PF-WILLOW's: their names have no subset
            raise SourceError(self.root, f"not {self.article} {self.title} root (needs {self.needs()})")
        self.categories = [c.name for c in classes]
        self._mats = [m for c in classes for m in sorted(c.glob("*.mat"))]
        return [Item(f"{m.parent.name}/{m.stem}", partial(self._read_image, m), self.rel(m)) for m in self._mats]

    def _read_image(self, mat: Path) -> ImageRecord:
        rel = self.rel(mat)
        pts = np.asarray(load_mat(self.read_source(rel), rel, ("pts_coord",))["pts_coord"])
        if pts.shape != (2, NUM_KEYPOINTS) or pts.dtype.kind != "f":
            raise SourceError(rel, f"pts_coord must be float (2, {NUM_KEYPOINTS}) (x row, y row), "
                                   f"got {pts.dtype} {pts.shape}")
        image_path = mat.with_suffix(".png")
        width, height, depth = image_header(image_path, self.root, rel)
        return ImageRecord(
            category=mat.parent.name, name=mat.stem, image_path=image_path, mask_path=None,
            width=width, height=height, bbox=(np.nan,) * 4, keypoints=pts.T.astype(np.float32), depth=depth,
        )

    def _csv_pairs(self, path: Path) -> list[_Listed]:
        """The pairs ``test_pairs_pf.csv`` lists, in its order; a bad row raises or is skipped by the
        policy (a bad header always raises)."""
        rel = self.rel(path)
        pairs: list[_Listed] = []
        with self.source_text(rel) as f:
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
                p = self.policy.attempt("pair", f"{SPLIT}/line {line}", lambda: _csv_row(row, rel, line, pair_id))
                if p is not None:
                    pairs.append(p)
        return pairs

    def pair_items(self) -> Iterator[tuple[str, list[Item[PairRecord]]]]:
        self.notes += [n for n in (_duplicates_note(list(self.images.values())),) if n]
        csv_path = next((p for p in (self.root / PAIR_CSV, self.data / PAIR_CSV) if p.is_file()), None)
        if csv_path is not None:
            listed = self._csv_pairs(csv_path)
            self.sources.append(csv_path)
        else:
            listed = published_pairs([(m.parent.name, m.stem) for m in self._mats])
            self.notes.append(f"no {PAIR_CSV}: built the published pair list from the annotations, all {len(listed)} "
                              f"ordered pairs (source != target) within each of the {len(self.categories)} class "
                              "folders, folders and images in name order, pair ids 1.. in that order")
        yield SPLIT, [Item(f"{SPLIT}/{pair_stem(p.pair_id, p.src[1], p.trg[1], p.src[0])}",
                           partial(self._pair, p), p.path) for p in listed]

    def _pair(self, p: _Listed) -> PairRecord:
        """A test pair over the 10 keypoint slots (the CSV's, else the images'), keeping those annotated in both."""
        src, trg = (named_image(self.images, self.skipped_images, k, p.path or None, w)
                    for k, w in zip((p.src, p.trg), p.where))
        src_kps, trg_kps = p.kps if p.kps is not None else (src.keypoints, trg.keypoints)
        ids = np.flatnonzero(np.isfinite(src_kps).all(1) & np.isfinite(trg_kps).all(1)).astype(np.int16)
        return PairRecord(
            split=SPLIT, pair_id=p.pair_id, stem=pair_stem(p.pair_id, src.name, trg.name, src.category),
            category=src.category, src=src.key, trg=trg.key, kps_ids=ids,
            src_kps=src_kps[ids].astype(np.float32), trg_kps=trg_kps[ids].astype(np.float32), path=p.path,
        )
