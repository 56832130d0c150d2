"""PCK evaluation: the vectorised evaluator against an independent per-pair loop, protocols, edge cases,
prediction inputs, renderings and the CLI."""
from __future__ import annotations

import csv
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import spairstore
from spairstore.core.schema import LEVELS
from spairstore.eval.evaluation import select_pairs
from spairstore.eval.methods import Identity
from spairstore.eval.predictions import PredictionsError, load_predictions
from spairstore.eval.protocols import PROTOCOLS, Protocol, ProtocolError, get_protocol, resolve_protocol

SWAP = {0: 0, 1: 2, 2: 1, 3: 3, -1: -1}


# ------------------------------------------------------------------------------------------------
# An independent implementation: one pair at a time, plain Python, straight from the definitions.
# ------------------------------------------------------------------------------------------------
def reference(store: spairstore.Store, split: str, pred: np.ndarray, proto: Protocol) -> dict:
    """The JSON-contract sections ``pck``, ``by_category``, ``by_factor``, ``controlled`` in percent."""
    t = store.pairs(split)
    rows = select_pairs(store, split, proto)
    records = []  # (category name, labels, n keypoints, [correct per alpha])
    for j in rows:
        n = int(t.n_kps[j])
        fwd = proto.direction == "src->trg"
        img = int(t.trg[j] if fwd else t.src[j])
        true = (t.trg_kps if fwd else t.src_kps)[j, :n].tolist()
        W, H = (float(v) for v in store.images.size[img])
        side = proto.square_side or 1
        fx, fy = (1.0, 1.0) if proto.frame == "original" else (side / W, side / H)
        if proto.threshold == "bbox":
            x1, y1, x2, y2 = (float(v) for v in store.images.bbox[img])
            base = max((x2 - x1) * fx, (y2 - y1) * fy)
        elif proto.threshold == "image":
            base = max(W * fx, H * fy)
        else:
            xs, ys = [p[0] * fx for p in true], [p[1] * fy for p in true]  # the padding lies in the frame
            if proto.threshold == "kp-extent-padded":
                xs, ys = xs + [-1.0], ys + [-1.0]
            base = max(max(xs) - min(xs), max(ys) - min(ys))
        counts = []
        for a in proto.alphas:
            c = 0
            for k in range(n):
                d = math.hypot((pred[j, k, 0] - true[k][0]) * fx, (pred[j, k, 1] - true[k][1]) * fy)
                c += (d <= a * base) if proto.comparison == "<=" else (d < a * base)
            counts.append(c)
        labels = {f: int(t[f][j]) for f in LEVELS}
        if not fwd:
            labels["truncation"], labels["occlusion"] = SWAP[labels["truncation"]], SWAP[labels["occlusion"]]
        records.append((store.categories[t.category[j]], labels, n, counts))

    def cells(recs: list) -> dict:
        out = {}
        for i, a in enumerate(proto.alphas):
            if not recs:
                out[f"{a:g}"] = {"per_image": None, "per_point": None}
                continue
            out[f"{a:g}"] = {"per_image": 100 * sum(r[3][i] / r[2] for r in recs) / len(recs),
                             "per_point": 100 * sum(r[3][i] for r in recs) / sum(r[2] for r in recs)}
        return out

    res = {"pck": cells(records),
           "by_category": {c: cells([r for r in records if r[0] == c]) for c in store.categories},
           "by_factor": {}, "controlled": {}}
    for f, levels in LEVELS.items():
        res["by_factor"][f] = {lv: cells([r for r in records if r[1][f] == i]) for i, lv in enumerate(levels)}
        easy = [r for r in records if all(r[1][o] == 0 for o in LEVELS if o != f)]
        res["controlled"][f] = {lv: cells([r for r in easy if r[1][f] == i]) for i, lv in enumerate(levels)}
    return res


def assert_same(got: dict, want: dict) -> None:
    """Nested dicts equal, floats to 1e-9."""
    assert set(got) == set(want), (set(got), set(want))
    for k, v in want.items():
        if isinstance(v, dict):
            assert_same(got[k], v)
        elif v is None:
            assert got[k] is None
        else:
            assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-9), k


def random_predictions(store: spairstore.Store, split: str, seed: int, direction: str = "src->trg") -> np.ndarray:
    """Predictions scattered around the truth, so every α sees both correct and wrong keypoints."""
    t = store.pairs(split)
    true = (t.trg_kps if direction == "src->trg" else t.src_kps).astype(np.float64)
    rng = np.random.default_rng(seed)
    scale = rng.choice([1.0, 5.0, 20.0, 80.0], size=true.shape[:2])[..., None]
    return true + rng.normal(size=true.shape) * scale


@pytest.fixture(scope="module")
def store(synth_store: Path) -> spairstore.Store:
    return spairstore.open(synth_store)


def copy_store(src: Path, dst: Path, edit) -> spairstore.Store:  # noqa: ANN001
    """A copy of a store with ``edit(h5py.File)`` applied."""
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        edit(f)
    return spairstore.open(dst)


# ------------------------------------------------------------------------------------------------
# Against the reference
# ------------------------------------------------------------------------------------------------
CUSTOM = [
    PROTOCOLS["spair"].replace(direction="trg->src"),
    PROTOCOLS["spair"].replace(comparison="<", alphas=(0.2, 0.1)),
    PROTOCOLS["spair"].replace(frame="square"),
    PROTOCOLS["pfwillow-legacy"].replace(frame="square", direction="trg->src"),
    PROTOCOLS["pfpascal"].replace(subsample=3, seed=7),
]


@pytest.mark.parametrize("proto", list(PROTOCOLS.values()) + CUSTOM, ids=lambda p: p.name)
def test_matches_per_pair_loop(store: spairstore.Store, proto: Protocol) -> None:
    for seed in (0, 1):
        pred = random_predictions(store, "test", seed, proto.direction)
        got = spairstore.evaluate(store, "test", pred, proto).to_dict()
        want = reference(store, "test", pred, proto)
        assert_same({k: got[k] for k in want}, want)
        # random predictions do land on both sides of the threshold
        assert 0 < got["pck"][f"{proto.alphas[0]:g}"]["per_point"] < 100


def test_identity_matches_loop_on_train_split(store: spairstore.Store) -> None:
    ident = Identity()
    rows = np.arange(store.pairs("trn").rows)
    pred = ident(store, "trn", rows)
    t = store.pairs("trn")
    for j in rows[::37]:
        for k in range(t.n_kps[j]):
            ws, hs = store.images.size[t.src[j]]
            wt, ht = store.images.size[t.trg[j]]
            x, y = t.src_kps[j, k]
            assert pred[j, k] == pytest.approx([x * wt / ws, y * ht / hs])
    got = spairstore.evaluate(store, "trn", ident, "spair").to_dict()
    assert_same({k: got[k] for k in ("pck", "by_factor")},
                {k: v for k, v in reference(store, "trn", pred, PROTOCOLS["spair"]).items() if k in ("pck", "by_factor")})


# ------------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PROTOCOLS))
def test_all_correct_and_all_wrong(store: spairstore.Store, name: str) -> None:
    t = store.pairs("test")
    true = t.trg_kps if PROTOCOLS[name].direction == "src->trg" else t.src_kps
    for pred, want in ((true, 100.0), (true + 1e6, 0.0)):
        d = spairstore.evaluate(store, "test", pred.astype(np.float64), name).to_dict()
        for a in d["pck"].values():
            assert a == {"per_image": want, "per_point": want}
        for cat in d["by_category"].values():
            assert all(v == {"per_image": want, "per_point": want} for v in cat.values())


def test_distance_exactly_at_threshold(store: spairstore.Store) -> None:
    """Offsets of exactly α·base (exact in binary: α = 0.25, 0.5, integer bboxes) are correct with <=
    and wrong with <."""
    t, im = store.pairs("test"), store.images
    b = im.bbox[t.trg].astype(np.float64)
    base = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
    assert np.all(base == np.round(base))
    for alpha in (0.25, 0.5):
        pred = t.trg_kps.astype(np.float64).copy()
        pred[..., 1] += alpha * base[:, None]  # straight down: the distance is exactly alpha * base
        le = spairstore.evaluate(store, "test", pred, PROTOCOLS["spair"].replace(alphas=(alpha,)))
        lt = spairstore.evaluate(store, "test", pred, PROTOCOLS["spair"].replace(alphas=(alpha,), comparison="<"))
        assert le.pck(alpha, "per_point") == 100.0
        assert lt.pck(alpha, "per_point") == 0.0
        # a hair inside / outside
        inside = spairstore.evaluate(store, "test", pred - [0, 1e-6], PROTOCOLS["spair"].replace(alphas=(alpha,), comparison="<"))
        assert inside.pck(alpha, "per_point") == 100.0


def test_one_keypoint_pairs(store: spairstore.Store, synth_store: Path, tmp_path: Path) -> None:
    def keep_one(f: h5py.File) -> None:
        n = f["pairs/test/n_kps"][...]
        assert n.min() >= 1
        for k in ("src_kps", "trg_kps"):
            a = f[f"pairs/test/{k}"][...]
            a[:, 1:] = np.nan
            f[f"pairs/test/{k}"][...] = a
        ids = f["pairs/test/kps_ids"][...]
        ids[:, 1:] = -1
        f["pairs/test/kps_ids"][...] = ids
        f["pairs/test/n_kps"][...] = np.ones_like(n)

    one = copy_store(synth_store, tmp_path / "one.h5", keep_one)
    for name in PROTOCOLS:
        proto = PROTOCOLS[name]
        pred = random_predictions(one, "test", 3)
        rep = spairstore.evaluate(one, "test", pred, proto)
        got = rep.to_dict()
        assert_same({k: got[k] for k in ("pck", "by_category", "by_factor", "controlled")},
                    reference(one, "test", pred, proto))
        for cells in got["pck"].values():  # one keypoint: per image == per point
            assert cells["per_image"] == pytest.approx(cells["per_point"])
        assert rep.valid.sum() == rep.pairs  # one keypoint per pair evaluated (a sampled pair may repeat)
    # one keypoint has zero extent: the keypoint-extent threshold is 0, only an exact hit counts
    t = one.pairs("test")
    exact = spairstore.evaluate(one, "test", t.trg_kps.astype(np.float64), "pfwillow")
    assert np.all(exact.base == 0) and exact.pck() == 100.0
    legacy = spairstore.evaluate(one, "test", t.trg_kps.astype(np.float64) + 0.5, "pfwillow-legacy")
    assert np.all(legacy.base == np.maximum(t.trg_kps[:, 0, 0], t.trg_kps[:, 0, 1]) + 1)


def test_pfwillow_threshold_ignores_padding(store: spairstore.Store) -> None:
    t = store.pairs("test")
    assert (t.n_kps < t.kps_ids.shape[1]).any()  # some pairs are padded
    pred = random_predictions(store, "test", 5)
    tight = spairstore.evaluate(store, "test", pred, "pfwillow")
    legacy = spairstore.evaluate(store, "test", pred, "pfwillow-legacy")
    for j in range(t.rows):
        pts = t.trg_kps[j, :t.n_kps[j]].astype(np.float64)
        assert tight.base[j] == (pts.max(0) - pts.min(0)).max()
        padded = np.vstack([pts, [[-1.0, -1.0]]])
        assert legacy.base[j] == (padded.max(0) - padded.min(0)).max()
    assert (legacy.base >= tight.base).all() and (legacy.base > tight.base).any()
    assert legacy.pck() >= tight.pck()
    # whatever sits in the padded slots of the predictions changes nothing
    junk = pred.copy()
    junk[np.arange(junk.shape[1]) >= t.n_kps[:, None]] = 0.0
    assert spairstore.evaluate(store, "test", junk, "pfwillow").to_dict()["pck"] == tight.to_dict()["pck"]


def test_nan_predictions_count_as_wrong(store: spairstore.Store) -> None:
    t = store.pairs("test")
    pred = t.trg_kps.astype(np.float64).copy()
    pred[:, 0] = np.nan
    rep = spairstore.evaluate(store, "test", pred, "spair")
    assert rep.missing == t.rows
    want = 100 * (1 - t.rows / t.n_kps.sum())
    assert rep.pck(0.1, "per_point") == pytest.approx(want)
    assert "without a prediction" in rep.to_text()


def test_trg_to_src_equals_reversed_pairs(store: spairstore.Store, synth_store: Path, tmp_path: Path) -> None:
    """trg->src on a pair is src->trg on its reverse: threshold on the source bbox, and the truncation and
    occlusion levels src/trg swap with the roles."""
    def reverse(f: h5py.File) -> None:
        g = f["pairs/trn"]
        for a, b in (("src", "trg"), ("src_kps", "trg_kps")):
            x, y = g[a][...], g[b][...]
            g[a][...], g[b][...] = y, x
        for k in ("truncation", "occlusion"):
            g[k][...] = np.array([SWAP[int(v)] for v in g[k][...]], dtype=np.int8)

    rev = copy_store(synth_store, tmp_path / "rev.h5", reverse)
    back = PROTOCOLS["spair"].replace(direction="trg->src")
    pred = random_predictions(store, "trn", 11, "trg->src")  # in the source image = the reversed pair's target
    a = spairstore.evaluate(store, "trn", pred, back).to_dict()
    b = spairstore.evaluate(rev, "trn", pred, "spair").to_dict()
    # the test can tell the levels apart
    assert a["by_factor"]["occlusion"]["src"]["0.1"] != a["by_factor"]["occlusion"]["trg"]["0.1"]
    assert spairstore.evaluate(store, "trn", Identity(), back).to_dict()["pck"] == \
        spairstore.evaluate(rev, "trn", Identity(), "spair").to_dict()["pck"]
    for k in ("pck", "by_category", "by_factor", "controlled", "counts"):
        assert a[k] == b[k], k


def test_subsample_per_category(store: spairstore.Store) -> None:
    t = store.pairs("trn")
    p = PROTOCOLS["spair"].replace(subsample=5, seed=3)
    rows = select_pairs(store, "trn", p)
    assert np.array_equal(rows, select_pairs(store, "trn", p))
    assert not np.array_equal(rows, select_pairs(store, "trn", p.replace(seed=4)))
    for c in np.unique(t.category):
        assert (t.category[rows] == c).sum() == min(5, (t.category == c).sum())
    rep = spairstore.evaluate(store, "trn", Identity(), p)
    assert rep.pairs == len(rows) and np.array_equal(rep.pair_id, t.pair_id[rows])
    assert "5 random pairs per category (seed 3)" in str(p)


# ------------------------------------------------------------------------------------------------
# Protocol records
# ------------------------------------------------------------------------------------------------
def test_protocol_records() -> None:
    p = get_protocol("spair")
    with pytest.raises(AttributeError):
        p.alphas = (0.2,)  # type: ignore[misc]
    assert p.alphas == (0.1, 0.05, 0.01) and p.threshold == "bbox" and p.comparison == "<="
    assert str(p) == ("protocol spair: src->trg, correct if distance <= alpha * max(w, h) of the target bbox, "
                      "original pixels, alpha 0.1/0.05/0.01, per image and per point, all pairs")
    back = p.replace(direction="trg->src")
    assert back.name == "spair[direction=trg->src]" and "source bbox" in str(back)
    assert get_protocol("pfpascal").alphas == (0.05, 0.1, 0.15) and get_protocol("pfpascal").threshold == "image"
    assert get_protocol(None, "pfwillow").name == "pfwillow" and get_protocol(None, "spair71k").name == "spair"
    custom = Protocol("mine", threshold="image", alphas=[0.2], aggregation=["per_point"])
    assert custom.alphas == (0.2,) and hash(custom)
    assert resolve_protocol("spair", None, alphas="0.2, 0.1", comparison=None).alphas == (0.2, 0.1)
    assert Protocol(**p.to_dict()) == p
    for bad in ({"direction": "up"}, {"threshold": "area"}, {"comparison": "=="}, {"alphas": ()},
                {"alphas": (-0.1,)}, {"aggregation": ("mean",)}, {"subsample": 0}, {"frame": "store"}):
        with pytest.raises(ProtocolError):
            Protocol("bad", **bad)
    with pytest.raises(ProtocolError, match="unknown protocol"):
        get_protocol("caltech")
    with pytest.raises(ProtocolError, match="no default protocol"):
        get_protocol(None, "mystery")
    with pytest.raises(ProtocolError, match="comma-separated"):
        resolve_protocol("spair", None, alphas="0.1,x")


def test_default_protocol_follows_dataset(synth_store: Path, tmp_path: Path) -> None:
    def as_willow(f: h5py.File) -> None:
        f.attrs["dataset"] = np.bytes_(b"pfwillow")

    willow = copy_store(synth_store, tmp_path / "w.h5", as_willow)
    t = willow.pairs("test")
    rep = spairstore.evaluate(willow, "test", t.trg_kps.astype(np.float64), None)
    assert rep.protocol.name == "pfwillow" and rep.to_dict()["protocol"]["threshold"] == "kp-extent"


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def test_prediction_inputs_agree(store: spairstore.Store, tmp_path: Path) -> None:
    import torch

    t = store.pairs("test")
    pred = random_predictions(store, "test", 9)
    per_pair = {int(pid): pred[j, :t.n_kps[j]] for j, pid in enumerate(t.pair_id)}
    np.savez(tmp_path / "p.npz", **{str(k): v for k, v in per_pair.items()})
    torch.save({k: torch.from_numpy(v) for k, v in per_pair.items()}, tmp_path / "p.pt")
    torch.save(torch.from_numpy(pred), tmp_path / "t.pt")
    np.save(tmp_path / "p.npy", pred)
    flat = np.concatenate(list(per_pair.values()))
    want = spairstore.evaluate(store, "test", pred, "spair").to_dict()["pck"]
    for source in (per_pair, flat, pred[:, :t.n_kps.max()], tmp_path / "p.npz", str(tmp_path / "p.pt"),
                   tmp_path / "t.pt", tmp_path / "p.npy"):
        assert spairstore.evaluate(store, "test", source, "spair").to_dict()["pck"] == want


def test_bad_predictions(store: spairstore.Store, tmp_path: Path) -> None:
    t = store.pairs("test")
    per_pair = {int(pid): np.zeros((t.n_kps[j], 2)) for j, pid in enumerate(t.pair_id)}
    first = int(t.pair_id[0])
    missing = dict(per_pair)
    del missing[first]
    with pytest.raises(PredictionsError, match=f"1 pair.*no prediction .first: pair {first}"):
        load_predictions(missing, store, "test")
    with pytest.raises(PredictionsError, match="not pair ids"):
        load_predictions({**per_pair, 999999: np.zeros((1, 2))}, store, "test")
    with pytest.raises(PredictionsError, match=f"pair {first} has {t.n_kps[0]} keypoints"):
        load_predictions({**per_pair, first: np.zeros((t.n_kps[0] + 1, 2))}, store, "test")
    with pytest.raises(PredictionsError, match="fits neither"):
        load_predictions(np.zeros((t.rows - 1, t.kps_ids.shape[1], 2)), store, "test")
    with pytest.raises(PredictionsError, match="keys must be pair ids"):
        load_predictions({"a": np.zeros((1, 2))}, store, "test")
    (tmp_path / "x.txt").write_text("1 2")
    with pytest.raises(PredictionsError, match="x.txt: predictions must be"):
        load_predictions(tmp_path / "x.txt", store, "test")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(PredictionsError, match="bad.npz: cannot read predictions"):
        load_predictions(tmp_path / "bad.npz", store, "test")
    with pytest.raises(PredictionsError, match="no such predictions file$"):
        load_predictions(tmp_path / "none.npz", store, "test")
    with pytest.raises(PredictionsError, match=r"^identity: no such predictions file; a method is not a file: pass "
                       r"spairstore.Identity\(\) or spairstore.NearestNeighbour\(FEATURES\) \(eval --method"):
        spairstore.evaluate(store, "test", "identity")


# ------------------------------------------------------------------------------------------------
# Renderings
# ------------------------------------------------------------------------------------------------
def test_json_contract_and_renderings(store: spairstore.Store) -> None:
    rep = spairstore.evaluate(store, "test", Identity(), "spair")
    d = json.loads(rep.to_json())
    assert d["protocol"]["name"] == "spair" and d["pairs"] == store.pairs("test").rows
    assert set(d["pck"]) == {"0.1", "0.05", "0.01"}
    assert set(d["pck"]["0.1"]) == {"per_image", "per_point"}
    assert set(d["by_category"]) == set(store.categories)
    assert set(d["by_category"]["aeroplane"]["0.1"]) == {"per_image", "per_point"}
    assert set(d["by_factor"]) == {"viewpoint", "scale", "truncation", "occlusion"}
    assert set(d["by_factor"]["viewpoint"]) == {"easy", "medium", "hard"}
    assert set(d["by_factor"]["truncation"]) == {"none", "src", "trg", "both"}
    assert set(d["controlled"]["occlusion"]) == {"none", "src", "trg", "both"}
    assert d["controlled"]["viewpoint"]["easy"] == d["controlled"]["scale"]["easy"]  # the same all-easy pairs
    assert sum(d["counts"]["by_category"].values()) == d["pairs"]
    # CSV carries the same numbers
    rows = list(csv.DictReader(io.StringIO(rep.to_csv())))
    for r in rows:
        section, g, lv, a, agg = r["section"], r["group"], r["level"], r["alpha"], r["aggregation"]
        if section in ("all", "category_mean"):
            cells = d["pck" if section == "all" else "category_mean"]
        else:
            cells = d["by_category"][lv] if section == "category" else d[{"factor": "by_factor"}.get(section, section)][g][lv]
        want = cells[a][agg]
        assert (r["pck"] == "" and want is None) or float(r["pck"]) == want
    assert len(rows) == 2 * 3 * (2 + len(store.categories) + 2 * (3 + 3 + 4 + 4))
    text, md = rep.to_text(), rep.to_markdown()
    for out in (text, md):
        assert str(rep.protocol) in out
        assert "Controlled analysis" in out and "by variation factor" in out
    assert "| | aeroplane |" in md and " aero " in text


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def cli(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """Run the console entry point in-process: ``cli(*args) -> (exit code, stdout, stderr)``."""
    from spairstore.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["spairstore", *args])
        with pytest.raises(SystemExit) as e:
            main()
        out = capsys.readouterr()
        return e.value.code or 0, out.out, out.err

    return run


def test_cli_eval_subprocess(synth_store: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "spairstore", "eval", str(synth_store), "--method", "identity",
                        "--format", "csv"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("section,group,level,alpha,aggregation,pck,pairs\nall,,all,0.1,per_image,")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spairstore", *args], capture_output=True, text=True)


def test_cli_eval_show_and_errors(synth_store: Path, tmp_path: Path, cli) -> None:  # noqa: ANN001
    rc, out, err = cli("eval", str(synth_store), "--method", "identity", "--json", "--alpha", "0.2,0.1",
                       "--direction", "trg->src", "--plot", str(tmp_path / "plot.png"))
    assert rc == 0, err
    d = json.loads(out)
    assert d["protocol"]["direction"] == "trg->src" and list(d["pck"]) == ["0.2", "0.1"]
    assert d["method"] == "identity"
    s = spairstore.open(synth_store)
    want = spairstore.evaluate(s, "test", Identity(), PROTOCOLS["spair"].replace(alphas=(0.2, 0.1), direction="trg->src"))
    assert d["pck"] == want.to_dict()["pck"]
    from PIL import Image

    with Image.open(tmp_path / "plot.png") as im:
        assert im.size[0] > 500
    pid = int(s.pairs("test").pair_id[2])
    rc, out, err = cli("show", str(synth_store), "--pair", str(pid), "--method", "identity", "-o", str(tmp_path / "p.png"))
    assert rc == 0 and "PCK@0.1" in out, err
    with Image.open(tmp_path / "p.png") as im:
        assert im.size[0] > 300
    rc, out, err = cli("show", str(synth_store), "--pair", str(pid), "-o", str(tmp_path / "gt.png"))
    assert rc == 0 and (tmp_path / "gt.png").stat().st_size > 0
    rc, out, err = cli("eval", str(synth_store), "--method", "identity", "--format", "markdown", "-o", str(tmp_path / "r.md"))
    assert rc == 0 and (tmp_path / "r.md").read_text().startswith("`spair71k test")
    for args, msg in ((["eval", str(synth_store)], "exactly one of --method and --predictions"),
                      (["eval", str(synth_store), "--method", "nn"], "needs a feature set"),
                      (["eval", str(synth_store), "--method", "nn", "--features", "none"], "no feature set 'none'"),
                      (["eval", str(synth_store), "--method", "magic"], "unknown method"),
                      (["eval", str(synth_store), "--method", "identity", "--protocol", "x"], "unknown protocol"),
                      (["eval", str(synth_store), "--method", "identity", "--comparison", "=="], "comparison"),
                      (["eval", str(synth_store), "--method", "identity", "--split", "dev"], "no split 'dev'"),
                      (["eval", str(synth_store), "--predictions", str(tmp_path / "no.npz")], "no such predictions"),
                      (["show", str(synth_store), "--pair", "99999", "-o", str(tmp_path / "x.png")], "no pair 99999")):
        rc, out, err = cli(*args)
        assert rc == 1, (args, out)
        assert msg in err and "Traceback" not in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("with_predictions", [False, True])
def test_show_title_fits_a_narrow_pair(store: spairstore.Store, tmp_path: Path, with_predictions: bool) -> None:
    """Two portrait images make a narrow picture: the title wraps onto lines that stay inside it (a clipped
    title leaves its ink at the picture's left and right edges)."""
    from PIL import Image

    from spairstore.eval.viz import show_pair

    out = tmp_path / "p.png"
    t = store.pairs("test")
    predictions = t.trg_kps[0, :t.n_kps[0]] if with_predictions else None
    show_pair(store, "test", 0, out, PROTOCOLS["spair"], predictions=predictions, method="a-long-method-name[x]",
              height=90)
    with Image.open(out) as im:
        ink = np.asarray(im.convert("L")) < 128
    title = ink[:ink.shape[0] - 90]  # the band above the images
    assert title.any() and not title[:, :3].any() and not title[:, -3:].any()
    assert title.any(axis=1).sum() > (22 if with_predictions else 11)  # more than one line of text


def test_plot_titles_fit_over_few_categories(store: spairstore.Store, tmp_path: Path) -> None:
    """The per-category panel of `eval --plot` keeps its title inside the picture however few categories
    it has (with this store's three, the old one-line title ran off the right edge)."""
    from PIL import Image

    from spairstore.eval.viz import plot_reports

    plot_reports(spairstore.evaluate(store, "test", Identity()), tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        ink = np.asarray(im.convert("L")) < 128
    assert ink[:40].any() and not ink[:40, -3:].any() and not ink[:40, :3].any()


def test_saved_predictions_are_refused_on_other_pairs_or_direction(store: spairstore.Store, tmp_path: Path) -> None:
    """save_predictions marks the file with the split's pair list and the direction; eval checks both."""
    from spairstore.eval.predictions import ABOUT_KEY

    path = spairstore.save_predictions(tmp_path / "p.npz", store, "test", Identity())
    assert not list(tmp_path.glob(".*part"))  # written beside and renamed in
    made = spairstore.evaluate(store, "test", path).provenance["predictions"]  # the file says what made it
    assert made == {"method": "identity", "spairstore": spairstore.__version__,
                    "store_fingerprint": store.fingerprint, "feature_sets": {}}
    assert spairstore.evaluate(store, "test", path).to_dict()["pck"] == \
        spairstore.evaluate(store, "test", Identity()).to_dict()["pck"]
    with np.load(path) as z:
        t = store.pairs("test")
        assert sorted(set(z.files) - {ABOUT_KEY}) == sorted(str(p) for p in t.pair_id)
        assert json.loads(str(z[ABOUT_KEY]))["pair_list_sha256"] == store.attrs["pair_list_sha256"]["test"]
    with pytest.raises(PredictionsError, match=r"p.npz: made for split 'test' of a spair71k store whose pair list "
                                               r"\(sha256 [0-9a-f]{12}\.\.\.\) is not this store's 'trn'"):
        spairstore.evaluate(store, "trn", path)
    back = spairstore.save_predictions(tmp_path / "b.npz", store, "test", Identity(), direction="trg->src")
    with pytest.raises(PredictionsError, match=r"b.npz: predictions for trg->src, evaluated as src->trg; pass "
                                               r"--direction trg->src"):
        spairstore.evaluate(store, "test", back)
    reverse = PROTOCOLS["spair"].replace(direction="trg->src")
    assert spairstore.evaluate(store, "test", back, reverse).to_dict()["pck"] == \
        spairstore.evaluate(store, "test", Identity(), reverse).to_dict()["pck"]
    with np.load(path) as z:
        np.savez(tmp_path / "bad.npz", **{**{k: z[k] for k in z.files}, ABOUT_KEY: np.array("{not json")})
    with pytest.raises(PredictionsError, match=f"bad.npz: its {ABOUT_KEY} entry is not what save_predictions writes"):
        spairstore.evaluate(store, "test", tmp_path / "bad.npz")
    with pytest.raises(PredictionsError, match=r"p.txt: predictions are saved as a .npz file"):
        spairstore.save_predictions(tmp_path / "p.txt", store, "test", Identity())

    def broken(*args: object) -> None:
        raise RuntimeError("model bug")

    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="model bug"):  # a failing method leaves the old file as it was
        spairstore.save_predictions(path, store, "test", broken)
    assert path.read_bytes() == before and not list(tmp_path.glob(".*part"))


def test_eval_saves_a_methods_predictions(synth_store: Path, tmp_path: Path) -> None:
    """`eval --method M --save-predictions F` reports M's PCK and writes F, which evaluates alike."""
    from conftest import run_cli

    r = run_cli("eval", synth_store, "--method", "identity", "--direction", "trg->src", "--save-predictions",
                tmp_path / "id", "--json")
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["method"] == f"identity, saved to {tmp_path / 'id.npz'}"
    r = run_cli("eval", synth_store, "--predictions", tmp_path / "id.npz", "--direction", "trg->src", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pck"] == made["pck"]
    r = run_cli("eval", synth_store, "--predictions", tmp_path / "id.npz")
    assert r.returncode == 1 and "predictions for trg->src, evaluated as src->trg" in r.stderr
    r = run_cli("eval", synth_store, "--predictions", tmp_path / "id.npz", "--save-predictions", tmp_path / "x.npz")
    assert r.returncode == 1 and "--save-predictions writes a method's predictions" in r.stderr


def test_results_show_one_line_as_a_repr_and_their_tables_in_a_notebook(store: spairstore.Store) -> None:
    from spairstore.eval.compare import compare
    from spairstore.eval.sensitivity import sensitivity_table

    rep = spairstore.evaluate(store, "test", spairstore.Identity())
    d = rep.to_dict()["pck"]["0.1"]
    assert repr(rep) == (f"<Report spair71k test, identity, protocol spair: {rep.pairs:,} pairs, PCK@0.1 per image "
                         f"{d['per_image']:.1f}, per point {d['per_point']:.1f}>")
    assert rep._repr_markdown_() == rep.to_markdown()  # what Jupyter shows for a bare `report`
    pred = spairstore.Identity()(store, "test", np.arange(store.pairs("test").rows))
    c = compare(store, "test", pred, pred, names=("mine", "identity"), min_pairs=1)
    assert repr(c) == f"<Comparison test, protocol spair: {rep.pairs:,} pairs, PCK@0.1 per image mine - identity 0.0 " \
                      "[0.0, 0.0], p 1.000>"
    assert c._repr_markdown_() == f"```\n{c.to_text()}\n```"
    table = sensitivity_table(store, "test", pred)
    assert repr(table).startswith("<SensitivityTable test: base, strict <, ") and len(repr(table)) < 200
    assert table._repr_markdown_() == table.to_markdown()
