"""The contract every converter fulfils, and what all of them share.

After torchvision's dataset base (a class per dataset, constructed on a root it checks) and the builders
of Hugging Face ``datasets`` (keyed examples from generators), a converter is a :class:`Converter`
subclass that declares

* ``name`` (the store's ``dataset`` attribute, ``pack --dataset``) and ``title`` (for messages);
* ``layout``: the paths a root must have, written as the user reads them (``<...>`` stands for any name,
  a trailing ``/`` for a folder), and ``data_dirs``: the sub-folders of the root the layout may lie in
  instead. The one declaration drives :meth:`Converter.detect` and the ``not a <title> root (needs ...)``
  error;
* two generators: :meth:`Converter.image_items` yields an :class:`Item` per image, and
  :meth:`Converter.pair_items` the items of each split's pairs (it runs after the images are read, which
  it finds in ``self.images``).

:meth:`Converter.read` runs them once, and everything converters have in common happens there: progress
bars, the error policy (``fail`` raises the first :class:`~spairstore.core.errors.SourceError`; ``skip``
leaves the item out and lists it), unique keys (image ``(category, name)``, pair ``(split, pair_id)``:
a second item with a key is an error naming both files), the size and SHA-256 of every source file
parsed (:meth:`Converter.read_source` and the readers built on it, for the manifest) and the list of the
source files behind what was kept.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from spairstore.core.errors import SourceError
from spairstore.core.manifest import sha256_bytes
from spairstore.core.records import DatasetRecords, ErrorPolicy, ImageRecord, OnError, PairRecord, Skipped

#: ``progress(iterable, description, total)`` wraps a long loop (e.g. a tqdm bar) and yields its items.
Progress = Callable[[Iterable[Any], str, int], Iterable[Any]]
#: Source path (POSIX, relative to the root) -> (size in bytes, SHA-256 hex); see ``DatasetRecords.digests``.
Digests = dict[str, tuple[int, str]]
R = TypeVar("R", ImageRecord, PairRecord)


@dataclass(frozen=True)
class Item(Generic[R]):
    """One image or pair to read."""

    label: str  #: ``category/name`` of an image, ``split/stem`` of a pair: its key in ``skipped`` lists
    #: Parses and checks the item: its record, or None where the dataset's own rules leave it out (not
    #: an error; the converter says how many in its notes). A bad file raises SourceError naming it.
    read: Callable[[], R | None]
    path: str = ""  #: the file that defines the item, POSIX relative to the root; "" for a built item


def _no_progress(items: Iterable[Any], description: str, total: int) -> Iterable[Any]:
    return items


def _in(rec: ImageRecord | PairRecord, categories: set[str]) -> bool:
    """Whether a record stays under ``--categories``: an image of one, a pair whose two images are."""
    if isinstance(rec, ImageRecord):
        return rec.category in categories
    return rec.src[0] in categories and rec.trg[0] in categories


def _present(folder: Path, pattern: str) -> bool:
    """Whether ``folder`` holds a path matching a ``layout`` entry (``<...>`` any name, ``/`` a folder)."""
    glob = re.sub(r"<[^>]*>", "*", pattern)
    want_dir = glob.endswith("/")
    return any(p.is_dir() or not want_dir for p in folder.glob(glob.rstrip("/")))


class Converter(ABC):
    """Reads one dataset root in its native layout into canonical records (:meth:`read`).

    Construction checks the layout (:class:`SourceError` ``not a <title> root (needs ...)`` otherwise).
    Attributes a subclass fills while its generators run: ``categories`` (in the store's order),
    ``notes``, ``sources`` (files read that no item names, e.g. pair lists), and optionally
    ``category_groups``.
    """

    name: ClassVar[str]  #: e.g. ``spair71k``
    title: ClassVar[str]  #: e.g. ``SPair-71k``
    article: ClassVar[str] = "a"  #: before the title in messages: "not a SPair-71k root", "not an AP-10K root"
    layout: ClassVar[tuple[str, ...]]  #: paths a root must have, e.g. ``ImageAnnotation/<category>/<name>.json``
    data_dirs: ClassVar[tuple[str, ...]] = ("",)  #: where the layout may lie: "" the root, else a sub-folder
    #: names of the pair ``subset`` labels (``PairRecord.subset`` indexes them); empty where there are none
    subset_names: ClassVar[tuple[str, ...]] = ()
    num_keypoints: int  #: keypoint slots per image
    mask_classes: ClassVar[int] = 0  #: see ``DatasetRecords.mask_classes``

    def __init__(self, root: str | Path, progress: Progress | None = None, on_error: OnError = "fail",
                 follow_links: bool = False, categories: Sequence[str] | None = None):
        self.root = Path(root).resolve()
        #: the categories to keep (``pack --categories``), None for all: images of others and pairs using
        #: one are left out after reading, so the dataset's own checks still see the whole root
        self.only = None if categories is None else list(dict.fromkeys(categories))
        #: read files that symbolic links lead to outside the root (else they are bad items)
        self.follow_links = follow_links
        self._remarks: dict[str, list[str]] = {}  # what -> files it was seen in
        self.policy = ErrorPolicy(on_error)
        self.progress: Progress = progress or _no_progress
        data = self.locate(self.root) if self.root.is_dir() else None
        if data is None:
            raise SourceError(self.root, f"not {self.article} {self.title} root (needs {self.needs()})")
        self.data: Path = data  #: the folder the layout was found in (the root or one of ``data_dirs``)
        self.categories: list[str] = []
        self.category_groups: dict[str, list[str]] = {}
        self.notes: list[str] = []
        self.sources: list[Path] = []
        self.digests: Digests = {}
        #: the images read and kept, by key; filled before :meth:`pair_items` runs
        self.images: dict[tuple[str, str], ImageRecord] = {}
        #: images left out under ``skip``, by ``category/name``
        self.skipped_images: dict[str, Skipped] = {}
        self._kept: list[tuple[ImageRecord | PairRecord, str]] = []  # kept records and their files

    # -- the layout ------------------------------------------------------------------------------
    @classmethod
    def locate(cls, root: Path) -> Path | None:
        """The folder of ``root`` (itself or one of :attr:`data_dirs`) holding every :attr:`layout` path."""
        for d in cls.data_dirs:
            folder = root / d if d else root
            if all(_present(folder, p) for p in cls.layout):
                return folder
        return None

    @classmethod
    def detect(cls, root: str | Path) -> bool:
        """True when ``root`` has this dataset's layout."""
        root = Path(root)
        return root.is_dir() and cls.locate(root) is not None

    @classmethod
    def needs(cls) -> str:
        """What a root must hold, for messages: the layout, and where it may lie."""
        subs = [f"{d}/" for d in cls.data_dirs if d]
        return " and ".join(cls.layout) + (f", in the root or in {' or '.join(subs)}" if subs else "")

    # -- what a subclass provides ----------------------------------------------------------------
    @abstractmethod
    def image_items(self) -> Iterable[Item[ImageRecord]]:
        """One item per image to read, in the store's order."""

    @abstractmethod
    def pair_items(self) -> Iterator[tuple[str, Iterable[Item[PairRecord]]]]:
        """``(split, items)`` for each split, the items in the split's pair order."""

    def finish_images(self, images: list[ImageRecord]) -> list[ImageRecord]:
        """The images read, as the store keeps them (e.g. keypoints padded to one width); called once."""
        return images

    def keypoint_flip(self) -> dict[str, list[int]] | None:
        """Category -> keypoint slot permutation under a horizontal flip, or None (see ``DatasetRecords``)."""
        return None

    def keypoint_groups(self) -> dict[str, list[list[int]]]:
        """Category -> groups of same-type keypoint slots (geo-aware subset), or {} (see ``DatasetRecords``)."""
        return {}

    # -- reading sources -------------------------------------------------------------------------
    def remark(self, what: str, rel: str) -> None:
        """Something the user should hear about, but not an error (e.g. a keypoint on the image's edge):
        counted per ``what`` into one note of the store (with the first file), not one per file."""
        self._remarks.setdefault(what, []).append(rel)

    def inside(self, path: Path | str) -> None:
        """Refuse a source file that a symbolic link (of the file or of a folder above it) leads to
        outside the root: a store may be shared, and must not carry files from elsewhere on this machine.
        ``follow_links`` allows it."""
        real = os.path.realpath(path)
        root = str(self.root)
        if not self.follow_links and real != root and not real.startswith(root + os.sep):
            rel = os.path.relpath(path, root)
            raise SourceError(rel, f"is a symbolic link to {real}, outside the dataset root "
                                   "(pack --follow-links reads such files)")

    def rel(self, path: Path) -> str:
        """``path`` relative to the root, POSIX: how messages and the manifest name a file."""
        return path.relative_to(self.root).as_posix()

    def read_source(self, rel: str) -> bytes:
        """The bytes of the source file ``rel`` (relative to the root), recording their size and SHA-256."""
        path = f"{self.root}/{rel}"  # plain strings: tens of thousands of files per pack
        self.inside(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise SourceError(rel, "file not found") from None
        except OSError as e:
            raise SourceError(rel, f"cannot read ({e.strerror})") from None
        self.digests[rel] = (len(data), sha256_bytes(data))
        return data

    def source_text(self, rel: str) -> io.StringIO:
        """A UTF-8 text source file (e.g. a pair CSV) as a stream for :mod:`csv`."""
        try:
            return io.StringIO(self.read_source(rel).decode("utf-8-sig"), newline="")
        except UnicodeDecodeError as e:
            raise SourceError(rel, f"not UTF-8 text ({e})") from None

    def load_json(self, rel: str) -> dict[str, Any]:
        """A JSON object source file, parsed from the very bytes whose digest is recorded."""
        raw = self.read_source(rel)
        try:
            data = json.loads(raw.decode("utf-8"))  # str: skips json's encoding detection
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise SourceError(rel, f"malformed JSON ({e})") from None
        if not isinstance(data, dict):
            raise SourceError(rel, "expected a JSON object")
        return data

    # -- reading the root ------------------------------------------------------------------------
    def read(self) -> DatasetRecords:
        """Every image and pair of the root as canonical records, checked as they are read."""
        images = self.finish_images(self._collect("image", self.image_items(), "image annotations"))
        if self.only == []:
            raise SourceError(self.root, f"--categories names no category (this {self.title} root has "
                                         f"{', '.join(self.categories)})")
        unknown = [c for c in self.only or () if c not in self.categories]
        if unknown:
            raise SourceError(self.root, f"--categories: no category {', '.join(map(repr, unknown))} in this "
                                         f"{self.title} root (it has {', '.join(self.categories)})")
        self.images = {im.key: im for im in images}
        self.skipped_images = {s.key: s for s in self.policy.skipped if s.kind == "image"}
        pairs = {split: self._collect("pair", items, f"{split} pairs") for split, items in self.pair_items()}
        if not any(pairs.values()):
            bad = [s for s in self.policy.skipped if s.kind == "pair"]
            raise SourceError(self.root, f"no pairs left: all {len(bad)} were skipped, the first as {bad[0]}"
                              if bad else "the dataset lists no pairs")
        self.notes += [f"{len(files):,} {what}, e.g. {files[0]}" for what, files in self._remarks.items()]
        for p in self.sources:
            self.inside(p)
        records = DatasetRecords(
            dataset=self.name, root=self.root, categories=self.categories, num_keypoints=self.num_keypoints,
            images=images, pairs=pairs, sources=self._sources(self._kept, images), notes=self.notes,
            skipped=self.policy.skipped, digests=self.digests, keypoint_flip=self.keypoint_flip(),
            category_groups=self.category_groups, subset_names=list(self.subset_names),
            keypoint_groups=self.keypoint_groups(), mask_classes=self.mask_classes,
        )
        return records if self.only is None else self._within(records, set(self.only))

    def _sources(self, kept: list[tuple[ImageRecord | PairRecord, str]], images: list[ImageRecord]) -> list[Path]:
        """Every source file behind the records kept, for the manifest: item files, other files read
        (pair lists), images and masks."""
        return list(dict.fromkeys([*(self.root / p for _, p in kept), *self.sources, *(im.image_path for im in images),
                                   *(im.mask_path for im in images if im.mask_path is not None)]))

    def _within(self, rec: DatasetRecords, keep: set[str]) -> DatasetRecords:
        """``rec`` restricted to the categories ``keep`` (``--categories``): their images, the pairs whose
        two images are among them, the per-category declarations and the files behind what stays."""
        cats = rec.categories
        images = [im for im in rec.images if im.category in keep]
        pairs = {split: [p for p in ps if _in(p, keep)] for split, ps in rec.pairs.items()}
        notes = [f"--categories: kept {len(keep)} of the {len(cats)} categories ({', '.join(c for c in cats if c in keep)}"
                 f"): {len(images):,} images, " + ", ".join(f"{split} {len(ps):,} pairs" for split, ps in pairs.items())]
        notes += [f"split {split!r} has no pair within those categories: not packed" for split, ps in pairs.items()
                  if not ps]
        pairs = {split: ps for split, ps in pairs.items() if ps}
        if not pairs:
            raise SourceError(self.root, "--categories: no pair has both images in those categories")
        flip = rec.keypoint_flip
        return dataclasses.replace(
            rec, categories=[c for c in cats if c in keep], images=images, pairs=pairs, notes=rec.notes + notes,
            sources=self._sources([(r, p) for r, p in self._kept if _in(r, keep)], images),
            keypoint_flip=None if flip is None else {c: v for c, v in flip.items() if c in keep},
            keypoint_groups={c: v for c, v in rec.keypoint_groups.items() if c in keep},
            category_groups={g: [v for c, v in zip(cats, vs) if c in keep] for g, vs in rec.category_groups.items()},
            category_filter=[c for c in cats if c in keep])

    def _read_item(self, item: Item[R]) -> R | None:
        """The item's record, its image files (which the writer reads) checked to lie inside the root."""
        rec = item.read()
        if isinstance(rec, ImageRecord):
            for path in (rec.image_path, rec.mask_path):
                if path is not None:
                    self.inside(path)
        return rec

    def _collect(self, kind: str, items: Iterable[Item[R]], description: str) -> list[R]:
        """The records of ``items`` under the error policy, each key once (a repeat is a bad item)."""
        items = items if isinstance(items, Sequence) else list(items)
        records: list[R] = []
        first: dict[tuple[Any, ...], str] = {}
        for item in self.progress(items, description, len(items)):
            rec = self.policy.attempt(kind, item.label, partial(self._read_item, item))
            if rec is None:
                continue
            key = rec.key
            if key in first:
                what = (f"duplicate image key {'/'.join(key)}" if kind == "image"
                        else f"duplicate pair_id {key[1]} in split {key[0]!r}")
                self.policy.skip(kind, item.label, SourceError(item.path or self.root, f"{what} (also in {first[key]})"))
                continue
            first[key] = item.path
            records.append(rec)
            if item.path:
                self._kept.append((rec, item.path))
        return records
