"""Read benchmark at full scale: the table in the README's "Training input" section.

    spairstore synth /tmp/full/SPair-71k --images-per-category 100       # full scale: 1,800 images, ~71k pairs
    spairstore pack /tmp/full/SPair-71k /tmp/full/spair512.h5 --size 512
    python benchmarks/bench_loader.py --store /tmp/full/spair512.h5 --source /tmp/full/SPair-71k

Runs ``spairstore bench`` (see ``spairstore/bench.py``: raw SPair files vs a plain ``np.memmap`` copy vs
``PairDataset``, single process and DataLoader workers, worker memory under fork and spawn) and checks
the issue's targets on what it measured: store >= 40x the raw-file loader and >= 70 % of the memmap
ceiling, a worker's private memory < 200 MiB. ``--json`` also writes every number to a file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from spairstore.torch.bench import run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True, help="a store packed at --size 512")
    ap.add_argument("--source", type=Path, required=True, help="the SPair-71k root it was packed from")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the result here as JSON")
    args = ap.parse_args()
    result = run(args.store, args.source, batches=args.batches, rounds=args.rounds, workers=args.workers)
    print(result)
    print()
    for mode in result.seconds:
        r = result.ratios(mode, "cpu")
        print(f"target {mode}: store >= 40x raw: {'met' if r['store_vs_raw'] >= 40 else 'NOT met'} "
              f"({r['store_vs_raw']:.1f}x CPU time); >= 70 % of memmap: "
              f"{'met' if r['store_vs_memmap'] >= 0.7 else 'NOT met'} ({r['store_vs_memmap']:.0%})")
    for ctx, mem in result.memory.items():
        print(f"target worker private memory < 200 MiB ({ctx}): {'met' if mem['private'] < 200 else 'NOT met'} "
              f"({mem['private']:.0f} MiB)")
    if args.json:
        args.json.write_text(json.dumps(result.to_dict(), indent=2))


if __name__ == "__main__":
    main()
