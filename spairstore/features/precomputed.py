"""Feature sets from maps computed elsewhere: :func:`add_feature_set`.

>>> spairstore.add_feature_set("spair.h5", "dift", lambda row: my_maps(row), stride=16, cell_offset=0.5,
...                            input_size=768)

The maps go through the same transaction, set writers and checks as ``spairstore features``: resumable
(a re-run with the same name and settings writes only the rows not yet done), crash-safe, and for HDF5
at the cost of the set alone.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from ..core.errors import FeatureError, StoreError
from ..store.backends import is_url
from ..store.feature_sets import SetWriter
from ..store.reader import Store
from .backbones import flip_attrs
from .extract import FeatureSummary, Staging, check_name, image_label, made_with, set_writer

Maps = Union[Iterable[tuple[int, Any]], Callable[[int], Any], Mapping[Union[tuple[str, str], int], Any]]  # noqa: UP007 - a runtime alias on 3.10
"""``(image_row, array)`` pairs in any order, a function ``row -> array``, or a mapping
``(category, name) -> array`` or ``image_row -> array`` (e.g. filled from ImageDataset batches' ``row``);
each array (C, H, W) of floats: numpy (float16/32/64), a torch tensor of any float dtype on any device
(bfloat16 included; detached, no grad needed), or anything ``np.asarray`` takes. Stored as float16."""

#: rows handed to the set writer at once (an HDF5 set's unit: what an interrupted run keeps at least)
_BATCH = 16


def _checked(store: Store, row: int, value: Any, shape: tuple[int, ...] | None) -> np.ndarray:
    """``value`` as float16 (C, H, W), refused with a one-line error naming the row when it is not a
    finite float array of ``shape`` (the first map's, when given)."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise FeatureError(f"maps of {image_label(store, row)}: dtype {value.dtype}; give floats")
        # numpy has no bfloat16; float32 holds it (and float16) exactly
        value = value.detach().to("cpu", torch.float32 if value.dtype == torch.bfloat16 else value.dtype)
    a = np.asarray(value)
    if a.dtype.kind != "f":
        raise FeatureError(f"maps of {image_label(store, row)}: dtype {a.dtype}; give floats")
    if a.ndim != 3 or (shape is not None and a.shape != shape):
        want = f"{shape} like the first map" if shape is not None else "(C, H, W)"
        raise FeatureError(f"maps of {image_label(store, row)}: shape {a.shape}, expected {want}")
    if not np.isfinite(a).all():
        raise FeatureError(f"maps of {image_label(store, row)}: holds NaN or infinite values")
    with np.errstate(over="ignore"):
        h = a.astype(np.float16)
    if not np.isfinite(h).all():
        raise FeatureError(f"maps of {image_label(store, row)}: values beyond float16's range (|x| > 65504)")
    return h


def _key_row(store: Store, key: Any) -> int:
    """The image row of a mapping's ``(category, name)`` or image-row key."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        if not 0 <= key < len(store):
            raise FeatureError(f"maps key {key!r}: image rows are integers 0..{len(store) - 1}")
        return int(key)
    if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key)):
        why = " (an image name alone is not a key: names repeat across categories)" if isinstance(key, str) else ""
        raise FeatureError(f"maps key {key!r}: keys must be (category, name) pairs of strings or image rows{why}")
    try:
        return store.image_row(*key)
    except StoreError:
        raise FeatureError(f"maps key {key!r}: no such image in {store.path}") from None


def _rows_of_mapping(store: Store, maps: Mapping[Any, Any]) -> dict[int, Any]:
    """Image row -> key of a mapping that names every image exactly once."""
    rows: dict[int, Any] = {}
    for key in maps:
        row = _key_row(store, key)
        if row in rows:
            raise FeatureError(f"maps keys {rows[row]!r} and {key!r} are the same image, {image_label(store, row)}; "
                               "give each image once")
        rows[row] = key
    missing = sorted(set(range(len(store))) - set(rows))
    if missing:
        raise FeatureError(f"maps hold no array for {len(missing)} images, e.g. {image_label(store, missing[0])}; "
                           f"give every image of the store")
    return rows


def _source(store: Store, maps: Maps) -> Callable[[np.ndarray], Iterator[tuple[int, Any]]]:
    """A function of the rows still to write that yields ``(row, value)`` for them (and, from an
    iterable, for every row it holds: the caller skips the others)."""
    if isinstance(maps, Mapping):
        keys = _rows_of_mapping(store, maps)
        return lambda todo: ((int(r), maps[keys[int(r)]]) for r in todo)
    if callable(maps):
        return lambda todo: ((int(r), maps(int(r))) for r in todo)
    it = iter(maps)
    return lambda todo: it


def _first(store: Store, maps: Maps) -> tuple[Maps, tuple[int, Any]]:
    """The first ``(row, value)`` the maps give (to learn the shape), and maps that still give it."""
    if isinstance(maps, Mapping):
        key = next(iter(maps), None)
        if key is None:
            raise FeatureError("maps is empty; give one array per image of the store")
        return maps, (_key_row(store, key), maps[key])
    if callable(maps):
        return maps, (0, maps(0))
    it = iter(maps)
    first = next(it, None)
    if first is None:
        raise FeatureError("maps is empty; give one array per image of the store")
    _row(store, first)

    def again() -> Iterator[tuple[int, Any]]:
        yield first
        yield from it

    return again(), first


def _row(store: Store, item: Any) -> int:
    if not (isinstance(item, tuple) and len(item) == 2):
        raise FeatureError(f"maps gave {type(item).__name__} {item!r:.60}; an iterable must give (image_row, array) pairs")
    row = item[0]
    if not isinstance(row, (int, np.integer)) or isinstance(row, bool) or not 0 <= row < len(store):
        raise FeatureError(f"maps gave image row {row!r}; rows are integers 0..{len(store) - 1}")
    return int(row)


def add_feature_set(store: str | Path, name: str, maps: Maps, *, stride: float, cell_offset: float,
                    input_size: int, source: str = "precomputed", flip_of: str | None = None,
                    overwrite: bool = False) -> FeatureSummary:
    """Add feature set ``name`` to the local store at ``store`` from maps computed elsewhere.

    ``maps`` gives one float array or tensor (C, H, W) per image row (see :data:`Maps`), stored as float16. The geometry
    is declared like the built-ins record it: the store frame (S x S store pixels, letterboxed) was
    resized to ``input_size`` x ``input_size`` input pixels, each cell spans ``stride`` input pixels
    and cell (col j, row i) is centred at ``((j, i) + cell_offset) * stride`` input pixels (x, y), so
    H = W = input_size / stride (rounded either way). ``source`` names where the maps come from (the
    set's ``backbone`` attribute).

    ``flip_of`` marks the maps as those of every store frame mirrored left to right, in the mirrored
    frame (cell ``(j, i)`` centred at store ``x = S - (j + cell_offset) * stride * S / input_size``), the
    companion of the existing set ``flip_of`` that test-time flip reads (``eval --flip``): ``name`` must then
    be ``<flip_of>-flip``, and the geometry and map shape those of ``flip_of``.

    Every image row must be given exactly once, every map with the same shape and finite values; the
    first problem is a one-line :class:`FeatureError` naming the row or key. A set ``name`` that exists
    is replaced only with ``overwrite``. A run that stopped (error, kill) resumes when called again with
    the same name and settings: rows already written are not asked for again (a function or mapping;
    but for the one row read first to learn the shape) or skipped (an iterable).
    """
    if is_url(store):
        raise FeatureError(f"{store}: remote stores are read-only; add the set to a local copy")
    check_name(name)
    if not (isinstance(input_size, int) and input_size > 0):
        raise FeatureError(f"input_size must be a positive integer (input pixels), got {input_size!r}")
    if not (math.isfinite(stride) and stride > 0 and math.isfinite(cell_offset)):
        raise FeatureError(f"stride must be positive and cell_offset finite, got {stride!r} and {cell_offset!r}")
    store_path = Path(store).resolve()
    t0 = time.perf_counter()
    with Store(store_path) as s:
        maps, (row0, value0) = _first(s, maps)
        shape = _checked(s, row0, value0, None).shape
        cells = input_size / stride
        if shape[1] != shape[2] or shape[1] not in (math.floor(cells), math.ceil(cells)):
            raise FeatureError(f"maps of {image_label(s, row0)} are {shape[1]}x{shape[2]} cells; input_size {input_size} / "
                               f"stride {stride} makes {cells:g}x{cells:g} (square maps of the square frame)")
        attrs = {"backbone": source, "library": "precomputed", "layers": [], "weights": None, "weights_sha256": None,
                 "input_size": input_size, "resize": "declared by the caller of add_feature_set",
                 "normalization": None, "stride": stride, "cell_offset": cell_offset,
                 "cell_centre": "cell (col j, row i) is centred at ((j, i) + cell_offset) * stride input pixels",
                 "width": shape[2], "height": shape[1], "channels": shape[0], "dtype": "float16"}
        if flip_of is not None:
            attrs.update(flip_attrs(flip_of))
            _check_companion(s, name, flip_of, attrs)
        exists = name in s.feature_sets
        if exists and not overwrite:
            raise FeatureError(f"{store_path}: feature set {name!r} exists, {made_with(s.feature_sets[name], attrs)}; "
                               "pass overwrite=True to replace it")
        source_rows = _source(s, maps)
        staging = Staging.open(store_path, {"name": name, "store": s.fingerprint, "rows": len(s),
                                            "row_shape": list(shape), "attrs": attrs}, restart=overwrite)
        try:
            target = set_writer(store_path, staging.meta, _BATCH)
            todo = target.prepare(staging.tx, replace=exists)
            written = _write(s, source_rows(todo), todo, target, target.sink(staging.tx, 0, staging.sync_seconds), shape)
            target.commit(staging.tx)
            staging.finish()
        finally:
            staging.close()
    return FeatureSummary(store=store_path, name=name, backbone=source, layers=[], shape=(len(s), *shape),
                          extracted=written, seconds=time.perf_counter() - t0, device=None)


def _check_companion(store: Store, name: str, flip_of: str, attrs: dict[str, Any]) -> None:
    """Refuse a ``flip_of`` set that test-time flip could not pair with its unflipped set."""
    if name != f"{flip_of}-flip":
        raise FeatureError(f"feature set {name!r}: the maps of the mirrored images of {flip_of!r} are named "
                           f"{flip_of + '-flip'!r} (test-time flip looks for that name)")
    of = store.feature_set(flip_of)
    differ = [f"{k} {attrs[k]} here, {of.get(k)} in {flip_of!r}"
              for k in ("input_size", "stride", "cell_offset", "width", "height", "channels") if attrs[k] != of.get(k)]
    if differ:
        raise FeatureError(f"feature set {name!r}: the mirrored images' maps need the geometry of {flip_of!r} "
                           f"({'; '.join(differ)})")


def _write(store: Store, items: Iterable[tuple[int, Any]], todo: np.ndarray, target: SetWriter, sink: Any,
           shape: tuple[int, ...]) -> int:
    """Validate the maps of rows ``todo`` and hand them to ``sink`` in batches of rows, ascending. Where
    the format writes units whole (Zarr shards), a unit goes once all its rows arrived: rows of an
    iterable in another order wait in memory for the rest of their unit. Elsewhere (HDF5) every
    :data:`_BATCH` rows go as they come, so memory stays a batch and a killed run keeps what it wrote."""
    wanted = np.zeros(len(store), dtype=bool)
    wanted[todo] = True
    seen = np.zeros(len(store), dtype=bool)
    unit_rows = target.unit_rows if target.whole_units else len(store)  # else one unit, flushed every _BATCH rows
    left = {int(u): int(c) for u, c in zip(*np.unique(todo // unit_rows, return_counts=True))}
    pending: dict[int, dict[int, np.ndarray]] = {}
    try:
        for item in items:
            row = _row(store, item)
            if seen[row]:
                raise FeatureError(f"maps gave {image_label(store, row)} twice; give every image exactly once")
            seen[row] = True
            value = _checked(store, row, item[1], shape)
            if not wanted[row]:
                continue  # written by an earlier, interrupted run
            unit = row // unit_rows
            waiting = pending.setdefault(unit, {})
            waiting[row] = value
            left[unit] -= 1
            if not left[unit] or (not target.whole_units and len(waiting) == _BATCH):
                rows = np.array(sorted(waiting), dtype=np.int64)
                for start in range(0, len(rows), _BATCH):
                    batch = rows[start:start + _BATCH]
                    sink(batch, np.stack([waiting[int(r)] for r in batch]))
                del pending[unit]
        missing = np.flatnonzero(wanted & ~seen)
        if len(missing):
            raise FeatureError(f"maps hold no array for {len(missing)} images, e.g. {image_label(store, int(missing[0]))}; "
                               f"give every image of the store (the rows given so far are kept for a re-run)")
    finally:
        sink.close()
    return int(wanted.sum())
