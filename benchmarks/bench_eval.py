"""Evaluation benchmark: every breakdown of a full test split at three α, vs a per-pair loop.

    python benchmarks/bench_eval.py /tmp/full/spair512.h5          # full-scale synthetic store
    python benchmarks/bench_eval.py spair-real.h5 --split test      # e.g. the real SPair-71k test annotations

Times (best of --repeat, after one warm-up): ``spairstore.evaluate`` on identity predictions with the
``spair`` protocol (α 0.1/0.05/0.01: overall, per category, by factor, controlled, per image and per
point) plus rendering the text tables and JSON; and, on the same predictions in the same run, a per-pair
Python loop in the style of published evaluators computing only the overall per-image PCK. Then the
current papers' reports on the same predictions: the geo-aware subset with every breakdown, PCK†, the
per-keypoint table, the protocol-sensitivity table (budget 5 s) and a paired bootstrap comparison.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

import spairstore
from spairstore.eval.methods import Identity


def best_of(fn, repeat: int) -> tuple[float, object]:  # noqa: ANN001
    fn()
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def per_pair_loop(store: spairstore.Store, split: str, pred: np.ndarray, alphas: tuple[float, ...]) -> list[float]:
    """One pair at a time, one keypoint at a time: the overall per-image PCK only."""
    t = store.pairs(split)
    sums = [0.0] * len(alphas)
    for j in range(t.rows):
        n = int(t.n_kps[j])
        x1, y1, x2, y2 = store.images.bbox[t.trg[j]]
        base = max(x2 - x1, y2 - y1)
        for i, a in enumerate(alphas):
            ok = sum(math.hypot(pred[j, k, 0] - t.trg_kps[j, k, 0], pred[j, k, 1] - t.trg_kps[j, k, 1]) <= a * base
                     for k in range(n))
            sums[i] += ok / n
    return [100 * s / t.rows for s in sums]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", type=Path, nargs="?", default=Path("/tmp/full/spair512.h5"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    t0 = time.perf_counter()
    store = spairstore.open(args.store)
    t_open = time.perf_counter() - t0
    P = store.pairs(args.split).rows
    rows = np.arange(P)
    t_ident, pred = best_of(lambda: Identity()(store, args.split, rows), args.repeat)
    proto = spairstore.get_protocol("spair")

    def full() -> spairstore.Report:
        rep = spairstore.evaluate(store, args.split, pred, proto)
        rep.to_dict()
        return rep

    t_eval, rep = best_of(full, args.repeat)
    t_render, _ = best_of(lambda: (rep.to_text(), rep.to_json(), rep.to_csv()), args.repeat)
    t0 = time.perf_counter()
    loop = per_pair_loop(store, args.split, pred, proto.alphas)
    t_loop = time.perf_counter() - t0
    got = [rep.pck(a, "per_image") for a in proto.alphas]
    assert np.allclose(got, loop), (got, loop)

    print(f"store {args.store} ({store.dataset}), split {args.split}: {P:,} pairs, {int(rep.valid.sum()):,} keypoints")
    print(f"{proto}")
    print(f"  open store (tables into RAM)           {t_open * 1e3:8.1f} ms")
    print(f"  identity predictions                    {t_ident * 1e3:8.1f} ms")
    print(f"  evaluate: 3 alphas, every breakdown     {t_eval * 1e3:8.1f} ms   (budget 1000 ms)")
    print(f"  render text + JSON + CSV                {t_render * 1e3:8.1f} ms")
    print(f"  per-pair loop, overall PCK only         {t_loop * 1e3:8.1f} ms   ({t_loop / t_eval:,.0f}x evaluate)")
    print(f"  identity PCK@0.1 per image: {got[0]:.2f} % (loop: {loop[0]:.2f} %)")
    if store.dataset != "spair71k":
        return
    from spairstore.eval.compare import compare
    from spairstore.eval.sensitivity import sensitivity_table

    geo = proto.replace(keypoints="geo-aware")
    t_geo, _ = best_of(lambda: spairstore.evaluate(store, args.split, pred, geo).to_dict(), args.repeat)
    t_dag, _ = best_of(lambda: spairstore.evaluate(store, args.split, pred, proto, dagger=True).to_dict(), args.repeat)
    t_all, _ = best_of(lambda: spairstore.evaluate(store, args.split, pred, geo, dagger=True).per_keypoint(), args.repeat)
    t_sens, _ = best_of(lambda: sensitivity_table(store, args.split, pred).to_dict(), args.repeat)
    t_cmp, _ = best_of(lambda: compare(store, args.split, pred, pred + 1.0, resamples=1000), 1)
    print(f"  geo-aware subset, every breakdown       {t_geo * 1e3:8.1f} ms   (budget 1000 ms)")
    print(f"  PCK + PCK-dagger, every breakdown       {t_dag * 1e3:8.1f} ms   (budget 1000 ms)")
    print(f"  geo-aware + dagger + per keypoint       {t_all * 1e3:8.1f} ms   (budget 1000 ms)")
    print(f"  sensitivity table (5 protocols)         {t_sens * 1e3:8.1f} ms   (budget 5000 ms)")
    print(f"  compare, 1,000 bootstrap resamples      {t_cmp * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
