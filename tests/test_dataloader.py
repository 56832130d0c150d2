"""The plain PyTorch idiom: ``DataLoader(PairDataset(...), batch_size=B, shuffle=True, num_workers=k,
pin_memory=True)`` with the default collate gives, batch by batch and leaf by leaf, what the fast path
(``collate_fn=spairstore.collate``, and ``Loader``) gives for the same indices, under every start method."""
from __future__ import annotations

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
