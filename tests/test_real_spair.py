"""The real SPair-71k annotations (../shared/data) pack, and every reconstructed pair equals the real files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import converters
import spairstore


def test_real_test_split_counts(real_store: Path) -> None:
    s = spairstore.open(real_store)
    assert s.pairs("test").rows == 12234
    assert int(s.pairs("test").small.sum()) == 2438
    assert set(s.splits) == {"trn", "val", "test"}
    test_images = ((s.images.splits >> s.splits.index("test")) & 1).astype(bool)
    assert int(test_images.sum()) == 481
    assert len(s.categories) == 18


def test_reconstructed_pairs_equal_real_files(real_store: Path, real_spair_root: tuple[Path, Path]) -> None:
    """Every real pair file present (all splits) is reproduced exactly from the store's tables."""
    _, real = real_spair_root
    s = spairstore.open(real_store)
    files = sorted((real / "PairAnnotation").glob("*/*.json"))
    assert len(files) >= 28
    for f in files:
        split = f.parent.name
        ann = json.loads(f.read_text())
        t = s.pairs(split)
        j = s.pair_row(split, ann["pair_id"])
        ids, src_kps, trg_kps = s.pair_keypoints(split, j)
        src, trg = int(t.src[j]), int(t.trg[j])
        rebuilt = {
            "pair_id": int(t.pair_id[j]),
            "filename": str(t.stem[j]),
            "src_imname": s.images.name[src] + ".jpg",
            "trg_imname": s.images.name[trg] + ".jpg",
            "src_imsize": [*map(int, s.images.size[src]), int(s.images.depth[src])],
            "trg_imsize": [*map(int, s.images.size[trg]), int(s.images.depth[trg])],
            "src_bndbox": [int(v) for v in s.images.bbox[src]],
            "trg_bndbox": [int(v) for v in s.images.bbox[trg]],
            "category": s.categories[t.category[j]],
            "src_pose": s.pose_names[s.images.pose[src]],
            "trg_pose": s.pose_names[s.images.pose[trg]],
            "src_kps": src_kps.astype(int).tolist(),
            "trg_kps": trg_kps.astype(int).tolist(),
            "kps_ids": [str(i) for i in ids],
            "mirror": int(t.mirror[j]),
            "viewpoint_variation": int(t.viewpoint[j]),
            "scale_variation": int(t.scale[j]),
            "truncation": int(t.truncation[j]),
            "occlusion": int(t.occlusion[j]),
        }
        assert json.dumps(rebuilt) == f.read_text(), f.name


def test_duplicate_names_across_categories_are_distinct(real_store: Path) -> None:
    s = spairstore.open(real_store)
    names = s.images.name
    uniq, counts = np.unique(names, return_counts=True)
    dup = uniq[counts > 1]
    assert len(dup) > 0  # the real test split has VOC names in two categories
    for name in dup:
        rows = np.flatnonzero(names == name)
        cats = {s.categories[c] for c in s.images.category[rows]}
        assert len(cats) == len(rows)
        for r in rows:
            assert s.image_row(s.categories[s.images.category[r]], name) == r


def test_rule_rebuilds_real_pair_files_byte_identical(real_spair_root: tuple[Path, Path]) -> None:
    from converters.spair71k import pair_annotation

    _, real = real_spair_root
    for f in sorted((real / "PairAnnotation").glob("*/*.json")):
        ann = json.loads(f.read_text())
        load = lambda n: json.loads((real / "ImageAnnotation" / ann["category"] / f"{Path(n).stem}.json").read_text())  # noqa: E731
        assert json.dumps(pair_annotation(load(ann["src_imname"]), load(ann["trg_imname"]), ann["pair_id"])) == f.read_text()


def test_detects_spair_layout(real_spair_root: tuple[Path, Path]) -> None:
    assert converters.detect(real_spair_root[0]) == "spair71k"
