"""AP-10K: the benchmark's rules on small hand-built roots, the synthetic layout, and the CLI round trip
synth -> pack -> info -> eval -> verify."""
from __future__ import annotations

import io
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import converters
import spairstore
from converters.ap10k import (
    AP10K,
    FLIP_PAIRS,
    GEO_AWARE_GROUPS,
    KEYPOINTS,
    NUM_KEYPOINTS,
    SUBSETS,
    benchmark_pairs,
    flip_permutation,
    split_images,
)
from converters.synth.ap10k import synthesize
from spairstore import cli
from spairstore.cli import app
from spairstore.core.errors import SourceError
from spairstore.core.records import DatasetRecords

W, H = 40, 30  # every hand-built image; keypoint k of an image lies at (1 + 2k, 1 + k)
FAMILY = {"cat": "Felidae", "lion": "Felidae", "hippo": "Hippopotamidae"}  # the species of the hand-built roots


@pytest.fixture(scope="module")
def jpeg_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (W, H), (90, 120, 30)).save(out, "JPEG")
    return out.getvalue()


def annotation(shown: list[int] | range, crowd: int = 0, bbox: list[float] | None = None) -> dict:
    """An AP-10K image annotation with keypoints ``shown`` annotated (v = 2), the others v = 0."""
    kps: list[float] = []
    for k in range(NUM_KEYPOINTS):
        kps += [1 + 2 * k, 1 + k, 2] if k in shown else [0, 0, 0]
    return {"width": W, "height": H, "bbox": bbox or [2.0, 3.0, 30.0, 20.0], "keypoints": kps, "iscrowd": crowd}


def write_image(root: Path, family: str, species: str, name: str, ann: dict, jpg: bytes) -> None:
    for sub, suffix, data in (("ImageAnnotation", "json", json.dumps(ann).encode()), ("JPEGImages", "jpg", jpg)):
        d = root / sub / family / species
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.{suffix}").write_bytes(data)


def write_pair(root: Path, folder: str, src: tuple[str, str, str], trg: tuple[str, str, str], suffix: str) -> str:
    """A pair file as GeoAware-SC writes it; ``src``/``trg`` are (family, species, name). Returns its stem."""
    d = root / "PairAnnotation" / folder
    d.mkdir(parents=True, exist_ok=True)
    stem = f"{src[2]}-{trg[2]}:{suffix}"
    (d / f"{stem}.json").write_text(json.dumps({f"{side}_json_path": f"data/ap-10k/ImageAnnotation/{'/'.join(k)}.json"
                                                for side, k in (("src", src), ("trg", trg))}))
    return stem


def many(root: Path, jpg: bytes, counts: dict[tuple[str, str], int], seed: int = 0) -> dict[tuple[str, str], list[str]]:
    """``counts[(family, species)]`` images with every keypoint shown, named by distinct ids written in a
    shuffled order (so that directory order is not sorted order). Returns the names per key."""
    rng = np.random.default_rng(seed)
    out = {}
    for (family, species), n in counts.items():
        names = [f"{i:017d}" for i in rng.choice(10**6, n, replace=False)]
        for name in names:
            write_image(root, family, species, name, annotation(range(NUM_KEYPOINTS)), jpg)
        out[(family, species)] = names
    return out


def read(root: Path, **kw) -> DatasetRecords:
    return AP10K(root, **kw).read()


def members(records: DatasetRecords, split: str) -> set[tuple[str, str]]:
    return {k for p in records.pairs[split] for k in (p.src, p.trg)}


# -- constants ---------------------------------------------------------------------------------------------
def test_flip_permutation_swaps_left_and_right_names():
    perm = flip_permutation()
    assert sorted(perm) == list(range(NUM_KEYPOINTS)) and [perm[p] for p in perm] == list(range(NUM_KEYPOINTS))
    swap = {"left": "right", "right": "left"}
    for k, name in enumerate(KEYPOINTS):
        side, _, part = name.partition("_")
        assert KEYPOINTS[perm[k]] == (f"{swap[side]}_{part}" if side in swap else name)
    assert len(FLIP_PAIRS) == 7  # eyes, shoulders, elbows, front paws, hips, knees, back paws


def test_geo_aware_groups_are_same_type_parts():
    # AP10K_GEO_AWARE of GeoAware-SC: [0, 1, 2, 3, 4, [5, 8], [6, 9, 12, 15], [7, 10, 13, 16], [11, 14]]
    flat = sorted(k for g in GEO_AWARE_GROUPS for k in g)
    assert flat == list(range(NUM_KEYPOINTS))  # every keypoint in exactly one group
    assert [g for g in GEO_AWARE_GROUPS if len(g) > 1] == [(5, 8), (6, 9, 12, 15), (7, 10, 13, 16), (11, 14)]
    kind = {"elbow": "joint", "knee": "joint", "front_paw": "paw", "back_paw": "paw"}
    perm = flip_permutation()
    for g in GEO_AWARE_GROUPS:
        parts = {KEYPOINTS[k].removeprefix("left_").removeprefix("right_") for k in g}
        assert len({kind.get(p, p) for p in parts}) == 1, g
        assert len(g) == 1 or {perm[k] for k in g} == set(g)  # a flip keeps each group of two or more


# -- the benchmark's rules, on hand-built roots ---------------------------------------------------------------
def test_exclusions_crowd_and_fewer_than_three_keypoints(tmp_path, jpeg_bytes):
    for name, ann in (("a", annotation(range(17), crowd=1)), ("b", annotation([0, 1])), ("c", annotation([0, 1, 2])),
                      ("d", annotation(range(17)))):
        write_image(tmp_path, "Felidae", "cat", name, ann, jpeg_bytes)
    rec = read(tmp_path)
    assert [im.name for im in rec.images] == ["c", "d"]
    assert any("1 crowd images and 1 images with fewer than 3" in n for n in rec.notes)
    c = rec.images[0]
    assert c.keypoints.shape == (NUM_KEYPOINTS, 2) and np.isfinite(c.keypoints).all(1).sum() == 3
    assert c.keypoints[2].tolist() == [5.0, 3.0]  # (x, y) of keypoint 2, original pixels
    assert c.bbox == (2.0, 3.0, 32.0, 23.0)  # COCO [x, y, w, h] -> x1, y1, x2, y2
    assert rec.num_keypoints == 17 and rec.keypoint_flip == {"cat": flip_permutation()}


def test_splits_in_sorted_order(tmp_path, jpeg_bytes):
    names = many(tmp_path, jpeg_bytes, {("Felidae", "cat"): 55})[("Felidae", "cat")]
    rec = read(tmp_path)
    ordered = sorted(names)
    assert names != ordered  # written unsorted: the rule must sort
    assert members(rec, "test") == {("cat", n) for n in ordered[-30:]}
    assert members(rec, "val") == {("cat", n) for n in ordered[-50:-30]}
    assert members(rec, "trn") == {("cat", n) for n in ordered[:-50]}
    assert len(rec.pairs["test"]) == 30 * 29 and len(rec.pairs["val"]) == 20 * 19 and len(rec.pairs["trn"]) == 5 * 4
    # fewer images fill test first, then val (AP-10K's slicing files[-30:], files[-50:-30], files[:-50])
    for n in (1, 25, 30, 31, 49, 50, 51):
        files = [f"{i:03d}" for i in range(n)]
        assert split_images(files[::-1]) == {"trn": files[:-50] if n > 50 else [],
                                             "val": files[max(0, n - 50):max(0, n - 30)], "test": files[-30:]}


def test_pairs_need_three_shared_keypoints(tmp_path, jpeg_bytes):
    for name, shown in (("a", [0, 1, 2, 3]), ("b", [0, 1, 2]), ("c", [2, 3, 4])):
        write_image(tmp_path, "Felidae", "cat", name, annotation(shown), jpeg_bytes)
    rec = read(tmp_path)
    assert [(p.src[1], p.trg[1]) for p in rec.pairs["test"]] == [("a", "b"), ("b", "a")]  # c shares 2 with a
    p = rec.pairs["test"][0]
    assert p.kps_ids.tolist() == [0, 1, 2] and p.subset == SUBSETS.index("intra-species")
    assert p.stem == "a-b:cat" and p.category == "cat"
    # a frozen pair list naming a pair the rule forbids is an error naming the file
    write_pair(tmp_path, "test", ("Felidae", "cat", "a"), ("Felidae", "cat", "c"), "cat")
    with pytest.raises(SourceError, match=r"PairAnnotation/test/a-c:cat.json: its images share 2 annotated "
                                          r"keypoints; a pair needs at least 3"):
        read(tmp_path)


@pytest.fixture(scope="module")
def capped(tmp_path_factory, jpeg_bytes) -> tuple[Path, DatasetRecords]:
    """Two families: Felidae (cat, lion) and Hippopotamidae (hippo), 50 images each (30 test, 20 val)."""
    root = tmp_path_factory.mktemp("capped")
    many(root, jpeg_bytes, {("Felidae", "cat"): 50, ("Felidae", "lion"): 50, ("Hippopotamidae", "hippo"): 50})
    return root, read(root)


def test_subsets_and_caps(capped):
    _, rec = capped
    family = FAMILY
    assert rec.category_groups == {"family": ["Felidae", "Hippopotamidae", "Felidae"]}  # cat, hippo, lion
    assert rec.categories == ["cat", "hippo", "lion"] and rec.subset_names == list(SUBSETS)
    for split, n, cross, per_family_pair in (("test", 30, 900, 30), ("val", 20, 400, 20)):
        pairs = rec.pairs[split]
        by = Counter(SUBSETS[p.subset] for p in pairs)
        assert by == {"intra-species": 3 * n * (n - 1), "cross-species": cross, "cross-family": 2 * per_family_pair}
        for p in pairs:
            (s, t), sub = (p.src[0], p.trg[0]), SUBSETS[p.subset]
            assert (s == t, family[s] == family[t]) == {"intra-species": (True, True), "cross-species": (False, True),
                                                        "cross-family": (False, False)}[sub]
            assert p.stem.rpartition(":")[2] == {"intra-species": s, "cross-species": family[s], "cross-family": "all"}[sub]
        assert Counter((family[p.src[0]], family[p.trg[0]]) for p in pairs if p.subset == 2) == {
            ("Felidae", "Hippopotamidae"): per_family_pair, ("Hippopotamidae", "Felidae"): per_family_pair}
        assert len({(p.src, p.trg) for p in pairs}) == len(pairs) and [p.pair_id for p in pairs] == list(
            range(1, len(pairs) + 1))
        # pair ids follow subset, then suffix, then stem
        assert [(p.subset, p.stem.rpartition(":")[2], p.stem) for p in pairs] == sorted(
            (p.subset, p.stem.rpartition(":")[2], p.stem) for p in pairs)
    assert rec.pairs["trn"] == []


def test_categories_keep_the_pairs_between_them_and_their_families(capped):
    root, _ = capped
    rec = read(root, categories=["lion", "cat"])
    assert rec.categories == ["cat", "lion"] == rec.category_filter
    assert rec.category_groups == {"family": ["Felidae", "Felidae"]}
    assert {im.category for im in rec.images} == {"cat", "lion"}
    for split in ("test", "val"):
        by = Counter(SUBSETS[p.subset] for p in rec.pairs[split])
        assert set(by) == {"intra-species", "cross-species"}  # cross-family pairs need the hippo
        assert all({p.src[0], p.trg[0]} <= {"cat", "lion"} for p in rec.pairs[split])
    assert "trn" not in rec.pairs and "split 'trn' has no pair within those categories: not packed" in rec.notes
    hippo = read(root, categories=["hippo"])
    assert hippo.category_groups == {"family": ["Hippopotamidae"]}
    assert {SUBSETS[p.subset] for p in hippo.pairs["test"]} == {"intra-species"}


def test_trn_intra_species_cap_is_fifty_per_image():
    rng = np.random.default_rng(3)
    visible = {("cat", f"{i:04d}"): rng.random(NUM_KEYPOINTS) < 0.6 for i in range(110)}  # 60 trn images
    plan = benchmark_pairs(visible, {"cat": "Felidae"})
    trn = plan["trn"]
    assert len(trn) == 50 * 60
    trn_images = sorted(visible)[:60]
    shared = {(a, b) for a in trn_images for b in trn_images
              if a != b and (visible[a] & visible[b]).sum() >= 3}
    assert len(shared) > 50 * 60 and {(p.src, p.trg) for p in trn} <= shared and len(set(trn)) == len(trn)
    assert benchmark_pairs(visible, {"cat": "Felidae"}) == plan  # seeded: the same list every time


def test_threshold_is_the_target_box_and_strict(tmp_path, jpeg_bytes):
    """Errors of exactly α·max(w, h) of the target's COCO box are wrong under ``ap10k`` (``<``) and right
    under ``spair`` (``<=``); the two images' boxes differ, so a source-box threshold would score otherwise."""
    from spairstore import pack
    from spairstore.eval.evaluation import evaluate

    boxes = {"a": [2.0, 3.0, 30.0, 20.0], "b": [2.0, 3.0, 20.0, 25.0]}  # max(w, h): 30 and 25
    for name, box in boxes.items():
        write_image(tmp_path / "root", "Felidae", "cat", name, annotation(range(17), bbox=box), jpeg_bytes)
    pack(tmp_path / "root", tmp_path / "s.h5", size=32)
    true = np.array([[1 + 2 * k, 1 + k] for k in range(17)], dtype=np.float64)
    preds = {}
    for pair_id, trg in ((1, "b"), (2, "a")):  # a-b:cat, then b-a:cat
        limit = 0.1 * max(boxes[trg][2:])
        dx = np.where(np.arange(17) < 5, limit, 0.99 * limit)  # the first 5 exactly on the threshold
        preds[pair_id] = true + np.stack([dx, np.zeros(17)], 1)
    strict = evaluate(tmp_path / "s.h5", "test", preds)
    assert strict.protocol.name == "ap10k" and strict.per_pair()[0].tolist() == [12 / 17, 12 / 17]
    assert evaluate(tmp_path / "s.h5", "test", preds, "spair").per_pair()[0].tolist() == [1.0, 1.0]


# -- bad input ---------------------------------------------------------------------------------------------
def test_not_an_ap10k_root(tmp_path, jpeg_bytes, monkeypatch, capsys):
    write_image(tmp_path, "Felidae", "cat", "a", annotation(range(17)), jpeg_bytes)
    shutil.rmtree(tmp_path / "JPEGImages")
    with pytest.raises(SourceError, match=r"not an AP-10K root \(needs ImageAnnotation/<family>/<species>/<id>.json "
                                          r"and JPEGImages/<family>/<species>/\)"):
        AP10K(tmp_path)
    with pytest.raises(SourceError, match="no known dataset layout found .*AP-10K needs ImageAnnotation"):
        converters.detect(tmp_path)
    monkeypatch.setattr(sys, "argv", ["spairstore", "pack", str(tmp_path), str(tmp_path / "s.h5"), "--dataset", "ap10k"])
    with pytest.raises(SystemExit):
        cli.main()  # the console entry point: one line, no traceback
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path}: not an AP-10K root (needs ImageAnnotation/<family>/<species>/<id>.json and "
        "JPEGImages/<family>/<species>/)")


@pytest.mark.parametrize(("ann", "message"), [
    ({**annotation(range(17)), "keypoints": [1, 1, 2] * 16}, "keypoints must be 51 numbers"),
    ({**annotation(range(17)), "keypoints": [1, 1, 3] * 17}, r"keypoint visibility v must be 0, 1 or 2, got \[3.0\]"),
    ({**annotation(range(17)), "keypoints": [1, 1, 2] * 16 + [W + 5, 1, 2]},
     r"keypoint 16 \(right_back_paw\) at \[45.0, 1.0\] lies outside the 40x30 image"),
    (annotation(range(17), bbox=[2.0, 3.0, 0.0, 5.0]), r"bbox \[2.0, 3.0, 0.0, 5.0\] \(\[x, y, w, h\]\) is empty"),
    ({**annotation(range(17)), "iscrowd": 2}, "iscrowd must be 0 or 1, got 2"),
    ({k: v for k, v in annotation(range(17)).items() if k != "bbox"}, "missing key.s. bbox"),
])
def test_bad_image_annotation(tmp_path, jpeg_bytes, ann, message):
    write_image(tmp_path, "Felidae", "cat", "a", ann, jpeg_bytes)
    with pytest.raises(SourceError, match=r"ImageAnnotation/Felidae/cat/a.json: " + message):
        read(tmp_path)


def test_keypoint_on_the_edge_is_kept_with_a_note(tmp_path, jpeg_bytes):
    for name in "ab":
        write_image(tmp_path, "Felidae", "cat", name, {**annotation(range(17)), "keypoints": [1, 1, 2] * 16 + [W + 1, 1, 2]},
                    jpeg_bytes)
    rec = read(tmp_path)
    assert rec.images[0].keypoints[16].tolist() == [W + 1, 1]
    assert "2 keypoints up to 2 px outside their image (kept as annotated), e.g. ImageAnnotation/Felidae/cat/a.json" in rec.notes


def test_bad_pair_files(tmp_path, jpeg_bytes):
    for species, fam in (("cat", "Felidae"), ("lion", "Felidae")):
        for name in (f"{species}1", f"{species}2"):
            write_image(tmp_path, fam, species, name, annotation(range(17)), jpeg_bytes)
    cat1, cat2, lion1 = ("Felidae", "cat", "cat1"), ("Felidae", "cat", "cat2"), ("Felidae", "lion", "lion1")
    stem = write_pair(tmp_path, "test", cat1, cat2, "cat")
    (tmp_path / "PairAnnotation" / "test" / f"{stem}.json").rename(tmp_path / "PairAnnotation" / "test" / "x-y:cat.json")
    with pytest.raises(SourceError, match=r"test/x-y:cat.json: file name and content disagree: its images make the "
                                          r"intra-species pair 'cat1-cat2:cat'"):
        read(tmp_path)
    shutil.rmtree(tmp_path / "PairAnnotation")
    write_pair(tmp_path, "test", cat1, lion1, "cat")
    with pytest.raises(SourceError, match=r"a pair of the intra-species subset \(its folder\), but it joins cat "
                                          r"\(Felidae\) and lion \(Felidae\)"):
        read(tmp_path)
    shutil.rmtree(tmp_path / "PairAnnotation")
    write_pair(tmp_path, "test", cat1, ("Felidae", "cat", "cat9"), "cat")
    write_pair(tmp_path, "test", cat2, cat1, "cat")
    with pytest.raises(SourceError, match="trg_json_path names image cat/cat9, which the benchmark leaves out"):
        read(tmp_path)
    rec = read(tmp_path, on_error="skip")  # the bad pair listed, the rest of the split kept
    assert [s.key for s in rec.skipped] == ["test/cat1-cat9:cat"] and [p.stem for p in rec.pairs["test"]] == [
        "cat2-cat1:cat"]


def test_species_in_two_families(tmp_path, jpeg_bytes):
    write_image(tmp_path, "Felidae", "cat", "a", annotation(range(17)), jpeg_bytes)
    write_image(tmp_path, "Viverridae", "cat", "b", annotation(range(17)), jpeg_bytes)
    with pytest.raises(SourceError, match=r"ImageAnnotation/Viverridae/cat: species 'cat' is also a species of "
                                          r"family 'Felidae'"):
        read(tmp_path)


# -- synth and the CLI round trip -----------------------------------------------------------------------------
SPECIES = "cat,lion,hippo"
PER_SPECIES = 34  # after 1 crowd and 1 few-keypoint image per species: 30 test and 2 val images


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ap10k") / "AP-10K"
    res = CliRunner().invoke(app, ["synth", str(root), "--dataset", "ap10k", "--images-per-category", str(PER_SPECIES),
                                   "--categories", SPECIES, "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert f"wrote {3 * PER_SPECIES} images" in res.output
    return root


def _pair_files(root: Path, split: str) -> dict[str, tuple[dict, dict, int]]:
    """stem -> (source annotation, target annotation, subset index), read straight from the files."""
    out = {}
    for subset, suffix in enumerate(("", "_cross_species", "_cross_family")):
        for f in sorted((root / "PairAnnotation" / f"{split}{suffix}").glob("*.json")):
            paths = json.loads(f.read_text())
            src, trg = (json.loads((root / paths[k].split("data/ap-10k/", 1)[1]).read_text())
                        for k in ("src_json_path", "trg_json_path"))
            out[f.stem] = (src, trg, subset)
    return out


def test_synth_layout(synth_root, tmp_path):
    assert sorted(p.name for p in synth_root.iterdir()) == ["ImageAnnotation", "JPEGImages", "PairAnnotation"]
    assert sorted(p.name for p in (synth_root / "PairAnnotation").iterdir()) == [
        "test", "test_cross_family", "test_cross_species", "val", "val_cross_family", "val_cross_species"]
    anns = {p.stem: json.loads(p.read_text()) for p in (synth_root / "ImageAnnotation").glob("*/*/*.json")}
    assert len(anns) == 3 * PER_SPECIES and all(len(s) == 17 and s.isdigit() for s in anns)
    for a in anns.values():
        v = np.array(a["keypoints"]).reshape(17, 3)
        assert set(v[:, 2]) <= {0, 2} and a["num_keypoints"] == (v[:, 2] > 0).sum()
        assert (v[v[:, 2] == 0, :2] == 0).all()  # unannotated: x = y = 0, as COCO writes them
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= a["width"] and y + h <= a["height"]
    assert Counter(a["iscrowd"] for a in anns.values()) == {0: 3 * PER_SPECIES - 3, 1: 3}
    assert sum(a["num_keypoints"] < 3 and not a["iscrowd"] for a in anns.values()) == 3
    with Image.open(next((synth_root / "JPEGImages").glob("*/*/*.jpg"))) as im:
        assert im.format == "JPEG"
    again = synthesize(tmp_path / "again", images_per_category=PER_SPECIES, categories=["hippo", "lion", "cat"], seed=3)
    tree = lambda r: {str(p.relative_to(r)): p.read_bytes() for p in sorted(r.rglob("*")) if p.is_file()}
    assert tree(again.out_dir) == tree(synth_root)  # the same seed writes the same bytes
    assert again.pairs["trn"] == 0 and str(again).endswith(
        f"\n  note: no trn pairs: the benchmark's rule takes each species' last 30 images (after its exclusions) "
        f"for test and the 20 before them for val, so {PER_SPECIES} images per species leave trn empty; the "
        "default, 60, gives each species about 6 trn images")
    assert synthesize(tmp_path / "default", categories=["cat"]).notes == ()


def test_cli_round_trip(synth_root, tmp_path):
    r = CliRunner()
    store = tmp_path / "ap10k.h5"
    res = r.invoke(app, ["pack", str(synth_root), str(store), "--size", "64"])  # the layout is detected
    assert res.exit_code == 0, res.output
    assert "packed ap10k" in res.output and "3 crowd images and 3 images with fewer than 3" in res.output

    res = r.invoke(app, ["info", str(store)])
    assert res.exit_code == 0, res.output
    test_files = _pair_files(synth_root, "test")
    n = Counter(SUBSETS[s] for _, _, s in test_files.values())
    assert (f"subsets      test: intra-species {n['intra-species']:,}, cross-species {n['cross-species']:,}, "
            f"cross-family {n['cross-family']:,}") in res.output
    assert "groups       family: 2 groups of the 3 categories (Felidae, Hippopotamidae)" in res.output
    info = json.loads(r.invoke(app, ["info", str(store), "--json"]).output)
    assert info["dataset"] == "ap10k" and info["images"] == 3 * PER_SPECIES - 6 and info["category_groups"] == {
        "family": ["Felidae", "Hippopotamidae", "Felidae"]}
    assert 0 < n["cross-species"] <= 900 and 0 < n["cross-family"] <= 2 * 30  # Felidae x Hippopotamidae, both ways
    stats = json.loads(r.invoke(app, ["stats", str(store), "--json"]).output)
    assert stats["splits"]["test"]["subset"] == {k: n[k] for k in SUBSETS}  # counted from the pair files
    table = r.invoke(app, ["stats", str(store)]).output.splitlines()
    test_row = next(ln for ln in table if ln.startswith("test "))
    assert table[0] == "ap10k: pairs per split and subset (images: used by the split)"  # no difficulty levels
    assert table[2].split()[-3:] == list(SUBSETS) and test_row.split()[-3:] == [f"{n[k]:,}" for k in SUBSETS]

    res = r.invoke(app, ["eval", str(store), "--method", "identity", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["protocol"]["name"] == "ap10k" and report["pairs"] == len(test_files)
    assert report["pair_list_sha256"] == info["pair_list_sha256"]["test"]

    # The identity baseline computed here from the pair and image files alone: x * W_t / W_s, y * H_t / H_s;
    # correct when strictly within 0.1 * max(w, h) of the target's COCO box; per image = mean over pairs.
    frac: dict[str, list[float]] = {}
    for stem, (src, trg, subset) in test_files.items():
        a, b = (np.array(x["keypoints"], dtype=float).reshape(17, 3) for x in (src, trg))
        ids = (a[:, 2] > 0) & (b[:, 2] > 0)
        pred = a[ids, :2] * [trg["width"] / src["width"], trg["height"] / src["height"]]
        ok = np.hypot(*(pred - b[ids, :2]).T) < 0.1 * max(trg["bbox"][2:])
        for key in ("all", SUBSETS[subset], stem.rpartition(":")[2] if subset == 0 else None):
            if key:
                frac.setdefault(key, []).append(ok.mean())
    assert report["pck"]["0.1"]["per_image"] == pytest.approx(100 * np.mean(frac["all"]), abs=1e-9)
    for sub in SUBSETS:
        assert report["by_group"]["subset"][sub]["0.1"]["per_image"] == pytest.approx(100 * np.mean(frac[sub]), abs=1e-9)
    assert set(report["by_group"]["family"]) == {"Felidae", "Hippopotamidae"}
    assert set(report["by_category"]) == {"cat", "hippo", "lion"}
    # GeoAware-SC's geo-aware subset: a keypoint annotated in both images counts when a group of two or more
    # same-type parts holding it has at least 2 members annotated in the target (counted here from the files)
    groups = [g for g in GEO_AWARE_GROUPS if len(g) > 1]
    geo = 0
    for src, trg, _ in test_files.values():
        a, b = (np.array(x["keypoints"]).reshape(17, 3)[:, 2] > 0 for x in (src, trg))
        geo += sum(a[k] and b[k] and any(k in g and b[list(g)].sum() >= 2 for g in groups) for k in range(17))
    res = r.invoke(app, ["eval", str(store), "--method", "identity", "--subset", "geo-aware", "--json"])
    assert res.exit_code == 0, res.output
    assert 0 < json.loads(res.output)["keypoints"] == geo < report["keypoints"]
    text = r.invoke(app, ["eval", str(store), "--method", "identity"]).output
    assert "PCK (%) by subset" in text and "PCK (%) by family" in text
    # compare breaks the difference down the same way: the truth minus identity, per subset, from the files
    truth = tmp_path / "truth.npy"
    np.save(truth, spairstore.open(store).pairs("test").trg_kps.astype(np.float64))
    res = r.invoke(app, ["compare", str(store), str(truth), "identity", "--json", "--resamples", "50"])
    assert res.exit_code == 0, res.output
    by_group = json.loads(res.output)["by_group"]
    for sub in SUBSETS:
        cell = by_group["subset"][sub]["0.1"]["per_image"]
        assert cell["diff"] == pytest.approx(100 - 100 * np.mean(frac[sub]), abs=1e-9) and 0 < cell["p"] <= 1
    assert set(by_group["family"]) == {"Felidae", "Hippopotamidae"}
    text = r.invoke(app, ["compare", str(store), str(truth), "identity", "--resamples", "50"]).output
    row = next(ln for ln in text.splitlines() if ln.startswith("subset cross-family"))
    assert row.split()[8] == f"{by_group['subset']['cross-family']['0.1']['per_image']['p']:.3f}"  # p: 3 decimals

    res = r.invoke(app, ["verify", str(store), "--sources", str(synth_root)])
    assert res.exit_code == 0, res.output


def test_frozen_list_equals_the_rules_on_synth(synth_root, tmp_path):
    """The store of the synth's pair files and the store of the pair list the converter builds by the
    rules (PairAnnotation/ removed) hold the same pairs: the same SHA-256 per split."""
    from spairstore import pack
    from spairstore.store.reader import open as open_store

    bare = tmp_path / "bare"
    shutil.copytree(synth_root, bare, ignore=shutil.ignore_patterns("PairAnnotation"))
    hashes, notes = [], []
    for root in (synth_root, bare):
        pack(root, tmp_path / f"{root.name}.h5", size=32)
        with open_store(tmp_path / f"{root.name}.h5") as s:
            hashes.append({k: v for k, v in s.attrs["pair_list_sha256"].items() if k != "trn"})
            notes.append(" ".join(s.attrs["notes"]))
    assert hashes[0] == hashes[1] and set(hashes[0]) == {"val", "test"}
    assert "split 'trn' absent" in notes[0] and "built the benchmark's pair list" not in notes[0]
    assert "built the benchmark's pair list by its rules" in notes[1]
