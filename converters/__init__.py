"""Source-dataset converters, one :class:`~converters.base.Converter` subclass per dataset.

``CONVERTERS`` maps each dataset name (the store's ``dataset`` attribute) to its converter class;
:func:`detect` finds the one whose layout a root has and :func:`read` reads a root with it. With
``on_error="skip"`` a converter leaves bad images and pairs out and lists them (file and reason) in
``DatasetRecords.skipped`` instead of raising.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from spairstore.core.errors import SourceError
from spairstore.core.records import DatasetRecords, OnError

from .ap10k import AP10K
from .base import Converter, Progress
from .pfpascal import PFPascal
from .pfwillow import PFWillow
from .spair71k import SPair71k

#: Every converter by dataset name, in detection order.
CONVERTERS: dict[str, type[Converter]] = {c.name: c for c in (SPair71k, PFPascal, PFWillow, AP10K)}


def detect(root: str | Path) -> str:
    """Name of the converter whose layout ``root`` has."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError(root, "dataset root is not a directory")
    found = [name for name, c in CONVERTERS.items() if c.detect(root)]
    if found:
        return found[0]
    # The folder above an unpacked archive (data/ for data/SPair-71k) is the common slip: name the one below.
    try:
        below = [(d, c.title) for d in sorted(p for p in root.iterdir() if p.is_dir())
                 for c in CONVERTERS.values() if c.detect(d)]
    except OSError:  # an unreadable folder below: only the plain message
        below = []
    if below:
        where = ", ".join(f"{d} holds {title}" for d, title in below[:3])
        raise SourceError(root, f"no known dataset layout found here, but {where}: give that folder")
    needs = "; ".join(f"{c.title} needs {c.needs()}" for c in CONVERTERS.values())
    raise SourceError(root, f"no known dataset layout found ({needs})")


def read(root: str | Path, dataset: str | None = None, progress: Progress | None = None,
         on_error: OnError = "fail", follow_links: bool = False,
         categories: Sequence[str] | None = None) -> DatasetRecords:
    """Read a dataset root into canonical records, with the named converter or the detected one.
    ``progress(iterable, description, total)`` wraps the long loops (e.g. a tqdm bar); files that
    symbolic links lead to outside the root are bad items unless ``follow_links``; ``categories`` keeps
    only those categories' images and the pairs between them."""
    name = dataset or detect(root)
    if name not in CONVERTERS:
        raise SourceError(root, f"unknown dataset {name!r} (known: {', '.join(CONVERTERS)})")
    return CONVERTERS[name](root, progress=progress, on_error=on_error, follow_links=follow_links,
                            categories=categories).read()
