"""Opening untrusted stores: links to other files, wrong dtypes and shapes, bad offsets, truncation,
random corruption. Each gives a StoreError; none crashes the interpreter."""
from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

import spairstore
from spairstore.core.schema import PAYLOAD_FIELDS
from tests.conftest import cli_env


@pytest.fixture()
def copy(synth_store: Path, tmp_path: Path) -> Path:
    p = tmp_path / "store.h5"
    shutil.copy(synth_store, p)
    return p


def replace(f: h5py.File, name: str, data: np.ndarray) -> None:
    del f[name]
    f[name] = data


def external_link(f: h5py.File, tmp: Path) -> None:
    f["images/evil"] = h5py.ExternalLink(str(tmp.parent / "elsewhere.h5"), "/data")


def external_storage(f: h5py.File, tmp: Path) -> None:
    n = f["images/category"].shape[0]
    (tmp.parent / "outside.bin").write_bytes(b"\0" * 2 * n)
    del f["images/category"]
    f.create_dataset("images/category", shape=(n,), dtype="int16",
                     external=[(str(tmp.parent / "outside.bin"), 0, 2 * n)])


def virtual_dataset(f: h5py.File, tmp: Path) -> None:
    n = f["images/category"].shape[0]
    with h5py.File(tmp.parent / "source.h5", "w") as src:
        src["x"] = np.zeros(n, dtype=np.int16)
    layout = h5py.VirtualLayout(shape=(n,), dtype="int16")
    layout[:] = h5py.VirtualSource(str(tmp.parent / "source.h5"), "x", shape=(n,))
    del f["images/category"]
    f.create_virtual_dataset("images/category", layout)


@pytest.mark.parametrize("make, message", [
    (external_link, "external link to"),
    (external_storage, "external storage in"),
    (virtual_dataset, "virtual dataset over"),
], ids=["external-link", "external-storage", "virtual-dataset"])
def test_refuses_references_to_other_files(copy: Path, make: Callable, message: str) -> None:
    with h5py.File(copy, "a") as f:
        make(f, copy)
    with pytest.raises(spairstore.StoreError, match=f"{message}.*refusing"):
        spairstore.open(copy)


@pytest.mark.parametrize("change, message", [
    (lambda f: replace(f, "images/category", f["images/category"][()].astype(np.float32)), "has dtype float32"),
    (lambda f: replace(f, "images/pixels", np.zeros((3, 8, 8, 3), np.uint8)), "images/pixels has shape"),
    (lambda f: replace(f, "images/bbox", np.zeros((2, 4), np.float32)), "images/bbox has 2 rows"),
    (lambda f: replace(f, "pairs/test/src_kps", np.zeros(3, np.float32)), "pairs/test/src_kps has shape"),
    (lambda f: f.__delitem__("pairs/val/trg"), "pairs/val/trg is missing"),
    (lambda f: replace(f, "images/image_offsets", f["images/image_offsets"][()] * 2), "do not delimit"),
    (lambda f: replace(f, "pairs/trn/src", f["pairs/trn/src"][()] + 10_000), "pairs/trn/src holds values outside"),
    (lambda f: replace(f, "images/category", f["images/category"][()] - 1), "images/category holds values outside"),
    (lambda f: f.attrs.__setitem__("image_size", np.bytes_(json.dumps("big"))), "'image_size' has an invalid value"),
    (lambda f: f.attrs.__setitem__("splits", np.bytes_(json.dumps(["../x"]))), "'splits' has an invalid value"),
    (lambda f: f.attrs.__delitem__("dataset"), "'dataset' is missing"),
    (lambda f: f.attrs.__setitem__("splits", np.bytes_(b"{not json")), "unreadable metadata"),
], ids=["dtype", "pixels-shape", "rows", "pair-shape", "missing", "offsets", "image-index", "category-index",
        "attr-type", "split-name", "attr-missing", "attr-json"])
def test_validates_layout_before_mapping(copy: Path, change: Callable, message: str) -> None:
    """At open; a pair table's indices when it is first read."""
    with h5py.File(copy, "a") as f:
        change(f)
    with pytest.raises(spairstore.StoreError, match=message):
        s = spairstore.open(copy)
        for split in s.splits:
            s.pairs(split)


def test_truncated_file_is_an_error(copy: Path) -> None:
    with h5py.File(copy, "r") as f:
        end = f["images/pixels"].id.get_offset() + f["images/pixels"].id.get_storage_size()
    with open(copy, "r+b") as f:
        f.truncate(end - 100)  # into the pixels: the rest of the file is gone
    with pytest.raises(spairstore.StoreError, match="store.h5"):
        spairstore.open(copy)


def test_extent_past_the_end_is_refused(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hot array said to lie (partly) past the end of the file is refused before it is mapped: reading
    such a map would kill the process (SIGBUS)."""
    from spairstore.store.backends import hdf5

    extent = hdf5.HDF5Reader.extent
    monkeypatch.setattr(hdf5.HDF5Reader, "extent", lambda self, name: extent(self, name)._replace(
        offsets=np.array([copy.stat().st_size - 10])) if name == "images/mask" else extent(self, name))
    with pytest.raises(spairstore.StoreError, match="images/mask .* of store.h5.* lies past the end"):
        spairstore.open(copy)


_DRIVER = """
import faulthandler, sys
faulthandler.enable()
import spairstore
from spairstore.cli import store_info
from spairstore.store.verify import verify

def read_all(p):
    with spairstore.open(p) as s:
        for i in range(len(s)):
            s.pixels(i); s.mask(i); s.image_bytes(i); s.mask_bytes(i)

for p in sys.argv[1:]:
    print("FILE", p, flush=True)
    for name, fn in (("open", read_all), ("info", store_info), ("verify", lambda p: verify(p).ok)):
        try:
            r = fn(p)
            print(name, "ok" if r is not False else "differs", flush=True)
        except spairstore.SpairstoreError as e:
            print(name, "error", str(e).replace(chr(10), " ")[:200], flush=True)
"""


def _corrupt(clean: bytes, rng: np.random.Generator, payload: list[tuple[int, int]], kind: str) -> bytes:
    """``clean`` truncated, or with random bytes changed: anywhere, or only outside the payload arrays
    (superblock, object headers, heaps, tables: what HDF5 and the reader parse)."""
    if kind == "truncate":
        return clean[: int(rng.integers(0, len(clean)))]
    data = bytearray(clean)
    outside = np.ones(len(data), bool)
    for start, length in payload:
        outside[start:start + length] = False
    where = np.flatnonzero(outside) if kind == "metadata" else np.arange(len(data))
    for pos in rng.choice(where, size=int(rng.integers(1, 40)), replace=False):
        data[pos] ^= int(rng.integers(1, 256))
    return bytes(data)


@pytest.mark.slow
def test_fuzz_never_crashes(synth_store: Path, tmp_path: Path) -> None:
    """120 random corruptions and truncations; open (reading every record), info and verify run in
    child interpreters and may only succeed or raise a SpairstoreError (no other exception, no signal)."""
    rng = np.random.default_rng(1234)
    clean = synth_store.read_bytes()
    with h5py.File(synth_store, "r") as f:
        payload = [(f[f"images/{k}"].id.get_offset(), f[f"images/{k}"].id.get_storage_size()) for k in PAYLOAD_FIELDS]
    files = []
    for i, kind in enumerate(["metadata"] * 70 + ["anywhere"] * 25 + ["truncate"] * 25):
        p = tmp_path / f"fuzz{i:03d}-{kind}.h5"
        p.write_bytes(_corrupt(clean, rng, payload, kind))
        files.append(p)
    outcomes = {}
    for batch in (files[i::4] for i in range(4)):
        res = subprocess.run(["python", "-c", _DRIVER, *map(str, batch)], capture_output=True, text=True,
                             env=cli_env(), timeout=600)
        last = [ln for ln in res.stdout.splitlines() if ln.startswith("FILE")][-1:]
        assert res.returncode == 0, f"crashed (code {res.returncode}) on {last}: {res.stderr[-3000:]}"
        current = None
        for ln in res.stdout.splitlines():
            if ln.startswith("FILE"):
                current = ln.split()[1]
            else:
                op, status, *_ = ln.split(" ", 2)
                outcomes[(current, op)] = status
    assert len(outcomes) == 3 * len(files)
    # And the damage is found: open refuses the file or verify reports differences (a few changed
    # bytes may land in unused space; none did in a run of 1,500).
    found = [outcomes[(str(p), "open")] == "error" or outcomes[(str(p), "verify")] != "ok" for p in files]
    assert sum(found) >= 0.95 * len(files)
    assert all(f for f, p in zip(found, files) if "truncate" in p.name)


def _redeclare(f: h5py.File, name: str, rows: int | None = None, dtype: str | None = None,
               width: int | None = None) -> None:
    """``name`` re-declared bigger than the file: chunked and compressed, never written."""
    old = f[name]
    shape = list(old.shape)
    if rows is not None:
        shape[0] = rows
    if width is not None:
        shape[1] = width
    del f[name]
    f.create_dataset(name, shape=tuple(shape), dtype=dtype or old.dtype, compression="gzip",
                     chunks=(1, *(min(n, 4096) for n in shape[1:])))


def _image_table_rows(f: h5py.File, rows: int) -> None:
    # every array of a row per image (the blobs' rows are bytes; their CRC arrays have a row per image)
    per_image = [k for k, v in f["images"].items() if isinstance(v, h5py.Dataset)
                 and (not k.endswith("_blob") or k.startswith("crc32_"))]
    for name in per_image:
        _redeclare(f, f"images/{name}", rows=rows + name.endswith("_offsets"))


@pytest.mark.parametrize("change, message", [
    (lambda f: _image_table_rows(f, 200_000_000), r"images/\w+ declares \(200000001?.*may take at most"),
    (lambda f: [_redeclare(f, f"pairs/trn/{k}", width=10**8) for k in ("kps_ids", "src_kps", "trg_kps")],
     "pairs/trn/kps_ids declares 100,000,000 keypoint columns"),
    (lambda f: _redeclare(f, "images/name", dtype="S150000000"), "images/name declares strings of 150,000,000 bytes"),
], ids=["image-rows", "keypoint-columns", "string-width"])
def test_refuses_memory_bombs(copy: Path, change: Callable, message: str) -> None:
    """Declarations that cost nothing on disk but would be allocated whole by open, info, verify and eval
    are refused before anything is read, naming the array."""
    with h5py.File(copy, "a") as f:
        change(f)
    assert copy.stat().st_size < 50 * 2**20
    with pytest.raises(spairstore.StoreError, match=message):
        spairstore.open(copy)
    res = subprocess.run(["python", "-m", "spairstore", "info", str(copy)], capture_output=True, text=True,
                         env=cli_env())
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0 and message.split()[0][:6] in res.stderr


def test_refuses_zarr_v2(tmp_path: Path) -> None:
    import zarr

    g = zarr.open_group(tmp_path / "old.zarr", mode="w", zarr_format=2)
    g.attrs["format"] = "spairstore"
    for i in range(20):
        g.create_array(f"images/a{i}", shape=(3,), dtype="int32")
    res = subprocess.run(["python", "-m", "spairstore", "info", str(tmp_path / "old.zarr")], capture_output=True,
                         text=True, env=cli_env())
    assert res.returncode == 1
    assert res.stderr.strip() == f"error: {tmp_path / 'old.zarr'}: a Zarr v2 store; spairstore reads Zarr v3 only"


def test_fuzz_declared_shapes(synth_store: Path, tmp_path: Path) -> None:
    """40 random re-declarations of one array each (rows, widths, dtypes; chunked and never written, so
    they cost nothing on disk): opening, reading every table and verifying either refuses the store with
    a StoreError or reads it, and then verify finds the change or the data equal the clean store's."""
    from spairstore.store.verify import verify

    rng = np.random.default_rng(7)
    with h5py.File(synth_store, "r") as f:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    with spairstore.open(synth_store) as s:
        clean = {k: s.pairs(k) for k in s.splits}
    dtypes = ["int8", "int64", "float16", "S7", "S100000", "uint32"]
    for i in range(40):
        p = tmp_path / f"shape{i}.h5"
        shutil.copy(synth_store, p)
        name = names[int(rng.integers(len(names)))]
        with h5py.File(p, "a") as f:
            shape = list(f[name].shape)
            what = rng.choice(["rows", "width", "dtype"])
            if what == "rows":
                shape[0] = int(rng.choice([0, max(0, shape[0] - 1), shape[0] + 1, shape[0] * 10**6 + 3]))
            elif what == "width" and len(shape) > 1:
                shape[1] = int(rng.choice([0, shape[1] + 1, 10**7]))
            dtype = str(rng.choice(dtypes)) if what == "dtype" else f[name].dtype
            del f[name]
            f.create_dataset(name, shape=tuple(shape), dtype=dtype, compression="gzip",
                             chunks=tuple(max(1, min(n, 4096)) for n in shape) if all(shape) else None)
        try:
            with spairstore.open(p) as s:
                tables = {k: s.pairs(k) for k in s.splits}
                _ = s.manifest
                report = verify(p)
        except spairstore.StoreError:
            continue
        same = all(np.array_equal(tables[k][c], clean[k][c], equal_nan=clean[k][c].dtype.kind == "f")
                   for k in clean for c in clean[k])
        assert not report.ok or same, f"{name} {what} {shape} {dtype}: read differently, verify found nothing"
