"""PF-PASCAL and PF-WILLOW: synthetic folders in the published layouts pack and read back exactly;
bad input names the file at fault."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from pfdata import Expected, identity_pck, make_pfpascal, make_pfwillow
from PIL import Image
from test_pack_roundtrip import independent_letterbox
from typer.testing import CliRunner

import converters
import spairstore
from spairstore.cli import app
from spairstore.core.manifest import sha256_file
from spairstore.core.records import Skipped
from spairstore.store.verify import verify


def assert_store_matches(path: Path, exp: Expected, dataset: str, root: Path) -> None:
    """Every image and pair of ``exp`` is in the store at ``path``, value for value."""
    s = spairstore.open(path)
    assert s.dataset == dataset
    assert len(s) == len(exp.images)
    assert s.shapes["images/mask"][0][0] == 0
    for (cls, name), im in exp.images.items():
        i = s.image_row(cls, name)
        assert s.images.size[i].tolist() == list(im["size"])
        k = len(im["kps"])
        np.testing.assert_array_equal(s.images.keypoints[i, :k], im["kps"].astype(np.float32))
        assert np.isnan(s.images.keypoints[i, k:]).all()
        np.testing.assert_array_equal(s.images.bbox[i], im["bbox"].astype(np.float32))
        assert s.image_bytes(i) == im["path"].read_bytes()
        with Image.open(im["path"]) as img:
            np.testing.assert_array_equal(s.pixels(i), independent_letterbox(img.convert("RGB"), s.image_size,
                                                                              Image.Resampling.BILINEAR))
    assert s.splits == list(exp.pairs)
    for split, pairs in exp.pairs.items():
        t = s.pairs(split)
        assert t.rows == len(pairs)
        assert t.pair_id.tolist() == list(range(1, len(pairs) + 1))
        for j, p in enumerate(pairs):
            assert (s.categories[s.images.category[t.src[j]]], s.images.name[t.src[j]]) == p["src"]
            assert (s.categories[s.images.category[t.trg[j]]], s.images.name[t.trg[j]]) == p["trg"]
            assert s.categories[t.category[j]] == p["src"][0]
            ids, src_kps, trg_kps = s.pair_keypoints(split, j)
            assert ids.tolist() == p["ids"].tolist()
            np.testing.assert_array_equal(src_kps, p["src_kps"].astype(np.float32))
            np.testing.assert_array_equal(trg_kps, p["trg_kps"].astype(np.float32))
            assert int(t.flip[j]) == p["flip"]
            assert all(int(t[k][j]) == -1 for k in ("viewpoint", "scale", "truncation", "occlusion"))
    # every file of the folder (CSVs, .mat, images) is a source, hashed as read
    files = {f.relative_to(root).as_posix(): sha256_file(f) for f in root.rglob("*") if f.is_file()}
    assert dict(zip(s.manifest.path, s.manifest.sha256)) == files


@pytest.mark.parametrize("layout", ["ncnet", "hpf"])
def test_pfpascal_roundtrip(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "pf-pascal"
    exp = make_pfpascal(root, layout=layout)
    assert converters.detect(root) == "pfpascal"
    summary = spairstore.pack(root, tmp_path / "p.h5", size=48)
    assert summary.pairs == {s: len(p) for s, p in exp.pairs.items()}
    assert_store_matches(tmp_path / "p.h5", exp, "pfpascal", root)
    s = spairstore.open(tmp_path / "p.h5")
    assert s.categories == list(converters.pfpascal.CATEGORIES) and len(s.categories) == 20
    assert s.attrs["num_keypoints"] == 12
    # one VOC file annotated under two classes: two images, different keypoints, same JPEG
    cat, dog = s.image_row("cat", "2010_000777"), s.image_row("dog", "2010_000777")
    assert cat != dog and s.image_bytes(cat) == s.image_bytes(dog)
    assert not np.array_equal(s.images.keypoints[cat], s.images.keypoints[dog], equal_nan=True)
    assert int(s.pairs("trn").flip.sum()) == sum(p["flip"] for p in exp.pairs["trn"]) > 0
    assert not any("not all rows" in n for n in summary.notes)  # every CSV keypoint found its .mat row


def test_pfpascal_csv_keypoints_off_the_mat_rows_are_kept_positionally(tmp_path: Path) -> None:
    root = tmp_path / "pf-pascal"
    exp = make_pfpascal(root)
    mat = root / "PF-dataset-PASCAL" / "Annotations" / "aeroplane" / "2009_000001.mat"
    m = scipy.io.loadmat(mat)
    scipy.io.savemat(mat, {"kps": m["kps"] + 0.5, "bbox": m["bbox"]})
    recs = converters.read(root)
    hit = [j for j, p in enumerate(exp.pairs["test"]) if ("aeroplane", "2009_000001") in (p["src"], p["trg"])]
    assert hit
    for j in hit:
        p = recs.pairs["test"][j]
        assert p.kps_ids.tolist() == list(range(len(exp.pairs["test"][j]["ids"])))
        np.testing.assert_array_equal(p.src_kps, exp.pairs["test"][j]["src_kps"].astype(np.float32))
    assert any(n.startswith(f"{len(hit)} pairs have CSV keypoints") for n in recs.notes)


@pytest.mark.parametrize("with_csv", [True, False])
def test_pfwillow_roundtrip(tmp_path: Path, with_csv: bool) -> None:
    root = tmp_path / "PF-WILLOW"
    exp = make_pfwillow(root, with_csv=with_csv)
    if not with_csv:  # the built list: each class folder's ordered pairs, folders and names sorted
        exp.pairs["test"].sort(key=lambda p: (p["src"][0], p["src"][1], p["trg"][1]))
    assert converters.detect(root) == "pfwillow"
    assert converters.detect(root / "PF-dataset") == "pfwillow"
    summary = spairstore.pack(root, tmp_path / "w.h5", size=40)
    assert summary.pairs == {"test": 36}
    assert_store_matches(tmp_path / "w.h5", exp, "pfwillow", root)
    s = spairstore.open(tmp_path / "w.h5")
    assert s.categories == ["car(G)", "car(M)", "duck(S)"]
    assert s.pairs("test").n_kps.min() == (9 if with_csv else 10)
    assert any(n.startswith("1 images are byte-identical") and "car(G)/Cars_001 = car(M)/Cars_001" in n
               for n in summary.notes)
    assert any("built the published pair list" in n for n in summary.notes) is not with_csv


def test_layouts_detected_apart(tmp_path: Path, synth_root: Path) -> None:
    make_pfpascal(tmp_path / "a")
    make_pfwillow(tmp_path / "b", with_csv=False)
    assert [converters.detect(p) for p in (tmp_path / "a", tmp_path / "b", synth_root)] == [
        "pfpascal", "pfwillow", "spair71k"]
    (tmp_path / "voc" / "JPEGImages").mkdir(parents=True)
    (tmp_path / "voc" / "Annotations").mkdir()  # a VOC root: XML annotations, no class folders
    with pytest.raises(spairstore.SourceError, match="no known dataset layout"):
        converters.detect(tmp_path / "voc")
    (tmp_path / "data").mkdir()  # the folder above an unpacked archive: the dataset below is named
    (tmp_path / "data" / "SPair-71k").symlink_to(synth_root)
    with pytest.raises(spairstore.SourceError, match=f"no known dataset layout found here, but "
                                                     f"{tmp_path / 'data' / 'SPair-71k'} holds SPair-71k: give that"):
        converters.detect(tmp_path / "data")


# -- bad input -------------------------------------------------------------------------------------
def pascal_mismatched_counts(root: Path) -> tuple[str, str]:
    p = root / "image_pairs" / "test_pairs.csv"
    lines = p.read_text().splitlines()
    cells = lines[2].split(",")
    cells[4] = cells[4].rsplit(";", 1)[0]  # YA one value short
    lines[2] = ",".join(cells)
    p.write_text("\n".join(lines) + "\n")
    return "image_pairs/test_pairs.csv", "line 3: keypoint counts differ"


def pascal_missing_image(root: Path) -> tuple[str, str]:
    p = root / "PF-dataset-PASCAL" / "JPEGImages" / "2009_070002.jpg"
    p.unlink()
    return "PF-dataset-PASCAL/JPEGImages/2009_070002.jpg", "image file not found"


def pascal_unreadable_mat(root: Path) -> tuple[str, str]:
    p = root / "PF-dataset-PASCAL" / "Annotations" / "cat" / "2009_070001.mat"
    p.write_bytes(p.read_bytes()[:100])
    return "PF-dataset-PASCAL/Annotations/cat/2009_070001.mat", "cannot read .mat"


def pascal_missing_mat(root: Path) -> tuple[str, str]:
    (root / "PF-dataset-PASCAL" / "Annotations" / "dog" / "2009_110003.mat").unlink()
    return "PF-dataset-PASCAL/Annotations/dog/2009_110003.mat", "annotation file not found (named by image_pairs/"


def pascal_bad_kps_shape(root: Path) -> tuple[str, str]:
    p = root / "PF-dataset-PASCAL" / "Annotations" / "dog" / "2009_110003.mat"
    scipy.io.savemat(p, {"kps": np.zeros((4, 3)), "bbox": np.zeros((1, 4))})
    return "PF-dataset-PASCAL/Annotations/dog/2009_110003.mat", "kps must be"


def pascal_bad_class(root: Path) -> tuple[str, str]:
    p = root / "image_pairs" / "val_pairs.csv"
    lines = p.read_text().splitlines()
    cells = lines[1].split(",")
    cells[2] = "21"
    lines[1] = ",".join(cells)
    p.write_text("\n".join(lines) + "\n")
    return "image_pairs/val_pairs.csv", "line 2: class must be 1..20"


def willow_wrong_columns(root: Path) -> tuple[str, str]:
    p = root / "PF-dataset" / "test_pairs_pf.csv"
    lines = p.read_text().splitlines()
    lines[4] = lines[4].rsplit(",", 1)[0]  # YB10 missing
    p.write_text("\n".join(lines) + "\n")
    return "PF-dataset/test_pairs_pf.csv", "line 5: 41 columns, expected 42"


def willow_missing_image(root: Path) -> tuple[str, str]:
    (root / "PF-dataset" / "duck(S)" / "060_002.png").unlink()
    return "PF-dataset/duck(S)/060_002.png", "image file not found"


def willow_unreadable_mat(root: Path) -> tuple[str, str]:
    (root / "PF-dataset" / "car(M)" / "Cars_002.mat").write_text("MATLAB 5.0 MAT-file, truncated")
    return "PF-dataset/car(M)/Cars_002.mat", "cannot read .mat"


def willow_bad_pts_shape(root: Path) -> tuple[str, str]:
    scipy.io.savemat(root / "PF-dataset" / "car(G)" / "Cars_003.mat", {"pts_coord": np.zeros((10, 2))})
    return "PF-dataset/car(G)/Cars_003.mat", "pts_coord must be float (2, 10)"


def willow_unknown_image(root: Path) -> tuple[str, str]:
    p = root / "PF-dataset" / "test_pairs_pf.csv"
    p.write_text(p.read_text().replace("car(G)/Cars_002.png", "car(G)/Cars_099.png", 1))
    return "PF-dataset/test_pairs_pf.csv", "names no annotated image"


BREAKERS = [
    pascal_mismatched_counts, pascal_missing_image, pascal_unreadable_mat, pascal_missing_mat,
    pascal_bad_kps_shape, pascal_bad_class, willow_wrong_columns, willow_missing_image, willow_unreadable_mat,
    willow_bad_pts_shape, willow_unknown_image,
]


@pytest.mark.parametrize("breaker", BREAKERS)
def test_bad_input_names_the_file(tmp_path: Path, breaker) -> None:
    root = tmp_path / "src"
    (make_pfpascal if breaker.__name__.startswith("pascal") else make_pfwillow)(root)
    bad, reason = breaker(root)
    out = tmp_path / "out.h5"
    with pytest.raises(spairstore.SourceError) as e:
        spairstore.pack(root, out, size=32)
    assert str(e.value).startswith(bad + ":"), str(e.value)
    assert reason in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("breaker", BREAKERS)
def test_bad_input_skipped(tmp_path: Path, breaker) -> None:
    """Under ``on_error="skip"`` the bad item is listed (summary and store) and everything else packs: all
    other images, and every pair not using a skipped image, under its own pair id with its own values."""
    root = tmp_path / "src"
    exp = (make_pfpascal if breaker.__name__.startswith("pascal") else make_pfwillow)(root)
    bad, reason = breaker(root)
    out = tmp_path / "out.h5"
    summary = spairstore.pack(root, out, size=32, on_error="skip")
    assert any(x.path == bad and reason in x.reason for x in summary.skipped), summary.skipped
    assert all(f"    {x}" in str(summary).splitlines() for x in summary.skipped)
    s = spairstore.open(out)
    assert [Skipped(**d) for d in s.attrs["skipped"]] == summary.skipped
    gone = {tuple(x.key.split("/")) for x in summary.skipped if x.kind == "image"}
    assert {(s.categories[c], n) for c, n in zip(s.images.category, s.images.name)} == set(exp.images) - gone
    kept = 0
    for split, pairs in exp.pairs.items():
        t = s.pairs(split)
        for j, pid in enumerate(t.pair_id.tolist()):
            p = pairs[pid - 1]
            assert (s.categories[s.images.category[t.src[j]]], s.images.name[t.src[j]]) == p["src"]
            assert (s.categories[s.images.category[t.trg[j]]], s.images.name[t.trg[j]]) == p["trg"]
            assert not {p["src"], p["trg"]} & gone
            np.testing.assert_array_equal(s.pair_keypoints(split, j)[1], p["src_kps"].astype(np.float32))
        kept += t.rows
    assert kept == sum(map(len, exp.pairs.values())) - sum(x.kind == "pair" for x in summary.skipped)
    assert verify(out, sources=root).ok  # the manifest covers exactly what was packed


def test_cli_names_the_bad_csv_line(tmp_path: Path) -> None:
    root = tmp_path / "src"
    make_pfpascal(root)
    bad, reason = pascal_mismatched_counts(root)
    res = subprocess.run([sys.executable, "-m", "spairstore", "pack", str(root), str(tmp_path / "o.h5")],
                         capture_output=True, text=True)
    assert res.returncode == 1
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{bad}: {reason}" in errors[0]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("dataset", ["pfpascal", "pfwillow"])
def test_identity_baseline_and_stats_on_pf_stores(tmp_path: Path, dataset: str) -> None:
    """``eval --method identity`` picks the dataset's protocol from the store and agrees with a pair-by-pair
    computation; ``stats`` counts the pairs (PF stores have no difficulty labels)."""
    root = tmp_path / "src"
    exp = (make_pfpascal if dataset == "pfpascal" else make_pfwillow)(root)
    out = tmp_path / "s.h5"
    spairstore.pack(root, out, size=32)
    runner = CliRunner()
    res = runner.invoke(app, ["eval", str(out), "--method", "identity", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["protocol"]["name"] == dataset and report["pairs"] == len(exp.pairs["test"])
    s = spairstore.open(out)
    for alpha in (0.05, 0.1, 0.15):
        assert report["pck"][str(alpha)]["per_image"] == pytest.approx(identity_pck(s, "test", alpha), abs=1e-6)
    res = runner.invoke(app, ["stats", str(out), "--json"])
    assert res.exit_code == 0, res.output
    stats = json.loads(res.output)["splits"]
    assert {k: v["pairs"] for k, v in stats.items()} == {k: len(v) for k, v in exp.pairs.items()}
    assert stats["test"]["viewpoint"]["unknown"] == len(exp.pairs["test"])
    res = runner.invoke(app, ["stats", str(out)])
    assert res.output.startswith(f"{dataset}: pairs per split (images: used by the split)\n"), res.output


def test_a_long_note_is_shortened_for_the_terminal_only() -> None:
    from spairstore.core.tables import brief

    items = "; ".join(f"a/{i:03d} = b/{i:03d}" for i in range(40))
    assert brief("short; note") == "short; note"
    out = brief(f"40 copies: {items}")
    assert out.startswith("40 copies: a/000 = b/000; a/001 = b/001;") and len(out) < 320
    shown = out.split("; and ")[0].count("; ") + 1
    assert out.endswith(f"; and {40 - shown} more (`spairstore info STORE --json` lists them all)")
    assert brief("x" * 300).endswith("x... (`spairstore info STORE --json` gives the whole note)")

