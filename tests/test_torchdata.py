"""PairDataset / ImageDataset / collate / ShardSampler / Loader against direct store reads."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset, DataLoader, Subset, random_split

import spairstore
from spairstore import ImageDataset, Loader, PairDataset, ShardSampler, SpairstoreError, StoreError, collate
from spairstore.torch.augment import Compose, HFlip, RandomCrop
from spairstore.torch.memory import BufferPool

ALL = ("pixels", "mask", "keypoints", "labels", "image_bytes", "mask_bytes")


def assert_batches_equal(a: dict, b: dict) -> None:
    """Equal keys, and per key equal type, dtype, shape and values (NaN equal to NaN: padded keypoints)."""
    assert a.keys() == b.keys()
    for k, x in a.items():
        y = b[k]
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, k
            if x.is_floating_point():
                assert torch.equal(x.isnan(), y.isnan()), k
                x, y = x.nan_to_num(0.0), y.nan_to_num(0.0)
            assert torch.equal(x, y), k
        else:
            assert x == y, k


def test_pair_batch_equals_direct_store_reads(synth_store: Path) -> None:
    s = spairstore.open(synth_store)
    ds = PairDataset(synth_store, "trn", fields=ALL)
    t = s.pairs("trn")
    idx = [5, 0, 5, len(ds) - 1, 3]  # a repeated pair: its images are read once, copied to both slots
    b = ds.fetch(idx)
    assert b["kps_valid"].shape[1] == s.images.keypoints.shape[1]  # padded to the store's K slots
    for j, i in enumerate(idx):
        src, trg = int(t.src[i]), int(t.trg[i])
        assert (b["index"][j], b["pair_id"][j], b["category"][j]) == (i, t.pair_id[i], t.category[i])
        assert (b["src_row"][j], b["trg_row"][j]) == (src, trg)
        for side, row in (("src", src), ("trg", trg)):
            np.testing.assert_array_equal(b[f"{side}_pixels"][j].numpy(), s.pixels(row))
            np.testing.assert_array_equal(b[f"{side}_mask"][j].numpy(), s.mask(row))
            assert b[f"{side}_image_bytes"][j] == s.image_bytes(row)
            assert b[f"{side}_mask_bytes"][j] == s.mask_bytes(row)
            np.testing.assert_array_equal(b[f"{side}_scale"][j].numpy(), s.images.scale[row])
            np.testing.assert_array_equal(b[f"{side}_offset"][j].numpy(), s.images.offset[row])
            np.testing.assert_array_equal(b[f"{side}_size"][j].numpy(), s.images.size[row])
            np.testing.assert_allclose(b[f"{side}_bbox"][j].numpy().reshape(2, 2),
                                       s.to_store(s.images.bbox[row].reshape(2, 2), row), rtol=1e-6)
        ids, src_kps, trg_kps = s.pair_keypoints("trn", i)
        n = len(ids)
        assert b["n_kps"][j] == n and b["kps_valid"][j].sum() == n and not b["kps_valid"][j, n:].any()
        np.testing.assert_array_equal(b["kps_ids"][j, :n].numpy(), ids)
        assert (b["kps_ids"][j, n:] == -1).all() and b["src_kps"][j, n:].isnan().all()  # padding is no point
        for side, row, orig in (("src", src, src_kps), ("trg", trg, trg_kps)):
            got = b[f"{side}_kps"][j, :n].numpy()
            np.testing.assert_allclose(got, s.to_store(orig, row), rtol=1e-6)
            # enough to map back: scale/offset of the batch give the original pixels again
            back = spairstore.core.geometry.to_original(got, b[f"{side}_scale"][j].numpy(), b[f"{side}_offset"][j].numpy())
            np.testing.assert_allclose(back, orig, atol=1e-3)
        for k in ("viewpoint", "scale", "truncation", "occlusion", "mirror", "flip"):
            assert b[k][j] == t[k][i]


def test_single_samples_and_collate_match_batch(synth_store: Path) -> None:
    ds = PairDataset(synth_store, "test", fields=ALL)
    idx = [2, 5, 1]
    samples = [ds[i] for i in idx]
    assert samples[0]["src_pixels"].shape == (ds.image_size, ds.image_size, 3)
    assert samples[1]["kps_valid"].sum() == samples[1]["n_kps"] and len(samples[1]["kps_ids"]) == ds.num_keypoints
    assert_batches_equal(collate(samples), ds.fetch(idx))
    batch = ds.fetch(idx)
    assert collate(batch) is batch
    read = ds.__getitems__(idx)
    assert collate(read) is read.block and len(read) == 3
    assert_batches_equal(torch.utils.data.default_collate(read), batch)
    with pytest.raises(SpairstoreError, match="empty"):
        collate([])
    with pytest.raises(TypeError, match=r"use dataset.fetch\(indices\) or spairstore.collate"):
        read["src_pixels"]


def test_image_dataset_equals_store(synth_store: Path) -> None:
    s = spairstore.open(synth_store)
    all_images = ImageDataset(synth_store, fields=("pixels", "mask", "keypoints", "image_bytes"))
    assert len(all_images) == len(s)
    test = ImageDataset(s, split="test")
    rows = np.flatnonzero(s.images.splits & (1 << s.splits.index("test")))
    np.testing.assert_array_equal(test.rows, rows)
    b = all_images.fetch([4, 0, 4])
    for j, i in enumerate([4, 0, 4]):
        np.testing.assert_array_equal(b["pixels"][j].numpy(), s.pixels(i))
        np.testing.assert_array_equal(b["mask"][j].numpy(), s.mask(i))
        assert b["image_bytes"][j] == s.image_bytes(i)
        kps = s.images.keypoints[i]
        present = np.isfinite(kps).all(axis=1)
        np.testing.assert_array_equal(b["keypoints_valid"][j].numpy(), present)
        np.testing.assert_allclose(b["keypoints"][j].numpy()[present], s.to_store(kps[present], i), rtol=1e-6)
        assert np.isnan(b["keypoints"][j].numpy()[~present]).all()
    with pytest.raises(SpairstoreError, match="pair labels"):
        ImageDataset(synth_store, fields=("labels",))


def test_features_field_reads_the_feature_set(synth_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "feat.h5"
    shutil.copy(synth_store, store)
    n = len(spairstore.open(store))
    data = np.random.default_rng(0).standard_normal((n, 4, 3, 3)).astype(np.float16)
    with h5py.File(store, "a") as f:
        f.create_dataset("features/tiny/data", data=data)
        f.attrs["feature_sets"] = json.dumps({"tiny": {"input_size": 96, "stride": 32, "cell_offset": 0.5,
                                                        "width": 3, "height": 3, "channels": 4}})
    ds = PairDataset(store, "trn", fields=("features/tiny", "keypoints"))
    b = ds.fetch([3, 1])
    s = spairstore.open(store)
    for side in ("src", "trg"):
        rows = b[f"{side}_row"].numpy()
        np.testing.assert_array_equal(b[f"{side}_features/tiny"].numpy(), s.read("features/tiny", rows))
        np.testing.assert_array_equal(b[f"{side}_features/tiny"].numpy(), data[rows])
    with pytest.raises(SpairstoreError, match="no feature set 'nope'"):
        PairDataset(store, "trn", fields=("features/nope",))
    with pytest.raises(SpairstoreError, match="features cannot follow"):
        PairDataset(store, "trn", fields=("features/tiny",), augment=RandomCrop())


def test_bad_arguments_raise_clear_errors(synth_store: Path) -> None:
    with pytest.raises(SpairstoreError, match="unknown field"):
        PairDataset(synth_store, "trn", fields=("pixels", "colour"))
    with pytest.raises(StoreError, match="no split 'train'"):
        PairDataset(synth_store, "train")
    with pytest.raises(SpairstoreError, match="rank 4"):
        ShardSampler(10, rank=4, world_size=4)
    ds = PairDataset(synth_store, "trn")
    with pytest.raises(IndexError):
        ds.fetch([len(ds)])
    if not torch.cuda.is_available():
        with pytest.raises(SpairstoreError, match="CUDA is not available"):
            Loader(ds, device="cuda")
    loader = Loader(ds, 4)
    state = loader.state_dict()
    with pytest.raises(SpairstoreError, match="batch_size"):
        Loader(ds, 5).load_state_dict(state)


@pytest.mark.parametrize("n", [0, 1, 7, 10, 33])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_every_index_exactly_once(n: int, world: int) -> None:
    for epoch in (0, 3):
        shards = []
        for rank in range(world):
            s = ShardSampler(n, seed=5, rank=rank, world_size=world)
            s.set_epoch(epoch)
            shards.append(list(s))
            assert len(s) == len(shards[-1])
        flat = [i for sh in shards for i in sh]
        assert sorted(flat) == list(range(n))  # disjoint and complete
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        padded = []
        for rank in range(world):
            s = ShardSampler(n, seed=5, rank=rank, world_size=world, pad=True)
            s.set_epoch(epoch)
            padded.append(list(s))
            assert len(s) == len(padded[-1]) == s.num_samples
        assert len({len(p) for p in padded}) == 1 and set(i for p in padded for i in p) == set(range(n))


def test_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        s = ShardSampler(50, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(1, 2) == order(1, 2) and sorted(order(1, 2)) == list(range(50))
    assert order(1, 2) != order(1, 3) and order(1, 2) != order(2, 2)
    s = ShardSampler(50, shuffle=False)
    assert list(s) == list(range(50))
    s.set_epoch(0, start=45)
    assert list(s) == [45, 46, 47, 48, 49] and len(s) == 5


def _dataloader_batches(ds: PairDataset, batches: list[list[int]], workers: int, ctx: str | None) -> list[dict]:
    return list(DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                           multiprocessing_context=ctx))


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_dataloader_workers_return_identical_batches(synth_store: Path, ctx: str) -> None:
    ds = PairDataset(synth_store, "trn", fields=ALL, augment=Compose(HFlip(0.5), RandomCrop(0.5)), seed=3)
    ds.set_epoch(2)
    batches = [[0, 5, 5, 7], [1, 2, 3], [9, 8], [11, 4, 6, 10, 12]]
    single = _dataloader_batches(ds, batches, 0, None)
    assert any(b["src_flipped"].any() for b in single)  # the augmentation did something
    for a, b in zip(single, _dataloader_batches(ds, batches, 2, ctx), strict=True):
        assert_batches_equal(a, b)


def test_loader_order_and_augmentation_independent_of_workers(synth_store: Path) -> None:
    ds = PairDataset(synth_store, "trn", fields=("pixels", "keypoints"), augment=HFlip(0.5))
    runs = {}
    for workers in (0, 2):
        loader = Loader(ds, 5, seed=7, num_workers=workers, multiprocessing_context="fork", normalize=False)
        loader.set_epoch(1)
        runs[workers] = list(loader)
    assert len(runs[0]) == len(Loader(ds, 5)) == -(-len(ds) // 5)
    for a, b in zip(runs[0], runs[2], strict=True):
        assert_batches_equal(a, b)
    order = torch.cat([b["index"] for b in runs[0]]).tolist()
    expected = ShardSampler(len(ds), seed=7)
    expected.set_epoch(1)
    assert order == list(expected)


def test_loader_resumes_mid_epoch(synth_store: Path) -> None:
    ds = PairDataset(synth_store, "trn", fields=("keypoints",))
    full = Loader(ds, 4, seed=1, drop_last=True)
    full.set_epoch(3)
    whole = [b["index"].tolist() for b in full]
    assert all(len(b) == 4 for b in whole) and len(whole) == len(full) == len(ds) // 4
    first = Loader(ds, 4, seed=1, drop_last=True)
    first.set_epoch(3)
    seen = []
    for b in first:
        seen.append(b["index"].tolist())
        if len(seen) == 3:
            state = first.state_dict()
            break
    assert state["batches"] == 3 and state["epoch"] == 3
    resumed = Loader(ds, 4, seed=1, drop_last=True)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # a checkpoint survives serialisation
    epochs = []
    for epoch in range(resumed.epoch, 5):  # the usual loop keeps the restored position
        resumed.set_epoch(epoch)
        epochs.append([b["index"].tolist() for b in resumed])
    assert epochs[0] == whole[3:] and len(epochs) == 2 and epochs[1] != whole and len(epochs[1]) == len(whole)
    assert [b["index"].tolist() for b in first] == whole[3:]  # a loop left early continues too
    # a checkpoint saved at the end of an epoch resumes at the next one: the usual loop repeats nothing
    at_end = first.state_dict()
    assert (at_end["epoch"], at_end["batches"]) == (4, 0)
    after = Loader(ds, 4, seed=1, drop_last=True)
    after.load_state_dict(at_end)
    rest = []
    for epoch in range(after.epoch, 5):
        after.set_epoch(epoch)
        rest.append([b["index"].tolist() for b in after])
    assert rest == [epochs[1]]
    assert [b["index"].tolist() for b in first] == whole  # a whole epoch looped again: from its start
    assert first.state_dict()["epoch"] == 4
    for b in first:
        break
    assert (first.state_dict()["epoch"], first.state_dict()["batches"]) == (3, 1)  # a loop left early: mid-epoch


def test_loader_normalises_pixels_on_the_device(synth_store: Path) -> None:
    ds = PairDataset(synth_store, "trn", fields=("pixels", "mask"))
    raw = next(iter(Loader(ds, 3, shuffle=False, normalize=False)))
    norm = next(iter(Loader(ds, 3, shuffle=False, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))))
    assert "src_pixels" not in norm and norm["src_image"].shape == (3, 3, ds.image_size, ds.image_size)
    expect = (raw["src_pixels"].permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) \
        / torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    torch.testing.assert_close(norm["src_image"], expect)
    assert norm["src_image"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(norm["trg_mask"], raw["trg_mask"])


@pytest.mark.cuda
@pytest.mark.parametrize("workers", [0, 2])
def test_cuda_loader_equals_cpu_loader(synth_store: Path, workers: int) -> None:
    ds = PairDataset(synth_store, "trn", fields=("pixels", "mask", "keypoints"))
    cpu = list(Loader(ds, 4, seed=2))
    gpu = list(Loader(ds, 4, seed=2, device="cuda", num_workers=workers, multiprocessing_context="fork", prefetch=1))
    for a, b in zip(cpu, gpu, strict=True):
        assert b["src_image"].is_cuda and b["src_mask"].dtype == torch.uint8
        for k in a:
            torch.testing.assert_close(a[k], b[k].cpu())


def test_buffer_pool_never_reuses_memory_in_use() -> None:
    pool = BufferPool(keep=2)
    a = pool.alloc((4, 4), torch.float32)
    a.fill_(1)
    view = a[1:].numpy()  # a derived array keeps the buffer busy
    del a
    b = pool.alloc((4, 4), torch.float32)
    b.fill_(2)
    assert (view == 1).all()
    ptr = b.data_ptr()
    del b
    assert pool.alloc((2, 4), torch.float32).data_ptr() == ptr  # free again: reused, even for a smaller batch
    del view
    c, d = pool.alloc((4, 4), torch.float32), pool.alloc((4, 4), torch.float32)  # beyond keep: plain memory
    assert len({c.data_ptr(), d.data_ptr()}) == 2


def test_dataset_pickles_without_its_store(synth_store: Path) -> None:
    import pickle

    ds = PairDataset(synth_store, "trn", fields=("pixels",))
    ds.fetch([0])
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._store is None and clone.path == ds.path
    assert_batches_equal(clone.fetch([2, 1]), ds.fetch([2, 1]))


def test_import_spairstore_does_not_import_torch() -> None:
    code = "import sys, spairstore; assert 'torch' not in sys.modules; spairstore.PairDataset; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_loader_read_ahead_surfaces_errors(synth_store: Path) -> None:
    ds = PairDataset(synth_store, "trn", fields=("pixels",))

    def broken(indices, alloc=None):
        raise StoreError("disk on fire")

    ds.fetch = broken  # type: ignore[method-assign]
    with pytest.raises(StoreError, match="disk on fire"):
        next(iter(Loader(ds, 4)))


def test_pair_dataset_over_zarr_equals_hdf5(synth_store: Path, tmp_path: Path) -> None:
    from spairstore.store.convert import convert
    from spairstore.torch.bench import run

    zarr = tmp_path / "synth.zarr"
    convert(synth_store, zarr)
    idx = [3, 0, 3, 17]
    fields = ("pixels", "mask", "keypoints", "labels", "image_bytes")
    h5, z = PairDataset(synth_store, "trn", fields=fields), PairDataset(zarr, "trn", fields=fields)
    a, b = h5.fetch(idx), z.fetch(idx)
    assert_batches_equal(a, b)
    assert_batches_equal(_dataloader_batches(z, [idx], 2, "fork")[0], a)
    r = run(zarr, batch_size=4, batches=2, workers=0, rounds=1, progress=False)  # memmap ceiling over shard files
    assert set(r.seconds["single"]) == {"memmap", "store"}


def test_one_name_per_field_old_spellings_warn(synth_store: Path) -> None:
    s = spairstore.open(synth_store)
    t = s.pairs("trn")
    assert len(t) == t.rows == len(t.pair_id) and "pair_id" in t.columns and len(t.columns) > 10
    assert list(t) == list(t.columns) == list(t.keys()) and dict(t.items())["src"] is t.src
    rows = [2, 0]
    want = s.read("pixels", rows)
    with pytest.warns(DeprecationWarning, match="'images/pixels' is now called 'pixels'"):
        np.testing.assert_array_equal(s.read("images/pixels", rows), want)
    with pytest.raises(StoreError, match="no field 'image_bytes' to read by rows; the store has pixels, mask"):
        s.read("image_bytes", rows)
    with pytest.warns(DeprecationWarning, match="'image_blob' is now called 'image_bytes'"):
        ds = PairDataset(synth_store, "trn", fields=("image_blob",))
    assert ds.fields == ("image_bytes",) and "src_image_bytes" in ds.fetch([0])
    from spairstore.cli import store_info

    info = store_info(synth_store)
    assert set(info["fields"]) == {"pixels", "mask", "image_bytes", "mask_bytes"}


def test_one_field_may_be_given_as_a_string(synth_store: Path) -> None:
    one = PairDataset(synth_store, "trn", fields="keypoints")  # not the characters of "keypoints"
    assert one.fields == ("keypoints",) == ImageDataset(synth_store, fields="keypoints").fields
    assert_batches_equal(one.fetch([0, 1]), PairDataset(synth_store, "trn", fields=("keypoints",)).fetch([0, 1]))


def test_datasets_and_the_loader_say_what_they_are(synth_store: Path) -> None:
    s = spairstore.open(synth_store)
    pairs = PairDataset(synth_store, "trn", fields=("pixels", "keypoints"))
    assert repr(pairs) == f"PairDataset({synth_store.name}, split 'trn': {s.pairs('trn').rows:,} pairs, fields pixels, " \
                          "keypoints)"
    assert repr(ImageDataset(synth_store)) == f"ImageDataset({synth_store.name}, all images: {len(s):,} images, " \
                                              "fields pixels, keypoints)"
    loader = Loader(pairs, 4, num_workers=2, rank=1, world_size=2)
    assert repr(loader) == (f"Loader({pairs!r}: batch_size 4, {len(loader):,} batches per epoch, shuffled, rank 1 of 2, "
                            "2 workers, device cpu, epoch 0)")


def test_loader_takes_subsets_and_other_map_style_datasets(synth_store: Path) -> None:
    """random_split / Subset keep the whole-batch read (and the augmentation's epoch, in workers too);
    ConcatDataset and other datasets are read sample by sample: the same batches either way."""
    ds = PairDataset(synth_store, "trn", fields=("pixels", "keypoints"), augment=HFlip(0.5))
    train, _ = random_split(ds, [0.75, 0.25], generator=torch.Generator().manual_seed(0))
    for wrapped, workers, ctx in ((Subset(ds, range(1, len(ds), 2)), 2, "spawn"), (train, 0, None)):
        loader = Loader(wrapped, 5, seed=3, num_workers=workers, multiprocessing_context=ctx, normalize=False)
        assert loader.dataset is wrapped
        loader.set_epoch(2)
        got = list(loader)
        order = ShardSampler(len(wrapped), seed=3)
        order.set_epoch(2)
        ds.set_epoch(2)
        idx = [int(wrapped.indices[i]) for i in order]
        want = [ds.fetch(idx[i:i + 5]) for i in range(0, len(idx), 5)]
        assert any(b["src_flipped"].any() for b in want)
        for a, b in zip(got, want, strict=True):
            assert_batches_equal(a, b)
    parts = [PairDataset(synth_store, split, fields=("keypoints",)) for split in ("trn", "val")]
    got = list(Loader(ConcatDataset(parts), 4, shuffle=False, num_workers=2, multiprocessing_context="fork"))
    want = collate([p[i] for p in parts for i in range(len(p))])
    np.testing.assert_array_equal(torch.cat([b["src_kps"] for b in got]), want["src_kps"])
    np.testing.assert_array_equal(torch.cat([b["pair_id"] for b in got]), want["pair_id"])


class _Tuples(torch.utils.data.Dataset):
    """Someone else's dataset: samples are (tensor, int) tuples."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.full((3,), float(i)), i


def test_loader_batches_any_samples_as_dataloader_does() -> None:
    for ds in (_Tuples(), Subset(_Tuples(), [9, 2, 5, 0, 7])):
        want = list(DataLoader(ds, batch_size=4))
        for workers in (0, 2):
            got = list(Loader(ds, 4, shuffle=False, num_workers=workers, multiprocessing_context="fork"))
            assert len(got) == len(want)
            for (x, i), (wx, wi) in zip(got, want, strict=True):
                assert torch.equal(x, wx) and torch.equal(i, wi)
