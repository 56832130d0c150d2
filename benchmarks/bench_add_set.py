"""What adding a feature set to an HDF5 store costs: bytes written and extra disk, against the set's size.

    python benchmarks/bench_add_set.py                       # 648 images: a 681 MiB store, a 137 MiB set
    python benchmarks/bench_add_set.py --images-per-category 12 --channels 64   # quick

Synthesises a dataset (``spairstore synth``), packs it at 512 px (``spairstore pack``), then adds a set
of random float16 maps (``--channels`` x 24 x 24 per image: the 135 MiB set of the issue at the
defaults) with :func:`spairstore.add_feature_set`, and replaces it once (``overwrite=True``). For each
it prints the set's size, the bytes this process wrote to storage (``write_bytes`` of
``/proc/self/io``, every write fsynced before it is read) and the extra peak disk (allocated blocks of
the store's folder, sampled every 5 ms, above what it held before), each also as a ratio to the set.
The store file's SHA-256 is compared before and after: adding a set never rewrites it.
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import spairstore


def io_written() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise SystemExit("/proc/self/io has no write_bytes (Linux only)")


def disk_blocks(folder: Path) -> int:
    """Bytes allocated on disk by every file under ``folder``."""
    total = 0
    for p in folder.rglob("*"):
        try:
            total += p.lstat().st_blocks * 512
        except FileNotFoundError:  # renamed or removed while walking
            pass
    return total


class PeakDisk:
    """Samples :func:`disk_blocks` of a folder on a thread; ``peak`` is the most seen."""

    def __init__(self, folder: Path):
        self.folder, self.peak, self._stop = folder, disk_blocks(folder), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, disk_blocks(self.folder))

    def __enter__(self) -> PeakDisk:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, disk_blocks(self.folder))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def measure(store: Path, name: str, maps: np.ndarray, overwrite: bool) -> tuple[int, int, int]:
    """(set bytes, bytes written, extra peak disk) of adding ``maps`` as set ``name``."""
    before_disk = disk_blocks(store.parent)
    written = io_written()
    with PeakDisk(store.parent) as peak:
        spairstore.add_feature_set(store, name, maps.__getitem__, stride=16, cell_offset=0.5, input_size=384,
                                   source="random (benchmark)", overwrite=overwrite)
    return maps.nbytes, io_written() - written, peak.peak - before_disk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--images-per-category", type=int, default=36, help="36: 648 images, a 681 MiB store")
    ap.add_argument("--channels", type=int, default=192)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-add-set-"))
    root, store = work / "SPair-71k", work / "store" / "s.h5"
    store.parent.mkdir(parents=True, exist_ok=True)
    if not store.exists():
        cli = [sys.executable, "-m", "spairstore"]
        if not root.exists():
            subprocess.run([*cli, "synth", str(root), "--images-per-category", str(args.images_per_category)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.run([*cli, "pack", str(root), str(store), "--size", "512"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    n = len(spairstore.open(store))
    digest = sha256(store)
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    print(f"store {store}: {n:,} images, {mib(store.stat().st_size)}")
    for what, seed, overwrite in (("add", 0, False), ("replace", 1, True)):
        maps = np.random.default_rng(seed).standard_normal((n, args.channels, 24, 24), dtype=np.float32)
        t0 = time.perf_counter()
        size, written, extra = measure(store, "bench", maps.astype(np.float16), overwrite)
        sec = time.perf_counter() - t0
        print(f"{what:<8} set {mib(size)}: wrote {mib(written)} ({written / size:.2f}x the set), "
              f"extra peak disk {mib(extra)} ({extra / size:.2f}x), {sec:.1f} s")
    assert sha256(store) == digest, "the store file changed"
    print("store file unchanged (SHA-256 equal before and after)")


if __name__ == "__main__":
    main()
