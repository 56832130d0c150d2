"""Prediction files and arrays: what ``spairstore eval --predictions`` reads, and :func:`save_predictions`.

Predictions are keypoints in the *original pixels* of the image they are predicted in (the target for
``src->trg``), one per pair keypoint in the pair's keypoint order, x then y.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import SpairstoreError
from ..store.reader import Store
from .provenance import method_provenance

#: The key of a ``.npz`` written by :func:`save_predictions` that says what its predictions were made for.
ABOUT_KEY = "__spairstore__"


class PredictionsError(SpairstoreError):
    """Predictions that do not fit the pairs they are evaluated on."""


def all_predictions(store: Store, split: str, predictions: Any, direction: str) -> np.ndarray:
    """Predictions for every pair of ``split`` as :func:`load_predictions` gives them; a method
    (``method(store, split, rows, direction)``) is run once on all of them."""
    if callable(predictions):
        rows = np.arange(store.pairs(split).rows)
        return np.asarray(predictions(store, split, rows, direction), dtype=np.float64)
    return load_predictions(predictions, store, split, direction)


def save_predictions(path: str | Path, store: Store, split: str, predictions: Any,
                     direction: str = "src->trg") -> Path:
    """Write predictions for every pair of ``split`` (any form :func:`load_predictions` reads, or a
    method, run on them) to the ``.npz`` ``path``: one ``(n_kps, 2)`` array per pair id, original pixels
    (x, y) of the image predicted in, and under :data:`ABOUT_KEY` the dataset, split, pair-list SHA-256
    and direction they were made for, and the method's name and provenance (``made_by``: its feature
    sets, head, the version), which a report of the file repeats. Reading the file back checks those, so it is refused on another
    split or pair list, or in the other direction, instead of scoring the wrong pairs. The file is
    written beside ``path`` and renamed into place (never half written)."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise PredictionsError(f"{path}: predictions are saved as a .npz file")
    part = path.with_name(f".{path.name}.part")
    try:
        # Opened before the method runs: an unwritable place fails now, not after the whole split.
        with open(part, "wb") as f:  # a file object: np.savez would add .npz to a name
            pred = all_predictions(store, split, predictions, direction)
            t = store.pairs(split)
            about = {"format": "spairstore-predictions", "dataset": store.dataset, "split": split,
                     "pair_list_sha256": store.attrs.get("pair_list_sha256", {}).get(split),
                     "direction": direction, "frame": "original pixels (x, y) of the image predicted in",
                     "method": getattr(predictions, "name", None) if callable(predictions) else None,
                     "made_by": method_provenance(store, predictions)}
            arrays = {str(int(pid)): pred[j, :int(n)] for j, (pid, n) in enumerate(zip(t.pair_id, t.n_kps))}
            np.savez(f, **arrays, **{ABOUT_KEY: np.array(json.dumps(about))})
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return path


def predictions_about(source: Any) -> dict[str, Any] | None:
    """The :data:`ABOUT_KEY` entry of a ``.npz`` file :func:`save_predictions` wrote (what the predictions
    were made for, and ``method``/``made_by``: what made them); None for anything else."""
    if not isinstance(source, (str, Path)) or Path(source).suffix.lower() != ".npz":
        return None
    try:
        with np.load(source, allow_pickle=False) as z:
            about = json.loads(str(z[ABOUT_KEY])) if ABOUT_KEY in z.files else None
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    return about if isinstance(about, dict) else None


def load_predictions(source: Any, store: Store, split: str, direction: str | None = None) -> np.ndarray:
    """Predictions for every pair of ``split`` as a float64 ``(P, M, 2)`` array in table order, NaN padded.

    ``source`` is an array (padded ``(P, M', 2)`` in table order, or flat ``(sum n_kps, 2)`` with each
    pair's keypoints in turn), a mapping pair id -> ``(n_kps, 2)``, or a ``.npz`` (keys: pair ids),
    ``.pt`` (a tensor or a dict keyed by pair id) or ``.npy`` file holding one of those. A mapping (file)
    written by :func:`save_predictions` must have been made for this split's pair list and, when
    ``direction`` is given, in that direction.
    """
    what = "predictions"
    if isinstance(source, (str, Path)):
        what = str(source)
        source = _read_file(Path(source))
    if isinstance(source, Mapping) and ABOUT_KEY in source:
        source = dict(source)
        _check_about(what, source.pop(ABOUT_KEY), store, split, direction)
    t = store.pairs(split)
    P, M = t.kps_ids.shape
    n = t.n_kps.astype(np.int64)
    out = np.full((P, M, 2), np.nan)
    slot = np.arange(M) < n[:, None]
    if isinstance(source, Mapping):
        index = {int(pid): j for j, pid in enumerate(t.pair_id)}
        try:
            keys = {int(k): k for k in source}
        except (TypeError, ValueError):
            raise PredictionsError(f"{what}: keys must be pair ids of split {split!r}") from None
        missing = sorted(set(index) - set(keys))
        extra = sorted(set(keys) - set(index))
        if missing or extra:
            raise PredictionsError(f"{what}: {len(missing)} pair(s) of split {split!r} have no prediction"
                                   f"{f' (first: pair {missing[0]})' if missing else ''} and {len(extra)} key(s) are "
                                   f"not pair ids of it{f' (first: {extra[0]})' if extra else ''}")
        for pid, key in keys.items():
            j = index[pid]
            v = _numpy(source[key])
            if v.shape != (n[j], 2):
                raise PredictionsError(f"{what}: pair {pid} has {n[j]} keypoints, its prediction has shape {v.shape}")
            out[j, :n[j]] = v
        return out
    arr = _numpy(source)
    if arr.ndim == 3 and arr.shape[0] == P and arr.shape[2] == 2 and arr.shape[1] >= n.max(initial=0):
        width = min(M, arr.shape[1])
        out[:, :width] = arr[:, :width]
        out[~slot] = np.nan
        return out
    if arr.ndim == 2 and arr.shape == (int(n.sum()), 2):
        out[slot] = arr  # boolean indexing walks pairs in order, keypoints in order
        return out
    raise PredictionsError(f"{what}: array of shape {arr.shape} fits neither ({P}, >= {n.max(initial=0)}, 2) "
                           f"(one row per pair of split {split!r}) nor ({int(n.sum())}, 2) (its keypoints in turn)")


def _check_about(what: str, about: Any, store: Store, split: str, direction: str | None) -> None:
    """Refuse predictions made for other pairs or the other direction (see :func:`save_predictions`)."""
    try:
        about = json.loads(str(np.asarray(about)))
        made_for, theirs = about["split"], about["pair_list_sha256"]
    except (ValueError, TypeError, KeyError):
        raise PredictionsError(f"{what}: its {ABOUT_KEY} entry is not what save_predictions writes") from None
    ours = store.attrs.get("pair_list_sha256", {}).get(split)
    if theirs and ours and theirs != ours:
        raise PredictionsError(f"{what}: made for split {made_for!r} of a {about.get('dataset')} store whose pair list "
                               f"(sha256 {theirs[:12]}...) is not this store's {split!r} ({ours[:12]}...); evaluate "
                               "it on the store and split it was made for")
    if direction is not None and about.get("direction", direction) != direction:
        raise PredictionsError(f"{what}: predictions for {about['direction']}, evaluated as {direction}; pass "
                               f"--direction {about['direction']}")


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _read_file(path: Path) -> Any:
    if not path.is_file():
        hint = ("; a method is not a file: pass spairstore.Identity() or spairstore.NearestNeighbour(FEATURES) "
                "(eval --method on the command line)") if not path.suffix else ""
        raise PredictionsError(f"{path}: no such predictions file{hint}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix in (".pt", ".pth"):
            import torch

            if _is_head(path):
                raise PredictionsError(f"{path}: a head file (save_head), not predictions: evaluate it with "
                                       "`spairstore eval STORE --head PATH` (compare: head:PATH)")
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                if "Weights only load failed" not in str(e):
                    raise
                # Never unpickled beyond tensors: a predictions file may come from anyone.
                raise PredictionsError(f"{path}: holds objects other than tensors, numbers, lists and dicts "
                                       "(numpy arrays?); save torch tensors (torch.from_numpy) or a .npz") from None
    except PredictionsError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's error, said in one line
        raise PredictionsError(f"{path}: cannot read predictions ({type(e).__name__}: {e})") from None
    raise PredictionsError(f"{path}: predictions must be a .npz, .pt or .npy file")


def _is_head(path: Path) -> bool:
    """Whether ``path`` is a torch.export archive carrying a head description (:mod:`.models`)."""
    from .models import HEAD_META

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(f"/extra/{HEAD_META}") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False
