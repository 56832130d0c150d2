"""On a CUDA device, the same store gives the same features, NN predictions and training run as on the CPU
(``pytest -m cuda``; every test here skips without CUDA). Tolerances allow for a different summation
order, not for a different result; TF32 convolutions are switched off where maps are compared."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, cli_env

import spairstore
from spairstore.features import extract_features

pytestmark = pytest.mark.cuda
LITE = "efficientnet-lite0"


@pytest.fixture(scope="module")
def lite_store(synth_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic store with efficientnet-lite0 maps computed on the CPU."""
    out = tmp_path_factory.mktemp("cuda") / "cpu.h5"
    shutil.copyfile(synth_store, out)
    extract_features(out, backbone=LITE, batch_size=8, device="cpu")
    return out


def _close_maps(a: np.ndarray, b: np.ndarray) -> None:
    a, b = a.astype(np.float32), b.astype(np.float32)
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-2 * float(np.abs(a).max()))
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9999


@pytest.mark.parametrize("backbone, weights, input_size", [(LITE, None, None), ("dinov2-vits14", "random", 112)])
def test_features_on_cuda_match_the_cpu(synth_store: Path, tmp_path: Path, backbone: str, weights: str | None,
                                        input_size: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    # cuDNN's default TF32 convolutions round inputs to 10 mantissa bits: through efficientnet-lite0 that is
    # ~2 % of the largest value, which would hide a real difference; full fp32 makes it a like-for-like test
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    stores = {dev: tmp_path / f"{dev}.h5" for dev in ("cpu", "cuda")}
    for dev, path in stores.items():
        shutil.copyfile(synth_store, path)
        extract_features(path, backbone=backbone, weights=weights, input_size=input_size, batch_size=8, device=dev)
    cpu, gpu = (spairstore.open(p) for p in stores.values())
    assert cpu.feature_sets[backbone] == gpu.feature_sets[backbone]  # same geometry and provenance
    rows = np.arange(len(cpu))
    _close_maps(cpu.read(f"features/{backbone}", rows), gpu.read(f"features/{backbone}", rows))


def test_nn_on_cuda_predicts_as_on_the_cpu(lite_store: Path) -> None:
    store = spairstore.open(lite_store)
    rows = np.arange(store.pairs("test").rows)
    cpu = spairstore.NearestNeighbour(LITE, device="cpu")(store, "test", rows)
    gpu = spairstore.NearestNeighbour(LITE, device="cuda")(store, "test", rows)
    same = np.isclose(cpu, gpu, atol=1e-3).all(-1) | np.isnan(cpu).all(-1)
    assert same.mean() > 0.99  # a near-tie between two cells may flip on a different summation order
    a = spairstore.evaluate(store, "test", spairstore.NearestNeighbour(LITE, device="cpu")).pck(0.1)
    b = spairstore.evaluate(store, "test", spairstore.NearestNeighbour(LITE, device="cuda")).pck(0.1)
    assert abs(a - b) <= 1.0


def test_train_head_runs_on_cuda(lite_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(REPO / "examples" / "train_head.py"), str(lite_store), "--features", LITE,
                        "--out", str(out), "--epochs", "1", "--max-steps", "3", "--batch-size", "4", "--hidden", "32",
                        "--device", "cuda"], check=False, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["device"].startswith("cuda") and m["steps"] == 3
    head = spairstore.load_head(out / "head.pt")
    assert next(head.parameters()).device.type == "cpu"  # a saved head loads anywhere


def test_saving_a_head_leaves_it_on_its_device(lite_store: Path, tmp_path: Path) -> None:
    import torch

    geom = spairstore.open(lite_store).feature_sets[LITE]
    head = torch.nn.Conv2d(int(geom["channels"]), 8, 1).cuda()
    spairstore.save_head(head, tmp_path / "h.pt", features=LITE, geometry=geom)
    assert head.weight.is_cuda and spairstore.load_head(tmp_path / "h.pt").in_channels == geom["channels"]
