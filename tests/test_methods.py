"""Nearest-neighbour matching on a hand-made feature set that makes the match exact, so no backbone is needed."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import spairstore
from spairstore.core import geometry
from spairstore.eval.methods import Identity, NearestNeighbour
from spairstore.eval.models import BatchMethod, load_head, save_head

STRIDE = 2


def cell_of(store: spairstore.Store, points: np.ndarray, rows: np.ndarray, geom: dict) -> np.ndarray:
    return geometry.store_to_cell(store.to_store(points, rows), geom, store.image_size)


@pytest.fixture(scope="module")
def feature_store(synth_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic store plus feature set ``onehot``: the cell under keypoint slot k holds one-hot(k), every
    other cell one-hot(K). Cosine NN then finds exactly the target cell of the same slot."""
    out = tmp_path_factory.mktemp("features") / "feat.h5"
    shutil.copy(synth_store, out)
    s = spairstore.open(out)
    size, K = s.image_size, s.images.keypoints.shape[1]
    geom = {"input_size": size, "stride": STRIDE, "cell_offset": 0.5, "width": size // STRIDE,
            "height": size // STRIDE, "channels": K + 1, "backbone": "onehot"}
    feats = np.zeros((len(s), K + 1, geom["height"], geom["width"]), dtype=np.float16)
    feats[:, K] = 1
    for i in range(len(s)):
        kps = s.images.keypoints[i]
        for k in np.flatnonzero(np.isfinite(kps).all(-1)):
            c, r = cell_of(s, kps[k], i, geom)
            feats[i, :, r, c] = 0
            feats[i, k, r, c] = 1
    with h5py.File(out, "a") as f:
        f.create_dataset("features/onehot/data", data=feats)
        f.attrs["feature_sets"] = json.dumps({"onehot": geom})
    return out


def expected(store: spairstore.Store, split: str, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """(predictions NN must make, mask of keypoints where it must make them): keypoints whose slot owns
    its cell alone in both images and whose target cell centre lies on the image."""
    t = store.pairs(split)
    geom = store.feature_sets["onehot"]
    a, b = (t.src, t.trg) if direction == "src->trg" else (t.trg, t.src)
    q, true = (t.src_kps, t.trg_kps) if direction == "src->trg" else (t.trg_kps, t.src_kps)

    def alone(img: np.ndarray, pts: np.ndarray) -> np.ndarray:
        out = np.zeros(pts.shape[:2], dtype=bool)
        for j in range(len(img)):
            allk = store.images.keypoints[img[j]]
            allk = allk[np.isfinite(allk).all(-1)]
            cells = [tuple(c) for c in cell_of(store, allk, img[j], geom)]
            for k in range(t.n_kps[j]):
                out[j, k] = cells.count(tuple(cell_of(store, pts[j, k], img[j], geom))) == 1
        return out

    tc = cell_of(store, np.nan_to_num(true), b[:, None], geom)
    centre = geometry.cell_to_store(tc, geom, store.image_size)
    want = store.to_original(centre, b[:, None])
    im = store.images
    lo, hi = im.offset[b][:, None], (im.offset[b] + im.size[b] * im.scale[b])[:, None]
    on = ((centre >= lo) & (centre <= hi)).all(-1)
    return want, alone(a, q) & alone(b, true) & on


@pytest.mark.parametrize("direction", ["src->trg", "trg->src"])
def test_nn_is_exact_on_onehot_features(feature_store: Path, direction: str) -> None:
    s = spairstore.open(feature_store)
    rows = np.arange(s.pairs("trn").rows)
    pred = NearestNeighbour("onehot", device="cpu", batch_size=7)(s, "trn", rows, direction)
    want, check = expected(s, "trn", direction)
    assert check.sum() > 0.8 * s.pairs("trn").n_kps.sum()
    np.testing.assert_allclose(pred[check], want[check], rtol=0, atol=1e-9)
    # the prediction is within half a cell diagonal of the truth, mapped back to original pixels
    t = s.pairs("trn")
    b = t.trg if direction == "src->trg" else t.src
    true = (t.trg_kps if direction == "src->trg" else t.src_kps).astype(np.float64)
    half_cell = STRIDE / 2 * np.sqrt(2) / s.images.scale[b].min(1)
    assert (np.linalg.norm(pred - true, axis=-1)[check] <= half_cell[:, None].repeat(true.shape[1], 1)[check] + 1e-9).all()
    pad = np.arange(true.shape[1]) >= t.n_kps[:, None]
    assert np.isnan(pred[pad]).all()


def test_nn_batch_size_does_not_matter_and_beats_identity(feature_store: Path) -> None:
    s = spairstore.open(feature_store)
    rows = np.arange(s.pairs("trn").rows)
    one = NearestNeighbour("onehot", device="cpu", batch_size=1)(s, "trn", rows)
    many = NearestNeighbour("onehot", device="cpu", batch_size=1000)(s, "trn", rows)
    np.testing.assert_array_equal(one, many)
    nn = spairstore.evaluate(s, "trn", NearestNeighbour("onehot", device="cpu"), "spair")
    ident = spairstore.evaluate(s, "trn", Identity(), "spair")
    assert nn.method == "nn[onehot]" and ident.method == "identity"
    assert nn.pck(0.05) > 90 > ident.pck(0.05) + 40
    from conftest import run_cli

    r = run_cli("eval", feature_store, "--split", "trn", "--method", "nn", "--features", "onehot", "--batch-size", "0")
    assert r.returncode == 1 and r.stderr.strip() == "error: batch size must be at least 1, got 0", r.stderr


def test_reports_record_what_the_numbers_were_made_from(feature_store: Path, tmp_path: Path) -> None:
    """Version, store fingerprint and each feature set read (backbone, geometry) are in the JSON and the header."""
    s = spairstore.open(feature_store)
    made = {"spairstore": spairstore.__version__, "store_fingerprint": s.fingerprint}
    nn = spairstore.evaluate(s, "trn", NearestNeighbour("onehot", device="cpu"), "spair")
    assert nn.to_dict()["provenance"] == {**made, "feature_sets": {"onehot": {
        "backbone": "onehot", "input_size": s.image_size, "stride": STRIDE}}}
    header = nn.to_text().split("\n\n")[0].splitlines()
    assert header[-2:] == [f"feature set onehot: onehot at {s.image_size} px, stride {STRIDE}",
                           f"spairstore {spairstore.__version__}, store fingerprint {s.fingerprint}"]
    batch = BatchMethod(lambda b: b["src_kps"], fields=("features/onehot",))
    assert list(spairstore.evaluate(s, "trn", batch).to_dict()["provenance"]["feature_sets"]) == ["onehot"]
    assert spairstore.evaluate(s, "trn", Identity()).to_dict()["provenance"] == {**made, "feature_sets": {}}
    saved = spairstore.save_predictions(tmp_path / "p.npz", s, "trn", NearestNeighbour("onehot", device="cpu"))
    again = spairstore.evaluate(s, "trn", saved, "spair")
    assert again.provenance["predictions"] == {"method": "nn[onehot]", **nn.provenance}
    assert again.to_text().split("\n\n")[0].splitlines()[-2:] == [
        "predictions made by nn[onehot] (spairstore " + spairstore.__version__ + ")",
        f"  feature set onehot: onehot at {s.image_size} px, stride {STRIDE}"]
    from spairstore.eval.compare import compare

    c = compare(s, "trn", NearestNeighbour("onehot", device="cpu"), Identity(), "spair", resamples=10)
    assert c.to_dict()["provenance"] == {**made, "a": {"feature_sets": nn.provenance["feature_sets"]},
                                         "b": {"feature_sets": {}}}
    assert f"\nA reads feature set onehot: onehot at {s.image_size} px" in c.to_text()


def test_nn_cli_and_show(feature_store: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spairstore.cli import app

    r = CliRunner().invoke(app, ["eval", str(feature_store), "--split", "trn", "--method", "nn", "--features",
                                 "onehot", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["method"] == "nn[onehot]" and d["pck"]["0.1"]["per_image"] > 90
    s = spairstore.open(feature_store)
    pid = int(s.pairs("trn").pair_id[0])
    r = CliRunner().invoke(app, ["show", str(feature_store), "--split", "trn", "--pair", str(pid), "--method", "nn",
                                 "--features", "onehot", "--device", "cpu", "-o", str(tmp_path / "nn.png")])
    assert r.exit_code == 0, r.output
    assert "PCK@0.1: 100.0%" in r.stdout


def test_nn_on_cuda_equals_cpu(feature_store: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    s = spairstore.open(feature_store)
    rows = np.arange(s.pairs("trn").rows)
    np.testing.assert_array_equal(NearestNeighbour("onehot", device="cuda")(s, "trn", rows),
                                  NearestNeighbour("onehot", device="cpu")(s, "trn", rows))


# ------------------------------------------------------------------------------------------------
# Models as methods: a transform on the stored maps, a batch predictor, a saved head.
# ------------------------------------------------------------------------------------------------

class Permute(torch.nn.Module):
    """Reorders channels: cosine similarity, and so every NN match, must not change."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("order", torch.randperm(channels, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.order]


def test_identity_and_permuting_transforms_give_the_nn_result(feature_store: Path) -> None:
    s = spairstore.open(feature_store)
    rows = np.arange(s.pairs("trn").rows)
    plain = NearestNeighbour("onehot", device="cpu", batch_size=5)(s, "trn", rows, "trg->src")
    for head in (torch.nn.Identity(), Permute(s.feature_sets["onehot"]["channels"])):
        got = NearestNeighbour("onehot", device="cpu", batch_size=5, transform=head)(s, "trn", rows, "trg->src")
        np.testing.assert_array_equal(got, plain)
    head = Permute(s.feature_sets["onehot"]["channels"]).train()
    NearestNeighbour("onehot", device="cpu", transform=head)(s, "trn", rows[:2])
    assert head.training  # the method restores the mode it found


def test_regrid_centres_follow_the_op() -> None:
    """A 2x2 average pool's cell sits at the mean of its four input centres; a 2x bilinear upsampling
    (align_corners=False) puts output cell j at input cell (j + 0.5) / 2 - 0.5."""
    g = {"input_size": 64, "stride": 4, "cell_offset": 0.5, "width": 16, "height": 16, "channels": 3}
    coarse, fine = geometry.regrid(g, 2), geometry.regrid(g, 0.5)
    assert (coarse["width"], coarse["height"], fine["width"], fine["height"]) == (8, 8, 32, 32)
    j = np.stack(np.meshgrid(np.arange(8), np.arange(8)), -1)
    four = np.stack([geometry.cell_to_store(2 * j + d, g, 128) for d in ([0, 0], [0, 1], [1, 0], [1, 1])])
    np.testing.assert_allclose(geometry.cell_to_store(j, coarse, 128), four.mean(0))
    j = np.stack(np.meshgrid(np.arange(32), np.arange(32)), -1)
    np.testing.assert_allclose(geometry.cell_to_store(j, fine, 128), geometry.cell_to_store((j + 0.5) / 2 - 0.5, g, 128))
    assert geometry.regrid(g, 1) == g
    with pytest.raises(ValueError, match="cell_stride must be positive"):
        geometry.regrid(g, 0)


def test_a_transform_that_changes_the_grid_must_declare_it(feature_store: Path) -> None:
    s = spairstore.open(feature_store)
    rows = np.arange(s.pairs("trn").rows)
    with pytest.raises(spairstore.SpairstoreError, match=r"expected \(B, C', 48, 48\) for cell_stride 1; declare"):
        NearestNeighbour("onehot", device="cpu", transform=torch.nn.AvgPool2d(2))(s, "trn", rows)
    pool = torch.nn.AvgPool2d(2)
    pool.cell_stride = 2
    # the coarser one-hot maps still match most keypoints to their slot: within a coarse cell of the truth
    pred = NearestNeighbour("onehot", device="cpu", transform=pool)(s, "trn", rows)
    assert spairstore.evaluate(s, "trn", pred, "spair").pck(0.1) > 80
    with pytest.raises(spairstore.SpairstoreError, match="transform takes 7 channels, feature set 'onehot' has 31"):
        NearestNeighbour("onehot", device="cpu", transform=torch.nn.Conv2d(7, 7, 1))(s, "trn", rows)


def gt_targets(batch: dict) -> torch.Tensor:
    return batch["trg_kps"]


@pytest.mark.parametrize("direction", ["src->trg", "trg->src"])
def test_batch_method_of_true_keypoints_scores_100(feature_store: Path, direction: str) -> None:
    s = spairstore.open(feature_store)
    proto = spairstore.get_protocol("spair").replace(direction=direction, alphas=(0.01,))
    r = spairstore.evaluate(s, "trn", BatchMethod(gt_targets, batch_size=7), proto)
    assert r.method == "gt_targets" and r.missing == 0
    assert r.pck(0.01, "per_image") == r.pck(0.01, "per_point") == 100.0
    # the source keypoints are not the answer: they score as the identity-free guess they are
    src = spairstore.evaluate(s, "trn", BatchMethod(lambda b: b["src_kps"], name="src"), proto)
    assert src.pck(0.01) < 50


def test_batch_method_sees_the_fields_it_asks_for_and_checks_its_output(feature_store: Path) -> None:
    s = spairstore.open(feature_store)
    rows = np.arange(6)
    seen = []

    def fn(batch: dict) -> np.ndarray:
        seen.append((batch["src_features/onehot"].shape, batch["src_image"].dtype))
        return batch["trg_kps"].numpy()

    pred = BatchMethod(fn, fields=("features/onehot", "pixels"), batch_size=4)(s, "trn", rows)
    t = s.pairs("trn")
    np.testing.assert_allclose(pred, t.trg_kps[rows], atol=1e-4)  # float32 store pixels and back
    assert seen == [((4, 31, 48, 48), torch.float32), ((2, 31, 48, 48), torch.float32)]
    assert BatchMethod(fn, fields="pixels").fields == ("keypoints", "pixels")  # one name as a string
    with pytest.raises(spairstore.SpairstoreError, match=r"returned shape \(4, 2\) for a batch of 4 pairs"):
        BatchMethod(lambda b: b["trg_kps"][:, 0], name="bad", batch_size=4)(s, "trn", rows)


def test_saved_head_loads_without_its_class_and_predicts_the_same(feature_store: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import cli_env

    s = spairstore.open(feature_store)
    geom = s.feature_sets["onehot"]
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Conv2d(31, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1))
    path = save_head(head, tmp_path / "head.pt", features="onehot", geometry=geom, extra={"epochs": 0})
    assert head.training  # the caller's module is not switched to eval mode by the export
    rows = np.arange(s.pairs("trn").rows)
    want = NearestNeighbour("onehot", device="cpu", transform=head)(s, "trn", rows)
    # a fresh interpreter that has never seen the head's code
    code = ("import sys, numpy as np, spairstore; from spairstore.eval.models import load_head; "
            "h = load_head(sys.argv[1]); s = spairstore.open(sys.argv[2]); "
            "p = spairstore.NearestNeighbour(h.features, device='cpu', transform=h)(s, 'trn', np.arange(s.pairs('trn').rows)); "
            "np.save(sys.argv[3], p); print(h.in_channels, h.cell_stride, h.meta['extra'])")
    r = subprocess.run([sys.executable, "-c", code, str(path), str(feature_store), str(tmp_path / "p.npy")],
                       check=False, capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "31 1.0 {'epochs': 0}"
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), want)

    from typer.testing import CliRunner

    from spairstore.cli import app

    r = CliRunner().invoke(app, ["eval", str(feature_store), "--split", "trn", "--head", str(path), "--device", "cpu",
                                 "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["method"] == "nn[onehot -> head.pt]"
    sha = hashlib.sha256(path.read_bytes()).hexdigest()  # the report ties the numbers to this head file
    assert (d["provenance"]["head"], d["provenance"]["head_sha256"]) == ("head.pt", sha)
    assert d["pck"]["0.1"]["per_image"] == spairstore.evaluate(s, "trn", want, "spair").pck(0.1)
    r = CliRunner().invoke(app, ["eval", str(feature_store), "--head", str(path), "--method", "identity"])
    assert "--head evaluates nn on the head's maps: drop --predictions and --method" in str(r.exception)
    pid = int(s.pairs("trn").pair_id[0])
    r = CliRunner().invoke(app, ["show", str(feature_store), "--split", "trn", "--pair", str(pid), "--head", str(path),
                                 "--device", "cpu", "-o", str(tmp_path / "head.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "head.png").stat().st_size > 0 and "PCK@0.1" in r.stdout



def test_a_head_reads_only_maps_of_the_network_it_was_trained_on(feature_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.h5"
    shutil.copy(feature_store, out)
    with h5py.File(out, "a") as f:
        sets, data = json.loads(f.attrs["feature_sets"]), f["features/onehot/data"][...]
        g = {**sets["onehot"], "layers": ["blocks.3"]}
        sets["onehot"] = {**g, "backbone": "/home/a/mine.py:make", "weights_sha256": "ab" * 32}
        sets["moved"] = {**g, "backbone": "/home/b/mine.py:make", "weights_sha256": "ab" * 32}  # same weights
        sets["retrained"] = {**g, "backbone": "/home/a/mine.py:make", "weights_sha256": "cd" * 32}
        sets["deeper"] = {**sets["onehot"], "layers": ["blocks.9"]}
        sets["precomputed"] = {**g, "backbone": "dift", "weights_sha256": None}
        for name in ("moved", "retrained", "deeper", "precomputed"):
            f.create_dataset(f"features/{name}/data", data=data)
        f.attrs["feature_sets"] = json.dumps(sets)
    s = spairstore.open(out)
    head = load_head(save_head(torch.nn.Conv2d(31, 31, 1), tmp_path / "head.pt", features="onehot",
                               geometry=s.feature_sets["onehot"]))
    assert head.made_by == {"backbone": "/home/a/mine.py:make", "layers": ["blocks.3"], "weights_sha256": "ab" * 32}
    rows = np.arange(6)
    want = NearestNeighbour("onehot", device="cpu", transform=head)(s, "trn", rows)
    # the same weights are the same network wherever its code lies
    np.testing.assert_array_equal(NearestNeighbour("moved", device="cpu", transform=head)(s, "trn", rows), want)
    for name, said in [("retrained", "weights_sha256 abababababab; 'retrained' has weights_sha256 cdcdcdcdcdcd"),
                       ("deeper", "layers blocks.3; 'deeper' has layers blocks.9"),
                       ("precomputed", "backbone /home/a/mine.py:make, weights_sha256 abababababab; 'precomputed' "
                                       "has backbone dift, weights_sha256 none")]:
        with pytest.raises(spairstore.SpairstoreError) as e:
            NearestNeighbour(name, device="cpu", transform=head)(s, "trn", rows)
        assert str(e.value) == (f"nn[{name} -> head.pt]: the head was trained on maps of another network than "
                                f"feature set '{name}' of {out} (trained on {said}); evaluate it on a set made with "
                                "the backbone, layers and weights it was trained on"), str(e.value)


class SoftmaxOverCells(torch.nn.Module):
    """A head whose code fixes the grid (it flattens the maps with the numbers it was built for)."""

    def __init__(self, h: int, w: int):
        super().__init__()
        self.h, self.w = h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.h * self.w).softmax(-1).reshape(x.shape[0], x.shape[1], self.h, self.w)


def test_a_saved_head_runs_on_any_grid_unless_its_code_fixes_one(feature_store: Path, tmp_path: Path) -> None:
    geom = spairstore.open(feature_store).feature_sets["onehot"]
    h, w = geom["height"], geom["width"]
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(31, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    head = load_head(save_head(conv, tmp_path / "conv.pt", features="onehot", geometry=geom))
    for shape in [(1, 31, h, w), (3, 31, 5, 7), (2, 31, 2 * h, w + 1)]:  # another store, input size, aspect
        x = torch.randn(shape)
        torch.testing.assert_close(head(x), conv(x))
    fixed = load_head(save_head(torch.nn.Sequential(torch.nn.Conv2d(31, 4, 1), SoftmaxOverCells(h, w)),
                                tmp_path / "fixed.pt", features="onehot", geometry=geom))
    assert fixed(torch.randn(2, 31, h, w)).shape == (2, 4, h, w)
    class ByLength(torch.nn.Module):  # len(x) is a Python int to torch.export: the batch is pinned to 2
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(len(x), x.shape[1], -1).reshape(x.shape)

    with pytest.raises(spairstore.SpairstoreError, match=r"len.pt: the head's code fixes the batch size .* take sizes "
                       r"from x.shape\[0\] rather than len\(x\)"):
        save_head(ByLength(), tmp_path / "len.pt", features="onehot", geometry=geom)
    assert not (tmp_path / "len.pt").exists()
    with pytest.raises(spairstore.SpairstoreError, match=rf"^fixed.pt: the head's graph runs only on maps like those "
                       rf"it was exported with, {h} x {w} cells \(Guard failed: .*\), not 5 x 7: extract the set at "
                       rf"that grid \(input_size {geom['input_size']}\) or save a head that works on any grid$"):
        fixed(torch.randn(1, 31, 5, 7))

USER_METHODS = """
import torch
from spairstore.eval.models import BatchMethod

def truth():                      # a batch predictor: fn(batch) -> (B, K, 2) store pixels
    return lambda batch: batch["trg_kps"]

class Offset(torch.nn.Module):    # a module predictor, asking for a field
    fields = ("pixels",)
    name = "offset"
    def forward(self, batch):
        assert batch["src_image"].dtype == torch.float32
        return batch["trg_kps"] + 1000.0

def method():                     # a whole method: (store, split, rows, direction) -> original pixels
    return BatchMethod(lambda b: b["trg_kps"], name="wrapped")

def broken():
    raise RuntimeError("no weights here")

def number():
    return 3

def lookup(batch):
    return batch["src_kps_typo"]   # a bug in the user's predictor

def typo():
    return lookup

class Maps(torch.nn.Module):      # a feature module (spairstore features --backbone), not a method
    input_size, stride, cell_offset = 64, 8, 0.5
    def forward(self, x):
        return x

def feature_module():
    return Maps()
"""


def test_eval_and_compare_take_a_users_method(feature_store: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spairstore.cli import app

    f = tmp_path / "mine.py"
    f.write_text(USER_METHODS)

    def run(*args: str) -> dict:
        r = CliRunner().invoke(app, [*args])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    base = ["eval", str(feature_store), "--split", "trn", "--device", "cpu", "--json", "--method"]
    d = run(*base, f"{f}:truth")
    assert d["method"] == f"{f}:truth" and d["pck"]["0.1"]["per_image"] == 100.0
    d = run(*base, f"{f}:Offset")
    assert d["method"] == "offset" and d["pck"]["0.1"]["per_image"] == 0.0
    assert run(*base, f"{f}:method")["method"] == "wrapped"
    d = run("compare", str(feature_store), f"{f}:truth", f"{f}:method", "--split", "trn", "--json")
    cell = d["overall"]["all"]["0.1"]["per_image"]
    assert (d["a"], cell["a"], cell["diff"]) == (f"{f}:truth", 100.0, 0.0)
    for factory, message in (("broken", "FACTORY() raised RuntimeError: no weights here"),
                             ("number", "FACTORY() returned int, not a method or a callable fn(batch)"),
                             ("missing", "has no callable 'missing'"),
                             ("feature_module", f"FACTORY() returned a feature module (it declares input_size, "
                              f"stride and cell_offset: images in, maps out), not a method; extract its maps with "
                              f"`spairstore features STORE --backbone {f}:feature_module --name N`")):
        r = CliRunner().invoke(app, [*base, f"{f}:{factory}"])
        assert r.exit_code != 0 and message in str(r.exception) + r.output, (factory, r.output)
    from tests.conftest import run_cli

    r = run_cli(*base, f"{f}:typo")  # the console entry point: the user's frames and one line naming them
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and err[-1] == f"error: your code raised KeyError: 'src_kps_typo' ({f}, line 25)", err
    assert f'  File "{f}", line 25, in lookup' in err and not any("spairstore/" in line for line in err), err


def test_load_head_refuses_what_is_not_a_head(tmp_path: Path) -> None:
    with pytest.raises(spairstore.SpairstoreError, match="nothing.pt: no such head file"):
        load_head(tmp_path / "nothing.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "state.pt")
    with pytest.raises(spairstore.SpairstoreError, match="state.pt: not a torch.export head file"):
        load_head(tmp_path / "state.pt")
    program = torch.export.export(torch.nn.Identity(), (torch.zeros(1, 2, 3, 3),))
    torch.export.save(program, tmp_path / "bare.pt2")
    with pytest.raises(spairstore.SpairstoreError, match="bare.pt2: exported program without a spairstore head"):
        load_head(tmp_path / "bare.pt2")
