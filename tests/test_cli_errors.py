"""What the command line says when the machine or the user gets in the way: one line on stderr, exit 1
(130 for Ctrl-C), never a traceback; and what it writes, named as written."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spairstore import cli
from tests.conftest import run_cli

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")


def one_line(res, contains: str) -> None:  # noqa: ANN001
    """Exit 1 and one error line among the progress bars (which stderr also carries), no traceback."""
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and contains in errors[0], res.stderr


@pytest.fixture(scope="module")
def featured(synth_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("cli") / "store.h5"
    shutil.copy(synth_store, p)
    assert run_cli("features", p, "--weights", "random", "--device", "cpu", "--name", "f").returncode == 0
    return p


@no_cuda
@pytest.mark.parametrize("command", [
    ["eval", "--method", "nn", "--features", "f", "--device", "cuda"],
    ["show", "--pair", "{pair}", "-o", "{tmp}/p.png", "--method", "nn", "--features", "f", "--device", "cuda"],
    ["features", "--device", "cuda", "--weights", "random", "--name", "g"],
    ["bench", "--device", "cuda", "--batch-size", "2"],
], ids=["eval", "show", "features", "bench"])
def test_cuda_without_cuda(featured: Path, tmp_path: Path, command: list[str]) -> None:
    import spairstore

    with spairstore.open(featured) as s:
        pair = str(int(s.pairs("test").pair_id[0]))
    args = [a.format(pair=pair, tmp=tmp_path) for a in command]
    one_line(run_cli(args[0], featured, *args[1:]), "device 'cuda': CUDA is not available here")


@pytest.mark.parametrize("command", [
    ["eval", "--method", "nn", "--features", "f", "-o", "{missing}/report.txt"],
    ["eval", "--method", "nn", "--features", "f", "--plot", "{missing}/plot.png"],
    ["eval", "--method", "nn", "--features", "f", "--save-predictions", "{missing}/p.npz"],
    ["show", "--pair", "{pair}", "-o", "{missing}/p.png"],
    ["compare", "identity", "nn:f", "--plot", "{missing}/c.png"],
], ids=["eval-output", "eval-plot", "eval-save-predictions", "show-output", "compare-plot"])
def test_output_into_a_missing_folder(featured: Path, tmp_path: Path, command: list[str]) -> None:
    import spairstore

    with spairstore.open(featured) as s:
        pair = str(int(s.pairs("test").pair_id[0]))
    args = [a.format(pair=pair, missing=tmp_path / "nowhere") for a in command]
    one_line(run_cli(args[0], featured, *args[1:]), f"{tmp_path / 'nowhere'}: output folder does not exist")


def test_output_into_a_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # chmod does not stop root (CI), so the folder is made read-only the way a read-only mount reports it
    from spairstore.core.errors import SpairstoreError

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path and mode & os.W_OK
                        else real(p, mode))
    with pytest.raises(SpairstoreError, match=f"^{tmp_path}: output folder is not writable$"):
        cli._output(tmp_path / "p", ".npz")


def test_show_names_the_file_it_wrote(featured: Path, tmp_path: Path) -> None:
    import spairstore

    with spairstore.open(featured) as s:
        pair = str(int(s.pairs("test").pair_id[0]))
    res = run_cli("show", featured, "--pair", pair, "-o", tmp_path / "p")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"wrote {tmp_path / 'p.png'}" and (tmp_path / "p.png").is_file()


@pytest.mark.parametrize("command", [["pack", "{root}"], ["convert", "{store}"]], ids=["pack", "convert"])
def test_zarr_into_a_folder_that_cannot_be_written(synth_root: Path, featured: Path, command: list[str]) -> None:
    # /proc refuses new entries even to root, who may write anywhere else.
    args = [a.format(root=synth_root, store=featured) for a in command]
    res = run_cli(*args, "/proc/spair.zarr")
    one_line(res, "/proc/")


@pytest.mark.parametrize("command", [["pack", "{root}"], ["convert", "{store}"]], ids=["pack", "convert"])
@pytest.mark.parametrize("target", ["results.zarr", "model.h5", "folder"])
def test_overwrite_replaces_stores_only(synth_root: Path, featured: Path, tmp_path: Path, command: list[str],
                                        target: str) -> None:
    """A folder of results or a model's .h5 where a store goes stays as it was, --overwrite or not."""
    out = tmp_path / target
    if target.endswith(".h5"):
        out.write_bytes(b"my weights")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("precious")
    args = [a.format(root=synth_root, store=featured) for a in command]
    kind = "a file" if target.endswith(".h5") else "a folder"
    res = run_cli(*args, out, "--overwrite", *(["--format", "zarr"] if target == "folder" else []))
    one_line(res, f"{out}: exists and is {kind}, not a spairstore store; a store is written only to a new path or "
                  "over another store (--overwrite): move it away or write elsewhere")
    assert (out.read_bytes() == b"my weights") if target.endswith(".h5") else \
        [p.name for p in out.iterdir()] == ["notes.txt"]
    if target == "results.zarr":  # an empty folder holds nothing to lose: replaced like a store
        (out / "notes.txt").unlink()
        assert run_cli(*args, out, "--overwrite").returncode == 0 and (out / "zarr.json").is_file()


@pytest.mark.parametrize("command", [["info"], ["eval", "--method", "identity"], ["verify"]])
def test_a_dataset_folder_where_a_store_goes(synth_root: Path, command: list[str]) -> None:
    one_line(run_cli(command[0], synth_root, *command[1:]),
             f"{synth_root}: not a store (neither an HDF5 file nor a Zarr v3 directory); it is a SPair-71k dataset "
             f"folder: pack it first (spairstore pack {synth_root} STORE.h5)")


def test_pack_with_its_two_paths_swapped(featured: Path, tmp_path: Path) -> None:
    one_line(run_cli("pack", featured, tmp_path / "new.h5"), f"{featured}: is a spairstore store, not a dataset "
             "folder: pack reads the dataset folder (SRC, first) and writes the store (OUT, second)")
    assert not (tmp_path / "new.h5").exists()
    one_line(run_cli("info", tmp_path), f"{tmp_path}: not a store (neither an HDF5 file nor a Zarr v3 directory)")


def test_predictions_pt_of_numpy_arrays(featured: Path, tmp_path: Path) -> None:
    torch.save({"1": np.zeros((3, 2))}, tmp_path / "p.pt")
    one_line(run_cli("eval", featured, "--predictions", tmp_path / "p.pt"),
             "holds objects other than tensors, numbers, lists and dicts (numpy arrays?)")


def test_memory_error_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def exhaust() -> None:
        raise MemoryError

    monkeypatch.setattr(cli, "app", exhaust)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == "error: out of memory (the store or the batch is too big for this " \
                                              "machine's RAM)"


@pytest.mark.parametrize("argv, kept", [
    (["pack", "{root}", "{tmp}/new.h5"], "{tmp}/new.h5 was not written; the images packed so far are kept: run the "
                                         "same command with --resume to continue"),
    (["pack", "{root}", "{tmp}/s.h5", "--overwrite"], "{tmp}/s.h5 is unchanged; the images packed so far are kept: "
                                                      "run the same command with --resume to continue"),
    (["pack", "{root}", "{tmp}/s.zarr"], "{tmp}/s.zarr was not written (a Zarr pack starts over)"),
    (["features", "{tmp}/s.h5"], "{tmp}/s.h5 is unchanged; the maps extracted so far are kept: run the same "
                                 "command again to resume"),
    (["convert", "{tmp}/s.h5", "{tmp}/c.zarr"], "{tmp}/c.zarr was not written; nothing of the copy was kept (a "
                                                "convert starts over)"),
], ids=["pack-hdf5", "repack-hdf5", "pack-zarr", "features", "convert"])
def test_ctrl_c_says_what_was_kept(synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str], argv: list[str], kept: str) -> None:
    import spairstore.features
    import spairstore.sources
    import spairstore.store.convert

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    spairstore.sources.pack(synth_root, tmp_path / "s.h5", size=16)  # an existing store
    monkeypatch.setattr(spairstore.sources, "pack", interrupted)
    monkeypatch.setattr(spairstore.features, "extract_features", interrupted)
    monkeypatch.setattr(spairstore.store.convert, "convert", interrupted)
    monkeypatch.setattr(sys, "argv", ["spairstore", *(a.format(root=synth_root, tmp=tmp_path) for a in argv)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted: " + kept.format(tmp=tmp_path)
