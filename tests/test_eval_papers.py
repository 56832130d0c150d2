"""Evaluation as current papers report it (issue 16): the geo-aware subset, GeoAware-SC's protocol and
its sampling, the CATs/DHPF PF-WILLOW protocols, PCK†, per-keypoint PCK and the sensitivity table --
each against an independent per-pair computation written here, on the real annotations where they exist."""
from __future__ import annotations

import json
import math
from glob import glob
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED_DATA

import spairstore
from converters.spair71k import CATEGORIES, GEO_AWARE_GROUPS, flip_permutation
from spairstore.eval.evaluation import select_pairs
from spairstore.eval.methods import Identity
from spairstore.eval.protocols import Protocol, ProtocolError, get_protocol
from spairstore.eval.sensitivity import conventions, sensitivity_table


@pytest.fixture(scope="module")
def real(real_store: Path) -> spairstore.Store:
    return spairstore.open(real_store)


@pytest.fixture(scope="module")
def synth(synth_store: Path) -> spairstore.Store:
    return spairstore.open(synth_store)


def scattered(store: spairstore.Store, split: str, seed: int) -> np.ndarray:
    """Predictions around the truth: every α sees right and wrong ones, some land on other keypoints."""
    t = store.pairs(split)
    rng = np.random.default_rng(seed)
    true = t.trg_kps.astype(np.float64)
    return true + rng.normal(size=true.shape) * rng.choice([1.0, 10.0, 40.0], size=true.shape[:2])[..., None]


# ------------------------------------------------------------------------------------------------
# The geo-aware groups against the real annotations
# ------------------------------------------------------------------------------------------------
def test_geo_aware_groups_fit_the_real_annotations(real_spair_root: tuple[Path, Path]) -> None:
    _, root = real_spair_root
    assert set(GEO_AWARE_GROUPS) == set(CATEGORIES)
    never_together = set()
    for c, groups in GEO_AWARE_GROUPS.items():
        used, pairs_shown = set(), {g: 0 for g in groups}
        for f in (root / "ImageAnnotation" / c).glob("*.json"):
            kps = json.loads(f.read_text())["kps"]
            shown = {int(k) for k, v in kps.items() if v is not None}
            used |= shown
            for g in groups:
                pairs_shown[g] += len(shown & set(g)) >= 2
        slots = [k for g in groups for k in g]
        assert len(slots) == len(set(slots)), f"{c}: groups overlap"
        assert set(slots) <= used, f"{c}: slots {sorted(set(slots) - used)} never annotated"
        perm = flip_permutation(c)
        for g in groups:
            assert len(g) >= 2 and {perm[k] for k in g} == set(g), f"{c}: group {g} is not closed under the flip"
            if not pairs_shown[g]:
                never_together.add((c, g))
    # front and back parts (licence plates, a boat's lower front/side, a train's back): no real image shows
    # two at once, so these groups never make a keypoint geo-aware -- as in GeoAware-SC's own table
    assert never_together == {("boat", (7, 8)), ("boat", (9, 10)), ("bus", (4, 7)), ("car", (4, 8)),
                              ("car", (5, 9)), ("train", (6, 7))}


def geo_reference(root: Path, store: spairstore.Store, pred: np.ndarray, alpha: float) -> tuple[int, int, int, float]:
    """Per pair from the pair JSON and the target's image JSON: (pairs with a geo keypoint, geo keypoints,
    all keypoints, pooled PCK in percent with ``<``)."""
    t = store.pairs("test")
    pairs_in = n_geo = n_all = correct = 0
    for j in range(t.rows):
        stem = t.stem[j].decode() if isinstance(t.stem[j], bytes) else str(t.stem[j])
        pair = json.loads((root / "PairAnnotation" / "test" / f"{stem}.json").read_text())
        trg = json.loads((root / "ImageAnnotation" / pair["category"] / f"{pair['trg_imname'][:-4]}.json").read_text())
        shown = {int(k) for k, v in trg["kps"].items() if v is not None}
        x1, y1, x2, y2 = pair["trg_bndbox"]
        base = max(x2 - x1, y2 - y1)
        hit = False
        for m, kid in enumerate(int(k) for k in pair["kps_ids"]):
            n_all += 1
            if any(kid in g and len(shown & set(g)) >= 2 for g in GEO_AWARE_GROUPS[pair["category"]]):
                hit = True
                n_geo += 1
                tx, ty = pair["trg_kps"][m]
                correct += math.hypot(pred[j, m, 0] - tx, pred[j, m, 1] - ty) < alpha * base
        pairs_in += hit
    return pairs_in, n_geo, n_all, 100 * correct / n_geo


def test_geo_aware_subset_on_real_annotations(real: spairstore.Store, real_spair_root: tuple[Path, Path]) -> None:
    root, _ = real_spair_root
    pred = scattered(real, "test", 3)
    proto = get_protocol("geoaware").replace(keypoints="geo-aware", aggregation=("per_point",))
    rep = spairstore.evaluate(real, "test", pred, proto)
    d = rep.to_dict()
    pairs_in, n_geo, n_all, pck = geo_reference(root, real, pred, 0.1)
    assert (rep.pairs, int(rep.valid.sum())) == (pairs_in, n_geo)
    sub = d["keypoint_subset"]
    assert (sub["of_pairs"], sub["of_keypoints"]) == (real.pairs("test").rows, n_all)
    assert sub["pairs"] == pytest.approx(100 * pairs_in / 12234) and sub["keypoints"] == pytest.approx(100 * n_geo / n_all)
    assert d["pck"]["0.1"]["per_point"] == pytest.approx(pck)
    assert "geo-aware keypoints only" in str(rep.protocol) and "geo-aware subset:" in rep.to_text()
    assert set(d["by_factor"]) == {"viewpoint", "scale", "truncation", "occlusion"}  # every breakdown still there


def test_geo_aware_needs_the_groups(synth_store: Path, tmp_path: Path) -> None:
    import shutil

    import h5py

    copy = tmp_path / "old.h5"
    shutil.copy(synth_store, copy)
    with h5py.File(copy, "r+") as f:
        del f.attrs["keypoint_groups"]
        f.attrs["table_crc32"] = f.attrs["table_crc32"]
    s = spairstore.open(copy)
    with pytest.raises(spairstore.StoreError, match="no keypoint_groups attribute.*repack"):
        spairstore.evaluate(s, "test", Identity(), get_protocol("spair").replace(keypoints="geo-aware"))


# ------------------------------------------------------------------------------------------------
# GeoAware-SC's protocol and its sampling
# ------------------------------------------------------------------------------------------------
def test_geoaware_sampling_reproduces_its_draw(real: spairstore.Store, real_spair_root: tuple[Path, Path]) -> None:
    root, _ = real_spair_root
    proto = get_protocol("geoaware-sampled")
    rows = select_pairs(real, "test", proto)
    t = real.pairs("test")
    got = [str(t.stem[j].decode() if isinstance(t.stem[j], bytes) else t.stem[j]) for j in rows]
    want = []
    for c in CATEGORIES:  # GeoAware-SC's load_spair_data, one category at a time
        np.random.seed(42)
        files = sorted(glob(f"{root}/PairAnnotation/test/*:{c}.json"))
        want += [Path(files[i]).name[:-5] for i in np.random.choice(len(files), 20)]
    assert got == want
    rep = spairstore.evaluate(real, "test", Identity(), proto)
    assert rep.pairs == 360 and "with replacement" in str(proto) and "np.random.seed(42)" in str(proto)
    # per image = mean over the drawn pairs, a repeated pair counted each time it was drawn
    pred = Identity()(real, "test", np.arange(t.rows))
    fr = []
    for j in rows:
        n = int(t.n_kps[j])
        x1, y1, x2, y2 = real.images.bbox[t.trg[j]]
        d = np.hypot(*(pred[j, :n] - t.trg_kps[j, :n]).T)
        fr.append(np.mean(d < 0.1 * max(x2 - x1, y2 - y1)))
    assert rep.pck(0.1, "per_image") == pytest.approx(100 * np.mean(fr))


def test_geoaware_protocol_fields() -> None:
    p = get_protocol("geoaware")
    assert (p.comparison, p.threshold, p.aggregation[0], p.subsample) == ("<", "bbox", "per_image", None)
    assert get_protocol("geoaware-sampled").replace(aggregation=("per_point",)).aggregation == ("per_point",)
    with pytest.raises(ProtocolError, match="sampling 'numpy' is not one of rng, geoaware-sc"):
        Protocol("x", sampling="numpy")
    with pytest.raises(ProtocolError, match="square_side needs frame 'square'"):
        Protocol("x", square_side=256)


# ------------------------------------------------------------------------------------------------
# PF-WILLOW as the CATs and DHPF code compute it
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def willow(tmp_path_factory: pytest.TempPathFactory) -> spairstore.Store:
    root = SHARED_DATA / "pf-willow-real"
    if not (root / "PF-dataset").is_dir():
        pytest.skip("../shared/data/pf-willow-real is absent")
    out = tmp_path_factory.mktemp("willow") / "willow.h5"
    spairstore.pack(root, out, size=32)
    return spairstore.open(out)


def legacy_loop(store: spairstore.Store, pred_side: str, side: int, alpha: float) -> float:
    """Their dataset and evaluator, one pair at a time: points squashed to side x side, padded with
    (-1, -1) to 40 in that frame, threshold the max side of the padded extent of the image predicted in,
    ``<=``, identity predictions (the other image's squashed points), mean of per-pair PCK."""
    t = store.pairs("test")
    out = []
    for j in range(t.rows):
        n = int(t.n_kps[j])
        sq = {}
        for s, kps, img in (("src", t.src_kps, t.src), ("trg", t.trg_kps, t.trg)):
            W, H = store.images.size[img[j]]
            pts = np.full((2, 40), -1.0, dtype=np.float32)
            pts[0, :n], pts[1, :n] = kps[j, :n, 0] * (side / W), kps[j, :n, 1] * (side / H)
            sq[s] = pts
        other = "src" if pred_side == "trg" else "trg"
        thres = max(sq[pred_side].max(1) - sq[pred_side].min(1))
        d = np.sqrt(((sq[other][:, :n] - sq[pred_side][:, :n]) ** 2).sum(0))
        out.append(np.sum(d <= thres * alpha) / n * 100)
    return float(np.mean(out))


@pytest.mark.parametrize("name, pred_side, side, want", [
    ("pfwillow-cats", "src", 256, (12.60, 29.07, 45.94)),
    ("pfwillow-dhpf", "trg", 240, (12.60, 29.10, 45.97)),
])
def test_pfwillow_lineages_exactly(willow: spairstore.Store, name: str, pred_side: str, side: int,
                                   want: tuple[float, ...]) -> None:
    rep = spairstore.evaluate(willow, "test", Identity(), name)
    got = [rep.pck(a, "per_image") for a in (0.05, 0.1, 0.15)]
    assert [round(v, 2) for v in got] == list(want)
    for a, v in zip((0.05, 0.1, 0.15), got):
        assert v == pytest.approx(legacy_loop(willow, pred_side, side, a), abs=1e-9)
    assert f"squashed to {side} x {side}" in str(rep.protocol)


# ------------------------------------------------------------------------------------------------
# PCK†, per keypoint, sensitivity
# ------------------------------------------------------------------------------------------------
def test_pck_dagger_matches_loop(synth: spairstore.Store) -> None:
    pred = scattered(synth, "test", 5)
    alphas = (0.5, 0.1, 0.05)  # a wide α, so some correct predictions lie nearer another keypoint
    rep = spairstore.evaluate(synth, "test", pred, get_protocol("spair").replace(alphas=alphas), dagger=True)
    t = synth.pairs("test")
    hits = [0, 0, 0]
    hits_plain = [0, 0, 0]
    total = 0
    for j in range(t.rows):
        shown = synth.images.keypoints[t.trg[j]]
        x1, y1, x2, y2 = synth.images.bbox[t.trg[j]]
        base = max(x2 - x1, y2 - y1)
        for m in range(int(t.n_kps[j])):
            total += 1
            own = int(t.kps_ids[j, m])
            d = {k: math.dist(pred[j, m], shown[k]) for k in range(len(shown)) if np.isfinite(shown[k]).all()}
            for i, a in enumerate(alphas):
                ok = math.dist(pred[j, m], t.trg_kps[j, m]) <= a * base
                hits_plain[i] += ok
                hits[i] += ok and all(v >= d[own] for v in d.values())
    d = rep.to_dict()
    for i, a in enumerate(("0.5", "0.1", "0.05")):
        assert d["pck_dagger"][a]["per_point"] == pytest.approx(100 * hits[i] / total)
        assert d["pck"][a]["per_point"] == pytest.approx(100 * hits_plain[i] / total)
    assert hits[0] < hits_plain[0]  # some predictions sit nearer another keypoint
    assert "PCK†@0.5" in rep.to_text() and "all_dagger" in rep.to_csv()


def test_per_keypoint_matches_loop(synth: spairstore.Store) -> None:
    pred = scattered(synth, "test", 6)
    rep = spairstore.evaluate(synth, "test", pred, "spair")
    t = synth.pairs("test")
    tally: dict[tuple[str, int], list[int]] = {}
    for j in range(t.rows):
        x1, y1, x2, y2 = synth.images.bbox[t.trg[j]]
        for m in range(int(t.n_kps[j])):
            cell = tally.setdefault((synth.categories[t.category[j]], int(t.kps_ids[j, m])), [0, 0])
            cell[0] += math.dist(pred[j, m], t.trg_kps[j, m]) <= 0.1 * max(x2 - x1, y2 - y1)
            cell[1] += 1
    d = rep.per_keypoint()
    got = {(c, int(k)): (v["0.1"]["per_point"], d["counts"][c][k]) for c, ks in d["pck"].items() for k, v in ks.items()}
    assert got.keys() == tally.keys()
    for key, (hit, n) in tally.items():
        assert got[key] == (pytest.approx(100 * hit / n), n)
    assert "per keypoint slot" in rep.per_keypoint_table()


def test_sensitivity_rows_are_their_protocols(synth: spairstore.Store) -> None:
    pred = scattered(synth, "test", 7)
    table = sensitivity_table(synth, "test", pred)
    d = table.to_dict()
    assert [r["change"] for r in d["rows"]] == [c for c, _ in conventions(get_protocol("spair"))]
    assert len(d["rows"]) == 5
    for row in d["rows"]:
        proto = Protocol(**row["protocol"])
        want = spairstore.evaluate(synth, "test", pred, proto).to_dict()
        assert row["protocol_line"] == str(proto)
        for a, cells in row["pck"].items():
            assert cells["per_image"] == pytest.approx(want["pck"][a]["per_image"])
            assert cells["per_point"] == pytest.approx(want["pck"][a]["per_point"])
            assert cells["category_mean"] == pytest.approx(want["category_mean"][a]["per_image"])
    # the source-bbox row by hand: threshold from the query image's bbox
    t = synth.pairs("test")
    fr = []
    for j in range(t.rows):
        x1, y1, x2, y2 = synth.images.bbox[t.src[j]]
        n = int(t.n_kps[j])
        fr.append(np.mean(np.hypot(*(pred[j, :n] - t.trg_kps[j, :n]).T) <= 0.1 * max(x2 - x1, y2 - y1)))
    row = next(r for r in d["rows"] if r["change"] == "source bbox")
    assert row["pck"]["0.1"]["per_image"] == pytest.approx(100 * np.mean(fr))
    assert "source bbox" in table.to_text() and table.render("csv").startswith("change,alpha")


# ------------------------------------------------------------------------------------------------
# compare: paired bootstrap
# ------------------------------------------------------------------------------------------------
def per_pair_fraction(store: spairstore.Store, pred: np.ndarray, alpha: float) -> np.ndarray:
    t = store.pairs("test")
    out = []
    for j in range(t.rows):
        n = int(t.n_kps[j])
        x1, y1, x2, y2 = store.images.bbox[t.trg[j]]
        out.append(np.mean([math.dist(pred[j, m], t.trg_kps[j, m]) <= alpha * max(x2 - x1, y2 - y1) for m in range(n)]))
    return np.array(out)


def test_compare_bootstrap_matches_loop(synth: spairstore.Store) -> None:
    from spairstore.eval.compare import compare

    a, b = scattered(synth, "test", 11), scattered(synth, "test", 12)
    res = compare(synth, "test", a, b, resamples=300, seed=4, min_pairs=1).to_dict()
    fa, fb = per_pair_fraction(synth, a, 0.1), per_pair_fraction(synth, b, 0.1)
    cell = res["overall"]["all"]["0.1"]["per_image"]
    assert cell["diff"] == pytest.approx(100 * (fa.mean() - fb.mean()))
    assert (cell["a"], cell["b"]) == (pytest.approx(100 * fa.mean()), pytest.approx(100 * fb.mean()))
    rng = np.random.default_rng(4)  # the documented draw: R x P pair indices with replacement
    draws = rng.integers(0, len(fa), size=(300, len(fa)))
    boot = np.array([100 * (fa[d].mean() - fb[d].mean()) for d in draws])
    assert cell["ci"] == [pytest.approx(np.percentile(boot, 2.5)), pytest.approx(np.percentile(boot, 97.5))]
    k = min((boot <= 0).sum(), (boot >= 0).sum())
    assert cell["p"] == pytest.approx(min(1.0, 2 * (k + 1) / 301))
    t = synth.pairs("test")
    for j, c in enumerate(synth.categories):
        rows = t.category == j
        if rows.any():
            got = res["by_category"][c]["0.1"]["per_image"]["diff"]
            assert got == pytest.approx(100 * (fa[rows].mean() - fb[rows].mean()))
    assert res["resamples"] == 300 and res["seed"] == 4 and set(res["by_factor"]) >= {"viewpoint", "scale"}


def test_compare_gives_no_interval_to_a_group_of_a_few_pairs(synth: spairstore.Store, tmp_path: Path) -> None:
    from spairstore.eval.compare import MIN_PAIRS, compare

    a, b = scattered(synth, "test", 11), scattered(synth, "test", 12)
    t = synth.pairs("test")
    counts = {c: int((t.category == j).sum()) for j, c in enumerate(synth.categories) if (t.category == j).any()}
    assert max(counts.values()) < 3 <= t.rows < MIN_PAIRS  # 6 pairs, 2 per category
    for min_pairs, overall_ci, category_ci in ((3, True, False), (1, True, True), (None, False, False)):
        d = compare(synth, "test", a, b, resamples=200, min_pairs=min_pairs).to_dict()
        assert d["min_pairs"] == (min_pairs or MIN_PAIRS)
        cells = [(d["overall"]["all"], t.rows, overall_ci)] + [(d["by_category"][c], n, category_ci)
                                                              for c, n in counts.items()]
        for groups, n, has_ci in cells:
            cell = groups["0.1"]["per_image"]
            assert cell["pairs"] == n and cell["diff"] is not None
            assert (cell["ci"] != [None, None] and cell["p"] is not None) == has_ci, (n, min_pairs, cell)
    from PIL import Image

    from spairstore.eval.viz import plot_comparison

    plot_comparison(compare(synth, "test", a, b, resamples=200, min_pairs=3), tmp_path / "c.png")
    with Image.open(tmp_path / "c.png") as im:  # a row per group: overall and the categories
        assert im.size[0] == 650 and im.size[1] >= 100 * (1.2 + 0.24 * (1 + len(counts))) - 1
    text = compare(synth, "test", a, b, resamples=200, min_pairs=3).to_text()
    assert "95 % interval (none for a group of fewer than 3 pairs)" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.split()[:1] in (["all"], *(
        [c] for c in counts))}
    assert rows["all"][0] == str(t.rows) and "-" not in rows["all"][:7], rows
    for c, n in counts.items():
        assert rows[c][0] == str(n) and rows[c][4:7] == ["-", "-", "-"], rows


def test_compare_identical_is_exactly_zero(synth_store: Path, tmp_path: Path) -> None:
    from conftest import run_cli

    s = spairstore.open(synth_store)
    np.save(tmp_path / "ident.npy", Identity()(s, "test", np.arange(s.pairs("test").rows)))
    r = run_cli("compare", synth_store, "identity", tmp_path / "ident.npy", "--json", "--resamples", "50",
                "--min-pairs", "1")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for section in ("overall", "by_category"):
        for cells in d[section].values():
            for aggs in cells.values():
                for c in aggs.values():
                    assert (c["diff"], c["ci"], c["p"]) == (0.0, [0.0, 0.0], 1.0)
    r = run_cli("compare", synth_store, "identity", tmp_path / "nope.npy")
    assert r.returncode != 0 and "nope.npy: neither a method (identity, nn:FEATURES, head:PATH, MODULE:FACTORY) nor a predictions file" in r.stderr
    r = run_cli("compare", synth_store, "identity", "identity", "--resamples", "20", "--plot", tmp_path / "same")
    assert r.returncode == 0 and "20 resamples, seed 0, 95 % interval" in r.stdout
    assert r.stdout.rstrip().endswith(f"wrote {tmp_path / 'same.png'}") and (tmp_path / "same.png").stat().st_size
    for option, value, said in (("--resamples", "0", "resamples must be a positive number, got 0"),
                                ("--min-pairs", "0", "min_pairs must be a positive number, got 0"),
                                ("--confidence", "100", "confidence must be a percentage between 0 and 100, got 100.0")):
        r = run_cli("compare", synth_store, "identity", "identity", option, value)
        assert r.returncode == 1 and r.stderr.strip() == f"error: {said}", r.stderr


def test_cli_eval_paper_options(synth_store: Path, tmp_path: Path) -> None:
    from conftest import run_cli

    r = run_cli("eval", synth_store, "--method", "identity", "--protocol", "geoaware", "--subset", "geo-aware",
                "--dagger", "--per-keypoint", "--aggregation", "per-point", "--plot", tmp_path / "p.png")
    assert r.returncode == 0, r.stderr
    assert "geo-aware subset:" in r.stdout and "PCK†@0.1 per point" in r.stdout and "per keypoint slot" in r.stdout
    assert (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "p-keypoints.png").stat().st_size > 0
    r = run_cli("eval", synth_store, "--method", "identity", "--sensitivity", "--json")
    assert r.returncode == 0, r.stderr
    assert [row["change"] for row in json.loads(r.stdout)["rows"]][:2] == ["base", "strict <"]
    r = run_cli("eval", synth_store, "--method", "identity", "--subset", "left-only")
    assert r.returncode != 0 and "keypoints 'left-only' is not one of all, geo-aware" in r.stderr
    r = run_cli("eval", synth_store, "--method", "identity", "--per-keypoint", "--report", "csv")
    assert r.returncode != 0 and "--per-keypoint adds a table: use --report text, markdown or json" in r.stderr
    r = run_cli("eval", synth_store, "--method", "identity", "--sensitivity", "--dagger")
    assert r.returncode != 0 and "--sensitivity makes its own table" in r.stderr


# ------------------------------------------------------------------------------------------------
# SPair-U: unseen keypoints as their own set
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unseen_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from converters.synth import synthesize

    root = tmp_path_factory.mktemp("spairu") / "SPair-71k"
    synthesize(root, images_per_category=12, categories=["car", "cat", "dog"], seed=2, unseen=True)
    return root


def test_spair_u_round_trip(unseen_root: Path, tmp_path: Path) -> None:
    for fmt in ("h5", "zarr"):
        out = tmp_path / f"u.{fmt}"
        spairstore.pack(unseen_root, out, size=32)
        s = spairstore.open(out)
        for i, (c, name) in enumerate(zip(np.asarray(s.categories)[s.images.category], s.images.name)):
            kps = json.loads((unseen_root / "ExtraImageAnnotation" / c / f"{name}.json").read_text())["kps"]
            want = np.array([v if v is not None else [np.nan, np.nan] for v in (kps[str(k)] for k in range(30))])
            np.testing.assert_array_equal(s.images.extra_keypoints[i], want)
        files = sorted((unseen_root / "ExtraPairAnnotation" / "test").glob("*.json"))
        t = s.pairs("test-unseen")
        assert t.rows == len(files) > 0
        by_id = {int(pid): j for j, pid in enumerate(t.pair_id)}
        for f in files:
            pair = json.loads(f.read_text())
            j = by_id[pair["pair_id"]]
            ids, src, trg = s.pair_keypoints("test-unseen", j)
            assert ids.tolist() == [int(k) for k in pair["kps_ids"]] and t.stem[j] == f.stem
            np.testing.assert_array_equal(src, pair["src_kps"])
            np.testing.assert_array_equal(trg, pair["trg_kps"])
        assert set(t.stem) <= set(s.pairs("test").stem)  # a relabelling of the test pairs


def test_eval_unseen_matches_loop(unseen_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "u.h5"
    spairstore.pack(unseen_root, out, size=32)
    s = spairstore.open(out)
    proto = get_protocol("geoaware").replace(keypoint_set="unseen")
    rep = spairstore.evaluate(s, "test", Identity(), proto)
    fractions = []
    for f in sorted((unseen_root / "ExtraPairAnnotation" / "test").glob("*.json")):
        pair = json.loads(f.read_text())
        (sw, sh, _), (tw, th, _) = pair["src_imsize"], pair["trg_imsize"]
        x1, y1, x2, y2 = pair["trg_bndbox"]
        ok = [math.dist((sx * tw / sw, sy * th / sh), (tx, ty)) < 0.1 * max(x2 - x1, y2 - y1)
              for (sx, sy), (tx, ty) in zip(pair["src_kps"], pair["trg_kps"])]
        fractions.append(np.mean(ok))
    assert rep.split == "test-unseen" and rep.pairs == len(fractions)
    assert rep.pck(0.1, "per_image") == pytest.approx(100 * np.mean(fractions))
    assert "SPair-U's unseen keypoints" in str(rep.protocol)
    with pytest.raises(ProtocolError, match="geo-aware groups name annotated keypoint slots"):
        proto.replace(keypoints="geo-aware")


def test_eval_unseen_needs_the_layer(synth: spairstore.Store) -> None:
    with pytest.raises(spairstore.StoreError, match="no SPair-U layer for split 'test'.*ExtraImageAnnotation"):
        spairstore.evaluate(synth, "test", Identity(), get_protocol("spair").replace(keypoint_set="unseen"))


# ------------------------------------------------------------------------------------------------
# Test-time flip for NN (GeoAware-SC's adaptive rule and its mask-free variant)
# ------------------------------------------------------------------------------------------------
FLIP_STRIDE = 8


@pytest.fixture(scope="module")
def flip_store(synth_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic store plus random feature sets ``rand`` and ``rand-flip`` (flip_of rand, flipped)."""
    import shutil

    import h5py

    out = tmp_path_factory.mktemp("flip") / "flip.h5"
    shutil.copy(synth_store, out)
    s = spairstore.open(out)
    side = s.image_size // FLIP_STRIDE
    geom = {"input_size": s.image_size, "stride": FLIP_STRIDE, "cell_offset": 0.5, "width": side, "height": side,
            "channels": 8, "backbone": "random"}
    rng = np.random.default_rng(0)
    with h5py.File(out, "a") as f:
        for name in ("rand", "rand-flip"):
            f.create_dataset(f"features/{name}/data", data=rng.normal(size=(len(s), 8, side, side)).astype(np.float16))
        f.attrs["feature_sets"] = json.dumps({"rand": geom, "rand-flip": {**geom, "flip_of": "rand", "flipped": True}})
    return out


def flip_reference(s: spairstore.Store, split: str, rule: str) -> tuple[np.ndarray, int]:
    """One pair at a time, plain numpy: (predictions, pairs whose mirrored source won)."""
    from spairstore.core import geometry

    geom, S = s.feature_sets["rand"], s.image_size
    n = int(geom["width"])
    centres = np.array([[(c + 0.5) * FLIP_STRIDE, (r + 0.5) * FLIP_STRIDE] for r in range(n) for c in range(n)])

    def unit(name: str, i: int) -> np.ndarray:
        f = s.read(f"features/{name}", [i])[0].astype(np.float64).reshape(8, -1).T
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    def on_image(i: int) -> np.ndarray:
        lo, hi = s.images.offset[i], s.images.offset[i] + s.images.size[i] * s.images.scale[i]
        return ((centres >= lo) & (centres <= hi)).all(1)

    def fg(i: int, pts: np.ndarray) -> np.ndarray:
        m = s.read("mask", [i])[0]
        v = m[np.clip(pts[:, 1].astype(int), 0, S - 1), np.clip(pts[:, 0].astype(int), 0, S - 1)]
        return (v != 0) & (v != 255)

    def cell(p: np.ndarray) -> int:
        c = geometry.store_to_cell(p, geom, S)
        return int(c[1] * n + c[0])

    def dist(fa: np.ndarray, fb: np.ndarray, a_ok: np.ndarray, b_ok: np.ndarray) -> float:
        d = np.sqrt(np.clip(((fa[:, None, :] - fb[None, :, :]) ** 2).sum(-1), 0, None))  # (a, b) Euclidean
        if rule == "adaptive":
            a_ok = a_ok if a_ok.any() else np.ones_like(a_ok)
            b_ok = b_ok if b_ok.any() else np.ones_like(b_ok)
            return float(np.where(b_ok[None], d, np.inf).min(1)[a_ok].mean())
        dd = np.where(a_ok[:, None] & b_ok[None], d, np.inf)
        ab, ba = dd.argmin(1), dd.argmin(0)
        mutual = np.array([a_ok[i] and ba[ab[i]] == i for i in range(len(ab))])
        return float(dd.min(1)[mutual].mean()) if mutual.any() else math.inf

    t = s.pairs(split)
    out = np.full(t.src_kps.shape, np.nan)
    won = 0
    for j in range(t.rows):
        a, b, k = int(t.src[j]), int(t.trg[j]), int(t.n_kps[j])
        A, Af, B = unit("rand", a), unit("rand-flip", a), unit("rand", b)
        okb = on_image(b)
        q = s.to_store(t.src_kps[j, :k].astype(np.float64), a)
        perm = s.keypoint_flip[t.category[j]]
        ids = [int(x) for x in t.kps_ids[j, :k]]

        def predict(query: np.ndarray, B: np.ndarray = B, okb: np.ndarray = okb, b: int = b) -> np.ndarray:
            best = int(np.argmax(np.where(okb, B @ query, -np.inf)))
            return s.to_original(centres[best], b)

        for m in range(k):
            out[j, m] = predict(A[cell(q[m])])
        if rule == "adaptive":
            d0 = dist(A, B, fg(a, centres) & on_image(a), fg(b, centres) & okb)
            d1 = dist(Af, B, fg(a, centres * [-1, 1] + [S, 0]) & on_image(a), fg(b, centres) & okb)
        else:
            d0, d1 = dist(A, B, on_image(a), okb), dist(Af, B, on_image(a), okb)
        if d1 < d0:
            won += 1
            for m in range(k):
                if perm[ids[m]] in ids:  # its mirror partner is a keypoint of the pair
                    src = q[ids.index(perm[ids[m]])]
                    out[j, m] = predict(Af[cell(np.array([S - src[0], src[1]]))])
    return out, won


@pytest.mark.parametrize("rule", ["adaptive", "adaptive-mutual"])
def test_nn_flip_matches_loop(flip_store: Path, rule: str) -> None:
    from spairstore.eval.methods import NearestNeighbour

    s = spairstore.open(flip_store)
    rows = np.arange(s.pairs("trn").rows)
    got = NearestNeighbour("rand", device="cpu", batch_size=5, flip=rule)(s, "trn", rows)
    want, won = flip_reference(s, "trn", rule)
    assert 0 < won < len(rows)  # both outcomes occur
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    plain = NearestNeighbour("rand", device="cpu")(s, "trn", rows)
    assert (np.nan_to_num(got) != np.nan_to_num(plain)).any()


def test_nn_flip_needs_its_set(flip_store: Path, tmp_path: Path) -> None:
    import shutil

    import h5py

    from spairstore.eval.methods import NearestNeighbour, get_method

    s = spairstore.open(flip_store)
    for flip in (None, "adaptive"):  # the companion itself is no set to match on: its cells lie mirrored
        with pytest.raises(spairstore.StoreError, match="feature set 'rand-flip' holds the maps of the mirrored "
                                                        "images .*; match on --features rand, with --flip"):
            NearestNeighbour("rand-flip", flip=flip)(s, "trn", np.arange(2))
    other = Path(shutil.copyfile(flip_store, tmp_path / "other.h5"))
    with h5py.File(other, "a") as f:  # a store whose only set is a companion: its flip is missing
        f.attrs["feature_sets"] = json.dumps({"rand": json.loads(f.attrs["feature_sets"])["rand"]})
    with pytest.raises(spairstore.StoreError, match="needs the feature set 'rand-flip', the maps of the mirrored "
                                                    "images: run the features command that made 'rand' again"):
        NearestNeighbour("rand", flip="adaptive")(spairstore.open(other), "trn", np.arange(2))
    other = Path(shutil.copyfile(flip_store, tmp_path / "other.h5"))
    with h5py.File(other, "a") as f:  # a set named like a companion that is not one
        sets = json.loads(f.attrs["feature_sets"])
        sets["rand-flip"].pop("flip_of")
        f.attrs["feature_sets"] = json.dumps(sets)
    with pytest.raises(spairstore.StoreError, match="needs the feature set 'rand-flip' with attributes flip_of"):
        NearestNeighbour("rand", flip="adaptive")(spairstore.open(other), "trn", np.arange(2))
    with pytest.raises(spairstore.SpairstoreError, match="unknown flip rule 'always'"):
        NearestNeighbour("rand", flip="always")
    with pytest.raises(spairstore.SpairstoreError, match="--flip applies to method nn only"):
        get_method("identity", flip="adaptive")


def test_cli_flip(flip_store: Path) -> None:
    from conftest import run_cli

    r = run_cli("eval", flip_store, "--split", "trn", "--method", "nn", "--features", "rand", "--flip",
                "adaptive-mutual", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["method"] == "nn[rand,flip=adaptive-mutual]"
    r = run_cli("compare", flip_store, "nn:rand:adaptive", "nn:rand", "--split", "trn", "--resamples", "20",
                "--device", "cpu")
    assert r.returncode == 0 and "A = nn:rand:adaptive" in r.stdout, r.stderr
