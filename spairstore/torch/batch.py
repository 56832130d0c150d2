"""The batch schema: every key a :class:`~spairstore.PairDataset` or :class:`~spairstore.ImageDataset`
batch can hold, with its dtype, shape and coordinate frame, in one place.

Dtypes and per-sample shapes come from the store schema (:mod:`spairstore.core.schema`); the dataset
widens integer columns to int64 (what torch indexes with). ``B`` is the batch size, ``S`` the store
size, ``K`` the dataset's ``num_keypoints`` (the store's keypoint slots, or more when given to pad
stores alike); ``C, h, w`` those of a feature set. Keys come with the ``fields=`` that read them and
nothing else changes with flags, except ``flipped`` (with an augmentation). A single sample
(``dataset[i]``) has the same keys without the ``B`` dimension;
``default_collate`` and :func:`spairstore.collate` give the same batch. Pair batches prefix per-image
keys with ``src_``/``trg_``; image batches have them bare. :func:`markdown_table` renders this (the
README's table is tested to equal it) and :func:`expected` gives the keys, dtypes and shapes a given
dataset's batches have (tested against real batches).

:class:`~spairstore.Loader` with ``normalize=True`` (its default) replaces each ``*pixels`` by
``*image``, float32 ``(B, 3, S, S)`` channels-last, ``(pixels / 255 - mean) / std``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core.schema import PAIR_LABELS, field_of
from .datasets import PairDataset


def _torch_dtype(dt: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dt)).dtype


def _from_store(name: str, widen: bool = False) -> tuple[torch.dtype, tuple[int | str, ...]]:
    """dtype and per-sample shape (sizes by name: ``S``, ``K``) of store field ``images/<name>``."""
    f = field_of(f"images/{name}")
    assert f is not None, name
    dt = np.dtype(f.dtype)
    return (torch.int64 if widen and dt.kind in "iu" else _torch_dtype(dt)), tuple(f.shape)


@dataclass(frozen=True)
class BatchKey:
    """One key of a batch. ``name`` has ``{side}`` where pair batches say ``src_``/``trg_``; ``field`` is
    the ``fields=`` entry that reads it (None: always there; ``augment``: with an augmentation)."""

    name: str
    dtype: torch.dtype | type
    shape: tuple[int | str, ...]  #: per sample (the batch adds ``B`` in front); ``len`` for a list
    field: str | None
    meaning: str
    kind: str = "both"  #: ``pair``, ``image`` or ``both`` datasets

    def names(self, pair: bool) -> list[str]:
        return [self.name.format(side=s) for s in ("src_", "trg_")] if pair and "{side}" in self.name \
            else [self.name.format(side="")]


_I64 = torch.int64
BATCH_KEYS: tuple[BatchKey, ...] = (
    BatchKey("index", _I64, (), None, "position in the dataset (what the sampler drew)"),
    BatchKey("category", _I64, (), None, "index into `store.categories`"),
    BatchKey("pair_id", _I64, (), None, "pair id; the pair key is (split, pair_id)", "pair"),
    BatchKey("{side}row", _I64, (), None, "image row in the store", "pair"),
    BatchKey("row", _I64, (), None, "image row in the store", "image"),
    BatchKey("{side}bbox", *_from_store("bbox"), None, "object box x1, y1, x2, y2, store pixels (NaN: none)"),
    BatchKey("{side}scale", *_from_store("scale"), None, "sx, sy: p_store = p_orig * scale + offset (after augmentation)"),
    BatchKey("{side}offset", *_from_store("offset"), None, "ox, oy, store pixels (after augmentation)"),
    BatchKey("{side}size", *_from_store("size", widen=True), None, "original width, height, pixels"),
    BatchKey("{side}pixels", *_from_store("pixels"), "pixels", "letterboxed RGB, store pixels (H, W, C)"),
    BatchKey("{side}mask", *_from_store("mask"), "mask", "class index per store pixel, 0 background/padding"),
    BatchKey("kps_ids", _I64, ("K",), "keypoints", "keypoint slot of each correspondence, -1 padded", "pair"),
    BatchKey("kps_valid", torch.bool, ("K",), "keypoints", "True for the n_kps real correspondences", "pair"),
    BatchKey("n_kps", _I64, (), "keypoints", "correspondences of the pair", "pair"),
    BatchKey("{side}kps", _from_store("keypoints")[0], ("K", 2), "keypoints",
             "x, y store pixels; `src_kps[j, i]` matches `trg_kps[j, i]`; NaN where not kps_valid", "pair"),
    BatchKey("keypoints", *_from_store("keypoints"), "keypoints", "x, y store pixels of every slot; NaN where absent",
             "image"),
    BatchKey("keypoints_valid", torch.bool, ("K",), "keypoints", "True where the slot is annotated", "image"),
    *(BatchKey(label, _I64, (), "labels", "pair label (SPair-71k; -1 unknown)", "pair") for label in PAIR_LABELS),
    BatchKey("{side}image_bytes", bytes, ("len",), "image_bytes", "the original image file, byte for byte (a list)"),
    BatchKey("{side}mask_bytes", bytes, ("len",), "mask_bytes", "the original mask file (a list)"),
    BatchKey("{side}features/<name>", torch.float16, ("C", "h", "w"), "features/<name>",
             "feature set <name>: cell (col, row) <-> store pixels by `core.geometry`"),
    BatchKey("{side}flipped", torch.bool, (), "augment", "mirrored by the augmentation"),
)


def _dtype_name(dtype: torch.dtype | type) -> str:
    return "list of bytes" if dtype is bytes else str(dtype).removeprefix("torch.")


def markdown_table() -> str:
    """The batch schema as a Markdown table (the README's); keys alike but for the name share a row."""
    rows = ["| key: pair batch; image batch | dtype | shape | with `fields=` | meaning |", "|---|---|---|---|---|"]
    groups: list[list[BatchKey]] = []
    for k in BATCH_KEYS:
        if groups and (groups[-1][0].dtype, groups[-1][0].shape, groups[-1][0].field, groups[-1][0].meaning,
                       groups[-1][0].kind) == (k.dtype, k.shape, k.field, k.meaning, k.kind):
            groups[-1].append(k)
        else:
            groups.append([k])
    for g in groups:
        k = g[0]
        sides = [", ".join(f"`{n}`" for key in g for n in key.names(pair)) for pair in (True, False)]
        both = sides[0] if sides[0] == sides[1] else "; ".join(sides)
        label = {"pair": sides[0] + " (pairs)", "image": sides[1] + " (images)", "both": both}[k.kind]
        shape = "(B)" if k.dtype is bytes else f"({', '.join(map(str, ('B', *k.shape)))})"
        field = "always" if k.field is None else "an augmentation" if k.field == "augment" else f"`{k.field}`"
        rows.append(f"| {label} | {_dtype_name(k.dtype)} | {shape} | {field} | {k.meaning} |")
    return "\n".join(rows)


def expected(dataset: Any, batch_size: int) -> dict[str, tuple[torch.dtype | type, tuple[int, ...]]]:
    """``key -> (dtype, shape)`` of a batch of ``batch_size`` from ``dataset`` (a PairDataset or
    ImageDataset), for its fields and augmentation (``bytes``: a list of ``batch_size`` bytes objects)."""
    pair = isinstance(dataset, PairDataset)
    store = dataset.store()
    out: dict[str, tuple[torch.dtype | type, tuple[int, ...]]] = {}
    for k in BATCH_KEYS:
        if k.kind != "both" and (k.kind == "pair") != pair:
            continue
        if k.field == "features/<name>":  # one key per feature set read
            sets = [f[len("features/"):] for f in dataset.fields if f.startswith("features/")]
        elif k.field is None or k.field in dataset.fields or (k.field == "augment" and dataset.augment is not None):
            sets = [""]
        else:
            sets = []
        for name in sets:
            g = store.feature_sets[name] if name else {}
            sizes = {"S": dataset.image_size, "K": dataset.num_keypoints, "C": g.get("channels"),
                     "h": g.get("height"), "w": g.get("width")}
            shape = (batch_size,) if k.dtype is bytes else (batch_size, *(sizes.get(d, d) for d in k.shape))
            for key in k.names(pair):
                out[key.replace("<name>", name)] = (k.dtype, shape)  # type: ignore[assignment]
    return out
