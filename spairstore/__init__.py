"""spairstore: semantic-correspondence datasets in one fast, checksummed store.

>>> import spairstore
>>> store = spairstore.open("spair.h5")
>>> store.pixels(0).shape, store.pairs("test").pair_id[:3]
>>> print(spairstore.evaluate(store, "test", spairstore.Identity()))   # PCK tables, protocol "spair"

The PyTorch side (:class:`PairDataset`, :class:`ImageDataset`, :class:`Loader`) and :func:`pack` (with
the converters it runs) are imported on first use: ``import spairstore`` imports neither torch nor
``converters``, and ``converters`` (which builds on :mod:`spairstore.core`) imports without a circle.
"""
from __future__ import annotations

from typing import Any

from .core.errors import SourceError, SpairstoreError, StoreError
from .core.version import __version__
from .eval.evaluation import Report, evaluate
from .eval.methods import Identity, NearestNeighbour
from .eval.predictions import load_predictions, save_predictions
from .eval.protocols import PROTOCOLS, Protocol, get_protocol
from .store.reader import Store, Table, open

_LAZY = {"pack": "sources", "PackSummary": "sources", "add_feature_set": "features.precomputed",
         "PairDataset": "torch.datasets", "ImageDataset": "torch.datasets", "collate": "torch.collate",
         "ShardSampler": "torch.sampler", "Loader": "torch.loader",
         "BatchMethod": "eval.models", "load_head": "eval.models", "save_head": "eval.models"}

__all__ = ["open", "Store", "Table", "SpairstoreError", "SourceError", "StoreError",
           "evaluate", "Report", "Protocol", "PROTOCOLS", "get_protocol", "Identity", "NearestNeighbour",
           "load_predictions", "save_predictions", *_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
