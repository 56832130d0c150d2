"""Crash safety: a pack killed at any moment leaves the old store or nothing at its path, and
``pack --resume`` finishes it to a store equal to an uninterrupted pack."""
from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

import spairstore
import spairstore.store.writer as writer
from spairstore.store.transaction import Transaction
from tests.conftest import cli_command, cli_env, run_cli

SIZE = 48


@pytest.fixture(scope="module")
def reference(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted pack."""
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    spairstore.pack(synth_root, out, size=SIZE)
    return out


def assert_same_store(a: Path, b: Path) -> None:
    """Equal in every array and attribute, and byte for byte (a pack is deterministic)."""
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        names = []
        fa.visit(names.append)
        other = []
        fb.visit(other.append)
        assert names == other
        for n in names:
            if isinstance(fa[n], h5py.Dataset):
                np.testing.assert_array_equal(fa[n][()], fb[n][()], err_msg=n)
        assert dict(fa.attrs) == dict(fb.attrs)
    assert a.read_bytes() == b.read_bytes()


def staging_of(out: Path) -> Path:
    return out.with_name(f".{out.name}.pack.staging")


def test_interrupted_pack_resumes_from_its_last_commit(synth_root: Path, reference: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "s.h5"
    monkeypatch.setattr(writer, "COMMIT_BYTES", 1)  # commit after every row (when none is running)
    decode, calls = writer.decode_image, []
    ref = spairstore.open(reference)
    stop = (ref.categories[ref.images.category[10]], ref.images.name[10])  # image row 10

    def interrupted(rec, *args):
        if rec.key == stop:
            raise KeyboardInterrupt
        return decode(rec, *args)

    monkeypatch.setattr(writer, "decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        spairstore.pack(synth_root, out, size=SIZE)
    assert not out.exists()
    committed = (staging_of(out) / "rows.crc").stat().st_size // 16
    assert 0 < committed <= 10  # some of rows 0-9 committed, row 10 interrupted
    with pytest.raises(spairstore.StoreError, match="unfinished pack"):
        spairstore.open(staging_of(out) / "store.h5")  # the staged file never opens as a store

    calls.clear()
    monkeypatch.setattr(writer, "decode_image", lambda *a: calls.append(1) or decode(*a))
    summary = spairstore.pack(synth_root, out, size=SIZE, resume=True)
    assert len(calls) == summary.images - committed  # only the rows not committed before
    assert any("resumed" in n for n in summary.notes)
    assert_same_store(out, reference)
    assert [p.name for p in tmp_path.iterdir()] == ["s.h5"]  # the staging folder is gone


def test_full_disk(synth_root: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that cannot fit is refused before writing; a disk that fills up while packing keeps the
    rows packed so far, says where, and --resume finishes the store."""
    import errno
    from collections import namedtuple

    from spairstore.store import transaction

    out = tmp_path / "s.h5"
    usage = shutil.disk_usage
    monkeypatch.setattr(transaction.shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(1, 1, 2**20))
    with pytest.raises(spairstore.SpairstoreError, match=rf"^{out}: the store needs about [\d.]+ MiB and {tmp_path} has "
                                                        r"1\.0 MiB free; make room or write elsewhere$"):
        spairstore.pack(synth_root, out, size=SIZE)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(transaction.shutil, "disk_usage", usage)

    monkeypatch.setattr(writer, "COMMIT_BYTES", 1)
    decode, ref = writer.decode_image, spairstore.open(reference)
    full = (ref.categories[ref.images.category[10]], ref.images.name[10])

    def filling(rec, *args):
        if rec.key == full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return decode(rec, *args)

    monkeypatch.setattr(writer, "decode_image", filling)
    with pytest.raises(spairstore.SpairstoreError, match=rf"^{out}: the disk filled up while packing; the images packed "
                                                        rf"so far are kept in {staging_of(out)}: make room and run the "
                                                        r"same command with --resume, or delete that folder$"):
        spairstore.pack(synth_root, out, size=SIZE)
    assert not out.exists() and (staging_of(out) / "rows.crc").stat().st_size > 0
    monkeypatch.setattr(writer, "decode_image", decode)
    spairstore.pack(synth_root, out, size=SIZE, resume=True)
    assert_same_store(out, reference)


def test_resume_refuses_changed_sources_or_options(synth_root: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "SPair"
    shutil.copytree(synth_root, root)
    out = tmp_path / "s.h5"
    decode = writer.decode_image
    monkeypatch.setattr(writer, "decode_image", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        spairstore.pack(root, out, size=SIZE)
    monkeypatch.setattr(writer, "decode_image", decode)
    with pytest.raises(spairstore.SpairstoreError, match="size was 48, now 64.*without --resume"):
        spairstore.pack(root, out, size=64, resume=True)
    ann = sorted(root.glob("ImageAnnotation/cat/*.json"))[0]
    a = json.loads(ann.read_text())
    a["pose"] = "Left" if a["pose"] != "Left" else "Right"
    ann.write_text(json.dumps(a))
    rel = ann.relative_to(root).as_posix()
    with pytest.raises(spairstore.SpairstoreError, match=f"source file {rel} changed"):
        spairstore.pack(root, out, size=SIZE, resume=True)
    assert staging_of(out).is_dir()  # a refused resume keeps the staging data
    summary = spairstore.pack(root, out, size=SIZE)  # without --resume: starts over
    assert any("discarded" in n for n in summary.notes)
    assert not staging_of(out).exists()


def test_second_pack_to_the_same_path_is_refused(synth_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.h5"
    running = Transaction.open(out, "pack", who="pack")  # as a running pack holds it
    with pytest.raises(spairstore.SpairstoreError, match=f"^another pack or convert is writing {out}; wait"):
        spairstore.pack(synth_root, out, size=SIZE)
    running.close()
    spairstore.pack(synth_root, out, size=SIZE)  # once released, a pack goes ahead
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # nor is the job lock file left behind
    (tmp_path / ".s.h5.busy").mkdir()  # as where nothing may be written beside the store
    with pytest.raises(spairstore.SpairstoreError, match=rf"^{tmp_path}/.s.h5.busy: cannot create the job lock file of s.h5 \(Is a directory\)$"):
        spairstore.pack(synth_root, out, size=SIZE, overwrite=True)


def _pack_child(root: Path, out: Path) -> None:
    writer.COMMIT_BYTES = 1  # commit every row, so that kills land between commits
    spairstore.pack(root, out, size=SIZE, overwrite=True, resume=True)


@pytest.mark.slow
def test_sigkill_at_random_moments(synth_root: Path, reference: Path, tmp_path: Path) -> None:
    """SIGKILL ``pack`` at >= 20 random moments. After each kill the output path holds the old store
    (or nothing, when there was none), or the complete new one; after every fourth kill ``--resume``
    runs to the end and must produce exactly the uninterrupted pack. Each killed run resumes the one
    before, so kills land in every step, resumed runs included. Packs run in children of a forkserver
    (no interpreter start, so the kills land in the work; and unlike a plain fork of this process they
    inherit no thread that may hold a lock, which once hung a child), the last rounds through the real
    CLI."""
    rng = np.random.default_rng(20240601)
    old = tmp_path / "old.h5"
    spairstore.pack(synth_root, old, size=16)
    old_bytes, new_bytes = old.read_bytes(), reference.read_bytes()
    out = tmp_path / "out" / "s.h5"
    out.parent.mkdir()
    fork = multiprocessing.get_context("forkserver")
    fork.set_forkserver_preload(["spairstore", "spairstore.store.writer"])
    t0 = time.perf_counter()
    spairstore.pack(synth_root, tmp_path / "timing.h5", size=SIZE)
    work = time.perf_counter() - t0

    def start(cli: bool) -> Callable[[], int | None]:
        """Start a resuming pack; returns its poll()."""
        if cli:
            p = subprocess.Popen(cli_command("pack", synth_root, out, "--size", SIZE, "--overwrite", "--resume"),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
            kill.append(p.kill)
            return lambda: p.poll() if p.poll() is None else p.wait()
        c = fork.Process(target=_pack_child, args=(synth_root, out))
        c.start()
        kill.append(c.kill)
        return lambda: (c.join(0), c.exitcode)[1]

    kills, rounds, had_old, kill, phases = 0, 0, True, [], []
    shutil.copy(old, out)
    for _ in range(100):
        if kills >= 24:
            break
        cli = kills >= 22
        poll = start(cli)
        if cli:  # wait for the interpreter to start and the pack to stage
            while poll() is None and not (staging_of(out) / "lock").exists():
                time.sleep(0.005)
        time.sleep(rng.uniform(0, 1.2 * work))
        if poll() is not None:  # finished before the kill: not a kill
            assert poll() == 0 and out.read_bytes() == new_bytes
        else:
            kill[-1]()
            while poll() is None:
                time.sleep(0.001)
            kills += 1
            now = out.read_bytes() if out.exists() else None
            assert now in ((old_bytes, new_bytes) if had_old else (None, new_bytes)), f"kill {kills}"
            assert {p.name for p in out.parent.iterdir()} <= {out.name, staging_of(out).name, f".{out.name}.busy"}
            phases.append(_phase(out))
            if kills % 4:
                continue
            if cli:
                res = run_cli("pack", synth_root, out, "--size", SIZE, "--overwrite", "--resume")
                assert res.returncode == 0, res.stderr
            else:
                c = fork.Process(target=_pack_child, args=(synth_root, out))
                c.start()
                c.join()
                assert c.exitcode == 0
        assert_same_store(out, reference)
        assert not staging_of(out).exists()
        rounds += 1
        had_old = rounds % 2 == 0  # alternate: replace an old store / write to an empty path
        if had_old:
            shutil.copy(old, out)
        else:
            out.unlink()
    assert kills >= 24 and rounds >= 6
    print("killed in:", {p: phases.count(p) for p in set(phases)})


def _phase(out: Path) -> str:
    """Which step a killed pack had reached, from what it left."""
    st = staging_of(out)
    if not (st / "plan.json").exists():
        return "reading/checking" if st.exists() else "start"
    rows = (st / "rows.crc").stat().st_size // 16 if (st / "rows.crc").exists() else 0
    return f"payload after {rows} rows" if (st / "store.h5").exists() else "renamed"


# -- feature sets: adding or replacing one, killed at any moment --------------------------------------
SET_GEOMETRY = {"stride": 16, "cell_offset": 0.5, "input_size": SIZE}


def set_maps(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 3, 3)).astype(np.float16)


def _add_set_child(store: Path, seed: int) -> None:
    from spairstore.features.extract import Staging

    Staging.sync_seconds = 0  # flag rows as they come, so that kills land between flags
    maps = set_maps(len(spairstore.open(store)), seed)
    spairstore.add_feature_set(store, "s", lambda row: (time.sleep(0.01), maps[row])[1], source=f"seed{seed}",
                               overwrite=True, **SET_GEOMETRY)


@pytest.mark.slow
def test_sigkill_while_adding_or_replacing_a_set(synth_root: Path, tmp_path: Path) -> None:
    """SIGKILL a run that replaces feature set "s" of an HDF5 store at random moments: after every kill
    the set reads back whole as the old maps or the new ones, the store file is untouched, and only the
    set's folder and the run's fixed staging folder lie beside it; the next run resumes and completes."""
    from spairstore.features import partial_feature_sets
    from spairstore.store.feature_sets import sidecar_dir
    from spairstore.store.verify import verify

    store = tmp_path / "s.h5"
    spairstore.pack(synth_root, store, size=SIZE)
    n = len(spairstore.open(store))
    _add_set_child(store, 0)
    digest = store.read_bytes()
    fork = multiprocessing.get_context("forkserver")
    fork.set_forkserver_preload(["spairstore", "spairstore.features.precomputed"])  # if not started yet

    def run(seed: int, kill_after: float | None) -> bool:
        """Run a replace with the maps of ``seed``, killed after ``kill_after`` s; whether it was killed."""
        c = fork.Process(target=_add_set_child, args=(store, seed))
        c.start()
        c.join(kill_after)
        c.kill()
        c.join()
        return c.exitcode != 0

    rng = np.random.default_rng(7)
    t0 = time.perf_counter()
    assert not run(100, None)  # how long a run takes in a child (a replace, as every round's)
    work = time.perf_counter() - t0
    _add_set_child(store, 0)
    current, kills = 0, 0
    for seed in range(1, 40):
        if kills >= 6:
            break
        for attempt in range(6):  # kill this round's run until one completes (the last is not killed)
            killed = run(seed, rng.uniform(0, 1.2 * work) if attempt < 5 else None)
            kills += killed
            s = spairstore.open(store)
            got = s.read("features/s", np.arange(n))
            seeds = [k for k in (current, seed) if np.array_equal(got, set_maps(n, k))]
            assert seeds and s.feature_sets["s"]["backbone"] == f"seed{seeds[0]}", f"kill {kills}: half a set"
            assert store.read_bytes() == digest
            assert {p.name for p in tmp_path.iterdir()} <= {store.name, sidecar_dir(store).name,
                                                             f".{store.name}.features-s.staging",
                                                             f".{store.name}.busy"}
            assert verify(store).ok
            current = seeds[0]  # killed after the switch: new in place, the staging still there
            if not killed:
                assert current == seed and partial_feature_sets(store) == {}
                break
    assert kills >= 6
    assert partial_feature_sets(store) == {} and [p.name for p in sidecar_dir(store).iterdir()] == ["s.h5"]


# -- Zarr --overwrite: a directory replaced by another, killed at any moment --------------------------
def _zarr_pack_child(root: Path, out: Path, exchange: bool) -> None:
    from spairstore.store import transaction

    transaction.EXCHANGE = exchange
    spairstore.pack(root, out, size=SIZE, overwrite=True)


@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "recorded-switch"])
def test_zarr_overwrite_killed_anywhere_always_opens(synth_root: Path, tmp_path: Path, exchange: bool) -> None:
    """SIGKILL ``pack --overwrite`` of a Zarr store at random moments, with the atomic exchange and with
    the recorded two-rename switch: the path always opens, as the old store or the new one; the killed
    pack's staging is the one fixed folder, reused and then removed by the next pack (none piles up)."""
    out = tmp_path / "s.zarr"
    spairstore.pack(synth_root, out, size=16)
    fork = multiprocessing.get_context("forkserver")
    rng = np.random.default_rng(3)

    def run(kill_after: float | None) -> bool:
        c = fork.Process(target=_zarr_pack_child, args=(synth_root, out, exchange))
        c.start()
        c.join(kill_after)
        c.kill()
        c.join()
        return c.exitcode != 0

    t0 = time.perf_counter()
    assert not run(None)
    work = time.perf_counter() - t0
    spairstore.pack(synth_root, out, size=16, overwrite=True)
    kills = 0
    for _ in range(30):
        if kills >= 8:
            break
        killed = run(rng.uniform(0, 1.2 * work))
        kills += killed
        assert spairstore.open(out).image_size in (16, SIZE), f"kill {kills}"
        assert {p.name for p in tmp_path.iterdir()} <= {out.name, ".s.zarr.pack.staging", ".s.zarr.lock", ".s.zarr.busy"}
        if spairstore.open(out).image_size == SIZE:
            spairstore.pack(synth_root, out, size=16, overwrite=True)  # back to the old store, for the next kill
    assert kills >= 8
    assert not run(None)
    assert spairstore.open(out).image_size == SIZE and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_recorded_switch_killed_between_its_renames_is_finished_by_the_next_open(
        synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Without RENAME_EXCHANGE a directory is replaced by two renames, recorded first: a crash between
    them leaves no store at the path, and the next open moves the finished new store in and says so."""
    from spairstore.store import transaction

    out = tmp_path / "s.zarr"
    spairstore.pack(synth_root, out, size=16)
    monkeypatch.setattr(transaction, "EXCHANGE", False)
    replace = transaction.os.replace

    def crash_before_the_second(src: str, dst: str) -> None:
        if Path(dst) == out:
            raise KeyboardInterrupt  # the old store is aside, the new one not yet in place
        replace(src, dst)

    monkeypatch.setattr(transaction.os, "replace", crash_before_the_second)
    with pytest.raises(KeyboardInterrupt):
        spairstore.pack(synth_root, out, size=SIZE, overwrite=True)
    monkeypatch.setattr(transaction.os, "replace", replace)
    assert not out.exists()
    assert spairstore.open(out).image_size == SIZE  # finished by the open
    assert "finished replacing it by the store an interrupted pack had built" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / ".s.zarr.pack.staging").iterdir()) == ["lock"]  # old store gone
    spairstore.pack(synth_root, out, size=16, overwrite=True)  # the next pack sweeps the staging folder
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


@pytest.mark.parametrize("dst", ["c.zarr", "c.h5"])
def test_an_interrupted_or_killed_convert_leaves_nothing_and_the_next_starts_over(
        synth_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dst: str) -> None:
    """A convert is never resumed: Ctrl-C mid-copy leaves no staged copy (the disk space comes back), and
    what a killed one staged is swept by the next instead of failing it (zarr's FileExistsError)."""
    import spairstore.store.convert as conv
    from spairstore.store.verify import verify

    out = tmp_path / dst
    copy = conv.copy_arrays

    def interrupted(r, w, *args, **kwargs):
        copy(r, w, skip=lambda a: not a.startswith("images/"))  # part of the arrays, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(conv, "copy_arrays", interrupted)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(synth_store, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.undo()
    staging = tmp_path / f".{dst}.convert.staging"  # as a SIGKILL mid-copy leaves it
    (staging / f"store{out.suffix}").mkdir(parents=True)
    (staging / f"store{out.suffix}" / "zarr.json").write_text("{}")
    (staging / "settings.json").write_text(json.dumps({"src": str(synth_store)}))
    conv.convert(synth_store, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [dst] and verify(out).ok
