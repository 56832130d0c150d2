"""Zarr v3 backend: pack and convert losslessly, raw fast path = zarr-python, remote reads over HTTP."""
from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr

import spairstore
from spairstore.store.backends import reader_for
from spairstore.store.backends import zarr as zarr_backend
from spairstore.store.convert import convert
from spairstore.store.verify import verify


def assert_stores_equal(a: Path | str, b: Path | str) -> None:
    """Every array (dtype, shape, values) and every root attribute equal."""
    ra, rb = reader_for(a), reader_for(b)
    assert ra.attrs == rb.attrs
    assert ra.shapes() == rb.shapes()
    for name in ra.shapes():
        x, y = ra.read(name), rb.read(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), name


def assert_reads_equal(a: spairstore.Store, b: spairstore.Store) -> None:
    assert len(a) == len(b) and a.attrs == b.attrs
    rows = np.array([5, 0, 5, len(a) - 1, 2, 3, 0])
    for field in ("pixels", "mask"):
        np.testing.assert_array_equal(a.read(field, rows), b.read(field, rows))
    for i in range(len(a)):
        np.testing.assert_array_equal(a.pixels(i), b.pixels(i))
        np.testing.assert_array_equal(a.mask(i), b.mask(i))
        assert a.image_bytes(i) == b.image_bytes(i) and a.mask_bytes(i) == b.mask_bytes(i)
    for split in a.splits:
        for k, v in a.pairs(split).items():
            np.testing.assert_array_equal(v, b.pairs(split)[k])


@pytest.fixture(scope="module")
def zarr_store(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic dataset packed straight to Zarr, with small shards (3 images each at 96 px)."""
    out = tmp_path_factory.mktemp("zarr") / "synth.zarr"
    spairstore.pack(synth_root, out, size=96, shard_bytes=3 * 96 * 96 * 3)
    return out


def test_pack_zarr_equals_pack_hdf5(synth_store: Path, zarr_store: Path) -> None:
    assert_stores_equal(synth_store, zarr_store)
    assert_reads_equal(spairstore.open(synth_store), spairstore.open(zarr_store))


def test_zarr_layout_one_image_per_chunk_uncompressed_sharded(zarr_store: Path) -> None:
    g = zarr.open_group(str(zarr_store), mode="r")
    px = g["images/pixels"]
    n, s = px.shape[0], px.shape[1]
    assert px.chunks == (1, s, s, 3) and px.shards == (3, s, s, 3)
    assert px.compressors == () and px.filters == ()
    assert len(list((zarr_store / "images/pixels/c").iterdir())) == -(-n // 3)  # one file per shard
    blob = g["images/image_blob"]
    assert blob.compressors == () and blob.chunks[0] <= zarr_backend.BLOB_CHUNK
    # attributes are native JSON in Zarr (HDF5 keeps JSON strings); both read back to the same values
    meta = json.loads((zarr_store / "zarr.json").read_text())
    assert meta["attributes"]["splits"] == ["trn", "val", "test"]
    assert isinstance(meta["attributes"]["build_config"], dict)


def test_round_trip_hdf5_zarr_hdf5(synth_store: Path, tmp_path: Path) -> None:
    z, h = tmp_path / "a.zarr", tmp_path / "b.h5"
    convert(synth_store, z)
    convert(z, h)
    assert_stores_equal(synth_store, z)
    assert_stores_equal(synth_store, h)
    assert_reads_equal(spairstore.open(synth_store), spairstore.open(h))


def test_fast_path_equals_zarr_python(zarr_store: Path) -> None:
    s = spairstore.open(zarr_store)
    assert all(s.extents[f"images/{f}"] is not None for f in ("pixels", "mask", "image_blob", "mask_blob"))
    assert len(s.extents["images/pixels"].files) > 1  # several shards: per-record locations
    lib = reader_for(zarr_store)
    rows = np.array([0, 4, 5, len(s) - 1])
    np.testing.assert_array_equal(s.read("pixels", rows), lib.read("images/pixels", rows))
    np.testing.assert_array_equal(s.read("mask", rows), lib.read("images/mask", rows))
    off = s.images.image_offsets
    for i in range(len(s)):  # blob ranges that cross 256 KiB chunk and shard boundaries
        assert s.image_bytes(i) == lib.read("images/image_blob", slice(int(off[i]), int(off[i + 1]))).tobytes()


def test_compressed_hot_array_falls_back_to_one_library_call_per_batch(
        zarr_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    z = tmp_path / "zstd.zarr"
    shutil.copytree(zarr_store, z)
    with zarr_backend._quiet():
        g = zarr.open_group(str(z), mode="a")
        pixels = g["images/pixels"][...]
        del g["images/pixels"]
        g.create_array("images/pixels", data=pixels, chunks=(1, *pixels.shape[1:]))  # default: zstd
        zarr.consolidate_metadata(str(z))
    s = spairstore.open(z)
    assert s.extents["images/pixels"] is None and s.extents["images/mask"] is not None
    calls = []
    real = zarr_backend.ZarrReader.read
    monkeypatch.setattr(zarr_backend.ZarrReader, "read",
                        lambda self, name, index=(): calls.append(name) or real(self, name, index))
    rows = [7, 2, 7, 0, 11]
    np.testing.assert_array_equal(s.read("pixels", rows), pixels[rows])
    assert calls == ["images/pixels"]


def test_unwritten_chunks_read_as_zeros(zarr_store: Path, tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "holes.zarr"
    shutil.copytree(zarr_store, out)
    before = spairstore.open(out).read("pixels", [0, 2, 3])
    (out / "images/pixels/c/0/0/0/0").unlink()  # the shard of rows 0..2
    s = spairstore.open(out)
    got = s.read("pixels", [0, 2, 3])
    assert not got[:2].any() and np.array_equal(got[2], before[2])
    np.testing.assert_array_equal(got, reader_for(out).read("images/pixels", np.array([0, 2, 3])))


def test_cli_pack_format_convert_and_overwrite(synth_root: Path, synth_store: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spairstore.cli import app

    r = CliRunner()
    out = tmp_path / "store.dir"
    res = r.invoke(app, ["pack", str(synth_root), str(out), "--size", "32", "--format", "zarr", "--shard-mb", "0.01"])
    assert res.exit_code == 0, res.output
    assert (out / "zarr.json").is_file() and spairstore.open(out).image_size == 32
    # replacing a Zarr directory with another store, through convert
    res = r.invoke(app, ["convert", str(synth_store), str(out)])
    assert res.exit_code == 1 and "exists" in str(res.exception)
    res = r.invoke(app, ["convert", str(synth_store), str(out), "--format", "zarr", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert_stores_equal(synth_store, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or old copies left
    res = r.invoke(app, ["info", str(out), "--json"])
    assert json.loads(res.output)["backend"] == "zarr"


def test_a_part_of_a_store_says_which_store_to_open(zarr_store: Path, tmp_path: Path) -> None:
    """A group or array inside a Zarr store, or a feature set's file beside an HDF5 store, opened by
    mistake: the error names the store to open instead."""
    from spairstore.features.precomputed import add_feature_set
    from spairstore.store.feature_sets import sidecar_path

    for part in (zarr_store / "images", zarr_store / "images" / "pixels"):
        with pytest.raises(spairstore.StoreError, match=re.escape(f"{part}: not a store but a part of the store "
                                                                  f"{zarr_store.resolve()}: open that")):
            spairstore.open(part)
    h5 = tmp_path / "s.h5"
    convert(zarr_store, h5)
    add_feature_set(h5, "m", lambda r: np.zeros((2, 3, 3), np.float32), stride=8, cell_offset=0.5, input_size=24)
    with pytest.raises(spairstore.StoreError, match=re.escape(f"not a spairstore store (the file of feature set 'm' "
                                                              f"of the store {h5}: open that)")):
        spairstore.open(sidecar_path(h5, "m"))


def test_repack_keeps_the_sets_of_the_same_images(synth_root: Path, tmp_path: Path) -> None:
    """pack --overwrite of a Zarr store keeps its feature sets where the new store holds the same images,
    as an HDF5 store keeps the set files beside it; of other images they go, and the summary says so."""
    from spairstore.features.precomputed import add_feature_set

    out = tmp_path / "s.zarr"
    spairstore.pack(synth_root, out, size=24, shard_bytes=20000)
    maps = np.random.default_rng(0).standard_normal((len(spairstore.open(out)), 2, 3, 3)).astype(np.float32)
    for name in ("m", "m-flip"):
        add_feature_set(out, name, maps.__getitem__, stride=8, cell_offset=0.5, input_size=24,
                        flip_of="m" if name == "m-flip" else None)
    old = spairstore.open(out)
    summary = spairstore.pack(synth_root, out, size=24, overwrite=True)
    assert "kept feature set 'm' of the store replaced: made from these same images" in summary.notes
    s = spairstore.open(out)
    assert sorted(s.feature_sets) == ["m", "m-flip"] and s.feature_sets["m-flip"]["flip_of"] == "m"
    np.testing.assert_array_equal(s.read("features/m", np.arange(len(s)), check=True), maps.astype(np.float16))
    assert verify(out).ok and (old.features("m", 3) == maps[3].astype(np.float16)).all()
    shutil.rmtree(out / "features" / "m-flip")  # damaged by hand: the repack goes on without it
    summary = spairstore.pack(synth_root, out, size=24, overwrite=True)
    assert summary.notes[-1] == "feature set 'm-flip' of the store replaced has no files (damaged): not kept"
    assert sorted(spairstore.open(out).feature_sets) == ["m"]
    summary = spairstore.pack(synth_root, out, size=32, overwrite=True)
    assert summary.notes[-1] == ("feature set m was made from other images than the new store's (another size or "
                                 "source): dropped with the store replaced")
    assert spairstore.open(out).feature_sets == {} and verify(out).ok


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_convert_over_a_store_keeps_its_sets(synth_root: Path, tmp_path: Path, fmt: str) -> None:
    """convert --overwrite loses no set of the store it replaces that the source lacks: those of the same
    images are kept (HDF5: set files hard-linked beside the new store), the source's set of a name wins,
    and of other images an HDF5 set file stays (refused) while a Zarr set goes; the notes say each."""
    from spairstore.features.precomputed import add_feature_set

    dst, src, other = tmp_path / f"d.{fmt}", tmp_path / "src.zarr", tmp_path / "other.zarr"
    spairstore.pack(synth_root, dst, size=24)
    spairstore.pack(synth_root, src, size=24)
    spairstore.pack(synth_root, other, size=32)
    n = len(spairstore.open(dst))
    maps = np.random.default_rng(1).standard_normal((n, 2, 3, 3)).astype(np.float32)
    for store, name, m in ((dst, "mine", maps), (dst, "both", maps), (src, "both", -maps)):
        add_feature_set(store, name, m.__getitem__, stride=8, cell_offset=0.5, input_size=24)
    summary = convert(src, dst, overwrite=True)
    assert sorted(summary.notes) == [
        "feature set 'both' of the store replaced: replaced by the new store's set of that name",
        "kept feature set 'mine' of the store replaced: made from these same images"]
    assert "  note: kept feature set 'mine'" in str(summary)
    s = spairstore.open(dst)
    assert sorted(s.feature_sets) == ["both", "mine"] and verify(dst).ok
    np.testing.assert_array_equal(s.read("features/mine", np.arange(n), check=True), maps.astype(np.float16))
    np.testing.assert_array_equal(s.read("features/both", np.arange(n), check=True), (-maps).astype(np.float16))
    s.close()
    summary = convert(other, dst, overwrite=True)
    s = spairstore.open(dst)
    assert s.feature_sets == {} and verify(dst).ok is (fmt == "zarr")  # verify reports a refused set file
    if fmt == "h5":
        assert sorted(s.stale_feature_sets) == ["both", "mine"]
        assert summary.notes[0] == ("feature set 'both' of the store replaced was made from other images: its file "
                                    "stays beside the new store, which refuses it")
    else:
        assert summary.notes == ["feature sets both, mine were made from other images than the new store's "
                                 "(another size or source): dropped with the store replaced"]


@pytest.mark.parametrize("fmt", ["h5", "zarr"])
def test_a_store_named_by_a_link_is_replaced_where_the_link_points(synth_root: Path, tmp_path: Path, fmt: str) -> None:
    """pack and convert --overwrite through a symbolic link (a store on another disk) write the store it
    leads to, as open reads it, keeping the link; its sets stay, and a job through the link and one
    through the real path exclude each other."""
    from spairstore.features.precomputed import add_feature_set

    real, link, src = tmp_path / "disk" / f"s.{fmt}", tmp_path / f"l.{fmt}", tmp_path / "src.zarr"
    real.parent.mkdir()
    spairstore.pack(synth_root, real, size=24)
    spairstore.pack(synth_root, src, size=24)
    link.symlink_to(real)
    n = len(spairstore.open(link))
    add_feature_set(link, "m", np.zeros((n, 2, 3, 3), np.float32).__getitem__, stride=8, cell_offset=0.5,
                    input_size=24)
    assert spairstore.pack(synth_root, link, size=24, overwrite=True).path == real
    assert convert(src, link, overwrite=True).dst == real
    assert link.is_symlink() and link.resolve() == real and sorted(p.name for p in tmp_path.iterdir()) == [
        "disk", link.name, src.name]
    assert sorted(spairstore.open(link).feature_sets) == ["m"] and verify(real).ok

    def meanwhile(row: int) -> np.ndarray:
        if row == 5:  # (row 0 is read first, for the shape, before the set's run begins)
            with pytest.raises(spairstore.SpairstoreError, match="a `spairstore features` run is adding"):
                spairstore.pack(synth_root, link, size=24, overwrite=True)
        return np.zeros((2, 3, 3), np.float32)

    add_feature_set(real, "k", meanwhile, stride=8, cell_offset=0.5, input_size=24)


def test_bad_paths_and_formats(synth_store: Path, tmp_path: Path) -> None:
    with pytest.raises(spairstore.SpairstoreError, match="cannot tell the store format"):
        convert(synth_store, tmp_path / "out.bin")
    with pytest.raises(spairstore.SpairstoreError, match="unknown store format"):
        convert(synth_store, tmp_path / "out.zarr", format="parquet")
    with pytest.raises(spairstore.SpairstoreError, match="same store"):
        convert(synth_store, synth_store, overwrite=True)
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(spairstore.StoreError, match="empty.zarr"):
        spairstore.open(tmp_path / "empty.zarr")
    with pytest.raises(spairstore.StoreError, match="remote stores must be Zarr"):
        spairstore.open("https://example.org/spair.h5")
    with pytest.raises(spairstore.StoreError, match="no such store"):
        spairstore.open(tmp_path / "missing.h5")
    g = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    g.attrs["format"] = "something-else"
    with pytest.raises(spairstore.StoreError, match="not a spairstore store"):
        spairstore.open(tmp_path / "other.zarr")
    with pytest.raises(spairstore.StoreError, match="not a spairstore store"):
        convert(tmp_path / "other.zarr", tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists()


def test_failed_zarr_pack_leaves_nothing(synth_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "SPair-71k"
    shutil.copytree(synth_root, root)
    sorted(root.glob("JPEGImages/*/*.jpg"))[-1].write_bytes(b"not a jpeg")
    with pytest.raises(spairstore.SourceError, match="cannot decode"):
        spairstore.pack(root, tmp_path / "out.zarr", size=32)
    assert [p.name for p in tmp_path.iterdir()] == ["SPair-71k"]


# -- remote ------------------------------------------------------------------------------------------
class NoRangeHandler(http.server.SimpleHTTPRequestHandler):
    """``python -m http.server`` as it is (quiet): every request gets the whole file."""

    def log_message(self, *args: object) -> None:
        pass


class RangeHandler(NoRangeHandler):
    """Python's static file server plus single byte-range requests, as object stores and web servers
    serve them (``python -m http.server`` ignores ``Range``, which remote Zarr shards need)."""

    def send_head(self):  # type: ignore[no-untyped-def]
        self._remaining = None
        path = self.translate_path(self.path)
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range") or "")
        if not m or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        a, b = m.groups()
        start, end = (max(0, size - int(b)), size - 1) if not a else (int(a), min(size - 1, int(b or size - 1)))
        if start > end:
            self.send_error(416)
            return None
        f = open(path, "rb")  # noqa: SIM115 - closed by the base class after copyfile
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self._remaining = end - start + 1
        return f

    def copyfile(self, source, outputfile):  # type: ignore[no-untyped-def]
        if self._remaining is None:
            return super().copyfile(source, outputfile)
        outputfile.write(source.read(self._remaining))


@contextlib.contextmanager
def _serve(folder: Path, handler: type[http.server.SimpleHTTPRequestHandler]) -> Iterator[str]:
    pytest.importorskip("aiohttp")
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def http_root(zarr_store: Path) -> Iterator[str]:
    """``http://127.0.0.1:PORT`` serving the folder that holds the Zarr store."""
    with _serve(zarr_store.parent, RangeHandler) as root:
        yield root


def test_server_without_range_requests_is_named(zarr_store: Path) -> None:
    with _serve(zarr_store.parent, NoRangeHandler) as root:
        s = spairstore.open(f"{root}/{zarr_store.name}")  # metadata are whole files: they read
        with pytest.raises(spairstore.StoreError, match=r"cannot read images/pixels \(.*checksum.*\); does the "
                                                        r"server honour HTTP range requests\?"):
            s.read("pixels", [0, 1])


def test_remote_read_over_http_equals_local(zarr_store: Path, http_root: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"{http_root}/{zarr_store.name}"
    remote, local = spairstore.open(url), spairstore.open(zarr_store)
    assert remote.path == url and all(e is None for e in remote.extents.values())
    calls = []
    real = zarr_backend.ZarrReader.read
    monkeypatch.setattr(zarr_backend.ZarrReader, "read",
                        lambda self, name, index=(): calls.append(name) or real(self, name, index))
    np.testing.assert_array_equal(remote.read("pixels", [9, 1, 9, 4]), local.read("pixels", [9, 1, 9, 4]))
    assert calls == ["images/pixels"]  # one library call for the batch
    monkeypatch.undo()
    assert_reads_equal(local, remote)
    # a remote store converts to a local one, losslessly
    convert(url, tmp_path / "copy.h5")
    assert_stores_equal(zarr_store, tmp_path / "copy.h5")


def test_remote_missing_store_is_a_store_error(http_root: str) -> None:
    with pytest.raises(spairstore.StoreError, match="nothing.zarr"):
        spairstore.open(f"{http_root}/nothing.zarr")


def _pixels_in_child(store: spairstore.Store, rows: list[int]) -> np.ndarray:
    return store.read("pixels", rows)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_store_reads_the_same_in_child_processes(zarr_store: Path, http_root: str, method: str) -> None:
    import multiprocessing as mp

    rows = [3, 0, 3, 8]
    for path in (zarr_store, f"{http_root}/{zarr_store.name}"):
        s = spairstore.open(path)
        want = s.read("pixels", rows)  # parent has mapped files / opened zarr before the fork
        with mp.get_context(method).Pool(1) as pool:
            np.testing.assert_array_equal(pool.apply(_pixels_in_child, (s, rows)), want)


def test_batch_rows_out_of_range(zarr_store: Path, synth_store: Path) -> None:
    for path in (zarr_store, synth_store):
        s = spairstore.open(path)
        for bad in ([0, len(s)], [-1, 2]):
            with pytest.raises(IndexError, match="out of range"):
                s.read("pixels", bad)
        with pytest.raises(TypeError, match=r"1-d sequence .*read\(field, \[i\]\)"):
            s.read("pixels", 0)  # type: ignore[arg-type]


def test_eval_and_stats_over_zarr_and_remote_equal_hdf5(synth_store: Path, zarr_store: Path, http_root: str) -> None:
    from typer.testing import CliRunner

    from spairstore.cli import app

    def run(*args: str) -> dict:
        res = CliRunner().invoke(app, list(args))
        assert res.exit_code == 0, res.output
        d = json.loads(res.stdout)
        d.pop("store")
        return d

    for cmd in (["stats", "--json"], ["eval", "--method", "identity", "--split", "test", "--json"]):
        want = run(cmd[0], str(synth_store), *cmd[1:])
        assert run(cmd[0], str(zarr_store), *cmd[1:]) == want
        assert run(cmd[0], f"{http_root}/{zarr_store.name}", *cmd[1:]) == want


def test_empty_byte_range_at_the_end_of_a_blob(zarr_store: Path, synth_store: Path) -> None:
    """An image without a mask file has an empty range, which may start exactly where the blob ends."""
    for path in (zarr_store, synth_store):
        s = spairstore.open(path)
        end = int(s.images.mask_offsets[-1])
        assert s._rows("images/mask_blob", end, end).size == 0
