"""spairstore: semantic-correspondence datasets in one fast, checksummed store.

>>> import spairstore
>>> store = spairstore.open("spair.h5")
>>> store.pixels(0).shape, store.pairs("test").pair_id[:3]
>>> print(spairstore.evaluate(store, "test", spairstore.Identity()))   # PCK tables, protocol "spair"
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import SourceError, SpairstoreError, StoreError
from .evaluation import Report, evaluate
from .methods import Identity, NearestNeighbour, load_predictions
from .protocols import PROTOCOLS, Protocol, get_protocol
from .reader import Store, Table, open
from .writer import PackSummary, pack

__all__ = ["open", "pack", "Store", "Table", "PackSummary", "SpairstoreError", "SourceError", "StoreError",
           "evaluate", "Report", "Protocol", "PROTOCOLS", "get_protocol", "Identity", "NearestNeighbour",
           "load_predictions", "__version__"]
