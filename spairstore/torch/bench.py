"""Read benchmark: ``spairstore bench STORE [--source SRC]``.

Random batches of pairs (pixels, masks and keypoints of both images, at the store's size) read three
ways, on the same batches, side by side in one run:

- ``raw files``: what HPF/CATs-style loaders do per pair -- parse the pair JSON, decode both JPEGs and
  both masks with PIL, letterbox them (the writer's own :func:`~spairstore.core.geometry.letterbox`, so the
  output is pixel-identical to the store's; checked), keypoints to the letterboxed frame;
- ``np.memmap``: a plain copy of the same pixel and mask bytes out of a memory map (the ceiling);
- ``spairstore``: :class:`~spairstore.PairDataset` batch reads.

Then the :class:`~spairstore.Loader` itself, on epochs of ``batches`` random batches: ``num_workers=0``
against ``num_workers=workers`` on plain reads, and with ``HFlip + RandomCrop`` augmentation one
worker against two; the ratios of their pairs/s are printed (targets: workers >= 75 % of one process;
augmentation 2 workers >= 1.6x one worker). With ``device="cuda"`` those Loader batches are delivered to
the GPU as training gets them (pinned buffers, asynchronous copies, images normalised there; each pass
ends with a synchronize), the other rows stay on the CPU.

Each runs in this process and in DataLoader worker processes, warm (an untimed pass first); the time
of a pass is the median of ``rounds`` passes, the methods interleaved so that load from elsewhere
hits them alike; CPU time (of this process and its workers) is reported beside wall-clock time, as it
barely depends on what else runs on the machine. Memory: each DataLoader worker reports its private memory (``/proc/self/smaps``)
after reading, under ``fork`` and ``spawn``; the store's payload pages it maps are page cache shared
with every process, counted apart from its private memory.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..core.device import resolve_device
from ..core.errors import SpairstoreError
from ..core.geometry import letterbox, letterbox_params
from ..store.reader import Store
from .augment import Compose, HFlip, RandomCrop
from .collate import Batch, collate, pad_keypoints
from .datasets import PairDataset
from .loader import Loader
from .memory import BatchMemory

FIELDS = ("pixels", "mask", "keypoints")


def smaps_memory(store_file: Path | None = None) -> dict[str, float]:
    """This process's memory in MiB, from ``/proc/self/smaps``:

    - ``private``: what the process itself owns -- private anonymous pages (heap, Python objects,
      torch) and modified pages of private file mappings;
    - ``batch``: shared-memory pages it has written (a DataLoader worker's batch on its way to the
      main process);
    - ``store_mapped``: resident pages of ``store_file`` (or the files of a Zarr directory) it maps --
      the page cache, shared with every reader and never a copy;
    - ``uss``: every page mapped by this process only (what ``psutil``'s USS counts), whatever its kind.
    """
    kib = dict.fromkeys(("private", "batch", "store_mapped", "uss"), 0)
    store = str(store_file) if store_file else None
    kind = "anon"
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts[0].endswith(":"):  # a mapping's header: address perms offset dev inode [path]
                path = " ".join(parts[5:])
                kind = ("anon" if not path.startswith("/")
                        else "store" if store and (path == store or path.startswith(store + "/"))  # Zarr: its files
                        else "shm" if path.startswith(("/dev/shm/", "/memfd:")) else "file")
                continue
            key, n = parts[0][:-1], int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            if key == "Rss" and kind == "store":
                kib["store_mapped"] += n
            elif key in ("Private_Clean", "Private_Dirty"):
                kib["uss"] += n
                if kind == "shm":
                    kib["batch"] += n
                elif kind == "anon" or (kind == "file" and key == "Private_Dirty"):
                    kib["private"] += n
    return {k: v / 1024 for k, v in kib.items()}


class _Memmap(Dataset):
    """The ceiling: the same pixel and mask bytes copied out of plain ``np.memmap`` s of the store's files,
    at the byte offsets its backend reports (one file for HDF5, shard files for Zarr)."""

    def __init__(self, store: Store, split: str):
        t = store.pairs(split)
        self.src, self.trg = t.src.astype(np.int64), t.trg.astype(np.int64)
        self.extents = {f: store.extents.get(f"images/{f}") for f in ("pixels", "mask")}
        if any(e is None for e in self.extents.values()):
            raise SpairstoreError(f"{store.path}: pixels and mask are not plain byte ranges; no memmap ceiling")
        self._maps: dict[Path, np.memmap] = {}
        self.alloc = BatchMemory()  # the store's allocation: shared in workers, recycled here

    def __len__(self) -> int:
        return len(self.src)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}

    def __getitems__(self, idx: Sequence[int]) -> Batch:
        rows = np.concatenate([self.src[idx], self.trg[idx]])
        out: Batch = {}
        alloc = self.alloc.batch()
        for f, e in self.extents.items():
            t = alloc((len(rows), *e.shape[1:]), torch.uint8)
            size = t[0].numel()
            dst = t.view(len(rows), size).numpy()
            chunk = rows // e.chunk_rows
            starts = e.offsets[chunk] + (rows - chunk * e.chunk_rows) * size
            for k, (c, start) in enumerate(zip(chunk.tolist(), starts.tolist())):
                path = e.files[e.file_ids[c]]
                m = self._maps.get(path)
                if m is None:
                    m = self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
                dst[k] = m[start:start + size]
            out["src_" + f], out["trg_" + f] = t[:len(idx)], t[len(idx):]
        return out


class _RawFiles(Dataset):
    """An HPF/CATs-style loader over the native SPair-71k files, per pair: parse the pair JSON, decode
    both JPEGs and masks with PIL, letterbox them. Its batch goes into the same recycled memory as
    the store's, so the comparison is between decoding and copying, nothing else."""

    def __init__(self, source: Path, store: Store, split: str):
        self.root, self.split, self.size = Path(source), split, store.image_size
        self.num_keypoints = store.images.keypoints.shape[1]
        self.stems = list(store.pairs(split).stem)
        probe = self.root / "PairAnnotation" / split / f"{self.stems[0]}.json"
        if not probe.is_file():
            raise SpairstoreError(f"{probe}: not found; --source must be the SPair-71k root the store was packed from")
        self.alloc = BatchMemory()

    def __len__(self) -> int:
        return len(self.stems)

    def __getitems__(self, idx: Sequence[int]) -> Batch:
        b, size = len(idx), self.size
        alloc = self.alloc.batch()
        pixels, masks = alloc((2 * b, size, size, 3), torch.uint8), alloc((2 * b, size, size), torch.uint8)
        px, mk = pixels.numpy(), masks.numpy()  # numpy copies, as the store's (torch's would spin up OpenMP threads)
        ids, kps = [], {"src": [], "trg": []}
        for j, i in enumerate(idx):
            with open(self.root / "PairAnnotation" / self.split / f"{self.stems[i]}.json") as f:
                ann = json.load(f)
            ids.append(np.array([int(k) for k in ann["kps_ids"]], dtype=np.int64))
            for k, side in ((j, "src"), (b + j, "trg")):
                name = ann[f"{side}_imname"]
                with Image.open(self.root / "JPEGImages" / ann["category"] / name) as im:
                    rgb = im.convert("RGB")
                with Image.open(self.root / "Segmentation" / ann["category"] / f"{Path(name).stem}.png") as m:
                    mk[k] = letterbox(m, size, Image.Resampling.NEAREST)
                px[k] = letterbox(rgb, size, Image.Resampling.BILINEAR)
                box = letterbox_params(rgb.width, rgb.height, size)
                points = np.asarray(ann[f"{side}_kps"], dtype=np.float64).reshape(-1, 2)
                kps[side].append(points * box.scale + box.offset)
        return {"src_pixels": pixels[:b], "trg_pixels": pixels[b:], "src_mask": masks[:b], "trg_mask": masks[b:],
                **{k: torch.from_numpy(v) for k, v in pad_keypoints(ids, kps["src"], kps["trg"], self.num_keypoints).items()}}


class _Epoch(Dataset):
    """A Loader epoch of ``n`` samples, cycling through a spairstore dataset: a small store still gives
    every worker batches to read (the first ``n`` alone left one batch for two workers)."""

    def __init__(self, inner: PairDataset, n: int):
        self.inner, self.n = inner, n

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def fetch(self, idx: Sequence[int], alloc: Any = None) -> Batch:
        return self.inner.fetch([i % len(self.inner) for i in idx], alloc)

    def __getitems__(self, idx: Sequence[int]) -> Any:
        return self.inner.__getitems__([i % len(self.inner) for i in idx])


class _Probe(Dataset):
    """Wraps a dataset so that each batch also carries the worker's memory after reading it."""

    def __init__(self, inner: Dataset, store_file: Path):
        self.inner, self.store_file = inner, store_file

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitems__(self, idx: Sequence[int]) -> Batch:
        out = collate(self.inner.__getitems__(idx))  # type: ignore[attr-defined]
        out["_memory"] = [{"pid": os.getpid(), **smaps_memory(self.store_file)}]
        return out


@dataclass
class BenchResult:
    """Per mode (``single``, ``workers``) and method (``raw``, ``memmap``, ``store``): ``wall`` and ``cpu``
    seconds per batch (CPU time of this process and its DataLoader workers); worker memory in MiB."""

    store: str
    split: str
    image_size: int
    batch_size: int
    batches: int
    workers: int
    seconds: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    memory_gib_read: float = 0.0
    identical: bool | None = None
    #: Loader pairs/s: ``plain`` by worker count (0 and ``workers``), ``augment`` (HFlip + RandomCrop) for 1 and 2
    loader: dict[str, dict[int, float]] = field(default_factory=dict)
    #: where the Loader delivered its batches
    device: str = "cpu"

    def loader_ratios(self) -> dict[str, float]:
        """``workers_vs_one_process``: Loader pairs/s with workers over ``num_workers=0`` (plain reads);
        ``augment_2_vs_1``: with augmentation, 2 workers over 1."""
        out = {}
        plain, aug = self.loader.get("plain", {}), self.loader.get("augment", {})
        if 0 in plain and self.workers in plain:
            out["workers_vs_one_process"] = plain[self.workers] / plain[0]
        if 1 in aug and 2 in aug:
            out["augment_2_vs_1"] = aug[2] / aug[1]
        return out

    def ratios(self, mode: str, clock: str) -> dict[str, float]:
        """Speed of the store relative to the other methods (and of the ceiling to raw files)."""
        s = {k: v[clock] for k, v in self.seconds[mode].items()}
        out = {"store_vs_memmap": s["memmap"] / s["store"]}
        if "raw" in s:
            out.update(store_vs_raw=s["raw"] / s["store"], memmap_vs_raw=s["raw"] / s["memmap"])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratios": {m: {c: self.ratios(m, c) for c in ("wall", "cpu")} for m in self.seconds},
                "loader_ratios": self.loader_ratios()}

    def __str__(self) -> str:
        names = {"raw": "raw files (JSON + PIL decode + letterbox)", "memmap": "np.memmap copy (ceiling)",
                 "store": "spairstore PairDataset"}
        modes = list(self.seconds)
        head = {"single": "1 process", "workers": f"{self.workers} DataLoader workers"}
        lines = [(f"{self.store}: {self.split}, random batches of {self.batch_size} pairs (pixels + masks + keypoints "
                 f"of both images at {self.image_size}x{self.image_size}), {self.batches} batches, warm cache"), "",
                 "| method | " + " | ".join(f"{head[m]}: ms/batch | CPU ms/batch | pairs/s" for m in modes) + " |",
                 "|---|" + "---:|---:|---:|" * len(modes)]
        for k in ("raw", "memmap", "store"):
            if all(k in self.seconds[m] for m in modes):
                cells = [f"{self.seconds[m][k]['wall'] * 1e3:,.1f} | {self.seconds[m][k]['cpu'] * 1e3:,.1f} | "
                         f"{self.batch_size / self.seconds[m][k]['wall']:,.0f}" for m in modes]
                lines.append(f"| {names[k]} | " + " | ".join(cells) + " |")
        lines.append("")
        for m in modes:
            for clock in ("wall", "cpu"):
                r = self.ratios(m, clock)
                text = f"store = {r['store_vs_memmap']:.0%} of the memmap ceiling"
                if "store_vs_raw" in r:
                    text = (f"store {r['store_vs_raw']:.1f}x the raw-file loader, " + text
                            + f" (ceiling {r['memmap_vs_raw']:.1f}x raw)")
                lines.append(f"{head[m]}, {'wall-clock' if clock == 'wall' else 'CPU time'}: {text}")
        if self.identical is not None:
            lines.append(f"raw-file, memmap and store batches identical: {'yes' if self.identical else 'NO'}")
        if self.loader:
            to = "" if self.device == "cpu" else f", to {self.device}, normalised there"
            lines += ["", f"| Loader (pixels + masks + keypoints{to}) | " + " | ".join(
                f"{'num_workers' if kind == 'plain' else 'HFlip + RandomCrop, workers'}={w}: pairs/s"
                for kind, v in self.loader.items() for w in v) + " |",
                "|---|" + "---:|" * sum(map(len, self.loader.values())),
                "| | " + " | ".join(f"{x:,.0f}" for v in self.loader.values() for x in v.values()) + " |"]
            r = self.loader_ratios()
            if "workers_vs_one_process" in r:
                lines.append(f"Loader, {self.workers} workers vs one process (plain reads): {r['workers_vs_one_process']:.0%} "
                             "of the pairs/s (target >= 75 %)")
            if "augment_2_vs_1" in r:
                lines.append(f"Loader with HFlip + RandomCrop, 2 workers vs 1: {r['augment_2_vs_1']:.2f}x the pairs/s "
                             "(target >= 1.6x)")
        for ctx, mem in self.memory.items():
            lines.append(f"DataLoader worker memory ({ctx}, after reading {self.memory_gib_read:.1f} GiB each): private "
                         f"{mem['private']:.0f} MiB; batch in shared memory {mem['batch']:.0f} MiB; store pages mapped "
                         f"{mem['store_mapped']:.0f} MiB (page cache, shared); USS {mem['uss']:.0f} MiB")
        return "\n".join(lines)


def _same(a: Batch, b: Batch, keys: Sequence[str]) -> bool:
    return all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3, equal_nan=True) if a[k].is_floating_point()
               else torch.equal(a[k], b[k]) for k in keys)


def _cpu_seconds() -> float:
    """User + system time of this process and its live children (DataLoader workers)."""
    total = time.process_time()
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def _drain(loader: Loader, device: torch.device) -> None:
    """One epoch of ``loader``, each batch dropped on arrival; returns once the device has it all."""
    for _ in loader:
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run: Callable[[], None]) -> tuple[float, float]:
    """Wall-clock and CPU seconds of ``run()``."""
    w, c = time.perf_counter(), _cpu_seconds()
    run()
    return time.perf_counter() - w, _cpu_seconds() - c


def run(store: str | Path, source: str | Path | None = None, split: str = "trn", batch_size: int = 32,
        batches: int = 16, workers: int = 2, rounds: int = 5, memory_batches: int = 40, seed: int = 0,
        progress: bool = True, device: str | torch.device = "cpu") -> BenchResult:
    """Measure; see the module docstring. ``source`` (the SPair-71k root) adds the raw-file loader;
    ``device`` is where the Loader rows deliver their batches."""
    if min(batch_size, batches, rounds, memory_batches) < 1 or workers < 0:
        raise SpairstoreError("batch size, batches, rounds and memory batches must be >= 1, workers >= 0")
    s = Store(store)
    if s.pairs(split).rows < batch_size:
        raise SpairstoreError(f"{s.path}: split {split!r} has {s.pairs(split).rows} pairs, fewer than a batch of "
                              f"{batch_size}; pass a smaller --batch-size or another --split")
    if s.dataset != "spair71k" and source is not None:
        raise SpairstoreError(f"{s.path}: the raw-file loader reads SPair-71k sources; this store holds {s.dataset}")
    store_ds = PairDataset(s, split, fields=FIELDS)
    methods: dict[str, Dataset] = {"memmap": _Memmap(s, split), "store": store_ds}
    if source is not None:
        methods = {"raw": _RawFiles(Path(source), s, split), **methods}
    rng = np.random.default_rng(seed)
    batch_list = [rng.choice(len(store_ds), batch_size, replace=False).tolist() for _ in range(batches)]
    dev = resolve_device(device)
    result = BenchResult(str(s.path), split, s.image_size, batch_size, batches, workers, device=str(dev))
    modes = 2 if workers else 1
    bar = tqdm(total=len(methods) * (rounds + 1) * modes + 2 * (modes - 1) + 4 * (rounds + 1) * (modes - 1),
               desc="bench", unit="pass",
               disable=not progress, leave=False)

    first = {k: collate(m.__getitems__(batch_list[0])) for k, m in methods.items()}  # type: ignore[attr-defined]
    if "raw" in first:
        result.identical = (_same(first["raw"], first["store"], [k for k in first["raw"]])
                            and _same(first["memmap"], first["store"], list(first["memmap"])))
    del first

    def single(m: Dataset) -> Callable[[], None]:
        def run() -> None:
            for b in batch_list:  # each batch dropped before the next, as a training loop does
                m.__getitems__(b)  # type: ignore[attr-defined]
        return run

    def pooled(m: Dataset) -> Callable[[], None]:
        loader = DataLoader(m, batch_sampler=batch_list, num_workers=workers, collate_fn=collate,
                            persistent_workers=True, prefetch_factor=2)

        def run() -> None:
            for _ in loader:
                pass
        return run

    for mode, make in (("single", single), ("workers", pooled)):
        if mode == "workers" and workers == 0:
            continue
        passes: dict[str, list[tuple[float, float]]] = {k: [] for k in methods}
        runs = {k: make(m) for k, m in methods.items()}
        for k in methods:  # warm: page cache, memory maps, worker start-up
            runs[k]()
            bar.update()
        for _ in range(rounds):
            for k in methods:
                passes[k].append(_timed(runs[k]))
                bar.update()
        result.seconds[mode] = {k: {"wall": statistics.median(w for w, _ in v) / batches,
                                    "cpu": statistics.median(c for _, c in v) / batches} for k, v in passes.items()}
        del runs  # ends persistent workers

    if workers:
        n = batches * batch_size
        epoch = _Epoch(store_ds, n)
        augmented = _Epoch(PairDataset(s, split, fields=FIELDS, augment=Compose(HFlip(0.5), RandomCrop(0.5)),
                                       seed=seed), n)
        for kind, ds, counts in (("plain", epoch, (0, workers)), ("augment", augmented, (1, 2))):
            loaders = {w: Loader(ds, batch_size, seed=seed, num_workers=w, device=dev, normalize=dev.type == "cuda")
                       for w in counts}
            passes: dict[int, list[float]] = {w: [] for w in counts}
            for r in range(rounds + 1):  # the first round warms up (and starts the workers)
                for w, loader in loaders.items():
                    wall, _ = _timed(lambda loader=loader: _drain(loader, dev))
                    if r:
                        passes[w].append(wall)
                    bar.update()
            result.loader[kind] = {w: len(ds) / statistics.median(v) for w, v in passes.items()}
            del loaders  # ends their workers

    mem_batches = [rng.choice(len(store_ds), batch_size, replace=False).tolist() for _ in range(memory_batches)]
    per_worker = memory_batches / max(workers, 1) * 2 * batch_size
    result.memory_gib_read = per_worker * (s.image_size ** 2 * 4) / 2**30
    for ctx in ("fork", "spawn"):
        if workers == 0:
            break
        probe = DataLoader(_Probe(store_ds, s.path), batch_sampler=mem_batches, num_workers=workers, collate_fn=collate,
                           multiprocessing_context=ctx)
        last: dict[int, dict[str, float]] = {}
        for b in probe:
            for m in b["_memory"]:
                last[m["pid"]] = m
        result.memory[ctx] = {k: max(m[k] for m in last.values()) for k in ("private", "batch", "store_mapped", "uss")}
        bar.update()
    bar.close()
    return result
