"""The plain PyTorch idiom: ``DataLoader(PairDataset(...), batch_size=B, shuffle=True, num_workers=k,
pin_memory=True)`` with the default collate gives, batch by batch and leaf by leaf, what the fast path
(``collate_fn=spairstore.collate``, and ``Loader``) gives for the same indices, under every start method."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from test_torchdata import ALL, assert_batches_equal
from torch.utils.data import ConcatDataset, DataLoader, Subset, default_collate

import spairstore
from spairstore import ImageDataset, Loader, PairDataset, ShardSampler
from spairstore.torch.augment import Compose, HFlip, RandomCrop


def _epoch(ds: torch.utils.data.Dataset, sampler: ShardSampler, **kw: object) -> list:
    return list(DataLoader(ds, batch_size=5, sampler=sampler, num_workers=2, pin_memory=True, **kw))


def both(samples: object) -> tuple[dict, dict]:
    """Both collate functions on the same read, in the worker: one worker start-up instead of two."""
    return default_collate(samples), spairstore.collate(samples)


@pytest.mark.parametrize("ctx", ["fork", pytest.param("spawn", marks=pytest.mark.slow),
                                 pytest.param("forkserver", marks=pytest.mark.slow)])
def test_default_collate_equals_fast_path(synth_store: Path, ctx: str) -> None:
    ds = PairDataset(synth_store, "trn", fields=ALL)
    sampler = ShardSampler(len(ds), seed=4)
    pairs = _epoch(ds, sampler, multiprocessing_context=ctx, collate_fn=both)
    assert len(pairs) == -(-len(ds) // 5)
    for plain, fast in pairs:
        assert_batches_equal(plain, fast)
        assert plain["src_kps"][~plain["kps_valid"]].isnan().all()  # padding is NaN, never a point at (0, 0)
    assert torch.cat([p["index"] for p, _ in pairs]).tolist() == list(sampler)
    loader = Loader(ds, 5, seed=4, num_workers=2, multiprocessing_context=ctx, normalize=False)
    for (plain, _), b in zip(pairs, loader, strict=True):
        assert_batches_equal(plain, b)


def test_shuffled_idiom_with_augmentation_and_images(synth_store: Path) -> None:
    """The line a new user types (shuffle=True), with augmentations; and ImageDataset likewise."""
    aug = Compose(HFlip(0.5), RandomCrop(0.5))
    ds = PairDataset(synth_store, "trn", fields=("pixels", "mask", "keypoints", "labels"), augment=aug, seed=2)
    runs = [list(DataLoader(ds, batch_size=4, shuffle=True, num_workers=w, pin_memory=True,
                            generator=torch.Generator().manual_seed(9), **kw))
            for w, kw in ((2, {}), (0, {"collate_fn": spairstore.collate}))]
    assert any(b["src_flipped"].any() for b in runs[0])
    for a, b in zip(*runs, strict=True):
        assert_batches_equal(a, b)
    images = ImageDataset(synth_store, split="test", fields=("pixels", "keypoints"))
    sampler = ShardSampler(len(images), seed=1)
    for a, b in zip(_epoch(images, sampler), _epoch(images, sampler, collate_fn=spairstore.collate), strict=True):
        assert_batches_equal(a, b)
        assert a["keypoints"][~a["keypoints_valid"]].isnan().all()


def test_wrapped_datasets_collate_alike(synth_store: Path) -> None:
    """Subset keeps the batched read; ConcatDataset falls back to single samples: the same batches."""
    ds = PairDataset(synth_store, "test", fields=("pixels", "keypoints"))
    idx = [3, 0, 5, 2]
    want = ds.fetch(idx)
    sub = next(iter(DataLoader(Subset(ds, idx), batch_size=4)))
    cat = next(iter(DataLoader(ConcatDataset([ds]), batch_size=4, sampler=idx, collate_fn=spairstore.collate)))
    for got in (sub, cat):
        assert_batches_equal(got, want)


def _slot_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("spairstore-*")}


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm: workers use fresh shared memory")
def test_worker_slots_are_reused_and_never_overwritten_while_held(synth_store: Path) -> None:
    """Batches kept alive (more than a worker's ring holds) keep their values; the ring stays bounded
    and its files are gone once the workers have exited."""
    from spairstore.torch.memory import RING

    ds = PairDataset(synth_store, "trn", fields=("pixels", "mask", "keypoints"))
    batches = [[i, (i + 7) % len(ds)] for i in range(RING * 2 + 6)]
    before = _slot_files()
    loader = DataLoader(ds, batch_sampler=batches, num_workers=2, collate_fn=spairstore.collate,
                        multiprocessing_context="fork", persistent_workers=True)
    kept = list(loader)  # every batch held: the workers may not reuse their slots
    assert 0 < len(_slot_files() - before) <= 2 * RING  # slots made on demand, at most RING a worker
    for b, idx in zip(kept, batches, strict=True):
        assert_batches_equal(b, ds.fetch(idx))
    del kept
    for _ in range(2):  # released: reused, no new files
        files = _slot_files()
        for b, idx in zip(loader, batches, strict=True):
            assert_batches_equal(b, ds.fetch(idx))
        assert _slot_files() <= files
    del loader, b
    import gc

    gc.collect()
    assert _slot_files() <= before


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm: workers use fresh shared memory")
def test_slot_files_of_killed_workers_are_swept(synth_store: Path) -> None:
    """SIGKILLed workers cannot unlink their slots; the next loader's workers remove them."""
    import signal

    ds = PairDataset(synth_store, "trn", fields=("pixels", "keypoints"))
    before = _slot_files()
    it = iter(DataLoader(ds, batch_sampler=[[i, i + 1] for i in range(8)], num_workers=2,
                         collate_fn=spairstore.collate, multiprocessing_context="fork"))
    held = [next(it) for _ in range(4)]
    workers = list(it._workers)
    for w in workers:
        os.kill(w.pid, signal.SIGKILL)
        w.join()
    left = {f for f in _slot_files() - before if int(f.split("-")[1]) in {w.pid for w in workers}}
    assert left  # what a killed worker leaves
    loader = DataLoader(ds, batch_sampler=[[0, 1]] * 4, num_workers=1, collate_fn=spairstore.collate,
                        multiprocessing_context="spawn")
    for b in loader:
        assert_batches_equal(b, ds.fetch([0, 1]))
    assert not left & _slot_files()
    for i, b in enumerate(held):  # the main process's mappings outlive the names
        assert_batches_equal(b, ds.fetch([i, i + 1]))
    del it


def _matches_schema(batch: dict, ds: torch.utils.data.Dataset, b: int) -> None:
    from spairstore.torch.batch import expected

    want = expected(ds, b)
    assert set(batch) == set(want), set(batch) ^ set(want)
    for k, (dtype, shape) in want.items():
        if dtype is bytes:
            assert isinstance(batch[k], list) and len(batch[k]) == b and all(isinstance(x, bytes) for x in batch[k]), k
        else:
            assert (batch[k].dtype, tuple(batch[k].shape)) == (dtype, shape), k


def test_batches_match_the_documented_schema(synth_store: Path, tmp_path: Path) -> None:
    import json
    import shutil

    import h5py
    import numpy as np

    store = tmp_path / "feat.h5"
    shutil.copy(synth_store, store)
    n = len(spairstore.open(store))
    with h5py.File(store, "a") as f:
        f.create_dataset("features/tiny/data", data=np.zeros((n, 4, 3, 2), np.float16))
        f.attrs["feature_sets"] = json.dumps({"tiny": {"input_size": 96, "stride": 32, "cell_offset": 0.5,
                                                        "width": 2, "height": 3, "channels": 4}})
    aug = Compose(HFlip(0.5), RandomCrop(0.5))
    cases = [PairDataset(store, "trn"), PairDataset(store, "trn", fields=ALL), PairDataset(store, "trn", augment=aug),
             PairDataset(store, "trn", fields=("keypoints", "features/tiny")), ImageDataset(store),
             ImageDataset(store, fields=("pixels", "mask", "keypoints", "image_bytes"), augment=aug)]
    for ds in cases:
        _matches_schema(ds.fetch([1, 0, 2]), ds, 3)
        _matches_schema(default_collate([ds[1], ds[0]]), ds, 2)
    assert "src_flipped" in expected_keys(cases[2]) and "src_flipped" not in expected_keys(cases[0])


def expected_keys(ds: torch.utils.data.Dataset) -> set[str]:
    from spairstore.torch.batch import expected

    return set(expected(ds, 1))


def test_readme_table_is_the_generated_one() -> None:
    from spairstore.torch.batch import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "README's batch table is stale: paste spairstore.torch.batch.markdown_table()"


def test_concat_of_stores_with_different_keypoint_slots(synth_store: Path, tmp_path: Path) -> None:
    """SPair-71k (30 slots) beside AP-10K (17): num_keypoints pads both to one width, so the plain
    DataLoader idiom stacks a ConcatDataset; each sample is its own dataset's, padded with absent slots."""
    from typer.testing import CliRunner

    from spairstore.cli import app

    root, ap = tmp_path / "AP-10K", tmp_path / "ap.h5"
    for args in (["synth", str(root), "--dataset", "ap10k", "--images-per-category", "34", "--categories", "cat"],
                 ["pack", str(root), str(ap), "--size", "96"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
    fields = ("pixels", "keypoints")
    spair, animal = PairDataset(synth_store, "test", fields), PairDataset(ap, "test", fields)
    assert (spair.num_keypoints, animal.num_keypoints) == (30, 17)
    wide = PairDataset(ap, "test", fields, num_keypoints=30)
    cat = ConcatDataset([PairDataset(synth_store, "test", fields, num_keypoints=30), wide])
    idx = [0, len(spair), 1, len(spair) + 1]
    got = next(iter(DataLoader(cat, batch_size=4, sampler=idx, num_workers=0)))
    assert got["src_kps"].shape == (4, 30, 2)
    for j, (ds, i) in enumerate(((spair, 0), (animal, 0), (spair, 1), (animal, 1))):
        want = ds[i]
        k = ds.num_keypoints
        for key in ("src_kps", "trg_kps", "kps_ids", "kps_valid"):
            torch.testing.assert_close(got[key][j][:k], want[key], equal_nan=True)
        assert not got["kps_valid"][j][k:].any() and (got["kps_ids"][j][k:] == -1).all()
        assert got["src_kps"][j][k:].isnan().all()
        assert torch.equal(got["src_pixels"][j], want["src_pixels"])
    with pytest.raises(spairstore.SpairstoreError, match="num_keypoints=10 is fewer than the store's 30"):
        PairDataset(synth_store, "test", fields, num_keypoints=10)
