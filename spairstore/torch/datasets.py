"""PyTorch datasets over a store: :class:`PairDataset` and :class:`ImageDataset`.

A dataset holds the store's path and the numpy tables it needs, nothing else: it pickles for ``spawn``
and ``forkserver`` workers, and each process opens the store itself on first use (a store opened before a
``fork`` reads on in the child through the files it opened). A process that finds another version of the
store, or of a feature set it reads, at the path (repacked, or a features commit) raises StoreError rather
than mix it with the dataset's tables and maps. Batches are read whole: :meth:`PairDataset.__getitems__`
(which ``torch.utils.data.DataLoader`` calls with a batch's indices) reads the batch's distinct images
once, in storage order, straight into the batch tensors: in a DataLoader worker those are allocated in
shared memory, so the batch crosses to the main process without another copy; elsewhere they come from
recycled buffers (:mod:`.memory`).

The batch keys, their dtypes, shapes and coordinate frames are listed in one place,
:mod:`spairstore.torch.batch` (``BATCH_KEYS``; the README's table is generated from it). Every
coordinate is in *store pixels* (x, y); ``scale``/``offset`` follow every augmentation, so
:func:`spairstore.core.geometry.to_original` maps a point of the batch back to the original image.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..core import geometry
from ..core.errors import SpairstoreError
from ..core.schema import FIELD_ARRAYS, PAIR_LABELS, field_names
from ..store.backends import is_url
from ..store.reader import Store
from .augment import Augment, View, needs_keypoint_flip
from .collate import Batch, Samples, pad_keypoints
from .memory import Alloc, BatchMemory

#: Field names a dataset can read; plus ``features/<name>`` for each stored feature set.
FIELDS = ("pixels", "mask", "keypoints", "labels", "image_bytes", "mask_bytes")
_PAYLOAD = ("pixels", "mask")
_BYTES = ("image_bytes", "mask_bytes")

#: One image's keypoints: slot ids (n,) and points (n, 2).
Points = tuple[np.ndarray, np.ndarray]


def _store_path(store: str | Path | Store) -> Path | str:
    if isinstance(store, Store):
        return store.path
    return store if is_url(store) else Path(store)


class _StoreDataset(Dataset):
    """Shared machinery: the path, the lazily opened store, field parsing and payload reads."""

    item = "items"  #: what one index is, for the repr

    def __init__(self, store: str | Path | Store, fields: Sequence[str], augment: Augment | None, seed: int,
                 num_keypoints: int | None = None):
        self.path = _store_path(store)
        s = store if isinstance(store, Store) else Store(self.path)
        self._store: Store | None = s
        self._identity = s.identity  # of the file the tables below come from
        self.alloc = BatchMemory()
        fields = field_names(fields)
        unknown = [f for f in fields if f not in FIELDS and not f.startswith("features/")]
        if unknown:
            raise SpairstoreError(f"unknown field(s) {', '.join(map(repr, unknown))}; "
                                  f"known: {', '.join(FIELDS)}, features/<name>")
        for f in fields:
            if f.startswith("features/"):
                s.feature_set(f[len("features/"):])
        if "mask" in fields and s.shapes["images/mask"][0][0] == 0:
            raise SpairstoreError(f"{self.path}: this store has no masks; drop the 'mask' field")
        if augment is not None and any(f.startswith("features/") for f in fields):
            raise SpairstoreError("augmentations move pixels; precomputed features cannot follow them -- "
                                  "read features without an augmentation")
        if augment is not None and needs_keypoint_flip(augment) and s.keypoint_flip is None:
            raise SpairstoreError(f"{self.path}: the store has no left/right keypoint permutation "
                                  "(keypoint_flip attribute), so a horizontal flip would mislabel keypoints")
        self.fields = fields
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self.image_size = s.image_size
        im = s.images
        self._images = {k: im[k] for k in ("category", "size", "scale", "offset", "bbox", "keypoints")}
        k = self._images["keypoints"].shape[1]
        if num_keypoints is not None:
            if num_keypoints < k:
                raise SpairstoreError(f"{self.path}: num_keypoints={num_keypoints} is fewer than the store's {k} "
                                      "keypoint slots")
            pad = np.full((len(s), num_keypoints - k, 2), np.nan, dtype=self._images["keypoints"].dtype)
            self._images["keypoints"] = np.concatenate([self._images["keypoints"], pad], axis=1)
        self.num_keypoints = self._images["keypoints"].shape[1]  #: K: every keypoint field is padded to it
        self._flip = s.keypoint_flip

    def __repr__(self) -> str:
        split = "all images" if getattr(self, "split", None) is None else f"split {self.split!r}"
        extra = "" if self.augment is None else f", augment {self.augment!r}"
        return (f"{type(self).__name__}({self.path.name}, {split}: {len(self):,} {self.item}, fields "
                f"{', '.join(self.fields)}{extra})")

    def set_epoch(self, epoch: int) -> None:
        """Augmentation randomness is a function of ``(seed, epoch, index)``: the same for any worker count."""
        self.epoch = int(epoch)

    def store(self) -> Store:
        """This process's store (opened on first use; a forked child reads through the files the parent opened).
        Raises StoreError where the path now holds another version than the one the tables came from."""
        if self._store is None:
            store = Store(self.path)
            store.require_identity(self._identity)
            self._store = store
        return self._store

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None  # each spawned process opens its own
        return state

    def _read_images(self, rows: np.ndarray, alloc: Alloc | None) -> Batch:
        """Image-level payload fields of image ``rows``: pixels, mask, features, original bytes."""
        s = self.store()
        alloc = alloc or self.alloc.batch()
        out: Batch = {}
        for f in self.fields:
            if f in _PAYLOAD or f.startswith("features/"):
                shape, dtype = s.shapes[f"{f}/data" if f.startswith("features/") else FIELD_ARRAYS[f]]
                t = alloc((len(rows), *shape[1:]), torch.from_numpy(np.empty(0, dtype)).dtype)
                s.read(f, rows, out=t.numpy())
                out[f] = t
            elif f in _BYTES:
                get = s.image_bytes if f == "image_bytes" else s.mask_bytes
                out[f] = [get(int(r)) for r in rows]
        return out

    def _frame(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Geometry of image ``rows`` (fresh arrays): ``scale``/``offset`` (n, 2) and ``bbox`` (n, 4), store pixels."""
        im = self._images
        scale, offset = im["scale"][rows], im["offset"][rows]
        bbox = geometry.to_store(im["bbox"][rows].reshape(-1, 2, 2), scale[:, None], offset[:, None]).reshape(-1, 4)
        return {"scale": scale, "offset": offset, "bbox": bbox}

    def _slots(self, rows: np.ndarray, frame: dict[str, np.ndarray]) -> np.ndarray:
        """Every keypoint slot of image ``rows`` in store pixels: (n, K, 2), NaN where absent."""
        return geometry.to_store(self._images["keypoints"][rows], frame["scale"][:, None], frame["offset"][:, None])

    def _augment(self, images: Batch, rows: np.ndarray, frame: dict[str, np.ndarray], points: list[Points],
                 keys: list[tuple[int, int]]) -> tuple[list[Points], np.ndarray]:
        """Apply the augmentation to image k of a batch (payload ``images[f][k]``, ``frame[..][k]`` updated in
        place, keypoints ``points[k]``) with a generator seeded by ``(seed, epoch, *keys[k])``."""
        flipped = np.zeros(len(rows), dtype=bool)
        moved = []
        for k, row in enumerate(rows.tolist()):
            v = View(pixels=images["pixels"][k].numpy() if "pixels" in images else None,
                     mask=images["mask"][k].numpy() if "mask" in images else None,
                     ids=points[k][0], points=points[k][1], bbox=frame["bbox"][k].copy(),
                     scale=frame["scale"][k].copy(), offset=frame["offset"][k].copy(), size=self.image_size,
                     flip_permutation=None if self._flip is None else self._flip[self._images["category"][row]])
            self.augment(v, np.random.default_rng((self.seed, self.epoch, *keys[k])))  # type: ignore[misc]
            frame["bbox"][k], frame["scale"][k], frame["offset"][k] = v.bbox, v.scale, v.offset
            flipped[k] = v.flipped
            moved.append((v.ids, v.points))
        return moved, flipped

    def _put_frame(self, out: Batch, prefix: str, rows: np.ndarray, frame: dict[str, np.ndarray], sl: slice) -> None:
        out[prefix + "bbox"] = torch.from_numpy(frame["bbox"][sl].astype(np.float32))
        out[prefix + "scale"] = torch.from_numpy(frame["scale"][sl])
        out[prefix + "offset"] = torch.from_numpy(frame["offset"][sl])
        out[prefix + "size"] = torch.from_numpy(self._images["size"][rows[sl]].astype(np.int64))

    def __getitem__(self, index: int) -> Batch:
        """One sample: a plain dict of tensors, the batch's without the batch dimension (fixed shapes, so
        ``default_collate`` stacks samples into the batch :meth:`fetch` reads)."""
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> Samples:
        """The batch ``indices`` read whole (what ``DataLoader`` calls): the sequence of its samples for
        ``default_collate``, the batch itself for :func:`spairstore.collate`. An ``indices`` with an
        ``epoch`` (a Loader's :class:`~spairstore.torch.loader.EpochBatch`) sets the epoch first."""
        epoch = getattr(indices, "epoch", None)
        if epoch is not None:
            self.set_epoch(epoch)
        return Samples(self.fetch(indices))

    def fetch(self, indices: Sequence[int], alloc: Alloc | None = None) -> Batch:
        raise NotImplementedError


class PairDataset(_StoreDataset):
    """The pairs of one split of a store, for ``torch.utils.data``.

    Args:
        store: path or URL of the store (or an open :class:`~spairstore.Store`; only its path is kept).
        split: ``trn``, ``val``, ``test`` (the store's splits).
        fields: what to read, by name: ``pixels``, ``mask``, ``keypoints``, ``labels``, ``image_bytes``,
            ``mask_bytes``, ``features/<name>`` (old spellings such as ``features:<name>`` warn and work);
            one name may be given as a string.
            Indices, categories, boxes and the per-image geometry (``scale``/``offset``, original
            ``size``) always come with a sample; see :mod:`spairstore.torch.batch` for every key.
        augment: a hook ``augment(view, rng)`` applied to each image of a pair (see
            :mod:`spairstore.torch.augment`); None (the default) reads the store as it is.
        seed: seeds the augmentation's randomness together with the epoch and the sample index.
        num_keypoints: pad the keypoint slots to this width instead of the store's ``K`` (absent slots:
            NaN, ids -1, not valid), so that batches of stores with different ``K`` stack, e.g. a
            ``ConcatDataset`` of SPair-71k (30 slots) and AP-10K (17) with ``num_keypoints=30``.

    Keypoints are the pair's correspondences (``src_kps[j, i]`` matches ``trg_kps[j, i]``, slot
    ``kps_ids[j, i]``) in store pixels. With a flip among the augmentations, each image's keypoints come
    from its own annotation (all slots) and a pair keeps the slots present in both images after the flip.
    """

    item = "pairs"

    def __init__(self, store: str | Path | Store, split: str, fields: Sequence[str] = ("pixels", "keypoints"),
                 augment: Augment | None = None, seed: int = 0, num_keypoints: int | None = None):
        super().__init__(store, fields, augment, seed, num_keypoints)
        t = self.store().pairs(split)
        self.split = split
        self._pairs = {k: t[k] for k in ("pair_id", "category", "src", "trg", "n_kps", "kps_ids", "src_kps",
                                         "trg_kps", *PAIR_LABELS)}

    def __len__(self) -> int:
        return len(self._pairs["pair_id"])

    def fetch(self, indices: Sequence[int], alloc: Alloc | None = None) -> Batch:
        """The batch of pairs ``indices``; payloads are read into tensors made by ``alloc`` (default
        the dataset's :class:`BatchMemory`)."""
        idx = np.asarray(indices, dtype=np.int64)
        p, b = self._pairs, len(idx)
        src, trg = p["src"][idx].astype(np.int64), p["trg"][idx].astype(np.int64)
        rows = np.concatenate([src, trg])
        images = self._read_images(rows, alloc)
        frame = self._frame(rows)
        out: Batch = {"index": torch.from_numpy(idx), "category": torch.from_numpy(p["category"][idx].astype(np.int64)),
                      "pair_id": torch.from_numpy(p["pair_id"][idx].astype(np.int64)),
                      "src_row": torch.from_numpy(src), "trg_row": torch.from_numpy(trg)}
        for k, v in images.items():
            out["src_" + k], out["trg_" + k] = v[:b], v[b:]
        kps = self._pair_keypoints(idx, frame)
        if self.augment is not None:
            if needs_keypoint_flip(self.augment):  # slots get relabelled: start from each image's own points
                slots = self._slots(rows, frame)
                points = [(ids := np.flatnonzero(np.isfinite(k).all(axis=1)), k[ids]) for k in slots]
            else:
                n = kps["n_kps"]
                points = [(kps["kps_ids"][j, :n[j]], kps[side][j, :n[j]]) for side in ("src_kps", "trg_kps") for j in range(b)]
            points, flipped = self._augment(images, rows, frame, points, [(i, s) for s in (0, 1) for i in idx.tolist()])
            out["src_flipped"], out["trg_flipped"] = torch.from_numpy(flipped[:b]), torch.from_numpy(flipped[b:])
            if b:
                kps = pad_keypoints(*zip(*[_common(points[j], points[b + j]) for j in range(b)]), self.num_keypoints)
        for prefix, sl in (("src_", slice(0, b)), ("trg_", slice(b, 2 * b))):
            self._put_frame(out, prefix, rows, frame, sl)
        if "keypoints" in self.fields:
            out.update({k: torch.from_numpy(v) for k, v in kps.items()})
        if "labels" in self.fields:
            out.update({k: torch.from_numpy(p[k][idx].astype(np.int64)) for k in PAIR_LABELS})
        return out

    def _pair_keypoints(self, idx: np.ndarray, frame: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The pairs' stored correspondences in store pixels, padded to the store's K slots (ids -1, NaN)."""
        p, b, k = self._pairs, len(idx), self.num_keypoints
        n = p["n_kps"][idx].astype(np.int64)
        valid = np.arange(k) < n[:, None]
        w = p["kps_ids"].shape[1]  # the table's width M <= K
        ids = np.full((b, k), -1, dtype=np.int64)
        ids[:, :w] = p["kps_ids"][idx]
        out = {"kps_ids": np.where(valid, ids, -1), "kps_valid": valid, "n_kps": n}
        for side, sl in (("src", slice(0, b)), ("trg", slice(b, 2 * b))):
            pts = np.full((b, k, 2), np.nan, dtype=np.float32)
            pts[:, :w] = geometry.to_store(p[f"{side}_kps"][idx], frame["scale"][sl, None], frame["offset"][sl, None])
            out[f"{side}_kps"] = np.where(valid[..., None], pts, np.float32(np.nan))
        return out


def _common(src: Points, trg: Points) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correspondences of two images' keypoints: the slots present in both, in the source's order."""
    _, si, ti = np.intersect1d(src[0], trg[0], assume_unique=True, return_indices=True)
    o = np.argsort(si)
    return src[0][si[o]], src[1][si[o]], trg[1][ti[o]]


class ImageDataset(_StoreDataset):
    """The images of a store (all, or those a split uses), for ``torch.utils.data``.

    Same arguments and fields as :class:`PairDataset` (``labels`` does not apply); ``keypoints`` are the
    image's K annotated slots, (B, K, 2) store pixels, NaN where ``keypoints_valid`` is False.
    """

    item = "images"

    def __init__(self, store: str | Path | Store, split: str | None = None,
                 fields: Sequence[str] = ("pixels", "keypoints"), augment: Augment | None = None, seed: int = 0,
                 num_keypoints: int | None = None):
        if "labels" in fields:
            raise SpairstoreError("'labels' are pair labels; ImageDataset has no such field")
        super().__init__(store, fields, augment, seed, num_keypoints)
        s = self.store()
        if split is None:
            self.rows = np.arange(len(s), dtype=np.int64)
        else:
            s.pairs(split)  # raises for an unknown split
            self.rows = np.flatnonzero((s.images.splits >> s.splits.index(split)) & 1).astype(np.int64)
        self.split = split

    def __len__(self) -> int:
        return len(self.rows)

    def fetch(self, indices: Sequence[int], alloc: Alloc | None = None) -> Batch:
        """The batch of images ``indices`` (positions in this dataset, not store rows)."""
        idx = np.asarray(indices, dtype=np.int64)
        rows = self.rows[idx]
        out: Batch = {"index": torch.from_numpy(idx), "row": torch.from_numpy(rows),
                      "category": torch.from_numpy(self._images["category"][rows].astype(np.int64))}
        images = self._read_images(rows, alloc)
        out.update(images)
        frame = self._frame(rows)
        kps = self._slots(rows, frame)
        if self.augment is not None:
            points = [(ids := np.flatnonzero(np.isfinite(k).all(axis=1)), k[ids]) for k in kps]
            points, flipped = self._augment(images, rows, frame, points, [(i, 0) for i in idx.tolist()])
            out["flipped"] = torch.from_numpy(flipped)
            kps = np.full_like(kps, np.nan)
            for j, (ids, pts) in enumerate(points):
                kps[j, ids] = pts
        self._put_frame(out, "", rows, frame, slice(None))
        if "keypoints" in self.fields:
            valid = np.isfinite(kps).all(axis=2)
            out["keypoints"] = torch.from_numpy(np.where(valid[..., None], kps, np.nan).astype(np.float32))
            out["keypoints_valid"] = torch.from_numpy(valid)
        return out

