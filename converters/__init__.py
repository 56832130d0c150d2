"""Source-dataset converters, one module per dataset (torchvision's convention).

Each module exposes ``NAME``, ``detect(root) -> bool`` and ``read(root, progress=None, on_error="fail")
-> DatasetRecords``. With ``on_error="skip"`` a converter leaves bad images and pairs out and lists them
(file and reason) in ``DatasetRecords.skipped`` instead of raising (through
:class:`~spairstore.core.records.ErrorPolicy`).
:func:`read` picks the module by name or by detecting the layout.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from spairstore.core.errors import SourceError
from spairstore.core.records import DatasetRecords, OnError

from . import pfpascal, pfwillow, spair71k

CONVERTERS: dict[str, ModuleType] = {m.NAME: m for m in (spair71k, pfpascal, pfwillow)}


def detect(root: Path) -> str:
    """Name of the converter whose layout ``root`` has."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(root, "dataset root is not a directory")
    found = [name for name, mod in CONVERTERS.items() if mod.detect(root)]
    if not found:
        raise SourceError(root, f"no known dataset layout found (known: {', '.join(CONVERTERS)})")
    return found[0]


def read(root: Path, dataset: str | None = None,
         progress: Callable[[Iterable[Any], str, int], Iterable[Any]] | None = None,
         on_error: OnError = "fail") -> DatasetRecords:
    """Read a dataset root into canonical records, with the named converter or the detected one."""
    name = dataset or detect(root)
    if name not in CONVERTERS:
        raise SourceError(root, f"unknown dataset {name!r} (known: {', '.join(CONVERTERS)})")
    return CONVERTERS[name].read(Path(root), progress=progress, on_error=on_error)
