"""Train a small head on a store's feature maps, select it on ``val``, and compare it with NN on ``test``.

    python examples/train_head.py STORE --features NAME --out DIR [--epochs 4] [--device cpu]

The head maps the stored maps (B, C, h, w) to maps of the same shape on the same cell grid:
``x + body(x)``, where ``body`` is 1x1 conv -> GELU -> 1x1 conv with its last layer zero-initialised, so
before training the head is the identity and NN on its maps is NN on the stored maps. Training reads
``trn`` pairs through :class:`spairstore.Loader` (feature maps and keypoints, store pixels), turns
keypoints into cells with :func:`spairstore.core.geometry.store_to_cell`, and for each source keypoint
takes a cross-entropy over all target cells of the cosine similarity / temperature, the true target cell
being the class (SPair-71k lists every pair in both directions). The head works cell by cell, so on the
source side it runs on the keypoints' cells only: half the cost of a step. At test time the head is
evaluated as ``NearestNeighbour(features, transform=head)``, the method ``spairstore eval --head`` runs.

Writes into DIR:
    head.pt               the head of the best val epoch (spairstore.eval.models.save_head; torch.export)
    test_predictions.npz  its test predictions keyed by pair id (spairstore eval STORE --predictions ...)
    report.md             head beside NN on the same features: overall, per category, per factor
    metrics.json          the numbers of report.md, per-epoch val PCK, data-wait share, wall time
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import spairstore
from spairstore.core import geometry
from spairstore.core.tables import markdown_table
from spairstore.eval.methods import NearestNeighbour
from spairstore.eval.models import save_head


class ResidualHead(torch.nn.Module):
    """``x + body(x)`` on a (B, C, h, w) map, one cell at a time: same channels, same cell grid."""

    def __init__(self, channels: int, hidden: int = 256):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(channels, hidden, 1), torch.nn.GELU(),
                                        torch.nn.Conv2d(hidden, channels, 1))
        torch.nn.init.zeros_(self.body[-1].weight)  # starts as the identity: epoch 0 is plain NN
        torch.nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def flat_cells(points: torch.Tensor, valid: torch.Tensor, geom: dict, image_size: int) -> torch.Tensor:
    """Store pixels (B, K, 2) x, y -> row-major index ``row * width + col`` of the nearest cell (B, K), on the
    points' device. Padding slots (NaN, ``valid`` False) get cell 0; the loss masks them out."""
    cells = geometry.store_to_cell(torch.where(valid[..., None], points, 0.0), geom, image_size)
    return cells[..., 1] * int(geom["width"]) + cells[..., 0]


def at_cells(maps: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """The (B, C, K) features of maps (B, C, h, w) at flat cell indices (B, K)."""
    return torch.gather(maps.flatten(2), 2, cells[:, None, :].expand(-1, maps.shape[1], -1))


def matching_loss(query: torch.Tensor, ref: torch.Tensor, r_cell: torch.Tensor, valid: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """Cross-entropy of each valid query keypoint (B, C, K) over all cells of the reference maps
    (B, C, h, w), logits cosine / temperature, class the true reference cell (B, K)."""
    q = F.normalize(query, dim=1)
    r = F.normalize(ref.flatten(2), dim=1)  # (B, C, h*w)
    logits = torch.bmm(q.transpose(1, 2), r) / temperature  # (B, K, h*w)
    return F.cross_entropy(logits[valid], r_cell[valid])


def schedule(opt: torch.optim.Optimizer, lr: float, total: int) -> torch.optim.lr_scheduler.LRScheduler:
    """One cycle up to ``lr`` and down over ``total`` steps, warming up for 10 % of them but at least 1.5
    (OneCycleLR divides by the warm-up's length); a smoke test of under 4 steps keeps ``lr`` constant."""
    if total < 4:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=max(0.1, 1.5 / total))


def val_pck(store: spairstore.Store, features: str, head: torch.nn.Module, device: str) -> float:
    """PCK@0.1 (the store's protocol, first aggregation) of NN on the head's maps over ``val``."""
    return spairstore.evaluate(store, "val", NearestNeighbour(features, device=device, transform=head)).pck(0.1)


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    store = spairstore.open(args.store)
    missing = [split for split in ("trn", "val", "test") if split not in store.splits]
    if missing:  # e.g. PF-WILLOW, test only: a head trained elsewhere is evaluated there with eval --head
        raise SystemExit(f"{args.store}: no {' or '.join(missing)} split (the store has {', '.join(store.splits)}); "
                         "this script trains on trn, selects on val and reports on test: train on a store that "
                         f"has them and evaluate the head on this one with `spairstore eval {args.store} --head "
                         "DIR/head.pt` (after `spairstore features` of the same backbone here)")
    try:
        geom = store.feature_set(args.features)
    except spairstore.StoreError as e:
        raise SystemExit(f"{e}; run spairstore features first") from None
    if geom.get("flipped"):  # its cells lie mirrored: the keypoints would land on the wrong parts
        raise SystemExit(f"{args.store}: feature set {args.features!r} holds the maps of the mirrored images; "
                         f"train on {geom.get('flip_of')!r}")
    field = f"features/{args.features}"
    data = spairstore.PairDataset(store, "trn", fields=("keypoints", field))
    loader = spairstore.Loader(data, args.batch_size, shuffle=True, seed=args.seed, drop_last=True,
                               device=args.device, rank=0, world_size=1)
    device = loader.device
    head = ResidualHead(int(geom["channels"]), args.hidden).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = min(len(loader), args.max_steps or len(loader))
    if not steps:
        raise SystemExit(f"{args.store}: trn has {len(data)} pairs, fewer than --batch-size {args.batch_size}")
    sched = schedule(opt, args.lr, args.epochs * steps)

    best = {"epoch": 0, "val": val_pck(store, args.features, head, str(device)), "state": copy.deepcopy(head.state_dict())}
    history = [{"epoch": 0, "val_pck@0.1": best["val"]}]
    print(f"epoch 0 (identity head = NN): val PCK@0.1 {best['val']:.1f}")
    wait = busy = 0.0
    t_start, cpu_start = time.perf_counter(), time.process_time()
    for epoch in range(1, args.epochs + 1):
        loader.set_epoch(epoch)
        head.train()
        losses = []
        it = iter(loader)
        for _ in range(steps):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            cs = flat_cells(batch["src_kps"], batch["kps_valid"], geom, store.image_size)
            ct = flat_cells(batch["trg_kps"], batch["kps_valid"], geom, store.image_size)
            query = head(at_cells(batch[f"src_{field}"].float(), cs)[..., None])[..., 0]  # a (B, C, K, 1) "map"
            loss = matching_loss(query, head(batch[f"trg_{field}"].float()), ct, batch["kps_valid"], args.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())  # .item() waits for the device, so busy time is the step's own
            wait += t1 - t0
            busy += time.perf_counter() - t1
        it.close()
        score = val_pck(store, args.features, head, str(device))
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_pck@0.1": score})
        print(f"epoch {epoch}: loss {np.mean(losses):.3f}, val PCK@0.1 {score:.1f}")
        if score > best["val"]:
            best = {"epoch": epoch, "val": score, "state": copy.deepcopy(head.state_dict())}
    train_s, train_cpu_s = time.perf_counter() - t_start, time.process_time() - cpu_start
    head.load_state_dict(best["state"])
    share = wait / max(wait + busy, 1e-12)
    print(f"best epoch {best['epoch']} (val PCK@0.1 {best['val']:.1f}); data wait {100 * share:.2f} % of step time "
          f"({wait:.2f} s waiting on the loader of {wait + busy:.1f} s in {args.epochs * steps} steps)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("store", "out")}
    save_head(head, out / "head.pt", features=args.features, geometry=geom,
              extra={"best_epoch": best["epoch"], "val_pck@0.1": best["val"], "settings": settings})
    # keyed by pair id, and marked with the split's pair list: eval refuses it on other pairs
    spairstore.save_predictions(out / "test_predictions.npz", store, "test",
                                NearestNeighbour(args.features, device=str(device), transform=head))
    ours = spairstore.evaluate(store, "test", out / "test_predictions.npz")
    nn = spairstore.evaluate(store, "test", NearestNeighbour(args.features, device=str(device)))
    metrics = {"store": str(args.store), "features": args.features, "device": str(device),
               "best_epoch": best["epoch"], "history": history, "data_wait_share": share,
               "step_time_s": wait + busy, "train_wall_s": train_s, "train_cpu_s": train_cpu_s,
               "load_average": os.getloadavg()[1], "steps": args.epochs * steps,
               **comparison(nn, ours)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "report.md").write_text(report(nn, ours, metrics))
    return metrics


def comparison(nn: spairstore.Report, ours: spairstore.Report) -> dict:
    """NN and head numbers side by side: overall (every α and aggregation), PCK@0.1 per category, per
    variation factor level (SPair-71k) and per group of each kind the store declares (AP-10K: family, subset)."""
    a, b = nn.to_dict(), ours.to_dict()
    agg = nn.protocol.aggregation[0]
    per_cat = {c: (a["by_category"][c]["0.1"][agg], b["by_category"][c]["0.1"][agg])
               for c in nn.categories if a["counts"]["by_category"][c]}
    per_factor = {f"{k}={lv}": (a["by_factor"][k][lv]["0.1"][agg], b["by_factor"][k][lv]["0.1"][agg])
                  for k in a["by_factor"] for lv in a["by_factor"][k] if a["counts"]["by_factor"][k][lv]}
    per_group = {kind: {g: (a["by_group"][kind][g]["0.1"][agg], b["by_group"][kind][g]["0.1"][agg])
                        for g in a["by_group"][kind] if a["counts"]["by_group"][kind][g]}
                 for kind in a["by_group"]}
    return {"aggregation": agg, "overall": {"nn": a["pck"], "head": b["pck"]}, "by_category": per_cat,
            "by_factor": per_factor, "by_group": per_group,
            "categories_better": sum(h > n for n, h in per_cat.values()), "categories": len(per_cat)}


def _gain(pairs: dict) -> list:
    """Table rows ``(label, [nn, head, head - nn])`` from ``{label: (nn, head)}``."""
    return [(k, [n, h, None if n is None or h is None else h - n]) for k, (n, h) in pairs.items()]


def report(nn: spairstore.Report, ours: spairstore.Report, m: dict) -> str:
    cols = [("", "NN"), ("", "head"), ("", "gain")]
    overall = [(f"PCK@{alpha} {agg.replace('_', ' ')}", [m["overall"]["nn"][alpha][agg], m["overall"]["head"][alpha][agg],
                                                         m["overall"]["head"][alpha][agg] - m["overall"]["nn"][alpha][agg]])
               for agg in nn.protocol.aggregation for alpha in m["overall"]["nn"]]
    agg = m["aggregation"].replace("_", " ")
    return "\n\n".join([
        f"# Head vs NN on `{m['features']}` ({Path(m['store']).name}, test)",
        (f"`{nn.protocol}`  \nbest epoch {m['best_epoch']} on val; {m['steps']} steps on {m['device']} in "
         f"{m['train_wall_s']:.1f} s ({m['train_cpu_s']:.1f} s CPU, load average {m['load_average']:.1f}); data wait {100 * m['data_wait_share']:.2f} % of step time; "
         f"head better in {m['categories_better']} of {m['categories']} categories"),
        markdown_table("PCK (%) overall", cols, overall),
        markdown_table(f"PCK@0.1 {agg} (%) per category", cols, _gain(m["by_category"])),
        *([markdown_table(f"PCK@0.1 {agg} (%) per variation factor", cols, _gain(m["by_factor"]))]
          if m["by_factor"] else []),
        *[markdown_table(f"PCK@0.1 {agg} (%) per {kind}", cols, _gain(groups)) for kind, groups in m["by_group"].items()],
        "## The head's full report\n\n" + ours.to_markdown(),
    ]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("store", help="Store with the feature set (spairstore features STORE --backbone ...).")
    p.add_argument("--features", required=True, help="Feature set to train on (store.feature_sets).")
    p.add_argument("--out", required=True, help="Folder for head.pt, test_predictions.npz, report.md, metrics.json.")
    d = " (default %(default)s)."
    p.add_argument("--epochs", type=int, default=3, help="Passes over trn; the epoch best on val is kept" + d)
    p.add_argument("--batch-size", type=int, default=16, help="Pairs per step" + d)
    p.add_argument("--max-steps", type=int, default=0, help="Steps per epoch at most; 0: the whole trn split" + d)
    p.add_argument("--lr", type=float, default=2e-3, help="Peak learning rate of AdamW's one-cycle schedule" + d)
    p.add_argument("--hidden", type=int, default=256, help="Hidden channels of the head" + d)
    p.add_argument("--temperature", type=float, default=0.05, help="Of the cosine similarities in the loss" + d)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]" + d)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0: torch's default, 1 is faster on a machine busy with other work" + d)
    p.add_argument("--seed", type=int, default=0, help="Of the head's initial weights and the pair order" + d)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        m = train(args)
    except spairstore.SpairstoreError as e:  # bad input: one line, as the CLI says it
        raise SystemExit(f"error: {e}") from None
    o = m["overall"]
    print(f"test PCK@0.1 {m['aggregation']}: NN {o['nn']['0.1'][m['aggregation']]:.1f} -> head "
          f"{o['head']['0.1'][m['aggregation']]:.1f}; better in {m['categories_better']} of {m['categories']} "
          f"categories; data wait {100 * m['data_wait_share']:.2f} %; training {m['train_wall_s']:.1f} s "
          f"({m['train_cpu_s']:.1f} s CPU)")


if __name__ == "__main__":
    main()
