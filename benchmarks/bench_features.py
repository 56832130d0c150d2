"""Feature benchmark: extraction speed, and random feature fetch from the store vs per-image ``.pt`` files.

    python benchmarks/bench_features.py --store /tmp/full/spair512.h5 --workdir /tmp/bench-features
    python benchmarks/bench_features.py --store /tmp/full/spair512.h5 --backbone resnet50 --weights random \\
        --extract-images 64          # time 64 images, then fill random maps of the real shape

The store is copied into ``--workdir`` (the original is never written). The feature set is extracted into
the copy with ``spairstore features``' own code; with ``--extract-images N`` below the store's image
count, only N images are timed and the set is filled with random float16 maps of the same shape (the read
benchmark depends on the shape only). Reads are then timed side by side in this run, interleaved, with a
warm page cache (every source is read once first), on the same random image rows:

* store:    ``Store.read("features/<name>", rows)``, batches of ``--batch`` rows (the reader's hot path);
* .pt:      one ``torch.save`` file per image, loaded with ``torch.load`` and stacked (the practice of
            published correspondence pipelines);
* memmap:   ``np.memmap`` of the same bytes in the set's file, rows copied into a preallocated batch
            (the ceiling).
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import spairstore
from spairstore.features import FeatureExtractor, Staging, extract_features, extract_rows
from spairstore.features.extract import set_writer


def fill_random(store_path: Path, name: str, fe: FeatureExtractor) -> None:
    """Commit feature set ``name`` with random float16 maps of ``fe``'s shape, through the real staging."""
    s = spairstore.open(store_path)
    shape = (fe.channels, fe.size, fe.size)
    meta = {"name": name, "store": s.fingerprint, "rows": len(s), "row_shape": list(shape),
            "attrs": {**fe.attrs(), "note": "random maps of the real shape (benchmark)"}}
    st = Staging.open(store_path.resolve(), meta, restart=True)
    target = set_writer(store_path.resolve(), st.meta, batch_size=64)
    target.prepare(st.tx, replace=name in s.feature_sets)
    sink = target.sink(st.tx, 0, st.sync_seconds)
    rng = np.random.default_rng(0)
    for start in range(0, len(s), 64):
        rows = np.arange(start, min(start + 64, len(s)))
        sink(rows, rng.standard_normal((len(rows), *shape), dtype=np.float32).astype(np.float16))
    sink.close()
    target.commit(st.tx)
    st.finish()


def timed(fns: list, repeat: int = 7) -> list[float]:
    """Best of ``repeat`` runs of each function, seconds; runs interleaved so that load from other
    processes on a shared machine falls on every method alike."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for k, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=Path("/tmp/full/spair512.h5"))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-features"))
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--layers", default=None, help="comma-separated, as for `spairstore features`")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--input-size", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16, help="extraction batch")
    ap.add_argument("--extract-images", type=int, default=None, help="time only this many (default: all)")
    ap.add_argument("--reads", type=int, default=2048, help="random image rows fetched per method")
    ap.add_argument("--batch", type=int, default=32, help="rows per fetch")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    layers = args.layers.split(",") if args.layers else None
    name = f"{args.backbone}" + (f"-{args.layers.replace(',', '_')}" if args.layers else "")
    store_path = args.workdir / args.store.name
    if not store_path.exists():
        shutil.copyfile(args.store, store_path)
    s = spairstore.open(store_path)
    n = len(s)
    if name not in s.feature_sets:
        k = min(args.extract_images or n, n)
        if k == n:
            summary = extract_features(store_path, backbone=args.backbone, layers=layers, input_size=args.input_size,
                                       batch_size=args.batch_size, weights=args.weights, name=name, progress=True)
            print(summary)
        else:
            fe = FeatureExtractor(args.backbone, layers, input_size=args.input_size, image_size=s.image_size,
                                  weights=args.weights)
            fe(s.read("pixels", [0]))  # warm-up
            t = time.perf_counter()
            extract_rows(s, fe, np.arange(k), lambda rows, maps: None, batch_size=args.batch_size, progress=True)
            sec = time.perf_counter() - t
            print(f"extracted {k} of {n} images in {sec:.1f} s: {k / sec:.1f} img/s on cpu "
                  f"({args.backbone}, {torch.get_num_threads()} threads); filling the set with random maps")
            fill_random(store_path, name, fe)
        s = spairstore.open(store_path)
    attrs = s.feature_sets[name]
    shape = (attrs["channels"], attrs["height"], attrs["width"])
    rec = int(np.prod(shape)) * 2
    print(f"feature set {name}: {attrs['backbone']} {','.join(attrs['layers'])} at {attrs['input_size']} px, "
          f"float16 {shape} = {rec / 2**10:,.0f} KiB per image, {n * rec / 2**20:,.0f} MiB for {n:,} images; "
          f"store file {store_path.stat().st_size / 2**20:,.0f} MiB")

    pt_dir = args.workdir / f"pt-{name}"
    if not (pt_dir / f"{n - 1}.pt").exists():
        pt_dir.mkdir(exist_ok=True)
        for i in range(n):
            torch.save(torch.from_numpy(s.features(name, i)), pt_dir / f"{i}.pt")
    ext = s.extents[f"features/{name}/data"]
    if ext is None or len(ext.files) != 1:
        raise SystemExit(f"{store_path}: the memmap ceiling needs a contiguous feature array (an HDF5 store's "
                         "feature-set file)")
    mm = np.asarray(np.memmap(ext.files[0], dtype=ext.dtype, mode="r", offset=int(ext.offsets[0]),
                              shape=ext.shape))
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, n, args.batch) for _ in range(max(1, args.reads // args.batch))]
    out = np.empty((args.batch, *shape), dtype=np.float16)

    def store_read() -> None:
        for b in batches:
            s.read(f"features/{name}", b, out=out)

    def pt_read() -> None:
        for b in batches:
            torch.stack([torch.load(pt_dir / f"{i}.pt", weights_only=True) for i in b])

    def memmap_read() -> None:
        for b in batches:
            for k, i in enumerate(b):
                out[k] = mm[i]

    for fn in (store_read, pt_read, memmap_read):  # warm the page cache for every source
        fn()
    t_store, t_pt, t_mm = timed([store_read, pt_read, memmap_read])
    reads = len(batches) * args.batch
    print(f"random fetch of {reads:,} feature maps in batches of {args.batch} (warm cache, best of 7, interleaved):")
    for label, t in (("store (Store.read)", t_store), ("torch.load per-image .pt", t_pt), ("np.memmap copy", t_mm)):
        print(f"  {label:<26} {t / reads * 1e6:8.1f} us/map  {reads * rec / t / 2**30:6.2f} GiB/s")
    print(f"  store vs .pt:     {t_pt / t_store:5.1f}x faster (target >= 20x)")
    print(f"  store vs memmap:  {t_mm / t_store * 100:5.0f} % of the ceiling (target >= 70 %)")


if __name__ == "__main__":
    main()
