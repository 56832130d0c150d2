"""spairstore: semantic-correspondence datasets in one fast, checksummed store.

>>> import spairstore
>>> store = spairstore.open("spair.h5")
>>> store.pixels(0).shape, store.pairs("test").pair_id[:3]
>>> print(spairstore.evaluate(store, "test", spairstore.Identity()))   # PCK tables, protocol "spair"

The PyTorch side (:class:`PairDataset`, :class:`ImageDataset`, :class:`Loader`) is imported on first
use, so ``import spairstore`` does not import torch.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .errors import SourceError, SpairstoreError, StoreError
from .evaluation import Report, evaluate
from .methods import Identity, NearestNeighbour, load_predictions
from .protocols import PROTOCOLS, Protocol, get_protocol
from .reader import Store, Table, open
from .writer import PackSummary, pack

_LAZY = {"PairDataset": "torchdata", "ImageDataset": "torchdata", "collate": "torchdata",
         "ShardSampler": "torchdata", "Loader": "loader"}

__all__ = ["open", "pack", "Store", "Table", "PackSummary", "SpairstoreError", "SourceError", "StoreError",
           "evaluate", "Report", "Protocol", "PROTOCOLS", "get_protocol", "Identity", "NearestNeighbour",
           "load_predictions", *_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
