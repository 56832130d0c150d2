"""Source datasets into stores (``spairstore pack``, ``spairstore synth``): the one module of :mod:`spairstore`
that imports the converters.

Data flows one way: a converter (``converters/``) reads a native layout into canonical records
(:mod:`spairstore.core.records`), and the writer (:mod:`spairstore.store.writer`) packs records into a
store. This module joins the two, so neither the store nor anything after it imports a converter.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import converters
from converters.synth import SYNTHESIZERS, SynthSummary, synthesize

from .core.errors import SourceError
from .core.records import OnError
from .store.backends import is_store
from .store.feature_sets import sidecar_dir
from .store.reader import open as open_store
from .store.writer import PackSummary, write

__all__ = ["DATASETS", "SYNTHESIZERS", "PackSummary", "SynthSummary", "pack", "synthesize"]

#: Names of the source layouts ``pack`` reads (``dataset=``).
DATASETS = tuple(converters.CONVERTERS)


def pack(src: str | Path, out: str | Path, size: int = 512, dataset: str | None = None,
         overwrite: bool = False, progress: bool = False, format: str | None = None,
         shard_bytes: int | None = None, on_error: OnError = "fail", resume: bool = False,
         follow_links: bool = False, categories: Sequence[str] | None = None) -> PackSummary:
    """Read the dataset at ``src`` (layout detected unless ``dataset`` names one of :data:`DATASETS`) and
    pack it into a store at ``out``. A source file that a symbolic link leads to outside ``src`` is a
    bad item (see ``on_error``) unless ``follow_links``. ``categories`` packs only those categories'
    images and the pairs between them (the whole root is still read and checked; the store's
    ``build_config`` and notes record the choice). Feature-set files already beside an HDF5
    ``out`` (``<out>.features/``) are left in place; the summary's notes say which the new store keeps
    and which it refuses. See :func:`spairstore.store.writer.write` for the other arguments."""
    if is_store(src):
        raise SourceError(src, "is a spairstore store, not a dataset folder: pack reads the dataset folder "
                               "(SRC, first) and writes the store (OUT, second)")

    def read(wrap, policy):  # noqa: ANN001, ANN202 - a SourceReader
        return converters.read(Path(src), dataset, progress=wrap, on_error=policy, follow_links=follow_links,
                               categories=categories)

    summary = write(read, out, size=size, overwrite=overwrite, progress=progress, format=format,
                    shard_bytes=shard_bytes, on_error=on_error, resume=resume)
    return dataclasses.replace(summary, notes=summary.notes + _sets_beside(summary.path))


def dataset_at(path: str | Path) -> str | None:
    """The title of the dataset whose layout the folder ``path`` has (e.g. ``SPair-71k``), else None."""
    try:
        return converters.CONVERTERS[converters.detect(path)].title
    except SourceError:
        return None


def _sets_beside(out: Path) -> list[str]:
    """What the new store makes of feature-set files already beside its path (from a store packed there
    before): sets of the same images stay valid and are kept, others are refused. Neither is deleted,
    so a repack never silently loses or adopts a set."""
    if not any(sidecar_dir(out).glob("*.h5")):
        return []
    with open_store(out) as s:
        return ([f"kept feature set {k!r} of {sidecar_dir(out)}/: made from these same images" for k in s.feature_sets]
                + [f"feature set {k!r} refused: {why}" for k, why in s.stale_feature_sets.items()])
