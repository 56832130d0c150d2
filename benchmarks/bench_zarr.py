"""Zarr vs HDF5 read benchmark: the reader's raw fast path over each backend vs the libraries.

    python benchmarks/bench_zarr.py --store /tmp/full/spair512.h5 --workdir /tmp/issue7/bench

Converts the HDF5 store to Zarr (64 MiB shards) and that back to HDF5, once, warms the page cache, then
reads the same random
image rows through every path, single-threaded, one sample per call and in batches of 32:

* ``Store`` over HDF5 and over Zarr: spairstore's fast path (memory maps at the resolved offsets);
* h5py slicing and zarr-python ``array[i]`` per sample: the libraries, as a per-sample loader uses them;
* the reader's fallback for compressed or remote arrays: zarr-python, one call per batch (runs of rows
  fetched concurrently).

All rows of one table are measured in this run, interleaved, so ratios compare like with like.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import zarr

import spairstore
from spairstore.store.backends import reader_for
from spairstore.store.backends import zarr as zarr_backend
from spairstore.store.convert import convert


def rates(fns: dict[str, Callable[[int], object]], items: np.ndarray, repeats: int, per: int = 1
          ) -> dict[str, float]:
    """Microseconds per sample of each ``fn(item)`` (``per`` samples per call): best of ``repeats``
    passes, the paths interleaved pass by pass so that a load change elsewhere hits them alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for x in items:
                fn(int(x))
            best[name] = min(best[name], time.perf_counter() - t)
    return {k: v / (len(items) * per) * 1e6 for k, v in best.items()}


def page_aligned(shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 buffer starting on a page, as pinned host memory does. Where a buffer starts matters: a
    copy whose source and destination addresses agree modulo 4096 runs ~2x slower here (4K aliasing),
    and a heap buffer's start is arbitrary, so an unaligned buffer makes the comparison a lottery."""
    n = int(np.prod(shape))
    raw = np.empty(n + 4096, np.uint8)
    start = -raw.ctypes.data % 4096
    return raw[start:start + n].reshape(shape)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path("/tmp/full/spair512.h5"), help="HDF5 store to compare")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/spairstore-bench"))
    ap.add_argument("--samples", type=int, default=1000, help="random rows per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    # Both stores written by this script the same way (copies of --store): how recently and how a file
    # was written changes memcpy speed from its page cache by up to ~1.7x here, whatever its format.
    zpath, hpath = args.workdir / f"{args.store.stem}.zarr", args.workdir / f"{args.store.stem}.h5"
    for src, dst in ((args.store, zpath), (zpath, hpath)):
        if not dst.exists():
            print(convert(src, dst))
    h, z = spairstore.open(hpath), spairstore.open(zpath)
    f = h5py.File(hpath, "r")
    with zarr_backend._quiet():
        g = zarr.open_group(str(zpath), mode="r")
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(h), args.samples)
    batches = rng.integers(0, len(h), (max(1, args.samples // 32), 32))
    for s in (h, z):  # warm the page cache with every record both stores hold
        for a in range(0, len(s), 64):
            s.read("pixels", np.arange(a, min(a + 64, len(s))))
            s.read("mask", np.arange(a, min(a + 64, len(s))))
    lib = reader_for(zpath)  # the reader's fallback for compressed or remote Zarr arrays
    results: dict[str, dict[str, float]] = {}
    for field in ("pixels", "mask"):
        name = f"images/{field}"
        za, hd = g[name], f[name]
        results[f"{field}, 1 per call"] = rates({
            "store_zarr": lambda r: z.read(field, [r]),
            "store_hdf5": lambda r: h.read(field, [r]),
            "h5py": lambda r: hd[r],
            "zarr_python": lambda r: za[r],
        }, rows, args.repeats)
        out = page_aligned((32, *h.shapes[name][0][1:]))  # a loader's reused (pinned) batch buffer
        results[f"{field}, batch of 32"] = rates({
            "store_zarr": lambda b: z.read(field, batches[b], out=out),
            "store_hdf5": lambda b: h.read(field, batches[b], out=out),
            "zarr_fallback": lambda b: lib.read(name, np.unique(batches[b])),
        }, np.arange(len(batches)), args.repeats, per=32)
    off, zb, hb = h.images.image_offsets, g["images/image_blob"], f["images/image_blob"]
    results["JPEG bytes, 1 per call"] = rates({
        "store_zarr": z.image_bytes,
        "store_hdf5": h.image_bytes,
        "h5py": lambda r: hb[off[r]:off[r + 1]].tobytes(),
        "zarr_python": lambda r: zb[off[r]:off[r + 1]].tobytes(),
    }, rows, args.repeats)

    print(f"\n{len(h):,} images at {h.image_size}^2; {args.samples} random rows, best of {args.repeats}; "
          f"microseconds per sample (ratio = that path's time / Zarr fast path's)")
    for k, row in results.items():
        base = row["store_zarr"]
        print(f"  {k:<32} " + "  ".join(f"{n} {v:8.1f} us ({v / base:5.2f}x)" for n, v in row.items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
