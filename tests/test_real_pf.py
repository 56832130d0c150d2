"""The real PF-WILLOW images and annotations, and the real PF-PASCAL pair lists (../shared/data)."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from conftest import SHARED_DATA
from pfdata import VOC, flat_image, identity_pck, write_willow_csv
from PIL import Image
from test_pack_roundtrip import independent_letterbox

import converters
import spairstore
from spairstore.core.manifest import sha256_file
from spairstore.eval.stats import dataset_stats

WILLOW = SHARED_DATA / "pf-willow-real"
PASCAL_PAIRS = SHARED_DATA / "pf-pascal-real" / "ncnet_image_pairs"


def willow_real() -> Path:
    if not (WILLOW / "PF-dataset").is_dir():
        pytest.skip("../shared/data/pf-willow-real is absent")
    return WILLOW


def pascal_real() -> Path:
    if not (PASCAL_PAIRS / "test_pairs.csv").is_file():
        pytest.skip("../shared/data/pf-pascal-real is absent")
    return PASCAL_PAIRS


@pytest.fixture(scope="module")
def willow_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, spairstore.PackSummary]:
    out = tmp_path_factory.mktemp("willow") / "pfwillow.h5"
    return out, spairstore.pack(willow_real(), out, size=64)


def test_real_pfwillow_reads_back_exactly(willow_store: tuple[Path, spairstore.PackSummary]) -> None:
    out, _ = willow_store
    root = willow_real()
    s = spairstore.open(out)
    mats = sorted((root / "PF-dataset").glob("*/*.mat"))
    assert s.dataset == "pfwillow" and len(s) == len(mats) == 100 and len(s.categories) == 10
    for mat in mats:
        i = s.image_row(mat.parent.name, mat.stem)
        pts = scipy.io.loadmat(mat)["pts_coord"]
        np.testing.assert_array_equal(s.images.keypoints[i], pts.T.astype(np.float32))
        png = mat.with_suffix(".png")
        assert s.image_bytes(i) == png.read_bytes()
        with Image.open(png) as im:
            assert s.images.size[i].tolist() == list(im.size) and max(im.size) == 300
            np.testing.assert_array_equal(s.pixels(i), independent_letterbox(im.convert("RGB"), 64,
                                                                              Image.Resampling.BILINEAR))
        assert np.isnan(s.images.bbox[i]).all()
    manifest = dict(zip(s.manifest.path, s.manifest.sha256))
    assert len(manifest) == 200
    for f in sorted((root / "PF-dataset").glob("*/*")):
        assert manifest[f.relative_to(root).as_posix()] == sha256_file(f)


def test_real_pfwillow_pair_list_built_from_annotations(willow_store: tuple[Path, spairstore.PackSummary]) -> None:
    out, summary = willow_store
    s = spairstore.open(out)
    t = s.pairs("test")
    assert s.splits == ["test"] and t.rows == 900
    assert np.bincount(t.category).tolist() == [90] * 10
    assert (t.n_kps == 10).all() and (t.src != t.trg).all()
    assert len({(int(a), int(b)) for a, b in zip(t.src, t.trg)}) == 900
    assert (s.images.category[t.src] == t.category).all() and (s.images.category[t.trg] == t.category).all()
    for j in range(0, 900, 37):
        _, src_kps, trg_kps = s.pair_keypoints("test", j)
        np.testing.assert_array_equal(src_kps, s.images.keypoints[t.src[j]])
        np.testing.assert_array_equal(trg_kps, s.images.keypoints[t.trg[j]])
    assert any("built the published pair list" in n and "900 ordered pairs" in n for n in summary.notes)
    dup = [n for n in summary.notes if "byte-identical" in n]
    assert len(dup) == 1 and dup[0].startswith("30 images") and "car(G)/Cars_006a = car(M)/Cars_006a" in dup[0]
    assert s.attrs["notes"] == summary.notes  # whole; the terminal gets the first three copies
    assert "car(G)/Cars_017a = car(M)/Cars_017a; and 27 more (`spairstore info STORE --json` lists them all)\n" \
        in str(summary)


def test_real_pfwillow_with_pair_csv(tmp_path: Path) -> None:
    """With ``test_pairs_pf.csv`` beside ``PF-dataset/`` its order and keypoints are used."""
    root = tmp_path / "PF-WILLOW"
    shutil.copytree(willow_real() / "PF-dataset", root / "PF-dataset")
    mats = sorted((root / "PF-dataset").glob("*/*.mat"))
    kps = {(m.parent.name, m.stem): scipy.io.loadmat(m)["pts_coord"].T for m in mats}
    pairs = [{"src": a, "trg": b, "src_kps_all": kps[a], "trg_kps_all": kps[b]}
             for a in kps for b in kps if a[0] == b[0] and a != b][::-1]
    write_willow_csv(root / "test_pairs_pf.csv", pairs)
    recs = converters.read(root)
    assert recs.dataset == "pfwillow" and [p.pair_id for p in recs.pairs["test"]] == list(range(1, 901))
    for p, q in zip(recs.pairs["test"], pairs):
        assert (p.src, p.trg) == (q["src"], q["trg"])
        np.testing.assert_array_equal(p.trg_kps, q["trg_kps_all"].astype(np.float32))
    assert not any("built the published pair list" in n for n in recs.notes)
    assert root / "test_pairs_pf.csv" in recs.sources


def read_csv(name: str) -> list[dict[str, str]]:
    with open(pascal_real() / name, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def pascal_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real NC-Net pair lists with a placeholder JPEG and ``.mat`` for every image they name. A test
    image's ``.mat`` rows are its CSV keypoints (each image has the same points in all its test pairs),
    then NaN rows up to the class's most keypoints; other images get random rows."""
    real = pascal_real()
    root = tmp_path_factory.mktemp("pfpascal") / "pf-pascal"
    shutil.copytree(real, root / "image_pairs")
    rng = np.random.default_rng(0)
    points: dict[tuple[str, str], np.ndarray] = {}
    named: dict[tuple[str, str], None] = {}
    for split in ("train", "val", "test"):
        for r in read_csv(f"{split}_pairs.csv"):
            cls = VOC[int(r["class"]) - 1]
            for side, c in (("source_image", "A"), ("target_image", "B")):
                key = (cls, Path(r[side]).stem)
                named[key] = None
                if split == "test":
                    xy = [[float(v) for v in r[f"{a}{c}"].split(";")] for a in "XY"]
                    points[key] = np.array(xy).T
    most = {cls: max(len(p) for k, p in points.items() if k[0] == cls) for cls, _ in points}
    sizes: dict[str, tuple[int, int]] = {}
    for cls, name in named:
        k = most.get(cls, 8)
        kps = np.full((k, 2), np.nan)
        if (cls, name) in points:
            kps[:len(points[cls, name])] = points[cls, name]
        else:
            m = int(rng.integers(2, k + 1))
            kps[:m] = rng.uniform(1, 60, (m, 2))
        w, h = sizes.get(name, (40, 30))
        w, h = max(w, int(np.nanmax(kps[:, 0])) + 2), max(h, int(np.nanmax(kps[:, 1])) + 2)
        sizes[name] = (w, h)
        mat = root / "PF-dataset-PASCAL" / "Annotations" / cls / f"{name}.mat"
        mat.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(mat, {"kps": kps, "bbox": np.array([[1, 1, w - 1, h - 1]])})
    for n, (name, (w, h)) in enumerate(sizes.items()):
        flat_image(root / "PF-dataset-PASCAL" / "JPEGImages" / f"{name}.jpg", w, h, seed=n)
    return root


def test_real_pfpascal_pair_lists_parse_completely(pascal_root: Path) -> None:
    recs = converters.read(pascal_root)
    assert recs.dataset == "pfpascal" and recs.categories == list(VOC)
    assert {s: len(p) for s, p in recs.pairs.items()} == {"trn": 2940, "val": 308, "test": 299}
    assert len(recs.images) == 1349 and len({im.image_path for im in recs.images}) == 1343
    for split, name in (("trn", "train"), ("val", "val"), ("test", "test")):
        for p, r in zip(recs.pairs[split], read_csv(f"{name}_pairs.csv"), strict=True):
            assert p.category == VOC[int(r["class"]) - 1]
            assert (p.src[1], p.trg[1]) == (Path(r["source_image"]).stem, Path(r["target_image"]).stem)
            assert p.flip == int(r.get("flip", 0))
            if split == "test":
                xy = np.array([[float(v) for v in r[c].split(";")] for c in ("XA", "YA", "XB", "YB")])
                np.testing.assert_array_equal(p.src_kps, xy[:2].T.astype(np.float32))
                np.testing.assert_array_equal(p.trg_kps, xy[2:].T.astype(np.float32))
                assert p.kps_ids.tolist() == list(range(xy.shape[1]))  # each point found its .mat row
    assert sum(len(p.kps_ids) for p in recs.pairs["test"]) == 2414
    assert sum(p.flip for p in recs.pairs["trn"]) == 1470
    assert not any("not all rows" in n for n in recs.notes)


@pytest.fixture(scope="module")
def pascal_store(pascal_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, spairstore.PackSummary]:
    out = tmp_path_factory.mktemp("pfpascal-store") / "pfpascal.h5"
    return out, spairstore.pack(pascal_root, out, size=32)


def test_real_pfpascal_packs(pascal_store: tuple[Path, spairstore.PackSummary]) -> None:
    out, summary = pascal_store
    assert summary.images == 1349 and summary.pairs == {"trn": 2940, "val": 308, "test": 299}
    s = spairstore.open(out)
    assert s.dataset == "pfpascal"
    # 2011_002811 is annotated under bicycle and person in the real test list: two images
    a, b = s.image_row("bicycle", "2011_002811"), s.image_row("person", "2011_002811")
    assert a != b and s.image_bytes(a) == s.image_bytes(b)
    t = s.pairs("test")
    assert int(t.n_kps.sum()) == 2414 and int(t.n_kps.max()) == 17
    assert s.manifest.rows == 3 + 1349 + 1343


@pytest.mark.parametrize("which", ["willow", "pascal"])
def test_real_identity_baseline_and_stats(which: str, request: pytest.FixtureRequest) -> None:
    """The identity baseline under each store's default protocol, checked pair by pair, and the stats."""
    out, _ = request.getfixturevalue(f"{which}_store")
    s = spairstore.open(out)
    report = spairstore.evaluate(s, "test", spairstore.Identity())
    assert report.protocol.name == s.dataset == f"pf{which}"
    assert report.pairs == s.pairs("test").rows
    for alpha in report.protocol.alphas:
        assert report.pck(alpha, "per_image") == pytest.approx(identity_pck(s, "test", alpha), abs=1e-6)
    if which == "willow":  # padding inside min/max only widens the extent: legacy numbers are higher
        legacy = spairstore.evaluate(s, "test", spairstore.Identity(), protocol="pfwillow-legacy")
        assert all(legacy.pck(a) >= report.pck(a) for a in report.protocol.alphas)
        assert legacy.pck(0.1) > report.pck(0.1)
    stats = dataset_stats(s)["splits"]
    assert {k: v["pairs"] for k, v in stats.items()} == {k: s.pairs(k).rows for k in s.splits}
    assert sum(stats["test"]["category"].values()) == s.pairs("test").rows
