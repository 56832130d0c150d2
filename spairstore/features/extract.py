"""Extract backbone features for every image of a store: ``spairstore features``, in one process or in
several at once (``torchrun --nproc-per-node N -m spairstore features ...``).

The pieces, each reusable on its own:

1. :func:`extract_rows` runs an :class:`~.backbones.Extractor` over given image rows in batches and hands each
   batch of float16 maps to a *sink* (any callable ``sink(rows, maps)``). Batches never straddle a
   *unit* (a block of rows: a Zarr shard, or ``batch_size`` rows), so the same rows always form the same
   batches, whichever process runs them. That matters: on CPU an image's map varies in its last bits
   with the other images of its batch, so equal batches are what makes a run of N processes bitwise
   equal to a run of one.
2. :class:`Staging` is the run's transaction ``features-<name>`` on the store
   (:mod:`spairstore.store.transaction`), in the folder ``.<store>.features-<name>.staging/``: its
   lock, its settings (a re-run with the same settings resumes, one with others is refused unless
   ``overwrite``), ``meta.json`` (the attributes the set gets) and, per writer process ``k``,
   ``done-<k>.u8`` (one flag per image row, made durable only after the rows it flags).
3. The set writer of the store's format (:mod:`spairstore.store.feature_sets`) takes the maps and
   commits the set: for HDF5 each process writes its rows in place into the staged sidecar file, which
   the commit renames to ``<store>.features/<name>.h5`` (the store file is never rewritten); for Zarr
   the processes write whole shards straight into the store's unlisted array, which the commit
   publishes. Either way readers see the whole set or none of it, and the maps are written once.

Several processes (:mod:`.world`): the first prepares (checks, the staging's lock, the Zarr array) and
deals the units with missing rows out round robin; each process extracts its units through its own
sink; the first commits when every part succeeded.
"""
from __future__ import annotations

import glob
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..core.device import resolve_device
from ..core.errors import FeatureError, SpairstoreError, require_batch_size
from ..core.tables import mib, setting
from ..store.backends import backend_for, is_url
from ..store.feature_sets import SetWriter, Sink
from ..store.reader import Store
from ..store.transaction import Transaction, staging_path, write_atomic
from .backbones import Extractor, FeatureExtractor, Flipped
from .user import UserExtractor, default_set_name, is_factory_spec
from .world import World

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: attributes that must match for a run to resume another one's staged rows
_RESUME_KEYS = ("backbone", "layers", "weights_sha256", "weights", "input_size", "normalization", "stride",
                "cell_offset", "width", "height", "channels", "dtype")

#: a setting that differs, and the settings that then differ because of it
_CAUSES = (("backbone", _RESUME_KEYS[1:]), ("weights", ("weights_sha256",)),
           ("layers", ("stride", "cell_offset", "width", "height", "channels")),
           ("input_size", ("width", "height")))


def _batches(rows: np.ndarray, batch_size: int, unit_rows: int | None) -> Iterator[np.ndarray]:
    """``rows`` in order, cut at every change of unit (``row // unit_rows``), then into ``batch_size``."""
    cuts = np.flatnonzero(np.diff(rows // unit_rows) != 0) + 1 if unit_rows and len(rows) else []
    for run in np.split(rows, cuts):
        for start in range(0, len(run), batch_size):
            yield run[start:start + batch_size]


def image_label(store: Store, row: int) -> str:
    """``image row 17 (cat/2008_000123)``: an image as errors name it."""
    return f"image row {row} ({store.categories[store.images.category[row]]}/{store.images.name[row]})"


def extract_rows(store: Store, extractor: Extractor, rows: Sequence[int] | np.ndarray, sink: Sink,
                 batch_size: int = 16, progress: bool = False, desc: str = "features",
                 unit_rows: int | None = None) -> int:
    """Extract the feature maps of image ``rows`` of ``store`` in batches of up to ``batch_size``, in
    the order given, handing each batch to ``sink``. With ``unit_rows``, no batch holds rows of two
    units (``row // unit_rows``). Returns the number of images extracted."""
    rows = np.asarray(rows, dtype=np.int64)
    require_batch_size(batch_size, FeatureError)
    bar = tqdm(total=len(rows), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for batch in _batches(rows, batch_size, unit_rows):
            out = extractor(store.read("pixels", batch))
            maps = out.half()
            if not torch.isfinite(maps).all():  # one check per batch; which rows, and why, only on failure
                for values, what in ((out, "NaN or infinite values"), (maps, "values beyond float16's range (|x| > 65504)")):
                    bad = batch[~torch.isfinite(values).flatten(1).all(1).cpu().numpy()]
                    if len(bad):
                        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
                        raise FeatureError(f"{store.path}: the maps of {image_label(store, int(bad[0]))}{more} hold "
                                           f"{what}")
            sink(batch, maps.cpu().numpy())
            bar.update(len(batch))
    finally:
        bar.close()
    return len(rows)


def staging_dir(store_path: Path, name: str) -> Path:
    """The staging folder of an unfinished feature set ``name`` of the store at ``store_path``."""
    return staging_path(store_path, f"features-{name}")


class Staging:
    """The resumable staging of one feature set being written: the transaction ``features-<name>`` on
    the store (:mod:`spairstore.store.transaction`), whose settings are the run's (the store's images,
    rows, map shape and the attributes in :data:`_RESUME_KEYS`), plus ``meta.json``: the name and the
    full attributes of the run that started it, which a resumed run commits.

    The process that runs alone, or the first of several, opens it with :meth:`open` and holds its lock
    until :meth:`close`; the others :meth:`attach` to it.
    """

    #: seconds between syncs of each process's done flags (each sync waits for the disk)
    sync_seconds = 2.0

    def __init__(self, tx: Transaction, meta: dict[str, Any]):
        self.tx, self.meta, self.path = tx, meta, tx.dir
        self.rows = int(meta["rows"])
        self.row_shape = tuple(meta["row_shape"])

    @classmethod
    def open(cls, store_path: Path, meta: dict[str, Any], restart: bool = False) -> Staging:
        """Resume the staging of ``meta["name"]`` if its settings equal ``meta``'s, else start it afresh.

        Staged rows made with other settings are discarded only with ``restart``; otherwise that is an
        error, so a typo in the options cannot throw away hours of extraction.
        """
        name = meta["name"]
        tx = Transaction.open(store_path, f"features-{name}", who="`spairstore features` run", error=FeatureError)
        try:
            refuse = lambda d: FeatureError(
                f"{tx.dir}: an unfinished run of feature set {name!r} used other settings ({d}); re-run with "
                f"those settings to resume it, or pass --overwrite to discard it")
            if not tx.begin(_settings(meta), restart, describe=_diff, refuse=refuse) \
                    or not (tx.dir / "meta.json").is_file():
                write_atomic(tx.dir / "meta.json", json.dumps(meta, indent=1).encode())
            staging = cls(tx, json.loads((tx.dir / "meta.json").read_text()))
            row_bytes, done = int(np.prod(staging.row_shape)) * 2, int(staging.done().sum())  # float16
        except BaseException:
            tx.close()
            raise
        try:
            tx.reserve(staging.rows * row_bytes, f"feature set {name!r}", staged=done * row_bytes, elsewhere=False)
        except SpairstoreError:
            if done:
                tx.close()  # rows an earlier run extracted stay for a resume
            else:
                tx.finish()
            raise
        return staging

    @classmethod
    def attach(cls, store_path: Path, name: str) -> Staging:
        """The staging that the first process of this run opened (and locked) with :meth:`open`."""
        tx = Transaction.attach(store_path, f"features-{name}")
        return cls(tx, json.loads((tx.dir / "meta.json").read_text()))

    def done(self) -> np.ndarray:
        """Which image rows are staged, by any process: bool (N,)."""
        return self.tx.done(self.rows)

    def finish(self) -> None:
        """The set is committed: remove the staging and release the lock."""
        self.tx.finish()

    def close(self) -> None:
        """Release the lock (the first process), keeping what is staged."""
        self.tx.close()


def _settings(meta: dict[str, Any]) -> dict[str, Any]:
    """What must match for a run to resume another one's staged rows."""
    return {"store": meta["store"], "rows": meta["rows"], "row_shape": list(meta["row_shape"]),
            **{k: meta["attrs"].get(k) for k in _RESUME_KEYS}}


def _diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    if old.get("store") != new.get("store") or old.get("rows") != new.get("rows"):
        return "staged for a store with other images"
    keys = [k for k in _RESUME_KEYS if old.get(k) != new.get(k)] or ["row_shape"]
    return ", ".join(f"{k} {old.get(k)!r} there, {new.get(k)!r} now" for k in keys)


def partial_feature_sets(store_path: str | Path) -> dict[str, dict[str, Any]]:
    """Unfinished feature sets staged beside the store: name -> ``{"path", "done", "images", "backbone",
    "resume"}`` (``resume``: what resumes it, the command or the call that started it)."""
    store_path = Path(store_path).resolve()
    out = {}
    head = f".{store_path.name}.features-"
    for d in sorted(store_path.parent.glob(f"{glob.escape(head)}*.staging")):
        name = d.name[len(head):-len(".staging")]
        try:
            meta = json.loads((d / "meta.json").read_text())
            done = int(np.count_nonzero(Transaction(store_path, f"features-{name}").done(int(meta["rows"]))))
        except (OSError, ValueError, KeyError, SpairstoreError):
            meta, done = {}, 0
        attrs = meta.get("attrs", {})
        resume = ("call spairstore.add_feature_set again with the same name and settings"
                  if attrs.get("library") == "precomputed" else "re-run `spairstore features`")
        out[name] = {"path": str(d), "done": done, "images": meta.get("rows"), "backbone": attrs.get("backbone"),
                     "resume": resume}
    return out


def set_writer(store_path: Path, meta: dict[str, Any], batch_size: int) -> SetWriter:
    """The writer of the staged set ``meta`` describes, for the store's format."""
    shape = (int(meta["rows"]), *meta["row_shape"])
    return backend_for(store_path).add_group(store_path, meta["name"], shape, meta["attrs"], meta["store"], batch_size)


def drop_feature_set(store_path: str | Path, name: str) -> int:
    """Remove feature set ``name`` from the local store at ``store_path``, or delete the file of a set the
    store refuses (:attr:`Store.stale_feature_sets`); returns the bytes freed on disk. An HDF5 store's
    file is not rewritten: the set's own file is deleted. Waits for nothing: refused while a run writes
    the set."""
    store_path = Path(store_path).resolve()
    with Store(store_path) as store:
        if name not in store.stale_feature_sets:
            store.feature_set(name)
    tx = Transaction.open(store_path, f"features-{name}", who="`spairstore features` run", error=FeatureError)
    try:
        return backend_for(store_path).drop_group(store_path, name)
    finally:
        tx.finish()


def _deal(rows: np.ndarray, unit_rows: int, processes: int) -> list[np.ndarray]:
    """``rows`` (ascending) split into units (``row // unit_rows``) dealt out round robin: process ``k``
    gets units ``k, k + processes, ...``."""
    units = np.split(rows, np.flatnonzero(np.diff(rows // unit_rows) != 0) + 1) if len(rows) else []
    return [np.concatenate(units[k::processes]) if units[k::processes] else np.empty(0, np.int64)
            for k in range(processes)]


@dataclass(frozen=True)
class _Plan:
    unit_rows: int
    rows: list[np.ndarray]  #: image rows of each process




@dataclass(frozen=True)
class FeatureSummary:
    """What a ``spairstore features`` run did."""

    store: Path
    name: str
    backbone: str
    layers: list[str]
    shape: tuple[int, ...]  #: (N, C, h, w)
    extracted: int  #: images extracted by this run (the rest were staged by an earlier, interrupted one)
    seconds: float  #: extraction time of this run
    device: str | None  #: of the first process; None for maps computed elsewhere (add_feature_set)
    processes: int = 1  #: processes that extracted (torchrun)
    flipped: FeatureSummary | None = None  #: the companion set of mirrored images (``flip``)
    kept: bool = False  #: the set was there, made with these same settings: nothing was extracted

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 2

    def __str__(self) -> str:
        n = self.shape[0]
        if self.device is None:
            done, where = "maps written", ""
        else:
            done = "images extracted"
            where = " on " + (self.device if self.processes == 1 else
                              f"{self.processes} {self.device.split(':')[0]} processes")
        rate = f", {self.extracted / self.seconds:.1f} img/s{where}" if self.extracted and self.seconds else ""
        resumed = f" ({n - self.extracted:,} resumed from an earlier run)" if self.extracted < n else ""
        made = " ".join([self.backbone, ", ".join(self.layers)]).strip()
        run = ("nothing to do: the store has this set, made with these same settings (--overwrite extracts it "
               "again)" if self.kept else f"{self.extracted:,} {done} in {self.seconds:.1f} s{rate}{resumed}")
        return (f"feature set {self.name!r} in {self.store}: {made}\n"
                f"  maps   float16 {self.shape[1:]} x {n:,} images = {mib(self.nbytes)}\n"
                f"  run    {run}"
                + (f"\n{self.flipped}" if self.flipped else ""))


def make_extractor(backbone: str | Callable[[], nn.Module] | nn.Module, layers: Sequence[str | int] | None = None,
                   input_size: int | None = None, image_size: int | None = None,
                   weights: str | Path | None = None, device: str = "cpu") -> Extractor:
    """The extractor ``backbone`` names: a registry backbone (:class:`FeatureExtractor`), or a user's module
    (:class:`~spairstore.features.user.UserExtractor`: ``"MODULE:FACTORY"``, a factory or a module)."""
    if not is_factory_spec(backbone):
        return FeatureExtractor(str(backbone), layers, input_size=input_size, image_size=image_size, weights=weights,
                                device=device)
    given = [opt for opt, v in (("--layers", layers), ("--weights", weights)) if v]
    if given:
        raise FeatureError(f"{' and '.join(given)} apply to registry backbones; a FACTORY() module taps and loads "
                           f"its own (--backbone {backbone})")
    extractor = UserExtractor(backbone, device=device)
    if input_size is not None and input_size != extractor.input_size:
        raise FeatureError(f"--input-size {input_size}: {extractor.spec} declares input_size {extractor.input_size} "
                           f"(leave --input-size out)")
    return extractor


def extract_features(store_path: str | Path, backbone: str | Callable[[], nn.Module] | nn.Module = "efficientnet-lite0",
                     layers: Sequence[str | int] | None = None, input_size: int | None = None,
                     batch_size: int = 16, device: str | None = None, weights: str | Path | None = None,
                     name: str | None = None, overwrite: bool = False, progress: bool = False,
                     flip: bool = False) -> FeatureSummary:
    """Run ``backbone`` over every image of the store at ``store_path`` and add the maps as feature set
    ``name``. Resumes an interrupted run with the same settings.

    ``backbone`` is a registry name (see :class:`~spairstore.features.backbones.FeatureExtractor` for
    ``layers``, ``input_size`` and ``weights``), or a user's network: ``"pkg.mod:make"``,
    ``"path/to/file.py:make"``, the factory itself or the ``torch.nn.Module`` it returns (see
    :mod:`spairstore.features.user` for the contract; ``layers`` and ``weights`` do not apply). ``name``
    defaults to the registry name, or ``<module>.<factory>`` for a user's factory.

    With ``flip``, a companion set ``<name>-flip`` also gets the maps of every store image mirrored left
    to right (see :class:`~spairstore.features.backbones.Flipped` for its frame).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this with the same arguments: each
    extracts its share of the images (on GPU ``LOCAL_RANK`` for ``device`` ``cuda``), and the first
    commits; every process returns the summary of the whole run.

    A set ``name`` that exists with these same settings (backbone, weights, layers, input size) is kept
    as it is, nothing extracted (the summary says so), so a script or ``--flip`` added later runs again
    without an error; one made otherwise is replaced, and an unfinished run with other settings
    discarded, only with ``overwrite``.
    """
    if is_url(store_path):
        raise FeatureError(f"{store_path}: remote stores are read-only; extract into a local copy "
                           f"(spairstore convert) instead")
    store_path = Path(store_path).resolve()
    if name is not None:
        check_name(name)
    require_batch_size(batch_size, FeatureError)
    dev = resolve_device(device)
    world = World.from_env(dev.type)
    if dev.type == "cuda" and world.size > 1:
        if dev.index is not None:
            world.close()
            raise FeatureError(f"--device {device} with {world.size} processes: each process takes the GPU of its "
                               f"LOCAL_RANK; pass --device cuda")
        dev = torch.device("cuda", world.local_rank)
    try:
        with Store(store_path) as store:
            extractor = world.each(lambda: make_extractor(
                backbone, layers, input_size=input_size, image_size=store.image_size, weights=weights,
                device=str(dev)))
            if name is None:
                name = default_set_name(extractor) if isinstance(extractor, UserExtractor) else str(backbone)
                check_name(name)
            run = _SetRun(store, store_path, world, batch_size, dev, progress)
            summary = run(extractor, name, overwrite)
            if flip:
                flip_name = f"{name}-flip"
                check_name(flip_name)
                summary = replace(summary, flipped=run(Flipped(extractor, of=name), flip_name, overwrite))
    finally:
        world.close()
    return summary


def made_with(published: dict[str, Any], attrs: dict[str, Any]) -> str:
    """How an existing set's settings compare with this run's, for the "exists" error."""
    keys = [k for k in _RESUME_KEYS if published.get(k) != attrs.get(k)]
    for cause, effects in _CAUSES:  # name what the user chose, not the map shape that follows from it
        if cause in keys:
            keys = [k for k in keys if k not in effects]
    differ = [f"{k} {setting(published.get(k))} there, {setting(attrs.get(k))} here" for k in keys]
    return f"made with other settings ({'; '.join(differ)})" if differ else "made with these same settings"


def check_name(name: str) -> None:
    """Refuse a feature-set name that could not be a file name on every system (it names the set's file)."""
    if not _NAME.match(name):
        raise FeatureError(f"feature set name {name!r}: a letter or digit first, then letters, digits, '_', '-' "
                           "and '.' (at most 64 in all)")


@dataclass
class _SetRun:
    """Extracts one feature set of an open store with the processes of ``world``, resumably, and commits it."""

    store: Store
    store_path: Path
    world: World
    batch_size: int
    device: torch.device
    progress: bool

    def __call__(self, extractor: Extractor, name: str, overwrite: bool) -> FeatureSummary:
        """Extract and commit set ``name``; a published set ``name`` with the same settings is kept as it
        is (nothing extracted) unless ``overwrite``."""
        store, store_path, world, batch_size = self.store, self.store_path, self.world, self.batch_size
        attrs = extractor.attrs()
        row_shape = [extractor.channels, extractor.size, extractor.size]
        meta = {"name": name, "store": store.fingerprint, "rows": len(store), "row_shape": row_shape,
                "attrs": attrs}
        published = store.feature_sets.get(name)
        if not overwrite and published is not None \
                and all(published.get(k) == attrs.get(k) for k in _RESUME_KEYS):
            return FeatureSummary(store=store_path, name=name, backbone=attrs["backbone"], layers=attrs["layers"],
                                  shape=(len(store), *row_shape), extracted=0, seconds=0.0, device=str(self.device),
                                  processes=world.size, kept=True)
        staging: Staging | None = None
        target: SetWriter | None = None

        def prepare() -> _Plan:
            nonlocal staging, target
            exists = published is not None
            if exists and not overwrite:
                raise FeatureError(f"{store_path}: feature set {name!r} exists, {made_with(published, attrs)}; "
                                   f"pass --overwrite to replace it")
            staging = Staging.open(store_path, meta, restart=overwrite)
            target = set_writer(store_path, staging.meta, batch_size)
            rows = target.prepare(staging.tx, replace=exists)
            return _Plan(target.unit_rows, _deal(rows, target.unit_rows, world.size))

        try:
            plan = world.first(prepare)
            if staging is None:
                staging = Staging.attach(store_path, name)
                target = set_writer(store_path, staging.meta, batch_size)
            t0 = time.perf_counter()

            def extract() -> None:
                sink = target.sink(staging.tx, world.rank, staging.sync_seconds)
                try:
                    extract_rows(store, extractor, plan.rows[world.rank], sink, batch_size=batch_size,
                                 progress=self.progress and world.rank == 0, unit_rows=plan.unit_rows,
                                 desc=f"features {name}" + (f" (process 0 of {world.size})" if world.size > 1 else ""))
                finally:
                    sink.close()

            world.each(extract)
            seconds = time.perf_counter() - t0

            def finish() -> None:
                target.commit(staging.tx)
                staging.finish()

            world.first(finish)
        finally:
            if staging is not None:
                staging.close()
        return FeatureSummary(store=store_path, name=name, backbone=attrs["backbone"], layers=attrs["layers"],
                              shape=(meta["rows"], *row_shape), extracted=sum(map(len, plan.rows)), seconds=seconds,
                              device=str(self.device), processes=world.size)

