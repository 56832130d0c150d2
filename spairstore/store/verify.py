"""Check a store against its own checksums and its sources: ``spairstore verify``.

* Every hot array with a CRC array beside it (``<group>/crc32_<field>``, see :mod:`spairstore.core.schema`)
  has each record's CRC-32 recomputed: a row (pixels, masks, feature maps) or, for a ``*_blob``
  array, the byte range its ``*_offsets`` delimit (the original JPEG/PNG files).
* Every array listed in the ``table_crc32`` attribute (all the small tables) is CRC-32'd whole.
* With ``sources``, every file of the manifest is hashed (SHA-256) under that root and compared.
* Against :mod:`spairstore.core.schema`: arrays it does not declare, and optional fields absent (a
  feature set without its CRC-32s), are listed.

A difference names the record (array, row, image key) or file. ``sample`` checks a random fraction of
the records and files instead of all of them: a quick spot check.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..core.errors import SpairstoreError
from ..core.manifest import sha256_file
from ..core.schema import blob_offsets, crc_array, field_of_array, store_fields
from .reader import Store
from .reader import open as open_store


@dataclass(frozen=True)
class Difference:
    """One record, table or source file that is not what the store says it should be."""

    what: str  #: e.g. ``pixels row 17 (aeroplane/2008_002719)`` (the field name) or a source path
    reason: str

    def __str__(self) -> str:
        return f"{self.what}: {self.reason}"


@dataclass
class VerifyReport:
    path: Path
    records: dict[str, tuple[int, int]] = field(default_factory=dict)  #: array -> (checked, total)
    tables: int = 0  #: arrays checked whole
    sources: tuple[int, int] | None = None  #: (checked, total) source files, when a root was given
    differences: list[Difference] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)  #: arrays no checksum covers
    unknown: list[str] = field(default_factory=list)  #: arrays the schema does not declare
    missing: list[str] = field(default_factory=list)  #: declared (optional) arrays the store lacks
    sample: float | None = None

    @property
    def ok(self) -> bool:
        return not self.differences

    def __str__(self) -> str:
        head = "OK" if self.ok else f"{len(self.differences):,} DIFFERENCES"
        scope = f", sampling {self.sample:.1%}" if self.sample is not None else ""
        names = {k: field_of_array(k) or k for k in self.records}
        w = max([len("source files"), *map(len, names.values())])
        lines = [f"verify {self.path}: {head}{scope}"]
        lines += [f"  {names[k]:<{w}} {c:,} of {t:,} records" for k, (c, t) in self.records.items()]
        lines.append(f"  {'tables':<{w}} {self.tables:,} arrays")
        if self.sources is not None:
            lines.append(f"  {'source files':<{w}} {self.sources[0]:,} of {self.sources[1]:,}")
        if self.unchecked:
            lines.append(f"  not covered by a checksum: {', '.join(self.unchecked)}")
        if self.unknown:
            lines.append(f"  not in the schema: {', '.join(self.unknown)}")
        if self.missing:
            lines.append(f"  missing from the store: {', '.join(self.missing)}")
        lines += [f"  DIFFERS {d}" for d in self.differences]
        return "\n".join(lines)


def _pick(n: int, sample: float | None, rng: np.random.Generator) -> np.ndarray:
    if sample is None or n == 0:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max(1, math.ceil(sample * n)), replace=False))


def _image_key(store: Store, i: int) -> str:
    return f"{store.categories[store.images.category[i]]}/{store.images.name[i]}"


def _records(store: Store, name: str) -> tuple[int, np.ndarray | None]:
    """How many records array ``name`` holds, and the byte offsets delimiting them for a blob."""
    offsets_name = blob_offsets(name)
    if offsets_name is None:
        return store.shapes[name][0][0], None
    offsets = store.array(offsets_name, 0, store.shapes[offsets_name][0][0])
    return len(offsets) - 1, offsets


def _check_records(store: Store, name: str, picked: np.ndarray, report: VerifyReport, bar: tqdm) -> None:
    n, offsets = _records(store, name)
    crc_name = crc_array(name)
    stored = store.array(crc_name, 0, store.shapes[crc_name][0][0])
    if n == 0:  # an empty payload (a store without masks): nothing to check
        report.records[name] = (0, 0)
        return
    if len(stored) != n:
        report.differences.append(Difference(crc_name, f"holds {len(stored)} CRCs for {n} records of {name}"))
        return
    per_image = n == len(store)
    for i in map(int, picked):
        data = (store.array(name, int(offsets[i]), int(offsets[i + 1])) if offsets is not None
                else store.array(name, i, i + 1))
        crc = zlib.crc32(np.ascontiguousarray(data))
        if crc != int(stored[i]):
            where = f"{field_of_array(name) or name} row {i}" + (f" ({_image_key(store, i)})" if per_image else "")
            report.differences.append(Difference(where, f"CRC-32 is {crc:08x}, stored {int(stored[i]):08x}"))
        bar.update()
    report.records[name] = (len(picked), n)


def _check_tables(store: Store, report: VerifyReport) -> None:
    table_crc = store.attrs.get("table_crc32", {})
    for name in sorted(table_crc):
        if name not in store.shapes:
            report.differences.append(Difference(name, "listed in table_crc32 but missing from the store"))
            continue
        crc = zlib.crc32(np.ascontiguousarray(store.array(name, 0, store.shapes[name][0][0])))
        if crc != table_crc[name]:
            report.differences.append(Difference(name, f"CRC-32 of the table is {crc:08x}, "
                                                       f"stored {table_crc[name]:08x}"))
        report.tables += 1


def _check_sources(store: Store, root: Path, picked: np.ndarray, report: VerifyReport, progress: bool) -> None:
    m = store.manifest
    root = root.resolve()
    before = len(report.differences)
    for i in tqdm(picked, desc="sources", unit="file", disable=not progress, leave=False, dynamic_ncols=True):
        rel = str(m.path[i])
        p = (root / rel).resolve()
        if Path(rel).is_absolute() or not p.is_relative_to(root):
            report.differences.append(Difference(rel, "the manifest names a path outside the source root"))
        elif not p.is_file():
            report.differences.append(Difference(rel, "missing from the source root"))
        elif p.stat().st_size != int(m.size[i]):
            report.differences.append(Difference(rel, f"is {p.stat().st_size:,} bytes, the manifest says "
                                                      f"{int(m.size[i]):,}"))
        elif sha256_file(p) != str(m.sha256[i]):
            report.differences.append(Difference(rel, "SHA-256 differs from the manifest"))
    report.sources = (len(picked), m.rows)
    found = report.differences[before:]
    if len(picked) > 1 and len(found) == len(picked) and all(d.reason == "missing from the source root" for d in found):
        # not a damaged dataset but another folder: one line instead of one per file
        packed = store.attrs.get("build_config", {}).get("source_root")
        report.differences[before:] = [Difference(str(root), (
            f"none of the {len(picked):,} source files checked is there (e.g. {found[0].what}): not the folder "
            "the store was packed from" + (f", which was {packed}" if packed else "")))]


def verify(path: str | Path, sources: str | Path | None = None, sample: float | None = None,
           seed: int | None = None, progress: bool = False) -> VerifyReport:
    """Check the store at ``path`` (see the module doc). ``sample`` in (0, 1] checks that fraction of
    the records and source files, drawn at random (``seed`` makes the draw repeatable).

    A store that cannot be opened raises :class:`~spairstore.StoreError`; differences are returned in
    the report, whose ``ok`` is False when there are any.
    """
    if sample is not None and not 0 < sample <= 1:
        raise SpairstoreError(f"sample must be a fraction in (0, 1], got {sample}")
    if sources is not None and not Path(sources).is_dir():
        raise SpairstoreError(f"{sources}: source root is not a directory")
    rng = np.random.default_rng(seed)
    with open_store(path) as store:
        report = VerifyReport(path=store.path, sample=None if sample in (None, 1) else sample)
        payload = sorted(k for k in store.shapes if crc_array(k) in store.shapes)
        picks = {k: _pick(_records(store, k)[0], report.sample, rng) for k in payload}
        with tqdm(total=sum(map(len, picks.values())), desc="records", unit="rec", disable=not progress,
                  dynamic_ncols=True) as bar:
            for name in payload:
                _check_records(store, name, picks[name], report, bar)
        _check_tables(store, report)
        report.differences += [Difference(f"features/{k}", why) for k, why in store.stale_feature_sets.items()]
        covered = set(store.attrs.get("table_crc32", {})) | set(payload) | {crc_array(k) for k in payload}
        report.unchecked = sorted(set(store.shapes) - covered)
        fields = store_fields(store.shapes, store.attrs)
        report.unknown = sorted(set(store.shapes) - {f.path for f in fields})
        report.missing = sorted({f.path for f in fields if not f.layer} - set(store.shapes))
        if sources is not None:
            _check_sources(store, Path(sources), _pick(store.manifest.rows, report.sample, rng), report, progress)
    return report
