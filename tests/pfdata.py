"""Small synthetic PF-PASCAL and PF-WILLOW folders in their published layouts, with the values a correct
converter must read from them (computed here, independently of the converters)."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

VOC = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
       "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


@dataclass
class Expected:
    """What the store must hold: images by key, pairs per split in order."""

    images: dict[tuple[str, str], dict] = field(default_factory=dict)  #: path, size, kps (K, 2), bbox
    pairs: dict[str, list[dict]] = field(default_factory=dict)  #: src, trg, ids, src_kps, trg_kps, flip


def flat_image(path: Path, width: int, height: int, seed: int) -> None:
    """A small placeholder image (JPEG or PNG by suffix) of the given size; flat colour keeps it tiny."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 255, 3))).save(path)


def fmt(values: np.ndarray) -> str:
    return ";".join(repr(float(v)) for v in values)


def write_pascal_csv(path: Path, rows: list[dict], with_kps: bool, prefix: str) -> None:
    """A pair CSV as published: keypoint cells are ';'-joined floats."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["source_image", "target_image", "class", *(["XA", "YA", "XB", "YB"] if with_kps else ["flip"])])
        for r in rows:
            names = [f"{prefix}JPEGImages/{r[s][1]}.jpg" for s in ("src", "trg")]
            cls = VOC.index(r["src"][0]) + 1
            if with_kps:
                s, t = r["src_kps"], r["trg_kps"]
                w.writerow([*names, cls, fmt(s[:, 0]), fmt(s[:, 1]), fmt(t[:, 0]), fmt(t[:, 1])])
            else:
                w.writerow([*names, cls, r["flip"]])


def make_pfpascal(root: Path, layout: str = "ncnet", seed: int = 0) -> Expected:
    """PF-PASCAL with classes aeroplane (6 kps slots), cat (9) and dog (12), 5 images each; one VOC
    name is annotated under both cat and dog with different keypoints.

    ``layout="ncnet"``: ``root/PF-dataset-PASCAL/{JPEGImages,Annotations}`` and
    ``root/image_pairs/{train,val,test}_pairs.csv``; ``"hpf"``: everything in ``root``, ``trn_pairs.csv``.
    Test CSV keypoints list the rows annotated in both images in *reverse* row order.
    """
    rng = np.random.default_rng(seed)
    data = root / "PF-dataset-PASCAL" if layout == "ncnet" else root
    pair_dir = root / "image_pairs" if layout == "ncnet" else root
    prefix = "PF-dataset-PASCAL/" if layout == "ncnet" else ""
    exp = Expected()
    sizes: dict[str, tuple[int, int]] = {}
    for cls, k in (("aeroplane", 6), ("cat", 9), ("dog", 12)):
        names = [f"2009_{VOC.index(cls):02d}{i:04d}" for i in range(4)] + ["2010_000777"]
        for name in names:
            w, h = sizes.setdefault(name, (int(rng.integers(40, 90)), int(rng.integers(30, 70))))
            kps = np.column_stack([rng.uniform(1, w - 1, k), rng.uniform(1, h - 1, k)])
            kps[rng.random(k) < 0.3] = np.nan
            kps[:2] = rng.uniform(1, 20, (2, 2))  # at least two rows in every image
            bbox = np.array([np.nanmin(kps[:, 0]), np.nanmin(kps[:, 1]), np.nanmax(kps[:, 0]), np.nanmax(kps[:, 1])])
            mat = data / "Annotations" / cls / f"{name}.mat"
            mat.parent.mkdir(parents=True, exist_ok=True)
            scipy.io.savemat(mat, {"kps": kps, "bbox": bbox[None]})
            image = data / "JPEGImages" / f"{name}.jpg"
            if not image.exists():
                flat_image(image, w, h, seed=len(sizes))
            exp.images[(cls, name)] = {"path": image, "size": (w, h), "kps": kps, "bbox": bbox}
    splits: dict[str, list[dict]] = {"trn": [], "val": [], "test": []}
    for cls in ("aeroplane", "cat", "dog"):
        keys = [k for k in exp.images if k[0] == cls]
        for a in range(len(keys)):
            for b in range(len(keys)):
                if a == b:
                    continue
                split = "test" if b == a + 1 else ("val" if b == a + 2 else "trn")
                src, trg = exp.images[keys[a]]["kps"], exp.images[keys[b]]["kps"]
                ids = np.flatnonzero(~np.isnan(src).any(1) & ~np.isnan(trg).any(1))
                if split == "test":
                    ids = ids[::-1]
                splits[split].append({"src": keys[a], "trg": keys[b], "ids": ids, "src_kps": src[ids],
                                      "trg_kps": trg[ids], "flip": int(rng.integers(0, 2)) if split == "trn" else 0})
    exp.pairs = splits
    trn_name = "train_pairs.csv" if layout == "ncnet" else "trn_pairs.csv"
    write_pascal_csv(pair_dir / trn_name, splits["trn"], with_kps=False, prefix=prefix)
    write_pascal_csv(pair_dir / "val_pairs.csv", splits["val"], with_kps=False, prefix=prefix)
    write_pascal_csv(pair_dir / "test_pairs.csv", splits["test"], with_kps=True, prefix=prefix)
    return exp


def write_willow_csv(path: Path, pairs: list[dict]) -> None:
    """``test_pairs_pf.csv`` as published: imageA, imageB, XA1..10, YA1..10, XB1..10, YB1..10."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["imageA", "imageB", *(f"{c}{i}" for c in ("XA", "YA", "XB", "YB") for i in range(1, 11))])
        for p in pairs:
            s, t = p["src_kps_all"], p["trg_kps_all"]
            w.writerow([f"PF-dataset/{p['src'][0]}/{p['src'][1]}.png", f"PF-dataset/{p['trg'][0]}/{p['trg'][1]}.png",
                        *(repr(float(v)) for v in np.concatenate([s[:, 0], s[:, 1], t[:, 0], t[:, 1]]))])


def make_pfwillow(root: Path, with_csv: bool = True, seed: int = 0) -> Expected:
    """PF-WILLOW with class folders car(G), car(M), duck(S), 4 images each; car(M)/Cars_001 is a
    byte-identical copy of car(G)/Cars_001. With ``with_csv``, ``test_pairs_pf.csv`` lists the pairs
    in reverse order and one pair has a NaN keypoint (dropped from that pair)."""
    rng = np.random.default_rng(seed)
    data = root / "PF-dataset"
    exp = Expected()
    for cls in ("car(G)", "car(M)", "duck(S)"):
        stem = "Cars" if cls.startswith("car") else "060"
        for i in range(4):
            name = f"{stem}_{i:03d}"
            png, mat = data / cls / f"{name}.png", data / cls / f"{name}.mat"
            if (cls, name) == ("car(M)", "Cars_001"):
                src = exp.images[("car(G)", name)]
                png.write_bytes(src["path"].read_bytes())
                scipy.io.savemat(mat, {"pts_coord": src["kps"].T.copy()})
                exp.images[(cls, name)] = dict(src, path=png)
                continue
            w, h = int(rng.integers(40, 90)), int(rng.integers(30, 70))
            flat_image(png, w, h, seed=len(exp.images) + 1)
            kps = np.column_stack([rng.uniform(1, w - 1, 10), rng.uniform(1, h - 1, 10)])
            scipy.io.savemat(mat, {"pts_coord": kps.T.copy()})
            exp.images[(cls, name)] = {"path": png, "size": (w, h), "kps": kps, "bbox": np.full(4, np.nan)}
    pairs = []
    for cls in ("car(G)", "car(M)", "duck(S)"):
        keys = [k for k in exp.images if k[0] == cls]
        for a in keys:
            for b in keys:
                if a != b:
                    s, t = exp.images[a]["kps"].copy(), exp.images[b]["kps"].copy()
                    pairs.append({"src": a, "trg": b, "src_kps_all": s, "trg_kps_all": t, "flip": 0})
    if with_csv:
        pairs = pairs[::-1]
        pairs[1]["trg_kps_all"][3, 1] = np.nan
        write_willow_csv(data / "test_pairs_pf.csv", pairs)
    for p in pairs:
        p["ids"] = np.flatnonzero(~np.isnan(p["src_kps_all"]).any(1) & ~np.isnan(p["trg_kps_all"]).any(1))
        p["src_kps"], p["trg_kps"] = p["src_kps_all"][p["ids"]], p["trg_kps_all"][p["ids"]]
    exp.pairs = {"test": pairs}
    return exp


def identity_pck(store, split: str, alpha: float) -> float:
    """Per-image PCK (%) of the identity baseline, written out pair by pair: each source keypoint predicted
    at the same relative position of the target image; threshold ``alpha`` times max(W, H) of the target
    image (``pfpascal``) or the max side of the target keypoints' extent (``pfwillow``)."""
    t = store.pairs(split)
    fractions = []
    for j in range(t.rows):
        _, src_kps, trg_kps = store.pair_keypoints(split, j)
        (ws, hs), (wt, ht) = store.images.size[t.src[j]], store.images.size[t.trg[j]]
        pred = src_kps.astype(np.float64) * [wt / ws, ht / hs]
        base = max(wt, ht) if store.dataset == "pfpascal" else (trg_kps.max(0) - trg_kps.min(0)).max()
        fractions.append(np.mean(np.linalg.norm(pred - trg_kps, axis=1) <= alpha * base))
    return 100 * float(np.mean(fractions))
