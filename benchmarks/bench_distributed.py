"""Feature extraction by one process vs several (``torchrun``) on the same store, side by side.

    python benchmarks/bench_distributed.py --workdir /tmp/bench-distributed [--processes 2]

Synthesises a SPair-format dataset (``--images-per-category``, default 10: 180 images) and packs it at
``--size`` (512) as HDF5 and as Zarr (``--shard-mb`` 8: 10 images per shard, so whole shards split
evenly), once. Then, for each store format, runs ``spairstore features`` (efficientnet-lite0, the
shipped weights) on a fresh copy of the store three ways, one after the other (``--repeats`` rounds,
the best run of each way kept):

* 1 process, torch's default thread count (all cores): what a plain ``spairstore features`` does;
* 1 process, 1 thread (``OMP_NUM_THREADS=1``): the per-process setting torchrun uses;
* ``torchrun --nproc-per-node N``: N processes of 1 thread each.

Each run reports its extraction time (the summary line) and the whole command's wall-clock time
(start-up, model load and commit included), the CPU time of all its processes, and the 1-minute load
average when it started (other jobs on a shared machine). Speed-up = 1-process time / N-process time.
The N-process maps are checked to equal the 1-process-1-thread maps bitwise, and the float16 values
where the default-thread maps differ from those are counted (oneDNN rounds by thread count).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import spairstore
from converters.synth import synthesize
from spairstore import pack
from spairstore.store.transaction import remove

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], threads: int | None) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    extraction = float(re.search(r"extracted in ([\d.]+) s", r.stdout).group(1))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"extraction_s": extraction, "wall_s": wall, "cpu_s": cpu, "load": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-distributed"))
    ap.add_argument("--images-per-category", type=int, default=10)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--shard-mb", type=float, default=8)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--input-size", type=int, help="default: the store's size")
    ap.add_argument("--formats", default="h5,zarr")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of the three ways, interleaved; best kept")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    src = work / "SPair-71k"
    if not src.is_dir():
        synthesize(src, images_per_category=args.images_per_category, seed=0)
    stores = {}
    for fmt in args.formats.split(","):
        stores[fmt] = work / f"store{args.size}.{fmt}"
        if not stores[fmt].exists():
            pack(src, stores[fmt], size=args.size, shard_bytes=int(args.shard_mb * 2**20))

    feature = [sys.executable, "-m", "spairstore", "features"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(args.processes), "-m", "spairstore", "features"]
    opts = ["--batch-size", str(args.batch_size), "--name", "bench"]
    if args.input_size:
        opts += ["--input-size", str(args.input_size)]
    ways = {"1 process, default threads": (feature, None),
            "1 process, 1 thread": (feature, 1),
            f"{args.processes} processes x 1 thread": (torchrun, 1)}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for fmt, store in stores.items():
        results[fmt] = {}
        maps = {}
        for _ in range(args.repeats):
            for way, (cmd, threads) in ways.items():
                copy = work / f"run.{fmt}"
                remove(copy)
                (shutil.copytree if store.is_dir() else shutil.copyfile)(store, copy)
                r = run([*cmd, str(copy), *opts], threads)
                print(fmt, way, r, flush=True)
                if way not in results[fmt] or r["extraction_s"] < results[fmt][way]["extraction_s"]:
                    results[fmt][way] = r
                with spairstore.open(copy) as s:
                    maps[way] = s.read("features/bench", np.arange(len(s))).view(np.uint16)
        default, one, many = list(ways)
        results[fmt]["bitwise_equal_1thread_vs_processes"] = bool(np.array_equal(maps[one], maps[many]))
        results[fmt]["values_differing_default_threads_vs_1thread"] = [int((maps[default] != maps[one]).sum()),
                                                                       maps[one].size]
    n = len(spairstore.open(next(iter(stores.values()))))
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"\n{n} images at {args.size} px, efficientnet-lite0, batch {args.batch_size}, "
          f"{os.cpu_count()} cores (load average at start in brackets)")
    print("| store | way [load] | extraction s | img/s | whole command s | CPU s | speed-up vs 1 process "
          "(default threads / 1 thread) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for fmt, rs in results.items():
        default, single = (rs[w]["extraction_s"] for w in list(ways)[:2])
        for way in ways:
            r = rs[way]
            print(f"| {fmt} | {way} [{r['load']:.1f}] | {r['extraction_s']:.1f} | {n / r['extraction_s']:.1f} | "
                  f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {default / r['extraction_s']:.2f}x / "
                  f"{single / r['extraction_s']:.2f}x |")
        k, size = rs["values_differing_default_threads_vs_1thread"]
        print(f"\n{fmt}: {list(ways)[2]} maps bitwise equal to 1 process, 1 thread: "
              f"{rs['bitwise_equal_1thread_vs_processes']}; 1 process default threads vs 1 thread: {k:,} of "
              f"{size:,} float16 values differ")


if __name__ == "__main__":
    main()
