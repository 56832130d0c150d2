"""Many readers, DataLoader workers under fork and spawn, and a new version packed to the same path
while readers read: every reader sees one consistent version, the one it opened, until it reopens."""
from __future__ import annotations

import multiprocessing
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import spairstore
from spairstore import PairDataset, collate


class StoreImages(torch.utils.data.Dataset):
    """A plain Dataset over ``spairstore.open``: every payload of image row ``i``."""

    def __init__(self, path: Path):
        self.store = spairstore.open(path)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s = self.store
        return {
            "row": torch.tensor(i),
            "pixels": torch.from_numpy(s.pixels(i)),
            "mask": torch.from_numpy(s.mask(i)),
            "image_bytes": torch.frombuffer(bytearray(s.image_bytes(i)), dtype=torch.uint8),
            "mask_bytes": torch.frombuffer(bytearray(s.mask_bytes(i)), dtype=torch.uint8),
        }


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_identical_bytes(synth_store: Path, context: str) -> None:
    ds = StoreImages(synth_store)
    single = [ds[i] for i in range(len(ds))]
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=4,
                                         multiprocessing_context=context)
    got = list(loader)
    assert len(got) == len(single)
    for a, b in zip(single, got):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def consistent(s: spairstore.Store) -> bool:
    """Every payload record matches the CRC-32 the same store file holds for it."""
    for i in range(len(s)):
        for data, crc in ((s.pixels(i), s.images.crc32_pixels[i]), (s.mask(i), s.images.crc32_mask[i]),
                          (s.image_bytes(i), s.images.crc32_image_blob[i])):
            if zlib.crc32(data) != int(crc):
                return False
    return True


def test_open_store_keeps_its_file_when_a_new_version_replaces_it(synth_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    spairstore.pack(synth_root, path, size=24)
    old = spairstore.open(path)  # tables loaded, nothing mapped yet
    spairstore.pack(synth_root, path, size=40, overwrite=True)
    assert old.pixels(0).shape == (24, 24, 3) and consistent(old)
    assert spairstore.open(path).image_size == 40
    # A pickled Store (what spawn workers get) refuses to silently become the new version.
    with pytest.raises(spairstore.StoreError, match="replaced by a new version"):
        pickle.loads(pickle.dumps(old))


def test_dataset_refuses_a_store_repacked_after_it_was_built(synth_root: Path, tmp_path: Path) -> None:
    """A dataset's tables come from the file it was built on: a process that opens the path anew (spawn
    worker, unpickled copy) and finds another version raises instead of mixing the two."""
    path = tmp_path / "s.h5"
    spairstore.pack(synth_root, path, size=24)
    ds = PairDataset(path, "trn", fields=("pixels", "keypoints"))
    spairstore.pack(synth_root, path, size=40, overwrite=True)
    assert ds[0]["src_pixels"].shape == (24, 24, 3)  # this process keeps reading the file it pinned
    with pytest.raises(spairstore.StoreError, match="replaced by a new version.*rebuild the dataset"):
        pickle.loads(pickle.dumps(ds))[0]
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=collate, multiprocessing_context="spawn")
    with pytest.raises(spairstore.StoreError, match="rebuild the dataset"):
        next(iter(loader))
    rebuilt = pickle.loads(pickle.dumps(PairDataset(path, "trn", fields=("pixels",))))
    assert rebuilt[0]["src_pixels"].shape == (40, 40, 3)


def _reader(path: Path, opened, packed, results) -> None:
    try:
        s = spairstore.open(path)
        first = s.image_size
        opened.release()
        rounds = 0
        while not packed.is_set() or rounds < 2:  # read the old file while the new one is written
            assert consistent(s) and s.image_size == first
            rounds += 1
        s.close()
        s = spairstore.open(path)  # reopening gives the new version
        results.put((first, s.image_size, consistent(s), rounds))
    except BaseException as e:  # report, do not hang the test
        results.put(repr(e))


def test_many_readers_while_a_new_version_is_packed(synth_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    spairstore.pack(synth_root, path, size=24)
    ctx = multiprocessing.get_context("fork")
    opened, packed, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    readers = [ctx.Process(target=_reader, args=(path, opened, packed, results)) for _ in range(4)]
    for r in readers:
        r.start()
    for _ in readers:
        assert opened.acquire(timeout=60)
    packer = ctx.Process(target=spairstore.pack, args=(synth_root, path), kwargs={"size": 40, "overwrite": True})
    packer.start()
    packer.join(120)
    assert packer.exitcode == 0
    packed.set()
    got = [results.get(timeout=120) for _ in readers]
    for r in readers:
        r.join(10)
    assert all(g == (24, 40, True, g[3]) and g[3] >= 2 for g in got), got
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_store_is_usable_after_fork_without_reopening(synth_store: Path, tmp_path: Path, suffix: str) -> None:
    """A Store opened before a fork reads the same bytes in the child (HDF5: mapped again there through
    the inherited descriptor; Zarr: through the inherited maps)."""
    from spairstore.store.convert import convert

    path = synth_store
    if suffix == ".zarr":
        convert(synth_store, tmp_path / "s.zarr")
        path = tmp_path / "s.zarr"
    s = spairstore.open(path)
    s.pixels(0)  # mapped in the parent
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=lambda: q.put(np.concatenate([s.pixels(i).ravel() for i in range(len(s))]).tobytes()))
    p.start()
    child = q.get(timeout=60)
    p.join()
    assert child == np.concatenate([s.pixels(i).ravel() for i in range(len(s))]).tobytes()


def test_open_zarr_store_keeps_its_files_when_repacked(synth_root: Path, tmp_path: Path) -> None:
    """A Zarr pack --overwrite puts new shard files where the old ones were: an open Store reads the files
    it opened (it used to read the new bytes at the old offsets: pixels failing their own CRC)."""
    path = tmp_path / "s.zarr"
    spairstore.pack(synth_root, path, size=24)
    old = spairstore.open(path)  # nothing read yet
    spairstore.pack(synth_root, path, size=40, overwrite=True)
    assert old.pixels(0).shape == (24, 24, 3) and consistent(old)
    with pytest.raises(spairstore.StoreError, match="replaced by a new version since this Store opened it"):
        old.pairs("val")  # a table read on first use: gone with the old directory, not taken from the new
    with pytest.raises(spairstore.StoreError, match="replaced by a new version since it was first opened here"):
        pickle.loads(pickle.dumps(old))  # a spawn worker's Store: opens the path anew
    assert spairstore.open(path).image_size == 40


def _constant(value: float):
    return lambda row: np.full((4, 6, 6), value, np.float32)


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_open_store_keeps_the_feature_set_it_opened(synth_root: Path, tmp_path: Path, suffix: str) -> None:
    """A feature set replaced or dropped while a Store reads it: the Store reads the old maps, every row
    (a Zarr set spans several shard files here); a copy opened anew refuses the new set, and a dropped
    set by name, but reads what did not change."""
    from spairstore import add_feature_set

    path = tmp_path / f"s{suffix}"
    spairstore.pack(synth_root, path, size=24, shard_bytes=4 * 24 * 24 * 3)
    geometry = {"stride": 4, "cell_offset": 0.5, "input_size": 24}
    add_feature_set(path, "a", _constant(1.0), **geometry)
    add_feature_set(path, "b", _constant(5.0), **geometry)
    old = spairstore.open(path)
    old.features("a", 0)
    ds = PairDataset(old, "trn", fields=("features/a",))
    if suffix == ".zarr":
        assert len(old.extents["features/a/data"].files) > 1
    add_feature_set(path, "a", _constant(2.0), **geometry, overwrite=True)
    add_feature_set(path, "c", _constant(3.0), **geometry)
    from spairstore.features.extract import drop_feature_set

    drop_feature_set(path, "b")
    assert all((old.features("a", i) == 1).all() and (old.features("b", i) == 5).all() for i in range(len(old)))
    copy = pickle.loads(pickle.dumps(old))
    with pytest.raises(spairstore.StoreError, match="feature set 'a' was replaced since"):
        copy.features("a", 0)
    with pytest.raises(spairstore.StoreError, match="feature set 'b' was dropped since"):
        copy.read("features/b", [0])
    with pytest.raises(spairstore.StoreError, match="feature set 'a' was replaced since.*rebuild the dataset"):
        pickle.loads(pickle.dumps(ds))[0]
    assert (ds[0]["src_features/a"] == 1).all()
    assert consistent(copy) and (copy.features("c", 3) == 3).all()  # unchanged arrays and a new set read on
    assert (spairstore.open(path).features("a", len(old) - 1) == 2).all()


_OPEN_WITH_LIMIT = """
import resource, sys
import spairstore
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), int(sys.argv[3])))
try:
    s = spairstore.open(sys.argv[1])
except spairstore.StoreError as e:
    print("StoreError:", e)
else:
    print("opened", len(s._mapped), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def test_a_zarr_store_of_many_files_raises_the_open_file_limit(synth_root: Path, tmp_path: Path) -> None:
    """Each mapped shard file holds a descriptor: the soft limit is raised towards the hard one, and
    where the hard one is too low the error says so instead of `Too many open files`."""
    import subprocess
    import sys

    path = tmp_path / "s.zarr"
    spairstore.pack(synth_root, path, size=24, shard_bytes=24 * 24 * 3)
    n = len(spairstore.open(path)._mapped)
    assert n > 30

    def run(soft: int, hard: int) -> str:
        return subprocess.run([sys.executable, "-c", _OPEN_WITH_LIMIT, str(path), str(soft), str(hard)],
                              capture_output=True, text=True, check=True).stdout

    assert run(24, 4096) == f"opened {n} {n + 1024}\n"
    assert run(24, 24).startswith(f"StoreError: {path}: mapping its {n} payload files needs more open files than "
                                  "this process may have (`ulimit -n` 24); raise the limit")


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_a_closed_store_reads_on_only_while_its_version_is_there(synth_root: Path, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"s{suffix}"
    spairstore.pack(synth_root, path, size=24)
    with spairstore.open(path) as s:
        pass
    assert s.pixels(1).shape == (24, 24, 3) and len(s.pairs("test")) > 0  # closed: opens its files again
    s.close()
    spairstore.pack(synth_root, path, size=40, overwrite=True)
    with pytest.raises(spairstore.StoreError, match="replaced"):
        s.pairs("val")
    with pytest.raises(spairstore.StoreError, match="replaced since"):
        s.pixels(2)


def _zarr_writer(path: Path, root: Path, rounds: int, done) -> None:
    """Replace feature set 'a' (constant maps of value k; k = 0 makes shards of zeros, which zarr would
    leave unwritten) and repack the store, ``rounds`` times each."""
    from spairstore import add_feature_set

    try:
        for k in range(rounds):
            add_feature_set(path, "a", lambda row, k=k: np.full((4, 6, 6), k, np.float32), stride=4,
                            cell_offset=0.5, input_size=24, overwrite=True)
        for k in range(rounds):
            spairstore.pack(root, path, size=(24, 32)[k % 2], overwrite=True, shard_bytes=20000)
    finally:
        done.set()


def _zarr_reader(path: Path, done, results) -> None:
    opened, problems = 0, []
    while not done.is_set():
        try:
            s = spairstore.open(path)
            rows = np.arange(len(s))
            s.read("pixels", rows, check=True)
            if "a" in s.feature_sets and len(np.unique(s.read("features/a", rows, check=True))) != 1:
                problems.append("a mix of two versions of set 'a'")
            opened += 1
        except Exception as e:  # every error is a failure: report it
            problems.append(f"{type(e).__name__}: {e}")
    results.put((opened, problems[:3]))


def test_readers_open_a_zarr_store_while_its_sets_and_itself_are_replaced(synth_root: Path, tmp_path: Path) -> None:
    """Stores opened at any moment of a feature-set replacement or a pack --overwrite (a directory
    exchange) read one whole version: no error (a file gone or an index of the old version met during
    the open retries it) and never a set of mixed maps."""
    path = tmp_path / "s.zarr"
    spairstore.pack(synth_root, path, size=24, shard_bytes=20000)
    ctx = multiprocessing.get_context("fork")
    done, results = ctx.Event(), ctx.Queue()
    readers = [ctx.Process(target=_zarr_reader, args=(path, done, results), daemon=True) for _ in range(2)]
    writer = ctx.Process(target=_zarr_writer, args=(path, synth_root, 8, done))
    for p in (*readers, writer):
        p.start()
    writer.join(180)
    assert writer.exitcode == 0
    got = [results.get(timeout=60) for _ in readers]
    for r in readers:
        r.join(10)
    assert all(opened > 10 and problems == [] for opened, problems in got), got


@pytest.mark.parametrize("suffix", [".h5", ".zarr"])
def test_a_store_is_not_replaced_while_a_set_is_written_into_it(synth_root: Path, tmp_path: Path, suffix: str) -> None:
    """pack and convert over a store are refused while a feature set is being added to it (on Zarr the
    set's shards lie in the store directory the switch moves away), other sets may be added meanwhile,
    and a set is refused while a pack replaces the store; each refusal leaves everything as it was."""
    from spairstore.features.precomputed import add_feature_set
    from spairstore.store.convert import convert
    from spairstore.store.transaction import Transaction
    from spairstore.store.verify import verify

    out, other = tmp_path / f"s{suffix}", tmp_path / "o.zarr"
    spairstore.pack(synth_root, out, size=24)
    spairstore.pack(synth_root, other, size=24)
    n = len(spairstore.open(out))
    maps = np.random.default_rng(0).standard_normal((n, 2, 3, 3)).astype(np.float32)
    tried: list[str] = []

    def with_jobs_meanwhile(row: int) -> np.ndarray:
        if row == 5:
            for job in (lambda: spairstore.pack(synth_root, out, size=32, overwrite=True),
                        lambda: convert(other, out, overwrite=True)):
                with pytest.raises(spairstore.SpairstoreError) as e:
                    job()
                tried.append(str(e.value))
            add_feature_set(out, "side", maps.__getitem__, stride=8, cell_offset=0.5, input_size=24)
        return maps[row]

    add_feature_set(out, "m", with_jobs_meanwhile, stride=8, cell_offset=0.5, input_size=24)
    assert tried == [f"{out}: a `spairstore features` run is adding or dropping a set of it; wait for it to finish "
                     f"(or stop it) and run {who} again" for who in ("pack", "convert")]
    s = spairstore.open(out)
    assert sorted(s.feature_sets) == ["m", "side"] and s.image_size == 24 and verify(out).ok
    np.testing.assert_array_equal(s.read("features/m", np.arange(n), check=True), maps.astype(np.float16))
    s.close()
    tx = Transaction.open(out, "pack", who="pack")  # a pack under way
    try:
        with pytest.raises(spairstore.SpairstoreError, match=f"^{out}: a pack or convert is replacing it; wait"):
            add_feature_set(out, "late", maps.__getitem__, stride=8, cell_offset=0.5, input_size=24)
        with pytest.raises(spairstore.SpairstoreError, match=f"^another pack or convert is writing {out}; wait"):
            convert(other, out, overwrite=True)
    finally:
        tx.finish()
    assert sorted(spairstore.open(out).feature_sets) == ["m", "side"]
    convert(other, out, overwrite=True)  # free again
    beside = {p.name for p in tmp_path.iterdir()} - {out.name, other.name, f"{out.name}.features"}
    assert not beside, beside  # no lock or staging file is left
