"""PF-PASCAL (Ham, Cho, Schmid, Ponce: Proposal Flow, 2017) as published for the NC-Net / HPF lineage.

::

    [PF-dataset-PASCAL/]JPEGImages/<name>.jpg                PASCAL VOC images
    [PF-dataset-PASCAL/]Annotations/<class>/<name>.mat       kps (K, 2) x, y (NaN = absent), bbox (1, 4)
    {., image_pairs/, PF-dataset-PASCAL/}{trn|train,val,test}_pairs.csv

Pair CSVs have columns ``source_image,target_image,class`` (class 1-20 in VOC order) and either
``XA,YA,XB,YB`` (each cell one ``;``-separated string of floats: the pair's keypoints) or ``flip``
(the training-time horizontal-flip flag, kept on the pair). Image paths are matched by file name. An
image is keyed by ``(class, name)``: one VOC file can be annotated under two classes. Pairs without
CSV keypoints take the ``.mat`` rows annotated in both images; NaN keypoints are dropped either way.
All coordinates are original pixels as annotated. The dataset has no masks.
"""
from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np

from spairstore.core.errors import SourceError
from spairstore.core.records import ImageRecord, PairRecord

from ._common import image_header, load_mat, named_image
from .base import Converter, Item
from .voc import CLASSES, pair_stem

#: The 20 PASCAL VOC classes in VOC order: CSV class ``k`` is ``CATEGORIES[k - 1]``.
CATEGORIES = CLASSES
DATA_DIR = "PF-dataset-PASCAL"
#: Pair-list file names per split (HPF's ``trn_`` or NC-Net's ``train_``).
SPLIT_FILES = {"trn": ("trn_pairs.csv", "train_pairs.csv"), "val": ("val_pairs.csv",), "test": ("test_pairs.csv",)}
KPS_COLUMNS = ("XA", "YA", "XB", "YB")
#: A CSV keypoint is the ``.mat`` row it lies within this many pixels of (both images), for ``kps_ids``.
MATCH_TOL = 0.01


@dataclass(frozen=True)
class _Row:
    """One line of a pair CSV."""

    path: str  #: the CSV, relative to the dataset root
    line: int
    pair_id: int  #: the row's position in the CSV, from 1 (a skipped row leaves its id unused)
    category: str
    src: str  #: image file name
    trg: str
    flip: int
    kps: tuple[np.ndarray, np.ndarray] | None  #: (n, 2) source and target keypoints, if the CSV has them

    @property
    def where(self) -> str:
        """``<csv> line <n>``, for messages."""
        return f"{self.path} line {self.line}"


def _floats(cell: str, column: str, where: str, rel: str) -> np.ndarray:
    try:
        values = np.array([float(v) for v in cell.split(";")], dtype=np.float64)
    except ValueError:
        raise SourceError(rel, f"{where}: {column} must be ';'-separated numbers, got {cell[:40]!r}") from None
    if not np.isfinite(values).all():
        raise SourceError(rel, f"{where}: {column} holds a value that is not a finite number ({cell[:40]!r})")
    return values


def _parse_row(r: dict[str, str], rel: str, line: int, pair_id: int, columns: int, has_kps: bool) -> _Row:
    where = f"line {line}"
    if None in r or None in r.values():
        raise SourceError(rel, f"{where}: expected {columns} columns")
    cls = r["class"].strip()
    if not (cls.isascii() and cls.isdigit() and 1 <= int(cls) <= len(CATEGORIES)):
        raise SourceError(rel, f"{where}: class must be 1..{len(CATEGORIES)} (VOC order), got {cls!r}")
    flip = r.get("flip", "0").strip()
    if flip not in ("0", "1"):
        raise SourceError(rel, f"{where}: flip must be 0 or 1, got {flip!r}")
    kps = None
    if has_kps:
        xa, ya, xb, yb = (_floats(r[c], c, where, rel) for c in KPS_COLUMNS)
        if not len(xa) == len(ya) == len(xb) == len(yb):
            raise SourceError(rel, f"{where}: keypoint counts differ (XA {len(xa)}, YA {len(ya)}, "
                                   f"XB {len(xb)}, YB {len(yb)})")
        kps = (np.stack([xa, ya], 1), np.stack([xb, yb], 1))
    return _Row(rel, line, pair_id, CATEGORIES[int(cls) - 1],
                *(PurePosixPath(r[c].strip().replace("\\", "/")).name for c in ("source_image", "target_image")),
                int(flip), kps)


def _slot_ids(src_slots: np.ndarray, trg_slots: np.ndarray, src_kps: np.ndarray, trg_kps: np.ndarray
              ) -> np.ndarray | None:
    """The ``.mat`` row of each CSV keypoint (the same row in both images, within ``MATCH_TOL``), or
    None where some keypoint has no such row."""
    d = np.maximum(np.abs(src_kps[:, None] - src_slots[None]).max(-1),
                   np.abs(trg_kps[:, None] - trg_slots[None]).max(-1))
    hit = np.nan_to_num(d, nan=np.inf) <= MATCH_TOL
    ids = hit.argmax(1)
    if not hit.any(1).all() or len(np.unique(ids)) != len(ids):
        return None
    return ids


class PFPascal(Converter):
    """PF-PASCAL (splits ``trn``, ``val``, ``test`` as present).

    Images are those the pair lists name, keyed ``(class, name)``, sorted by class (VOC order) and
    name; pairs keep their CSV order, with pair ids 1.. per split (a pair's row in its CSV). ``kps_ids``
    are ``.mat`` rows (for CSV keypoints: the row each matches; positions in the pair where none does,
    counted in the notes). A bad CSV header always raises, whatever the error policy.
    """

    name = "pfpascal"
    title = "PF-PASCAL"
    layout = ("JPEGImages/", "Annotations/<class>/<name>.mat")
    data_dirs = (DATA_DIR, "")

    def _split_files(self) -> dict[str, Path]:
        """The pair lists of the first folder holding any: the root, ``image_pairs/``, the data folder."""
        for folder in dict.fromkeys((self.root, self.root / "image_pairs", self.data)):
            found = {}
            for split, names in SPLIT_FILES.items():
                path = next((folder / n for n in names if (folder / n).is_file()), None)
                if path is not None:
                    found[split] = path
            if found:
                return found
        return {}

    def _read_csv(self, path: Path, split: str) -> list[_Row]:
        """The rows of a pair CSV; a bad row raises, or is skipped by the policy (a bad header always raises)."""
        rel = self.rel(path)
        rows: list[_Row] = []
        with self.source_text(rel) as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in ("source_image", "target_image", "class") if c not in columns]
            if missing:
                raise SourceError(rel, f"missing column(s) {', '.join(missing)} (header {columns})")
            has_kps = any(c in columns for c in KPS_COLUMNS)
            if has_kps and not all(c in columns for c in KPS_COLUMNS):
                raise SourceError(rel, f"keypoint columns must be all of {', '.join(KPS_COLUMNS)} (header {columns})")
            for pair_id, r in enumerate(reader, start=1):
                line = reader.line_num
                row = self.policy.attempt("pair", f"{split}/line {line}",
                                          lambda: _parse_row(r, rel, line, pair_id, len(columns), has_kps))
                if row is not None:
                    rows.append(row)
        return rows

    def image_items(self) -> list[Item[ImageRecord]]:
        self.files = self._split_files()
        if not self.files:
            raise SourceError(self.root, "no pair list found: test_pairs.csv, trn_pairs.csv (or train_pairs.csv), "
                                         f"val_pairs.csv in the root, image_pairs/ or {DATA_DIR}/")
        self.sources += self.files.values()
        self.rows = {split: self._read_csv(path, split) for split, path in self.files.items()}
        self.notes += [f"split {s!r} absent (no {' or '.join(n)}): not packed"
                       for s, n in SPLIT_FILES.items() if s not in self.files]
        named: dict[tuple[str, str], tuple[str, str]] = {}  # (class, name) -> (file name, first line naming it)
        for rs in self.rows.values():
            for r in rs:
                for f in (r.src, r.trg):
                    named.setdefault((r.category, PurePosixPath(f).stem), (f, r.where))
        if not named:
            raise SourceError(self.rel(next(iter(self.files.values()))), "the pair lists hold no pairs")
        self.categories = list(CATEGORIES)
        keys = sorted(named, key=lambda k: (CATEGORIES.index(k[0]), k[1]))
        return [Item("/".join(k), partial(self._read_image, k[0], *named[k]),
                     self.rel(self._mat(k[0], PurePosixPath(named[k][0]).stem))) for k in keys]

    def _mat(self, category: str, name: str) -> Path:
        return self.data / "Annotations" / category / f"{name}.mat"

    def _read_image(self, category: str, filename: str, where: str) -> ImageRecord:
        name = PurePosixPath(filename).stem
        mat = self._mat(category, name)
        rel = self.rel(mat)
        if not mat.is_file():
            raise SourceError(rel, f"annotation file not found (named by {where})")
        m = load_mat(self.read_source(rel), rel, ("kps", "bbox"))
        kps, bbox = np.asarray(m["kps"]), np.asarray(m["bbox"])
        if kps.dtype.kind not in "fiu" or kps.ndim != 2 or (kps.size and kps.shape[1] != 2):
            raise SourceError(rel, f"kps must be a numeric (K, 2) array of x, y rows, got {kps.dtype} {kps.shape}")
        if bbox.dtype.kind not in "fiu" or bbox.size != 4:
            raise SourceError(rel, f"bbox must be 4 numbers x1, y1, x2, y2, got {bbox.dtype} {bbox.shape}")
        image_path = self.data / "JPEGImages" / filename
        width, height, depth = image_header(image_path, self.root, where)
        return ImageRecord(
            category=category, name=name, image_path=image_path, mask_path=None, width=width, height=height,
            bbox=tuple(float(v) for v in bbox.ravel()),  # type: ignore[arg-type]
            keypoints=kps.reshape(-1, 2).astype(np.float32), depth=depth,
        )

    def finish_images(self, images: list[ImageRecord]) -> list[ImageRecord]:
        """Keypoints NaN-padded to the most rows of any image (the store's ``num_keypoints``)."""
        self.num_keypoints = max((len(im.keypoints) for im in images), default=0)
        pad = np.full((self.num_keypoints, 2), np.nan, dtype=np.float32)
        return [replace(im, keypoints=np.concatenate([im.keypoints, pad[len(im.keypoints):]])) for im in images]

    def pair_items(self) -> Iterator[tuple[str, list[Item[PairRecord]]]]:
        self._unmatched = 0
        for split, rs in self.rows.items():
            has_kps = bool(rs) and rs[0].kps is not None
            self.notes.append(f"{split}: {len(rs):,} pairs listed in {self.rel(self.files[split])}, keypoints "
                              + ("from the CSV" if has_kps else "from the .mat rows annotated in both images"))
            yield split, [Item(f"{split}/{pair_stem(r.pair_id, PurePosixPath(r.src).stem, PurePosixPath(r.trg).stem, r.category)}",
                               partial(self._pair, split, r), r.path) for r in rs]
        if self._unmatched:
            self.notes.append(f"{self._unmatched} pairs have CSV keypoints that are not all rows of their images' .mat "
                              f"kps (within {MATCH_TOL} px): their kps_ids are positions in the pair")

    def _pair(self, split: str, r: _Row) -> PairRecord:
        src, trg = (named_image(self.images, self.skipped_images, (r.category, PurePosixPath(f).stem), r.path,
                                f"line {r.line}: {f!r}") for f in (r.src, r.trg))
        if r.kps is None:
            ids = np.flatnonzero(np.isfinite(src.keypoints).all(1) & np.isfinite(trg.keypoints).all(1))
            src_kps, trg_kps = src.keypoints[ids], trg.keypoints[ids]
        else:
            keep = np.isfinite(r.kps[0]).all(1) & np.isfinite(r.kps[1]).all(1)
            src_kps, trg_kps = r.kps[0][keep], r.kps[1][keep]
            slots = _slot_ids(src.keypoints, trg.keypoints, src_kps, trg_kps)
            self._unmatched += slots is None
            ids = np.arange(len(src_kps)) if slots is None else slots
        return PairRecord(
            split=split, pair_id=r.pair_id, stem=pair_stem(r.pair_id, src.name, trg.name, r.category),
            category=r.category, src=src.key, trg=trg.key, kps_ids=ids.astype(np.int16),
            src_kps=src_kps.astype(np.float32), trg_kps=trg_kps.astype(np.float32), flip=r.flip, path=r.path,
        )
