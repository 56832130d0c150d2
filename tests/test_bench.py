"""`spairstore bench` runs end to end on a small store (no timings are asserted)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import spairstore
from spairstore import PairDataset, SpairstoreError
from spairstore.cli import app
from spairstore.torch.bench import run, smaps_memory


def test_bench_compares_identical_batches(synth_store: Path, synth_root: Path) -> None:
    r = run(synth_store, synth_root, batch_size=4, batches=2, workers=0, rounds=1, progress=False)
    assert r.identical is True  # the raw-file loader, the memmap copy and the store read the same pixels
    assert set(r.seconds) == {"single"} and set(r.seconds["single"]) == {"raw", "memmap", "store"}
    assert all(v["wall"] > 0 and v["cpu"] >= 0 for v in r.seconds["single"].values())
    assert set(r.ratios("single", "cpu")) == {"store_vs_memmap", "store_vs_raw", "memmap_vs_raw"}
    assert "raw-file, memmap and store batches identical: yes" in str(r)


def test_bench_cli_json_without_source(synth_store: Path) -> None:
    res = CliRunner().invoke(app, ["bench", str(synth_store), "--batch-size", "4", "--batches", "2", "--rounds", "1",
                                   "--workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert set(d["seconds"]["single"]) == {"memmap", "store"} and d["identical"] is None
    assert "store_vs_memmap" in d["ratios"]["single"]["wall"]


def test_bench_rejects_bad_arguments(synth_store: Path, tmp_path: Path) -> None:
    with pytest.raises(SpairstoreError, match="--source must be the SPair-71k root"):
        run(synth_store, tmp_path, workers=0, progress=False)
    with pytest.raises(SpairstoreError, match=">= 1"):
        run(synth_store, batches=0, progress=False)
    with pytest.raises(SpairstoreError, match="fewer than a batch"):
        run(synth_store, split="test", batch_size=1000, progress=False)


def test_smaps_memory_counts_store_pages_apart(synth_store: Path) -> None:
    ds = PairDataset(synth_store, "trn", fields=("pixels", "mask"))
    ds.fetch(list(range(len(ds))))
    mem = smaps_memory(spairstore.open(synth_store).path)
    assert mem["store_mapped"] > 0  # the payload pages are the store file's, mapped from the page cache
    assert 0 < mem["private"] <= mem["uss"] + mem["store_mapped"]


def test_bench_reports_loader_worker_ratios(synth_store: Path) -> None:
    r = run(synth_store, batch_size=4, batches=2, workers=2, rounds=1, memory_batches=2, progress=False)
    assert set(r.loader) == {"plain", "augment"} and set(r.loader["plain"]) == {0, 2} and set(r.loader["augment"]) == {1, 2}
    ratios = r.loader_ratios()
    assert ratios["workers_vs_one_process"] == r.loader["plain"][2] / r.loader["plain"][0]
    assert ratios["augment_2_vs_1"] == r.loader["augment"][2] / r.loader["augment"][1]
    text = str(r)
    assert "Loader, 2 workers vs one process (plain reads):" in text and "HFlip + RandomCrop, 2 workers vs 1:" in text
