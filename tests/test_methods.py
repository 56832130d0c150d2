"""Nearest-neighbour matching on a hand-made feature set that makes the match exact, so no backbone is needed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import spairstore
from spairstore.core import geometry
from spairstore.eval.methods import Identity, NearestNeighbour

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
