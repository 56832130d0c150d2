"""Ways to get predictions: baselines and nearest-neighbour matching on stored features (files: :mod:`.predictions`).

A *method* is a callable ``method(store, split, rows, direction) -> (len(rows), M, 2)`` float array: for
each pair row, its keypoints transferred into the other image of the pair, in that image's *original
pixels* (x, y), padded with NaN to the split's keypoint width ``M``. ``direction`` is ``src->trg`` (predict
target keypoints from source ones) or ``trg->src``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from tqdm import tqdm

from ..core import geometry
from ..core.device import resolve_device
from ..core.errors import SpairstoreError, StoreError, require_batch_size
from ..core.tables import setting
from ..store.reader import Store

if TYPE_CHECKING:
    import torch


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


#: Test-time flip rules for :class:`NearestNeighbour` (GeoAware-SC's adaptive flip): how "the flipped
#: source matches the target better" is measured. ``adaptive``: mean over the source's foreground cells
#: (mask at the cell centre not 0 or 255) of the distance to the nearest target foreground cell.
#: ``adaptive-mutual``: mask-free, the mean distance over mutual nearest-neighbour cells.
FLIP_RULES = ("adaptive", "adaptive-mutual")


class NearestNeighbour:
    """Nearest neighbour on a stored feature set: each query keypoint takes the feature of the cell it falls
    in (original -> store pixels -> nearest cell) and is predicted at the centre of the most cosine-similar
    cell of the other image (cell -> store pixels -> original pixels), among cells whose centre lies on the
    image rather than the letterbox padding. Pairs are processed ``batch_size`` at a time with one batched
    matmul, on ``device`` (CUDA when available unless given), under ``torch.no_grad``.

    ``transform`` (e.g. a trained head, :func:`spairstore.eval.models.load_head`) is a ``torch.nn.Module``
    applied to the stored maps first (the flipped set's too), float32 ``(B, C, h, w)`` -> ``(B, C', h', w')``,
    moved to ``device`` and in eval mode for the call (its mode is restored after). It keeps the cell grid
    unless it declares an attribute ``cell_stride`` (input cells per output cell and side, e.g. 2 for a
    stride-2 conv, 0.5 for a 2x upsampling): then its grid covers the same store pixels with the geometry
    :func:`spairstore.core.geometry.regrid` gives, and ``(h', w')`` must match it.

    ``flip`` (one of :data:`FLIP_RULES`) adds GeoAware-SC's test-time flip. It needs the feature set
    ``<features>-flip`` (attributes ``flip_of: <features>``, ``flipped: true``): features of each image's
    store pixels mirrored left-right, so store point ``(x, y)`` lies at ``(S - x, y)`` there. The query
    keypoint of part ``k`` in the mirrored query image is the mirror of the query's part ``perm[k]`` (the
    store's ``keypoint_flip``); where the mirrored query matches the other image better than the query
    itself (the rule's distance, lower), its predictions replace the originals for the keypoints whose
    mirror partner is a keypoint of the pair (parts on the symmetry plane are their own partner).
    """

    def __init__(self, features: str, device: str | None = None, batch_size: int = 32, progress: bool = False,
                 flip: str | None = None, transform: Callable[[Any], Any] | None = None):
        if flip is not None and flip not in FLIP_RULES:
            raise SpairstoreError(f"unknown flip rule {flip!r} (known: {', '.join(FLIP_RULES)})")
        require_batch_size(batch_size)
        self.features, self.device, self.batch_size, self.progress, self.flip = features, device, batch_size, progress, flip
        self.transform = transform
        label = "" if transform is None else f" -> {getattr(transform, 'name', type(transform).__name__)}"
        self.name = f"nn[{features}{label}]" if flip is None else f"nn[{features}{label},flip={flip}]"

    @property
    def feature_sets(self) -> tuple[str, ...]:
        """The sets this method reads (for the report's provenance)."""
        return (self.features, f"{self.features}-flip") if self.flip else (self.features,)

    @property
    def made_with(self) -> dict[str, str]:
        """What else the numbers depend on, for the report's provenance: a loaded head's file and SHA-256."""
        sha = getattr(self.transform, "sha256", None)
        return {} if sha is None else {"head": getattr(self.transform, "name", "?"), "head_sha256": sha}

    def _flip_set(self, store: Store) -> str:
        name = f"{self.features}-flip"
        geom = store.feature_sets.get(name)
        if geom is None:
            raise StoreError(f"{store.path}: --flip needs the feature set {name!r}, the maps of the mirrored "
                             f"images: run the features command that made {self.features!r} again with --flip "
                             f"(only the mirrored images are extracted), or add_feature_set(..., "
                             f"flip_of={self.features!r})")
        if geom.get("flip_of") != self.features or not geom.get("flipped"):
            raise StoreError(f"{store.path}: --flip needs the feature set {name!r} with attributes flip_of "
                             f"{self.features!r} and flipped true (features of the mirrored images)")
        if store.keypoint_flip is None:
            raise StoreError(f"{store.path}: no keypoint_flip attribute, so mirrored keypoints cannot be relabelled")
        if self.flip == "adaptive" and store.shapes["images/mask"][0][0] == 0:
            raise StoreError(f"{store.path}: has no masks; use the mask-free flip rule adaptive-mutual")
        return name

    def __call__(self, store: Store, split: str, rows: np.ndarray, direction: str = "src->trg") -> np.ndarray:
        import torch

        geom, size = store.feature_set(self.features), store.image_size
        if geom.get("flipped"):
            raise StoreError(f"{store.path}: feature set {self.features!r} holds the maps of the mirrored images "
                             f"(the companion that --flip reads); match on --features {geom.get('flip_of')}, with "
                             "--flip for test-time flip")
        flip_set = self._flip_set(store) if self.flip else None
        if self.transform is not None:
            wants = getattr(self.transform, "in_channels", None)
            if wants is not None and int(wants) != int(geom["channels"]):
                raise SpairstoreError(f"{self.name}: the transform takes {wants} channels, feature set "
                                      f"{self.features!r} has {geom['channels']}; use the set it was trained on")
            made_by = getattr(self.transform, "made_by", {})
            # weights name the network wherever its code lies; without them (precomputed maps) the source does
            keys = ("layers", "weights_sha256") if made_by.get("weights_sha256") and geom.get("weights_sha256") \
                else ("backbone", "layers", "weights_sha256")
            differ = [k for k in keys if k in made_by and k in geom and made_by[k] != geom[k]]
            if differ:
                def said(a: dict) -> str:
                    return ", ".join(f"{k} {setting(a[k])}" for k in differ)
                raise SpairstoreError(f"{self.name}: the head was trained on maps of another network than feature "
                                      f"set {self.features!r} of {store.path} (trained on {said(made_by)}; "
                                      f"{self.features!r} has {said(geom)}); evaluate it on a set made with the "
                                      "backbone, layers and weights it was trained on")
            geom = geometry.regrid(geom, getattr(self.transform, "cell_stride", 1))
        device = resolve_device(self.device)
        h, w = int(geom["height"]), int(geom["width"])
        a, b, kps = _sides(store, split, rows, direction)
        q_store = store.to_store(kps, a[:, None])
        ok = np.isfinite(q_store).all(-1)
        q_flat = _flat_cell(np.where(ok[..., None], q_store, 0.0), geom, size)
        col, row = np.meshgrid(np.arange(w), np.arange(h))
        centres = geometry.cell_to_store(np.stack([col.ravel(), row.ravel()], -1), geom, size)  # (h*w, 2), row-major
        if flip_set:
            t = store.pairs(split)
            ids = np.where(ok, t.kps_ids[rows], -1).astype(np.int64)
            partner = np.take_along_axis(store.keypoint_flip[t.category[rows]], ids.clip(0), 1)  # (P, M) slots
            # the pair keypoint showing each keypoint's mirror partner, -1 where the pair lacks it
            at = (ids[:, None, :] == partner[:, :, None]) & (ids[:, None, :] >= 0)
            src_of = np.where(at.any(2) & ok, at.argmax(2), -1)
            mirrored = np.take_along_axis(q_store, src_of.clip(0)[..., None], 1) * [-1, 1] + [size, 0]
            f_flat = _flat_cell(np.where((src_of >= 0)[..., None], mirrored, 0.0), geom, size)
        im = store.images
        out = np.full(kps.shape, np.nan)
        starts = range(0, len(rows), self.batch_size)
        with torch.no_grad(), _evaluating(self.transform, device):
            for s in tqdm(starts, desc=self.name, unit="batch", disable=not self.progress, leave=False,
                          dynamic_ncols=True):
                sl = slice(s, s + self.batch_size)
                uniq = np.unique(np.concatenate([a[sl], b[sl]]))
                fmap = self._cells(store, self.features, uniq, device, (h, w))
                ia, ib = np.searchsorted(uniq, a[sl]), np.searchsorted(uniq, b[sl])
                lo = im.offset[uniq]
                hi = lo + im.size[uniq] * im.scale[uniq]
                on_image = ((centres[None] >= lo[:, None]) & (centres[None] <= hi[:, None])).all(-1)  # (U, h*w)
                on_image[~on_image.any(1)] = True  # an image smaller than one cell keeps every cell
                target_ok = torch.from_numpy(on_image[ib]).to(device)
                best = _best_cells(fmap[ia], q_flat[sl], fmap[ib], target_ok)
                out[sl] = store.to_original(centres[best], b[sl, None])
                if flip_set:
                    fflip = self._cells(store, flip_set, uniq, device, (h, w))
                    best_f = _best_cells(fflip[ia], f_flat[sl], fmap[ib], target_ok)
                    pred_f = store.to_original(centres[best_f], b[sl, None])
                    if self.flip == "adaptive":
                        fg = _foreground(store, uniq, centres, size)
                        fg_mirror = _foreground(store, uniq, centres * [-1, 1] + [size, 0], size)
                        d_orig = _masked_distance(fmap[ia], fmap[ib], fg[ia] & on_image[ia], fg[ib] & on_image[ib], device)
                        d_flip = _masked_distance(fflip[ia], fmap[ib], fg_mirror[ia] & on_image[ia], fg[ib] & on_image[ib],
                                                  device)
                    else:
                        d_orig = _mutual_distance(fmap[ia], fmap[ib], on_image[ia], on_image[ib], device)
                        d_flip = _mutual_distance(fflip[ia], fmap[ib], on_image[ia], on_image[ib], device)
                    use = (d_flip < d_orig)[:, None] & (src_of[sl] >= 0)
                    out[sl][use] = pred_f[use]
        out[~ok] = np.nan
        return out


    def _cells(self, store: Store, name: str, rows: np.ndarray, device: str, grid: tuple[int, int]) -> torch.Tensor:
        """(U, h*w, C') unit-length cell features of feature set ``name`` for image ``rows`` on ``device``,
        after the transform (checked to give a (U, C', h', w') map on ``grid``)."""
        import torch

        fmap = torch.from_numpy(store.read(f"features/{name}", rows, check=True)).to(device).float()
        if self.transform is not None:
            y = self.transform(fmap)
            shape = tuple(getattr(y, "shape", ()))
            if len(shape) != 4 or shape[0] != fmap.shape[0] or shape[2:] != grid:
                stride = getattr(self.transform, "cell_stride", 1)
                raise SpairstoreError(
                    f"{self.name}: the transform maps {tuple(fmap.shape)} to {shape}, expected (B, C', {grid[0]}, "
                    f"{grid[1]}) for cell_stride {stride}; declare the head's cell_stride attribute (input cells per "
                    "output cell)")
            fmap = y
        return torch.nn.functional.normalize(fmap.flatten(2), dim=1).transpose(1, 2)


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

def _flat_cell(points: np.ndarray, geom: dict, size: int) -> np.ndarray:
    """Store pixels (..., 2) -> row-major index of the nearest feature cell."""
    cell = geometry.store_to_cell(points, geom, size)
    return cell[..., 1] * int(geom["width"]) + cell[..., 0]


def _best_cells(query_maps: torch.Tensor, query_cells: np.ndarray, target_maps: torch.Tensor,
                target_ok: torch.Tensor) -> np.ndarray:
    """Per pair and query keypoint, the most cosine-similar allowed target cell: (B, M) indices."""
    import torch

    idx = torch.from_numpy(query_cells).to(query_maps.device)
    query = torch.gather(query_maps, 1, idx[..., None].expand(-1, -1, query_maps.shape[2]))  # (B, M, C)
    sim = torch.bmm(query, target_maps.transpose(1, 2))  # (B, M, h*w)
    sim.masked_fill_(~target_ok[:, None, :], float("-inf"))
    return sim.argmax(-1).cpu().numpy()


def _foreground(store: Store, rows: np.ndarray, points: np.ndarray, size: int) -> np.ndarray:
    """(U, h*w) bool: the store mask at each cell centre ``points`` (store pixels) holds an object class."""
    masks = store.read("mask", rows, check=True)
    x = np.clip(np.floor(points[:, 0]).astype(np.int64), 0, size - 1)
    y = np.clip(np.floor(points[:, 1]).astype(np.int64), 0, size - 1)
    m = masks[:, y, x]
    return (m != 0) & (m != 255)


def _masked_distance(fa: torch.Tensor, fb: torch.Tensor, a_ok: np.ndarray, b_ok: np.ndarray, device: str) -> np.ndarray:
    """GeoAware-SC's flip distance: mean over ``a_ok`` cells of the distance to the nearest ``b_ok`` cell
    (unit features: ``sqrt(2 - 2 cos)``); all cells stand in for an empty mask."""
    import torch

    a_ok, b_ok = (np.where(m.any(1, keepdims=True), m, True) for m in (a_ok, b_ok))
    sim = torch.bmm(fa, fb.transpose(1, 2))
    sim.masked_fill_(~torch.from_numpy(b_ok).to(device)[:, None, :], float("-inf"))
    d = torch.sqrt(torch.clamp(2 - 2 * sim.max(2).values, min=0)).cpu().numpy()
    return np.where(a_ok, d, 0).sum(1) / a_ok.sum(1)


def _mutual_distance(fa: torch.Tensor, fb: torch.Tensor, a_ok: np.ndarray, b_ok: np.ndarray, device: str) -> np.ndarray:
    """The mask-free flip distance: mean distance between mutual nearest-neighbour cells (on-image cells)."""
    import torch

    sim = torch.bmm(fa, fb.transpose(1, 2))
    allowed = torch.from_numpy(a_ok[:, :, None] & b_ok[:, None, :]).to(device)
    sim.masked_fill_(~allowed, float("-inf"))
    nn_ab, nn_ba = sim.argmax(2), sim.argmax(1)  # (B, hw_a), (B, hw_b)
    mutual = (torch.gather(nn_ba, 1, nn_ab) == torch.arange(nn_ab.shape[1], device=sim.device)).cpu().numpy() & a_ok
    d = torch.sqrt(torch.clamp(2 - 2 * sim.max(2).values, min=0)).cpu().numpy()
    return np.where(mutual.any(1), np.where(mutual, d, 0).sum(1) / np.maximum(mutual.sum(1), 1), np.inf)


def get_method(name: str, features: str | None = None, device: str | None = None, batch_size: int = 32,
               progress: bool = False, flip: str | None = None) -> Method:
    """A method by its CLI name: ``identity``, ``nn`` (which needs ``features``; ``flip``: a test-time
    flip rule of :data:`FLIP_RULES`) or a user's ``MODULE:FACTORY`` (see
    :func:`spairstore.eval.models.method_from_factory`)."""
    if flip and name != "nn":
        raise SpairstoreError("--flip applies to method nn only")
    if name == "identity":
        return Identity()
    if name == "nn":
        if not features:
            raise SpairstoreError("method nn needs a feature set: --features NAME")
        return NearestNeighbour(features, device=device, batch_size=batch_size, progress=progress, flip=flip)
    if ":" in name:
        from .models import method_from_factory  # torch and the loader, only for a user's method

        return method_from_factory(name, device, batch_size, progress)
    raise SpairstoreError(f"unknown method {name!r} (known: identity, nn, or a user's MODULE:FACTORY)")

