"""converters.synth: a synthetic SPair-71k in the native layout and byte format."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from converters import spair71k
from converters.spair71k import IMAGE_KEYS, NUM_KEYPOINTS, SPLITS, pair_annotation
from converters.synth import SynthSummary, synthesize
from converters.voc import CLASS_INDEX as VOC_CLASS_INDEX
from spairstore.core.errors import SpairstoreError

CATS = ("bird", "car", "cow", "tvmonitor")
PER_CAT = 14  # 7 trn / 3 val / 4 test images per category: a few hundred pairs, well under a second
SEED = 5  # a seed whose small run has pairs without a common keypoint (the id rule needs them)
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "spair71k-real"


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, SynthSummary]:
    root = tmp_path_factory.mktemp("synth") / "spair"
    return root, synthesize(root, images_per_category=PER_CAT, categories=CATS, seed=SEED)


def _images(root: Path) -> dict[tuple[str, str], dict]:
    return {(p.parent.name, p.stem): json.loads(p.read_bytes())
            for p in sorted((root / "ImageAnnotation").glob("*/*.json"))}


def _pairs(root: Path, split: str) -> list[dict]:
    stems = (root / "Layout" / "large" / f"{split}.txt").read_text().splitlines()
    return [json.loads((root / "PairAnnotation" / split / f"{s}.json").read_bytes()) for s in stems]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_summary_and_layout(synth):
    root, summary = synth
    assert summary.out_dir == root and summary.images == PER_CAT * len(CATS) and summary.seconds > 0
    assert sorted(p.name for p in root.iterdir()) == [
        "ImageAnnotation", "JPEGImages", "Layout", "PairAnnotation", "Segmentation"]
    for sub in ("ImageAnnotation", "JPEGImages", "Segmentation"):
        assert sorted(p.name for p in (root / sub).iterdir()) == list(CATS)
    for cat in CATS:
        stems = sorted(p.stem for p in (root / "ImageAnnotation" / cat).glob("*.json"))
        assert len(stems) == PER_CAT
        assert stems == sorted(p.stem for p in (root / "JPEGImages" / cat).glob("*.jpg"))
        assert stems == sorted(p.stem for p in (root / "Segmentation" / cat).glob("*.png"))
        for s in stems:  # VOC-like names: 2008_001234
            year, num = s.split("_")
            assert 2007 <= int(year) <= 2011 and len(num) == 6 and num.isdigit()
    for split in SPLITS:
        large = (root / "Layout" / "large" / f"{split}.txt").read_text()
        small = (root / "Layout" / "small" / f"{split}.txt").read_text()
        assert large.endswith("\n") and "\r" not in large  # every line ends with \n, like the real files
        stems = large.splitlines()
        assert len(stems) == summary.pairs[split] > 0
        assert sorted(f"{s}.json" for s in stems) == sorted(p.name for p in (root / "PairAnnotation" / split).iterdir())
        assert [int(s.split("-")[0]) for s in stems] == sorted(int(s.split("-")[0]) for s in stems)
        sub = small.splitlines()
        assert set(sub) <= set(stems) and sub == [s for s in stems if s in set(sub)]  # subset, id order
        assert 0 < len(sub) < len(stems)


def test_deterministic(synth, tmp_path):
    root, _ = synth
    again = synthesize(tmp_path / "again", images_per_category=PER_CAT, categories=CATS[::-1], seed=SEED)
    assert _tree(root) == _tree(again.out_dir)  # byte-identical; category order given does not matter
    other = synthesize(tmp_path / "other", images_per_category=6, categories=["car"], seed=4)
    assert _tree(other.out_dir) != _tree(synthesize(tmp_path / "o2", 6, ["car"], seed=5).out_dir)


def test_image_annotations(synth):
    root, _ = synth
    poses = {0: {"Frontal"}, 7: {"Frontal"}, 1: {"Left"}, 2: {"Left"}, 3: {"Rear"}, 4: {"Rear"},
             5: {"Right"}, 6: {"Right"}}
    for (cat, name), ann in _images(root).items():
        raw = (root / "ImageAnnotation" / cat / f"{name}.json").read_bytes()
        assert raw == json.dumps(ann).encode()  # default separators, no trailing newline
        assert tuple(ann) == IMAGE_KEYS
        assert list(ann["kps"]) == [str(i) for i in range(NUM_KEYPOINTS)]
        assert ann["filename"] == f"{name}.jpg" and ann["category"] == cat and ann["image_depth"] == 3
        assert ann["pose"] in poses[ann["azimuth_id"]] | {"Unspecified"}
        assert all(ann[k] in (0, 1) for k in ("truncated", "occluded", "difficult"))
        w, h = ann["image_width"], ann["image_height"]
        with Image.open(root / "JPEGImages" / cat / f"{name}.jpg") as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (w, h)
        assert 250 <= min(w, h) and max(w, h) <= 500
        with Image.open(root / "Segmentation" / cat / f"{name}.png") as mask:
            assert mask.mode in ("L", "P") and mask.size == (w, h)
            m = np.asarray(mask)
        assert set(np.unique(m).tolist()) == {0, VOC_CLASS_INDEX[cat]}
        # bbox: VOC 1-based inclusive extent of the mask's object pixels.
        ys, xs = np.nonzero(m)
        assert ann["bndbox"] == [xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1]
        assert 1 <= ann["bndbox"][0] <= ann["bndbox"][2] <= w and 1 <= ann["bndbox"][1] <= ann["bndbox"][3] <= h
        visible = {k: v for k, v in ann["kps"].items() if v is not None}
        assert len(visible) >= 3
        for x, y in visible.values():
            assert type(x) is int and type(y) is int
            assert 0 <= x < w and 0 <= y < h
            assert m[y, x] == VOC_CLASS_INDEX[cat]  # on the drawn (and unoccluded) object


def test_visibility_tracks_truncation_and_occlusion(synth):
    """A null keypoint is one the template has but the image does not show; flags are set and used."""
    root, _ = synth
    anns = _images(root)
    flags = Counter((a["truncated"], a["occluded"]) for a in anns.values())
    assert len(flags) >= 3  # truncated only, occluded only, neither (and usually both)
    for a in anns.values():
        x1, y1, x2, y2 = a["bndbox"]
        touches = x1 == 1 or y1 == 1 or x2 == a["image_width"] or y2 == a["image_height"]
        if a["truncated"]:  # truncated objects reach the frame (unless an occluder covers that part)
            assert touches or a["occluded"]
        else:
            assert not touches
    slots = {c: set().union(*({k for k, v in a["kps"].items() if v} for (cc, _), a in anns.items() if cc == c))
             for c in CATS}
    for c in CATS:  # a category uses a fixed subset of the 30 slots
        assert 8 <= len(slots[c]) <= 20


def test_pairs_match_pair_annotation(synth):
    root, _ = synth
    anns = _images(root)
    for split in SPLITS:
        for p in _pairs(root, split):
            cat = p["category"]
            src, trg = anns[(cat, Path(p["src_imname"]).stem)], anns[(cat, Path(p["trg_imname"]).stem)]
            raw = (root / "PairAnnotation" / split / f"{p['filename']}.json").read_bytes()
            assert raw == json.dumps(pair_annotation(src, trg, p["pair_id"])).encode()
            assert p["kps_ids"], "a pair without common keypoints was written"


def test_splits_pairs_and_ids(synth):
    """Image-disjoint splits; all ordered pairs with a common keypoint, both directions; ids numbered
    the way the real data numbers them (self-pairs take an id, pairs without common keypoints none)."""
    root, _ = synth
    anns = _images(root)
    members, excluded = {}, 0
    for split in SPLITS:
        pairs = _pairs(root, split)
        keys = {(p["category"], Path(p[f"{s}_imname"]).stem) for p in pairs for s in ("src", "trg")}
        members[split] = keys
        have = {(p["category"], p["src_imname"], p["trg_imname"]) for p in pairs}
        assert all((c, b, a) in have for c, a, b in have)  # both directions
        expected, next_id = [], 0
        for cat in CATS:
            imgs = sorted(n for c, n in anns if c == cat and (c, n) in keys)
            for a in imgs:
                for b in imgs:
                    common = spair71k.common_keypoint_ids(anns[(cat, a)]["kps"], anns[(cat, b)]["kps"])
                    if a == b or common:
                        if a != b:
                            expected.append(spair71k.pair_stem(next_id, a, b, cat))
                        next_id += 1
        assert [p["filename"] for p in pairs] == expected
        assert pairs[0]["pair_id"] == 1
        excluded += sum(len({n for c, n in keys if c == cat}) ** 2 for cat in CATS) - next_id
    assert excluded > 0  # this seed has pairs without a common keypoint: the id rule is exercised
    assert not (members["trn"] & members["val"] or members["trn"] & members["test"] or members["val"] & members["test"])
    per_cat = {s: Counter(c for c, _ in members[s]) for s in SPLITS}
    assert all(per_cat["trn"][c] == 7 and per_cat["val"][c] == 3 and per_cat["test"][c] == 4 for c in CATS)


def test_difficulty_labels_span_levels(synth):
    root, _ = synth
    pairs = [p for s in SPLITS for p in _pairs(root, s)]
    for key in ("viewpoint_variation", "scale_variation", "truncation", "occlusion"):
        assert len({p[key] for p in pairs}) >= 3, key


def test_duplicate_names_across_categories(synth):
    root, _ = synth
    anns = _images(root)
    by_name = Counter(n for _, n in anns)
    dups = [n for n, k in by_name.items() if k > 1]
    assert dups  # image keys must be (category, name)
    for n in dups:
        same = [a for (c, m), a in anns.items() if m == n]
        assert len({a["category"] for a in same}) == len(same)
        assert same[0]["kps"] != same[1]["kps"]


def test_converter_reads_synthetic_root(synth):
    root, summary = synth
    records = spair71k.SPair71k(root).read()
    assert len(records.images) == summary.images
    assert {s: len(v) for s, v in records.pairs.items()} == summary.pairs


def test_matching_beats_identity(synth):
    """The images carry signal: nearest neighbour on plain blurred-colour features finds most target
    keypoints, the identity mapping almost none (PCK@0.1 of the target bbox)."""
    root, _ = synth

    def features(cat: str, name: str) -> np.ndarray:
        im = Image.open(root / "JPEGImages" / cat / name)
        return np.concatenate([np.asarray(im.filter(ImageFilter.BoxBlur(r)), np.float32) for r in (1, 3)], 2)

    hits = {"nn": 0, "identity": 0}
    total = 0
    for p in _pairs(root, "test")[::4]:
        fs, ft = features(p["category"], p["src_imname"]), features(p["category"], p["trg_imname"])
        x1, y1, x2, y2 = p["trg_bndbox"]
        thr = 0.1 * max(x2 - x1, y2 - y1)
        flat = ft.reshape(-1, ft.shape[2])
        for (sx, sy), (tx, ty) in zip(p["src_kps"], p["trg_kps"]):
            j = int(((flat - fs[sy, sx]) ** 2).sum(1).argmin())
            hits["nn"] += np.hypot(j % ft.shape[1] - tx, j // ft.shape[1] - ty) <= thr
            hits["identity"] += np.hypot(sx - tx, sy - ty) <= thr
            total += 1
    assert total >= 20
    assert hits["nn"] / total > 0.4 > 0.1 > hits["identity"] / total


def test_progress_bar(tmp_path, capsys):
    synthesize(tmp_path / "p", images_per_category=6, categories=["cat"], progress=True)
    assert "synth images" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, message", [
    ({"categories": ["unicorn"]}, "unknown category"),
    ({"categories": []}, "empty"),
    ({"images_per_category": 3}, "images per category must be between 6"),
    ({"images_per_category": 2.5}, "images per category must be an integer"),
    ({"images_per_category": True}, "images per category must be an integer"),
    ({"seed": -1}, "seed"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    args = {"out_dir": tmp_path / "x", "images_per_category": 6, "categories": ["dog"], **kwargs}
    with pytest.raises(SpairstoreError, match=message):
        synthesize(**args)
    assert not (tmp_path / "x").exists()  # nothing written on a bad argument


def test_out_dir_must_be_new_or_empty(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(SpairstoreError, match="not empty"):
        synthesize(tmp_path / "full", images_per_category=6, categories=["dog"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpairstoreError, match="not a directory"):
        synthesize(tmp_path / "file", images_per_category=6, categories=["dog"])
    (tmp_path / "empty").mkdir()
    assert synthesize(tmp_path / "empty", images_per_category=6, categories=["dog"]).images == 6


@pytest.mark.skipif(not REAL.is_dir(), reason="real SPair-71k annotation sample not present")
def test_format_matches_real_files(synth):
    root, _ = synth
    real_img = sorted((REAL / "ImageAnnotation" / "aeroplane").glob("*.json"))[0].read_bytes()
    ours = sorted((root / "ImageAnnotation" / "car").glob("*.json"))[0].read_bytes()
    for raw in (real_img, ours):
        assert not raw.endswith(b"\n")
        assert json.dumps(json.loads(raw)).encode() == raw  # default json.dumps separators
    real, mine = json.loads(real_img), json.loads(ours)
    assert list(real) == list(mine)
    assert list(real["kps"]) == list(mine["kps"])
    assert {k: type(v) for k, v in real.items()} == {k: type(v) for k, v in mine.items()}
    real_pair = next((REAL / "PairAnnotation" / "test").glob("*.json")).read_bytes()
    our_pair = next((root / "PairAnnotation" / "test").glob("*.json")).read_bytes()
    assert list(json.loads(real_pair)) == list(json.loads(our_pair))
    assert not our_pair.endswith(b"\n")
    real_layout = (REAL / "Layout" / "large" / "test.txt").read_bytes()
    our_layout = (root / "Layout" / "large" / "test.txt").read_bytes()
    for raw in (real_layout, our_layout):
        assert raw.endswith(b"\n") and b"\r" not in raw and not raw.endswith(b"\n\n")
