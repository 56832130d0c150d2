"""spairstore: semantic-correspondence datasets in one fast, checksummed store.

>>> import spairstore
>>> store = spairstore.open("spair.h5")
>>> store.pixels(0).shape, store.pairs("test").pair_id[:3]
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import SourceError, SpairstoreError, StoreError
from .reader import Store, Table, open
from .writer import PackSummary, pack

__all__ = ["open", "pack", "Store", "Table", "PackSummary", "SpairstoreError", "SourceError", "StoreError",
           "__version__"]
