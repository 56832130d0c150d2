"""Keypoint subsets of a split: which pair keypoints a protocol's ``keypoints`` field scores.

``geo-aware`` is GeoAware-SC's geometry-aware subset ("Telling Left from Right", CVPR'24): a pair keypoint
counts iff (being a pair keypoint) it is visible in both images and some *keypoint group* of its category
-- same-type parts such as a car's four wheels, the store's ``keypoint_groups`` attribute, slot ids in the
dataset's own numbering -- holds it and has at least two members visible in the image predicted in (the
target for ``src->trg``). Parts without a look-alike (groups of one) never count.
"""
from __future__ import annotations

import numpy as np

from ..core.errors import StoreError
from ..store.reader import Store


def group_table(store: Store) -> np.ndarray:
    """bool (C, G, K): ``[c, g, k]`` is True when slot ``k`` is in group ``g`` of category ``c`` (groups of a
    category padded with empty rows to the most any category has), from the ``keypoint_groups`` attribute."""
    groups = store.attrs.get("keypoint_groups")
    if not groups:
        raise StoreError(f"{store.path}: no keypoint_groups attribute, so no geo-aware subset "
                         f"(repack the {store.dataset} source with this spairstore version)")
    K, cats = int(store.attrs["num_keypoints"]), list(store.categories)
    width = max((len(g) for g in groups.values()), default=0)
    table = np.zeros((len(cats), max(width, 1), K), dtype=bool)
    for name, of_category in groups.items():
        if name not in cats:
            raise StoreError(f"{store.path}: keypoint_groups names {name!r}, which is not a category of the store")
        for g, slots in enumerate(of_category):
            if any(not 0 <= k < K for k in slots):
                raise StoreError(f"{store.path}: keypoint_groups[{name!r}] holds a slot outside 0..{K - 1}")
            table[cats.index(name), g, slots] = True
    return table


def geo_aware_mask(store: Store, split: str, rows: np.ndarray, direction: str = "src->trg") -> np.ndarray:
    """bool (len(rows), M): pair keypoints of ``rows`` in the geo-aware subset (padding slots False).

    Visibility in the image predicted in comes from its image annotation (``images/keypoints``: every
    annotated slot, not only the pair's mutually visible ones), as GeoAware-SC reads it."""
    t = store.pairs(split)
    table = group_table(store)[t.category[rows]]  # (P, G, K)
    shown_in = (t.trg if direction == "src->trg" else t.src)[rows]
    shown = np.isfinite(store.images.keypoints[shown_in]).all(-1)  # (P, K)
    qualifies = (table & shown[:, None, :]).sum(-1) >= 2  # (P, G)
    slot_ok = (table & qualifies[..., None]).any(1)  # (P, K)
    M = t.kps_ids.shape[1]
    real = np.arange(M) < t.n_kps[rows, None]
    ids = np.where(real, t.kps_ids[rows], 0).astype(np.int64)
    return real & np.take_along_axis(slot_ok, ids, axis=1)
