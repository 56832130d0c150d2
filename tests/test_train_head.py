"""examples/train_head.py: a few steps on the small synthetic store; what it writes evaluates through the CLI."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, cli_env, run_cli

import spairstore
from spairstore.features import extract_features

LITE = "efficientnet-lite0"
# Three fresh interpreters (the script, eval --predictions, eval --head) and a torch.export: ~30 s.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(synth_store: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """(store with efficientnet-lite0 maps, output folder, the script's run) after 2 epochs of 3 steps."""
    tmp = tmp_path_factory.mktemp("train")
    store = tmp / "s.h5"
    shutil.copyfile(synth_store, store)
    extract_features(store, backbone=LITE, batch_size=8)
    out = tmp / "run"
    r = subprocess.run([sys.executable, str(REPO / "examples" / "train_head.py"), str(store), "--features", LITE,
                        "--out", str(out), "--epochs", "2", "--max-steps", "3", "--batch-size", "4", "--hidden", "32"],
                       check=False, capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    return store, out, r


def test_outputs_and_printed_numbers(trained: tuple[Path, Path, subprocess.CompletedProcess]) -> None:
    store, out, r = trained
    assert sorted(p.name for p in out.iterdir()) == ["head.pt", "metrics.json", "report.md", "test_predictions.npz"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 6 and [h["epoch"] for h in m["history"]] == [0, 1, 2]
    assert 0 <= m["data_wait_share"] < 1
    assert f"data wait {100 * m['data_wait_share']:.2f} % of step time" in r.stdout
    # the best epoch is the best val score, epoch 0 (the identity head) included
    assert m["history"][m["best_epoch"]]["val_pck@0.1"] == max(h["val_pck@0.1"] for h in m["history"])
    # NN's numbers are those of the plain NN method on the same features
    s = spairstore.open(store)
    nn = spairstore.evaluate(s, "test", spairstore.NearestNeighbour(LITE, device="cpu"))
    assert m["overall"]["nn"] == nn.to_dict()["pck"]
    assert m["categories"] == 3 and m["categories_better"] == sum(h > n for n, h in m["by_category"].values())
    text = (out / "report.md").read_text()
    for title in ("PCK (%) overall", "per category", "per variation factor", "viewpoint=easy", "aeroplane"):
        assert title in text


def test_predictions_file_and_head_evaluate_alike(trained: tuple[Path, Path, subprocess.CompletedProcess]) -> None:
    store, out, _ = trained
    m = json.loads((out / "metrics.json").read_text())
    r = run_cli("eval", store, "--predictions", out / "test_predictions.npz", "--json")
    assert r.returncode == 0, r.stderr
    from_file = json.loads(r.stdout)
    r = run_cli("eval", store, "--head", out / "head.pt", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    from_head = json.loads(r.stdout)
    assert from_head["method"] == f"nn[{LITE} -> head.pt]"
    r = run_cli("eval", store, "--method", f"head:{out / 'head.pt'}", "--device", "cpu", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == from_head  # compare's spelling works in eval too
    assert from_file["pck"] == from_head["pck"] == m["overall"]["head"]
    assert from_file["by_category"] == from_head["by_category"]
    r = run_cli("compare", store, f"head:{out / 'head.pt'}", out / "test_predictions.npz", "--json",
                "--resamples", "20", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    overall = json.loads(r.stdout)["overall"]
    assert [c["diff"] for cells in overall.values() for aggs in cells.values() for c in aggs.values()] == [0.0] * 6
    r = run_cli("eval", store, "--predictions", out / "head.pt")
    assert r.returncode == 1 and "head.pt: a head file (save_head), not predictions: evaluate it with " \
        "`spairstore eval STORE --head PATH` (compare: head:PATH)" in r.stderr
    s = spairstore.open(store)
    t = s.pairs("test")
    with np.load(out / "test_predictions.npz") as z:
        assert sorted(map(int, set(z.files) - {spairstore.eval.predictions.ABOUT_KEY})) == sorted(t.pair_id.tolist())
        assert all(z[str(pid)].shape == (n, 2) for pid, n in zip(t.pair_id, t.n_kps))


def test_a_head_is_evaluated_on_another_dataset_and_a_store_without_trn_is_refused(
        trained: tuple[Path, Path, subprocess.CompletedProcess], tmp_path: Path) -> None:
    from pfdata import make_pfwillow

    _, out, _ = trained
    make_pfwillow(tmp_path / "W")
    willow = tmp_path / "w.h5"
    spairstore.pack(tmp_path / "W", willow, size=64)
    r = subprocess.run([sys.executable, str(REPO / "examples" / "train_head.py"), str(willow), "--features", LITE,
                        "--out", str(tmp_path / "run")], check=False, capture_output=True, text=True, env=cli_env(),
                       timeout=120)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"{willow}: no trn or val split (the store has test); this script trains on trn, selects on val and "
        f"reports on test: train on a store that has them and evaluate the head on this one with `spairstore eval "
        f"{willow} --head DIR/head.pt` (after `spairstore features` of the same backbone here)"), r.stderr
    assert not (tmp_path / "run").exists()
    extract_features(willow, backbone=LITE, batch_size=8)  # the same network at another input size
    r = run_cli("eval", willow, "--head", out / "head.pt", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["method"], d["pairs"], d["protocol"]["name"]) == (f"nn[{LITE} -> head.pt]", 36, "pfwillow")


def test_report_breaks_ap10k_down_by_its_groups(tmp_path: Path) -> None:
    """On AP-10K (no variation factors) the report has a table per family and per subset, none per factor."""
    import importlib.util

    from spairstore.eval.methods import Identity
    from spairstore.sources import SYNTHESIZERS

    root = tmp_path / "AP-10K"
    SYNTHESIZERS["ap10k"](root, categories=["cat", "lion", "wolf"], images_per_category=34, seed=3)
    store = spairstore.pack(root, tmp_path / "ap.h5", size=32).path
    spec = importlib.util.spec_from_file_location("train_head", REPO / "examples" / "train_head.py")
    train_head = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_head)
    s = spairstore.open(store)
    t = s.pairs("test")
    nn = spairstore.evaluate(s, "test", Identity())
    ours = spairstore.evaluate(s, "test", t.trg_kps)  # the truth: 100 %
    m = train_head.comparison(nn, ours)
    assert m["by_factor"] == {} and sorted(m["by_group"]) == ["family", "subset"]
    assert sorted(m["by_group"]["family"]) == ["Canidae", "Felidae"]
    assert {k: h for k, (_, h) in m["by_group"]["subset"].items()} == {
        k: 100.0 for k, n in nn.to_dict()["counts"]["by_group"]["subset"].items() if n}
    text = train_head.report(nn, ours, {**m, "features": "f", "store": str(store), "best_epoch": 0, "steps": 0,
                                        "device": "cpu", "train_wall_s": 0.0, "train_cpu_s": 0.0, "load_average": 0.0,
                                        "data_wait_share": 0.0})
    assert "per variation factor" not in text and "per family**" in text and "| cross-species |" in text


def test_schedule_of_any_length() -> None:
    """Short runs (a smoke test of --max-steps 1, or 10 steps, which divided by zero in OneCycleLR) step
    through; long ones warm up over 10 % of the steps to the peak rate and end near zero."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("train_head", REPO / "examples" / "train_head.py")
    train_head = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_head)
    for total in (1, 2, 3, 4, 5, 10, 15, 363):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.002)
        sched = train_head.schedule(opt, 0.002, total)
        rates = []
        for _ in range(total):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert all(np.isfinite(rates)) and max(rates) <= 0.002 + 1e-12, total
    assert abs(rates.index(max(rates)) - 0.1 * 363) <= 1 and rates[-1] < 1e-5



def test_a_set_of_mirrored_maps_is_refused_in_one_line(trained: tuple[Path, Path, subprocess.CompletedProcess],
                                                       tmp_path: Path) -> None:
    """A `-flip` companion holds the maps of the mirrored images: trained on with unmirrored keypoints it
    taught the head nothing (NN 1.4 -> head 1.4 on the demo store) and said nothing."""
    from spairstore.store.feature_sets import sidecar_dir

    store = tmp_path / "s.h5"
    shutil.copyfile(trained[0], store)
    shutil.copytree(sidecar_dir(trained[0]), sidecar_dir(store))
    s = spairstore.open(store)
    g = s.feature_set(LITE)
    spairstore.add_feature_set(store, f"{LITE}-flip", lambda r: s.features(LITE, r)[..., ::-1].copy(),
                               stride=g["stride"], cell_offset=g["cell_offset"], input_size=g["input_size"],
                               flip_of=LITE)
    r = subprocess.run([sys.executable, str(REPO / "examples" / "train_head.py"), str(store), "--features",
                        f"{LITE}-flip", "--out", str(tmp_path / "run")], check=False, capture_output=True, text=True,
                       env=cli_env(), timeout=300)
    assert r.returncode == 1 and r.stderr == (f"{store}: feature set '{LITE}-flip' holds the maps of the mirrored "
                                              f"images; train on '{LITE}'\n"), r.stderr
