"""DINOv2 through spairstore vs the transformers model run by hand on the same images.

    python benchmarks/bench_dino.py --store /tmp/d.h5 [--backbone dinov2-vits14] [--input-size 224] [--images 32]

Both sides get the same store pixels, batch by batch; spairstore's side is ``FeatureExtractor`` (resize,
normalise, forward with a hook on the tapped layer, prefix tokens dropped, reshape to a map), the other
the same preprocessing written out plus ``model(pixel_values=x).last_hidden_state``. Prints images per
second of each, best of ``--repeats`` alternating runs, and their ratio (random weights: the speed does
not depend on them).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import spairstore
from spairstore.features import RANDOM_WEIGHTS, FeatureExtractor
from spairstore.features.backbones import get_backbone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--backbone", default="dinov2-vits14")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    store = spairstore.open(args.store)
    rows = np.arange(min(args.images, len(store)))
    batches = [store.read("pixels", rows[i:i + args.batch_size]) for i in range(0, len(rows), args.batch_size)]
    fe = FeatureExtractor(args.backbone, input_size=args.input_size, weights=RANDOM_WEIGHTS)
    model = get_backbone(args.backbone).build(args.input_size).eval()  # fe.model carries the taps' hooks
    mean = torch.tensor(fe.mean).view(1, 3, 1, 1)
    std = torch.tensor(fe.std).view(1, 3, 1, 1)

    def plain() -> None:
        with torch.inference_mode():
            for b in batches:
                x = torch.from_numpy(b).permute(0, 3, 1, 2).float() / 255
                x = F.interpolate(x, size=(args.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
                model(pixel_values=(x - mean) / std)

    def ours() -> None:
        for b in batches:
            fe(b)

    best = {"spairstore": float("inf"), "transformers": float("inf")}
    for _ in range(args.repeats):
        for name, fn in (("spairstore", ours), ("transformers", plain)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    n = len(rows)
    print(f"{args.backbone} @ {args.input_size} on {n} images ({torch.get_num_threads()} threads):")
    for name, s in best.items():
        print(f"  {name:13s} {n / s:6.2f} img/s ({s:.2f} s)")
    print(f"  spairstore / transformers time: {best['spairstore'] / best['transformers']:.3f}")


if __name__ == "__main__":
    main()
