"""Pack benchmark: pack time vs simply reading + decoding every source file once, and pack's peak memory.

    python benchmarks/bench_pack.py                      # synthesises the full-scale dataset first
    python benchmarks/bench_pack.py --src /tmp/full/SPair-71k --size 512

Both are measured in this run, on the same files, with a warm page cache (each source is read once
before timing), alternating ``--repeats`` times; the best of each is compared, since other jobs on a
shared machine only ever add time. Pack runs in child processes so its peak resident memory
(ru_maxrss) is its own.
"""
from __future__ import annotations

import argparse
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image


def read_and_decode_all(root: Path) -> tuple[float, int]:
    """The floor: parse every JSON, read every Layout, decode every JPEG and PNG once."""
    t0 = time.perf_counter()
    n = 0
    for p in root.rglob("*"):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.suffix == ".json":
            json.loads(data)
        elif p.suffix in (".jpg", ".png"):
            with Image.open(io.BytesIO(data)) as im:
                im.load()
        n += 1
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, help="SPair-format root (default: synthesise 100 images/category)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="spairstore-bench-"))
    src = args.src
    if src is None:
        from converters.synth import synthesize

        src = work / "SPair-71k"
        if not src.exists():
            t = time.perf_counter()
            synthesize(src, images_per_category=100, progress=True)
            print(f"synthesised full scale in {time.perf_counter() - t:.1f} s")
    read_and_decode_all(src)  # warm the page cache for both measurements
    out = work / f"bench-{args.size}.h5"
    floors, packs = [], []
    for _ in range(args.repeats):
        floor, files = read_and_decode_all(src)
        floors.append(floor)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "spairstore", "pack", str(src), str(out), "--size", str(args.size),
                        "--overwrite"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        packs.append(time.perf_counter() - t)
    floor, pack_s = min(floors), min(packs)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    size_mib = out.stat().st_size / 2**20
    from spairstore import open as open_store

    s = open_store(out)
    print(f"source files: {files:,}   images: {len(s):,}   pairs: "
          + ", ".join(f"{k} {s.pairs(k).rows:,}" for k in s.splits))
    print(f"best of {args.repeats} (all runs: read+decode " + ", ".join(f"{x:.1f}" for x in floors)
          + "; pack " + ", ".join(f"{x:.1f}" for x in packs) + " s)")
    print(f"read + decode every source file once: {floor:7.1f} s")
    print(f"spairstore pack --size {args.size}:          {pack_s:7.1f} s   ratio {pack_s / floor:.2f}x (target <= 3x)")
    print(f"pack peak resident memory:            {peak_mib:7.0f} MiB (target <= 1024)")
    print(f"store size: {size_mib:,.0f} MiB  ("
          + ", ".join(f"{k.split('/')[-1]} {v / 2**20:,.0f}" for k, v in sorted(s.field_bytes().items(), key=lambda kv: -kv[1])[:4])
          + " MiB)")


if __name__ == "__main__":
    main()
