"""Ways to get predictions: baselines and nearest-neighbour matching on stored features (files: :mod:`.predictions`).

A *method* is a callable ``method(store, split, rows, direction) -> (len(rows), M, 2)`` float array: for
each pair row, its keypoints transferred into the other image of the pair, in that image's *original
pixels* (x, y), padded with NaN to the split's keypoint width ``M``. ``direction`` is ``src->trg`` (predict
target keypoints from source ones) or ``trg->src``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from ..core import geometry
from ..core.device import resolve_device
from ..core.errors import SpairstoreError, StoreError
from ..store.reader import Store


class Method(Protocol):
    name: str

    def __call__(self, store: Store, split: str, rows: np.ndarray, direction: str = "src->trg") -> np.ndarray: ...


def _sides(store: Store, split: str, rows: np.ndarray, direction: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query image rows, predicted-in image rows, query keypoints in original pixels (P, M, 2))."""
    t = store.pairs(split)
    if direction == "src->trg":
        return t.src[rows], t.trg[rows], t.src_kps[rows].astype(np.float64)
    return t.trg[rows], t.src[rows], t.trg_kps[rows].astype(np.float64)


class Identity:
    """The dataset paper's identity mapping: each keypoint predicted at the same *relative* position in the
    other image, ``(x * W_t / W_s, y * H_t / H_s)`` in original pixels."""

    name = "identity"

    def __call__(self, store: Store, split: str, rows: np.ndarray, direction: str = "src->trg") -> np.ndarray:
        a, b, kps = _sides(store, split, rows, direction)
        size = store.images.size.astype(np.float64)
        return kps * (size[b] / size[a])[:, None, :]


class NearestNeighbour:
    """Nearest neighbour on a stored feature set: each query keypoint takes the feature of the cell it falls
    in (original -> store pixels -> nearest cell) and is predicted at the centre of the most cosine-similar
    cell of the other image (cell -> store pixels -> original pixels), among cells whose centre lies on the
    image rather than the letterbox padding. Pairs are processed ``batch_size`` at a time with one batched
    matmul, on ``device`` (CUDA when available unless given), under ``torch.no_grad``.

    ``transform`` (e.g. a trained head, :func:`spairstore.eval.models.load_head`) is a ``torch.nn.Module``
    applied to the stored maps first, float32 ``(B, C, h, w)`` -> ``(B, C', h', w')``, in eval mode. It
    keeps the cell grid unless it declares an attribute ``cell_stride`` (input cells per output cell and
    side, e.g. 2 for a stride-2 conv, 0.5 for a 2x upsampling): then its grid covers the same store pixels
    with the geometry :func:`spairstore.core.geometry.regrid` gives, and ``(h', w')`` must match it.
    """

    def __init__(self, features: str, device: str | None = None, batch_size: int = 32, progress: bool = False,
                 transform: Callable[[Any], Any] | None = None):
        self.features, self.device, self.batch_size, self.progress = features, device, batch_size, progress
        self.transform = transform
        label = getattr(transform, "name", type(transform).__name__)
        self.name = f"nn[{features}]" if transform is None else f"nn[{features} -> {label}]"

    def __call__(self, store: Store, split: str, rows: np.ndarray, direction: str = "src->trg") -> np.ndarray:
        import torch

        if self.features not in store.feature_sets:
            raise StoreError(f"{store.path}: no feature set {self.features!r} "
                             f"(store has {', '.join(store.feature_sets) or 'none'})")
        geom, size = store.feature_sets[self.features], store.image_size
        if self.transform is not None:
            wants = getattr(self.transform, "in_channels", None)
            if wants is not None and int(wants) != int(geom["channels"]):
                raise SpairstoreError(f"{self.name}: the transform takes {wants} channels, feature set "
                                      f"{self.features!r} has {geom['channels']}; use the set it was trained on")
            geom = geometry.regrid(geom, getattr(self.transform, "cell_stride", 1))
        device = resolve_device(self.device)
        h, w = int(geom["height"]), int(geom["width"])
        a, b, kps = _sides(store, split, rows, direction)
        q_store = store.to_store(kps, a[:, None])
        ok = np.isfinite(q_store).all(-1)
        q_cell = geometry.store_to_cell(np.where(ok[..., None], q_store, 0.0), geom, size)
        q_flat = q_cell[..., 1] * w + q_cell[..., 0]
        col, row = np.meshgrid(np.arange(w), np.arange(h))
        centres = geometry.cell_to_store(np.stack([col.ravel(), row.ravel()], -1), geom, size)  # (h*w, 2), row-major
        im = store.images
        out = np.full(kps.shape, np.nan)
        starts = range(0, len(rows), self.batch_size)
        with torch.no_grad(), _evaluating(self.transform, device):
            for s in tqdm(starts, desc=self.name, unit="batch", disable=not self.progress, leave=False,
                          dynamic_ncols=True):
                sl = slice(s, s + self.batch_size)
                uniq = np.unique(np.concatenate([a[sl], b[sl]]))
                fmap = torch.from_numpy(store.read(f"features/{self.features}", uniq)).to(device).float()
                if self.transform is not None:
                    fmap = self._transformed(fmap, (h, w))
                fmap = torch.nn.functional.normalize(fmap.flatten(2), dim=1).transpose(1, 2)  # (U, h*w, C), unit
                ia = torch.from_numpy(np.searchsorted(uniq, a[sl])).to(device)
                ib = np.searchsorted(uniq, b[sl])
                query = fmap[ia[:, None], torch.from_numpy(q_flat[sl]).to(device)]  # (B, M, C)
                sim = torch.bmm(query, fmap[torch.from_numpy(ib).to(device)].transpose(1, 2))  # (B, M, h*w)
                lo = im.offset[uniq]
                hi = lo + im.size[uniq] * im.scale[uniq]
                on_image = ((centres[None] >= lo[:, None]) & (centres[None] <= hi[:, None])).all(-1)  # (U, h*w)
                on_image[~on_image.any(1)] = True  # an image smaller than one cell keeps every cell
                sim.masked_fill_(~torch.from_numpy(on_image[ib]).to(device)[:, None, :], float("-inf"))
                best = sim.argmax(-1).cpu().numpy()
                out[sl] = store.to_original(centres[best], b[sl, None])
        out[~ok] = np.nan
        return out

    def _transformed(self, fmap: Any, grid: tuple[int, int]) -> Any:
        """The transform's output for stored maps ``fmap``, checked to be a (U, C', h', w') map on ``grid``."""
        y = self.transform(fmap)  # type: ignore[misc]
        shape = tuple(getattr(y, "shape", ()))
        if len(shape) != 4 or shape[0] != fmap.shape[0] or shape[2:] != grid:
            stride = getattr(self.transform, "cell_stride", 1)
            raise SpairstoreError(
                f"{self.name}: the transform maps {tuple(fmap.shape)} to {shape}, expected (B, C', {grid[0]}, {grid[1]}) "
                f"for cell_stride {stride}; declare the head's cell_stride attribute (input cells per output cell)")
        return y


@contextmanager
def _evaluating(module: Any, device: Any) -> Iterator[None]:
    """``module`` (if a torch module) on ``device`` and in eval mode for the block; its mode is restored."""
    import torch

    if not isinstance(module, torch.nn.Module):
        yield
        return
    was = module.training
    module.to(device).eval()
    try:
        yield
    finally:
        module.train(was)


def get_method(name: str, features: str | None = None, device: str | None = None, batch_size: int = 32,
               progress: bool = False) -> Method:
    """A method by its CLI name: ``identity`` or ``nn`` (which needs ``features``)."""
    if name == "identity":
        return Identity()
    if name == "nn":
        if not features:
            raise SpairstoreError("method nn needs a feature set: --features NAME")
        return NearestNeighbour(features, device=device, batch_size=batch_size, progress=progress)
    raise SpairstoreError(f"unknown method {name!r} (known: identity, nn)")

