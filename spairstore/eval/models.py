"""Trained models as evaluation methods: a portable head file for stored feature maps and any batch predictor.

- :func:`save_head` / :func:`load_head`: a ``torch.nn.Module`` that maps feature maps to feature maps,
  saved as a ``torch.export`` program (the graph and its weights, no Python code) with a small JSON of
  what it was trained on. A file loads in any process without the training script's classes, which a
  ``state_dict`` cannot do and which TorchScript, deprecated upstream, no longer promises. Evaluate it with
  ``NearestNeighbour(head.features, transform=load_head(path))`` or ``spairstore eval STORE --head PATH``.
- :class:`BatchMethod`: any callable ``fn(batch) -> (B, K, 2)`` that predicts target keypoints from a
  :class:`~spairstore.PairDataset` batch, run on exactly the pairs :func:`~spairstore.evaluate` scores.
- :func:`method_from_factory`: a user's method or predictor named ``MODULE:FACTORY`` (``eval --method``).
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset
from tqdm import tqdm

from ..core import geometry
from ..core.device import resolve_device
from ..core.errors import SpairstoreError
from ..core.schema import field_names
from ..core.user_code import load_factory, raised
from ..store.reader import Store
from ..torch.collate import Batch
from ..torch.datasets import PairDataset
from ..torch.loader import Loader

#: Name of the JSON entry a head file carries beside the exported program.
HEAD_META = "spairstore-head.json"
HEAD_FORMAT = 1
#: Feature-set attributes that say which network made the maps a head was trained on; a set of the same
#: channels made otherwise (another backbone, layers or weights) is refused rather than scored as noise.
MADE_BY = ("backbone", "layers", "weights_sha256")


class Head(torch.nn.Module):
    """A head loaded by :func:`load_head`: the exported graph plus what it declares.

    Attributes: ``features`` (name of the feature set it was trained on), ``in_channels``,
    ``cell_stride`` (input cells per output cell, 1 = the same grid; see
    :func:`spairstore.core.geometry.regrid`), ``made_by`` (that set's :data:`MADE_BY` attributes, which
    :class:`~spairstore.NearestNeighbour` checks against the set it reads), ``meta`` (the whole JSON, with
    the caller's ``extra``), ``name``, ``sha256`` (of the file it was loaded from; reports record it).
    """

    def __init__(self, graph: torch.nn.Module, meta: dict[str, Any], name: str, sha256: str | None = None):
        super().__init__()
        self.graph, self.meta, self.name, self.sha256 = graph, meta, name, sha256
        self.features = str(meta["features"])
        self.in_channels = int(meta["in_channels"])
        self.cell_stride = float(meta.get("cell_stride", 1))
        self.made_by: dict[str, Any] = dict(meta.get("made_by", {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.graph(x)
        except AssertionError as e:  # the exported graph's own shape check, the only one it can fail so
            if "Guard failed" not in str(e):
                raise
            g = self.meta.get("geometry", {})
            raise SpairstoreError(f"{self.name}: the head's graph runs only on maps like those it was exported "
                                  f"with, {g.get('height')} x {g.get('width')} cells ({e}), not "
                                  f"{' x '.join(map(str, x.shape[2:]))}: extract the set at that grid "
                                  f"(input_size {g.get('input_size')}) or save a head that works on any grid") from None

    def train(self, mode: bool = True) -> Head:
        """The exported graph was traced in eval mode and has no other; only the flag changes."""
        self.training = mode
        return self


def save_head(head: torch.nn.Module, path: str | Path, *, features: str, geometry: dict,
              cell_stride: float = 1.0, extra: dict[str, Any] | None = None) -> Path:
    """Export a copy of ``head`` (in eval mode, on the CPU) to ``path`` for :func:`load_head`; ``head`` itself
    keeps its device and mode.

    ``geometry`` is the attributes of the feature set it maps (``store.feature_sets[features]``): the
    example input is float32 ``(2, channels, height, width)``; the batch dimension stays dynamic, and so do
    height and width unless the head's code fixes them (then it runs only on that grid); its
    :data:`MADE_BY` attributes are kept, so the head is only applied to maps of the same network.
    ``cell_stride`` declares a grid change (see :func:`~spairstore.core.geometry.regrid`); ``extra``
    (JSON-serialisable) is kept in the file's metadata, e.g. the training settings.
    """
    path = Path(path)
    c, h, w = int(geometry["channels"]), int(geometry["height"]), int(geometry["width"])
    # a CPU copy is exported: the caller's module keeps its device and mode
    # any grid (another store or input size) unless the head's code fixes one: AUTO keeps what it can dynamic
    try:
        program = torch.export.export(copy.deepcopy(head).cpu().eval(), (torch.zeros(2, c, h, w),),
                                      dynamic_shapes=({0: torch.export.Dim("batch"), 2: torch.export.Dim.AUTO,
                                                       3: torch.export.Dim.AUTO},))
    except RuntimeError as e:
        if "Constraints violated (batch)" not in str(e):
            raise
        raise SpairstoreError(f"{path}: the head's code fixes the batch size (torch.export specialised it to the "
                              "example's 2), so it could not evaluate batches of other sizes; take sizes from "
                              "x.shape[0] rather than len(x) or Python numbers") from None
    meta = {"format": HEAD_FORMAT, "features": features, "in_channels": c, "cell_stride": float(cell_stride),
            "geometry": {k: geometry[k] for k in ("input_size", "stride", "cell_offset", "width", "height",
                                                   "channels") if k in geometry},
            "made_by": {k: geometry[k] for k in MADE_BY if k in geometry}, "extra": extra or {}}
    buf = io.BytesIO()  # a buffer, not the path: torch.export wants a .pt2 name and would warn about .pt
    torch.export.save(program, buf, extra_files={HEAD_META: json.dumps(meta)})
    path.write_bytes(buf.getvalue())
    return path


def load_head(path: str | Path) -> Head:
    """A head written by :func:`save_head`, ready for ``NearestNeighbour(..., transform=head)``."""
    path = Path(path)
    if not path.is_file():
        raise SpairstoreError(f"{path}: no such head file (write one with spairstore.eval.models.save_head)")
    extra = {HEAD_META: ""}
    data = path.read_bytes()
    try:
        program = torch.export.load(io.BytesIO(data), extra_files=extra)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's error, said in one line
        raise SpairstoreError(f"{path}: not a torch.export head file ({type(e).__name__}: {e}); "
                              "write one with spairstore.eval.models.save_head") from None
    try:
        meta = json.loads(extra[HEAD_META])
        if meta.get("format") != HEAD_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}")
        return Head(program.module(), meta, path.name, hashlib.sha256(data).hexdigest())
    except (ValueError, KeyError, TypeError) as e:  # no entry, not JSON, or a declared field missing
        raise SpairstoreError(f"{path}: exported program without a spairstore head description ({HEAD_META}: "
                              f"{e}); write it with spairstore.eval.models.save_head") from None


def reversed_pairs(batch: Batch) -> Batch:
    """The batch with its sides swapped (every ``src_*`` key becomes ``trg_*`` and back), as ``trg->src``
    presents it: the query image is always ``src_``."""
    swap = {"src_": "trg_", "trg_": "src_"}
    return {(swap[k[:4]] + k[4:] if k[:4] in swap else k): v for k, v in batch.items()}


class BatchMethod:
    """A method from a callable that predicts from a batch: ``fn(batch) -> (B, K, 2)``.

    ``batch`` is a :class:`~spairstore.PairDataset` batch of ``fields`` (``keypoints`` always included) on
    ``device`` through a :class:`~spairstore.Loader` (pixels normalised to ``*_image`` unless
    ``normalize=False``), under ``torch.no_grad``. ``fn`` returns, for each pair and each of its ``K``
    keypoint slots (``batch["src_kps"]``, in that order), the point in the *store pixels* (x, y) of the
    batch's ``trg_`` image: a tensor or array; padding slots (``kps_valid`` False) are ignored. For
    ``trg->src`` the batch's sides are swapped first (:func:`reversed_pairs`), so ``src_`` is always the
    query. Predictions are mapped back to original pixels with the batch's ``trg_scale``/``trg_offset``.
    ``device`` is ``cpu`` unless given (``cuda`` puts the batch there): only the caller knows where ``fn``'s
    model lives.
    """

    def __init__(self, fn: Callable[[Batch], Any], fields: Sequence[str] = ("keypoints",), *, name: str | None = None,
                 device: str | None = "cpu", batch_size: int = 32, normalize: bool = True, progress: bool = False):
        self.fn = fn
        self.fields = tuple(dict.fromkeys(("keypoints", *field_names(fields))))
        self.name = name or getattr(fn, "name", None) or getattr(fn, "__name__", type(fn).__name__)
        self.device, self.batch_size, self.normalize, self.progress = device, batch_size, normalize, progress

    @property
    def feature_sets(self) -> tuple[str, ...]:
        """The sets its batches hold (for the report's provenance)."""
        return tuple(f[len("features/"):] for f in self.fields if f.startswith("features/"))

    def __call__(self, store: Store, split: str, rows: np.ndarray, direction: str = "src->trg") -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.full((len(rows), store.pairs(split).kps_ids.shape[1], 2), np.nan)
        loader = Loader(Subset(PairDataset(store, split, self.fields), rows), self.batch_size, shuffle=False,
                        rank=0, world_size=1, device=resolve_device(self.device), normalize=self.normalize)
        at = 0
        with torch.no_grad():
            for batch in tqdm(loader, desc=self.name, unit="batch", disable=not self.progress, leave=False):
                if direction == "trg->src":
                    batch = reversed_pairs(batch)
                valid = batch["kps_valid"].cpu().numpy()
                pred = self.fn(batch)
                pred = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
                if pred.shape != (*valid.shape, 2):
                    raise SpairstoreError(f"{self.name}: returned shape {pred.shape} for a batch of {valid.shape[0]} "
                                          f"pairs with {valid.shape[1]} keypoint slots; return (B, K, 2) target "
                                          "points in store pixels, x, y, one per batch['src_kps'] slot")
                scale, offset = (batch[f"trg_{k}"].cpu().numpy()[:, None] for k in ("scale", "offset"))
                pts = geometry.to_original(pred.astype(np.float64), scale, offset)
                n = len(valid)
                # batches pad to the store's K slots; the split's table is M <= K wide, its pairs' keypoints first
                out[at:at + n] = np.where(valid[..., None], pts, np.nan)[:, :out.shape[1]]
                at += n
        return out


def method_from_factory(spec: str, device: str | None = None, batch_size: int = 32, progress: bool = False) -> Any:
    """The method ``spairstore eval --method MODULE:FACTORY`` names: ``FACTORY()`` returns either a method
    (``method(store, split, rows, direction) -> (P, M, 2)`` original pixels, e.g. a :class:`BatchMethod`)
    or a batch predictor ``fn(batch) -> (B, K, 2)`` store pixels, run as ``BatchMethod(fn, fn.fields)``
    (``fields`` defaults to keypoints only). A ``torch.nn.Module`` predictor is put in eval mode and
    moved to ``device`` (default: cuda if available), and its batches go there."""
    factory, origin = load_factory(spec, "--method")
    try:
        obj = factory()
    except Exception as e:  # noqa: BLE001 - the user's code: report whatever it raised in one line
        raise SpairstoreError(f"--method {origin}: FACTORY() raised {raised(e)}") from None
    if not callable(obj):
        raise SpairstoreError(f"--method {origin}: FACTORY() returned {type(obj).__name__}, not a method or a "
                              "callable fn(batch)")
    if isinstance(obj, torch.nn.Module) and not hasattr(obj, "fields") and all(
            hasattr(obj, a) for a in ("input_size", "stride", "cell_offset")):
        raise SpairstoreError(f"--method {origin}: FACTORY() returned a feature module (it declares input_size, "
                              f"stride and cell_offset: images in, maps out), not a method; extract its maps with "
                              f"`spairstore features STORE --backbone {spec} --name N`, then `eval --method nn "
                              f"--features N`")
    if isinstance(obj, BatchMethod) or _required_positional(obj) >= 3:
        if not hasattr(obj, "name"):
            obj.name = origin
        return obj
    where = device
    if isinstance(obj, torch.nn.Module):
        where = resolve_device(device)
        obj = obj.eval().to(where)
    return BatchMethod(obj, getattr(obj, "fields", ("keypoints",)), name=getattr(obj, "name", None) or origin,
                       device=where or "cpu", batch_size=batch_size, progress=progress)


def _required_positional(fn: Callable[..., Any]) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 1
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)
