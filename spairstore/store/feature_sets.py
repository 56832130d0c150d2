"""Feature sets added to an existing store at the cost of the set alone.

A feature set ``<name>`` is one float16 array ``features/<name>/data`` (N, C, h, w), one map per image
row, with the CRC-32 of each map in ``features/<name>/crc32`` and its geometry and provenance
(``input_size``, ``stride``, ``cell_offset``, ... see :mod:`spairstore.core.geometry`) as attributes.
Where it lives is the backend's business (:meth:`~spairstore.store.backends.Backend.add_group`):

* HDF5: in its own file beside the store, ``<store>.features/<name>.h5`` (a *sidecar*), holding those
  two arrays and the attributes ``format`` (:data:`SIDECAR_FORMAT`), ``name``, ``feature_set`` (the
  geometry) and ``store_fingerprint``: the images it was computed from (:func:`fingerprint`), so a set
  left beside a repacked or foreign store is refused. The store file is never rewritten: adding or
  replacing a set renames one finished file into the folder, dropping one deletes it. Copy or move a
  store together with its ``.features`` folder.
* Zarr: the group ``features/<name>`` inside the store directory, written shard by shard and
  published last.

Every writer runs inside a :class:`~spairstore.store.transaction.Transaction` (``features-<name>``):
resumable, flagged per row, and old-or-new under SIGKILL.
"""
from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..core.errors import FeatureError
from .transaction import Transaction

#: ``format`` attribute of a sidecar feature-set file
SIDECAR_FORMAT = "spairstore-feature-set"

Sink = Callable[[np.ndarray, np.ndarray], None]
"""Receives ``(rows int64 (B,), maps float16 (B, C, h, w))`` for each batch of maps."""


def sidecar_dir(store: Path) -> Path:
    """The folder of an HDF5 store's feature-set files."""
    return store.with_name(store.name + ".features")


def sidecar_path(store: Path, name: str) -> Path:
    """The file of feature set ``name`` of the HDF5 store at ``store``."""
    return sidecar_dir(store) / f"{name}.h5"


def fingerprint(images: int, image_size: int, crc32_pixels: np.ndarray) -> str:
    """Identifies a store's images (count, frame size, pixel CRCs): a feature set belongs to them only."""
    h = hashlib.sha256(f"{images} {image_size}".encode())
    h.update(np.ascontiguousarray(crc32_pixels, dtype=np.uint32).tobytes())
    return h.hexdigest()[:32]


def images_fingerprint(r: Any) -> str:
    """:func:`fingerprint` of the store that the backend reader ``r`` (an ``ArrayReader``) reads."""
    return fingerprint(r.shapes()["images/crc32_pixels"][0][0], int(r.attrs["image_size"]),
                       r.read("images/crc32_pixels"))


_FATES = {
    "kept": "kept feature set {!r} of the store replaced: made from these same images",
    "replaced": "feature set {!r} of the store replaced: replaced by the new store's set of that name",
    "damaged": "feature set {!r} of the store replaced has no files (damaged): not kept",
    "refused": "feature set {!r} of the store replaced was made from other images: its file stays beside the new "
               "store, which refuses it",
}


def kept_notes(fates: dict[str, str]) -> list[str]:
    """The notes of a ``pack``/``convert --overwrite`` on what became of each set of the store it
    replaced: name -> ``kept``, ``replaced``, ``damaged``, ``refused`` or ``other images`` (dropped)."""
    notes = [_FATES[f].format(name) for name, f in fates.items() if f in _FATES]
    if dropped := [name for name, f in fates.items() if f == "other images"]:
        which = f"feature set {dropped[0]} was" if len(dropped) == 1 else f"feature sets {', '.join(dropped)} were"
        notes.append(f"{which} made from other images than the new store's (another size or source): dropped with "
                     "the store replaced")
    return notes


def crc32_rows(block: np.ndarray) -> np.ndarray:
    """CRC-32 of each row of ``block``: uint32 (len(block),)."""
    return np.array([zlib.crc32(row) for row in np.ascontiguousarray(block)], dtype=np.uint32)


class SetSink(Protocol):
    """One process's writer of maps into a staged set: call it per batch, then :meth:`close`."""

    def __call__(self, rows: np.ndarray, maps: np.ndarray) -> None: ...

    def close(self) -> None:
        """Flag every row written (durably) and release the files."""


class SetWriter(Protocol):
    """Stages one feature set of a store inside its transaction and commits it (see the module doc).

    ``unit_rows``: rows of the block one process writes whole (a Zarr shard; for HDF5 any batch).
    ``whole_units``: whether a unit must reach the sink in one go (a Zarr shard is one file, written once);
    where not (HDF5), any rows, in any order, may be written in any batch.
    """

    unit_rows: int
    whole_units: bool

    def prepare(self, tx: Transaction, replace: bool) -> np.ndarray:
        """Make the staged set ready (creating it if new) and return the image rows still to write,
        ascending, in whole units; ``replace`` hides an existing set of the name first where the
        format must (Zarr)."""

    def sink(self, tx: Transaction, part: int, sync_seconds: float) -> SetSink:
        """Part ``part``'s writer (one per process)."""

    def commit(self, tx: Transaction) -> None:
        """Add the fully written set to the store (replacing one of its name); old or new under a kill."""


def check_complete(tx: Transaction, rows: int) -> None:
    """Refuse to commit a set with rows not written yet."""
    missing = int((~tx.done(rows)).sum())
    if missing:
        raise FeatureError(f"{tx.dir}: {missing} images not extracted yet")


def set_attrs(name: str, attrs: dict[str, Any], store_fingerprint: str) -> dict[str, Any]:
    """Root attributes of a sidecar feature-set file."""
    return {"format": SIDECAR_FORMAT, "name": name, "feature_set": attrs, "store_fingerprint": store_fingerprint}
