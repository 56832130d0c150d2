"""Collation: single samples into a batch (:func:`collate`), padding keypoint lists to the batch's largest."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..core.errors import SpairstoreError

Batch = dict[str, Any]


def pad_keypoints(ids: Sequence[np.ndarray], src: Sequence[np.ndarray], trg: Sequence[np.ndarray]) -> Batch:
    """Per-sample keypoint lists (ids (n,), points (n, 2)) -> ``kps_ids`` (-1 padded), ``kps_valid``,
    ``n_kps`` and ``src_kps``/``trg_kps`` padded with 0 to the batch's largest ``n``."""
    n = np.array([len(i) for i in ids], dtype=np.int64)
    width = int(n.max(initial=0))
    kps_ids = np.full((len(n), width), -1, dtype=np.int64)
    pts = np.zeros((2, len(n), width, 2), dtype=np.float32)
    for j, k in enumerate(n):
        kps_ids[j, :k] = ids[j]
        pts[0, j, :k], pts[1, j, :k] = src[j], trg[j]
    return {"kps_ids": torch.from_numpy(kps_ids), "kps_valid": torch.from_numpy(kps_ids >= 0),
            "n_kps": torch.from_numpy(n), "src_kps": torch.from_numpy(pts[0]), "trg_kps": torch.from_numpy(pts[1])}


def collate(samples: Batch | list[Batch]) -> Batch:
    """``collate_fn`` for a DataLoader over a spairstore dataset.

    A batch from ``__getitems__`` passes through unchanged. A list of single samples (``__getitem__``)
    is stacked; keypoint lists of different lengths are padded with a validity mask (``kps_valid``)."""
    if isinstance(samples, dict):
        return samples
    if not samples:
        raise SpairstoreError("cannot collate an empty list of samples")
    kps = ("kps_ids", "kps_valid", "n_kps", "src_kps", "trg_kps")
    out: Batch = {}
    if "kps_ids" in samples[0]:
        out.update(pad_keypoints([s["kps_ids"].numpy() for s in samples], [s["src_kps"].numpy() for s in samples],
                                 [s["trg_kps"].numpy() for s in samples]))
    for k, v in samples[0].items():
        if k not in kps:
            out[k] = torch.stack([s[k] for s in samples]) if isinstance(v, torch.Tensor) else [s[k] for s in samples]
    return out
