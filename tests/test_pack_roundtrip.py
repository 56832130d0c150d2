"""Pack a synthetic SPair-71k root and compare every stored value with the source files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import spairstore


def independent_letterbox(img: Image.Image, size: int, resample: Image.Resampling) -> np.ndarray:
    """Letterbox written out independently of spairstore.core.geometry: longest side to size, centred."""
    w, h = img.size
    nw, nh = max(1, round(w * size / max(w, h))), max(1, round(h * size / max(w, h)))
    canvas = Image.new(img.mode, (size, size))
    canvas.paste(img.resize((nw, nh), resample), ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas)


def test_image_fields_equal_source(synth_root: Path, synth_store: Path) -> None:
    s = spairstore.open(synth_store)
    anns = sorted((synth_root / "ImageAnnotation").glob("*/*.json"))
    assert len(s) == len(anns)
    seen = set()
    for p in anns:
        a = json.loads(p.read_text())
        i = s.image_row(p.parent.name, p.stem)
        seen.add(i)
        assert s.categories[s.images.category[i]] == a["category"]
        assert s.images.name[i] == p.stem
        assert s.images.size[i].tolist() == [a["image_width"], a["image_height"]]
        assert int(s.images.depth[i]) == a["image_depth"]
        assert s.images.bbox[i].tolist() == a["bndbox"]
        assert int(s.images.azimuth[i]) == a["azimuth_id"]
        assert s.pose_names[s.images.pose[i]] == a["pose"]
        for k in ("truncated", "occluded", "difficult"):
            assert int(s.images[k][i]) == a[k]
        kps = s.images.keypoints[i]
        for k, v in a["kps"].items():
            if v is None:
                assert np.isnan(kps[int(k)]).all()
            else:
                assert kps[int(k)].tolist() == v
        jpg = synth_root / "JPEGImages" / a["category"] / a["filename"]
        png = synth_root / "Segmentation" / a["category"] / f"{p.stem}.png"
        assert s.jpeg_bytes(i) == s.image_bytes(i) == jpg.read_bytes()
        assert s.mask_bytes(i) == png.read_bytes()
        with Image.open(jpg) as im:
            np.testing.assert_array_equal(
                s.pixels(i), independent_letterbox(im.convert("RGB"), s.image_size, Image.Resampling.BILINEAR))
        with Image.open(png) as m:
            np.testing.assert_array_equal(s.mask(i), independent_letterbox(m, s.image_size, Image.Resampling.NEAREST))
    assert seen == set(range(len(s)))


def test_pair_fields_equal_source(synth_root: Path, synth_store: Path) -> None:
    s = spairstore.open(synth_store)
    for split in ("trn", "val", "test"):
        stems = (synth_root / "Layout" / "large" / f"{split}.txt").read_text().split()
        small = set((synth_root / "Layout" / "small" / f"{split}.txt").read_text().split())
        t = s.pairs(split)
        assert t.rows == len(stems)
        for j, stem in enumerate(stems):
            a = json.loads((synth_root / "PairAnnotation" / split / f"{stem}.json").read_text())
            assert t.stem[j] == stem and int(t.pair_id[j]) == a["pair_id"]
            assert s.categories[t.category[j]] == a["category"]
            for side in ("src", "trg"):
                row = int(t[side][j])
                assert (s.categories[s.images.category[row]], s.images.name[row] + ".jpg") == (
                    a["category"], a[f"{side}_imname"])
            ids, src_kps, trg_kps = s.pair_keypoints(split, j)
            assert [str(i) for i in ids] == a["kps_ids"]
            assert src_kps.tolist() == a["src_kps"] and trg_kps.tolist() == a["trg_kps"]
            n = int(t.n_kps[j])
            assert (t.kps_ids[j, n:] == -1).all() and np.isnan(t.src_kps[j, n:]).all()
            assert [int(t[k][j]) for k in ("viewpoint", "scale", "truncation", "occlusion", "mirror")] == [
                a["viewpoint_variation"], a["scale_variation"], a["truncation"], a["occlusion"], a["mirror"]]
            assert bool(t.small[j]) == (stem in small)


def test_manifest_covers_every_source_file(synth_root: Path, synth_store: Path) -> None:
    s = spairstore.open(synth_store)
    files = {p.relative_to(synth_root).as_posix(): p for p in synth_root.rglob("*") if p.is_file()}
    assert sorted(s.manifest.path) == sorted(files)
    for rel, size, digest in zip(s.manifest.path, s.manifest.size, s.manifest.sha256):
        data = files[rel].read_bytes()
        assert size == len(data) and digest == hashlib.sha256(data).hexdigest()


def test_geometry_round_trip_and_batch_read(synth_store: Path) -> None:
    s = spairstore.open(synth_store)
    i = 3
    pts = np.array([[0.0, 0.0], s.images.size[i].astype(float)])
    store_pts = s.to_store(pts, i)
    np.testing.assert_allclose(s.to_original(store_pts, i), pts, atol=1e-9)
    # the image's corners land on the edges of its letterboxed content
    assert np.isclose(store_pts[1] - store_pts[0], store_pts[1] - store_pts[0]).all()
    assert np.isclose(max(store_pts[1] - store_pts[0]), s.image_size)
    rows = [5, 1, 5, 0]
    batch = s.read("pixels", rows)
    for b, r in zip(batch, rows):
        np.testing.assert_array_equal(b, s.pixels(r))


def test_store_pickles_and_reopens(synth_store: Path) -> None:
    import pickle

    s = spairstore.open(synth_store)
    s2 = pickle.loads(pickle.dumps(s))
    np.testing.assert_array_equal(s2.pixels(2), s.pixels(2))
    assert len(pickle.dumps(s)) < 1000  # only the path travels


def test_cli_synth_pack_info(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spairstore.cli import app

    r = CliRunner()
    res = r.invoke(app, ["synth", str(tmp_path / "d"), "--images-per-category", "6", "--categories", "cat,dog"])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["pack", str(tmp_path / "d"), str(tmp_path / "d.h5"), "--size", "64"])
    assert res.exit_code == 0, res.output
    assert "packed spair71k" in res.output
    res = r.invoke(app, ["info", str(tmp_path / "d.h5"), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["dataset"] == "spair71k" and info["images"] == 12 and info["image_size"] == 64
    # pack's summary names fields as info and Store.read do
    fields = {f: f"{n / 2**20:,.1f} MiB" for f, n in info["fields"].items()}
    assert "  fields: " + ", ".join(f"{f} {fields[f]}" for f in ("pixels", "mask", "image_bytes", "mask_bytes")) \
        in r.invoke(app, ["pack", str(tmp_path / "d"), str(tmp_path / "d.h5"), "--size", "64", "--overwrite"]).output
    res = r.invoke(app, ["info", str(tmp_path / "d.h5")])
    from spairstore.core.schema import FORMAT_VERSION

    assert res.exit_code == 0 and "spairstore %d.%d" % FORMAT_VERSION in res.output


def test_pack_refuses_to_replace_without_overwrite(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.h5"
    spairstore.pack(synth_root, out, size=24)
    old = out.read_bytes()
    with pytest.raises(spairstore.SpairstoreError, match="s.h5 exists; pass --overwrite"):
        spairstore.pack(synth_root, out, size=32)
    assert out.read_bytes() == old
    spairstore.pack(synth_root, out, size=32, overwrite=True)
    assert spairstore.open(out).image_size == 32
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]


def test_partial_splits_pack_and_say_so(synth_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "SPair"
    shutil.copytree(synth_root, root)
    shutil.rmtree(root / "PairAnnotation" / "trn")
    (root / "Layout" / "large" / "trn.txt").unlink()
    summary = spairstore.pack(root, tmp_path / "s.h5", size=32)
    assert "trn" not in summary.pairs and any("'trn' absent" in n for n in summary.notes)
    s = spairstore.open(tmp_path / "s.h5")
    assert s.splits == ["val", "test"] and any("trn" in n for n in s.attrs["notes"])


def test_pack_keeps_only_the_categories_asked_for(synth_root: Path, synth_store: Path, tmp_path: Path) -> None:
    from conftest import run_cli

    r = run_cli("pack", synth_root, tmp_path / "c.h5", "--size", "96", "--categories", "dog, cat")
    assert r.returncode == 0, r.stderr
    full, part = spairstore.open(synth_store), spairstore.open(tmp_path / "c.h5")
    assert part.categories == ["cat", "dog"] and part.attrs["build_config"]["categories"] == ["cat", "dog"]
    assert full.attrs["build_config"]["categories"] == "all"
    keys = list(zip(np.array(full.categories)[full.images.category], full.images.name))
    kept = [i for i, (c, _) in enumerate(keys) if c in ("cat", "dog")]
    assert len(part) == len(kept)
    for j, i in enumerate(kept):  # every value of each kept image is the full store's
        assert (part.categories[part.images.category[j]], part.images.name[j]) == keys[i]
        np.testing.assert_array_equal(part.pixels(j), full.pixels(i))
        np.testing.assert_array_equal(part.images.keypoints[j], full.images.keypoints[i])
        assert part.image_bytes(j) == full.image_bytes(i)
    for split in full.splits:
        f, p = full.pairs(split), part.pairs(split)
        rows = np.flatnonzero(np.isin(np.array(full.categories)[f.category], ["cat", "dog"]))
        np.testing.assert_array_equal(p.pair_id, f.pair_id[rows])  # the dataset's ids, not renumbered
        np.testing.assert_array_equal(p.n_kps, f.n_kps[rows])  # the table is as wide as its most keypoints
        np.testing.assert_array_equal(p.src_kps, f.src_kps[rows][:, :p.src_kps.shape[1]])
        np.testing.assert_array_equal(p.trg_kps, f.trg_kps[rows][:, :p.trg_kps.shape[1]])
        assert [keys[i] for i in f.src[rows]] == [(part.categories[part.images.category[i]], part.images.name[i])
                                                  for i in p.src]
    assert not [m for m in part.manifest.path if "aeroplane" in m] and len(part.manifest.path) < len(full.manifest.path)
    assert "--categories: kept 2 of the 3 categories (cat, dog): 16 images, trn " in r.stdout
    r = run_cli("info", tmp_path / "c.h5")
    assert "\n  dataset      spair71k (only cat, dog: pack --categories), 16 images at 96x96" in r.stdout, r.stdout
    r = run_cli("pack", synth_root, tmp_path / "x.h5", "--categories", "cat,wolf")
    assert r.returncode == 1 and r.stderr.strip().endswith(
        "--categories: no category 'wolf' in this SPair-71k root (it has aeroplane, cat, dog)"), r.stderr
    assert not (tmp_path / "x.h5").exists()
    r = run_cli("pack", synth_root, tmp_path / "x.h5", "--categories", ",")
    assert r.returncode == 1 and r.stderr.strip().endswith("--categories names no category (this SPair-71k root has aeroplane, cat, dog)")
