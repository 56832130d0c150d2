"""``spairstore verify``: every corrupted payload record, table and source file is found and named."""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import spairstore
from spairstore.core.schema import PAYLOAD_FIELDS, field_of_array
from spairstore.store.verify import verify
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(root, store) with 36 images: 144 payload records."""
    from converters.synth import synthesize

    base = tmp_path_factory.mktemp("verify")
    root = base / "SPair-71k"
    synthesize(root, images_per_category=9, categories=["bird", "boat", "cat", "cow"], seed=5)
    spairstore.pack(root, base / "s.h5", size=16)
    return root, base / "s.h5"


def flip(f, offset: int, rng: np.random.Generator) -> None:
    """XOR one byte with a non-zero value."""
    f.seek(offset)
    b = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([b ^ int(rng.integers(1, 256))]))


def record_span(h: h5py.File, field: str, i: int) -> tuple[int, int]:
    """(file offset, length) of record ``i`` of payload ``field``."""
    d = h[f"images/{field}"]
    base = d.id.get_offset()
    if field.endswith("_blob"):
        off = h[f"images/{field[:-5]}_offsets"][()]
        return base + int(off[i]), int(off[i + 1] - off[i])
    row = int(np.prod(d.shape[1:]))
    return base + i * row, row


def test_clean_store_verifies(store: tuple[Path, Path]) -> None:
    root, path = store
    report = verify(path, sources=root)
    assert report.ok, str(report)
    assert report.records == {f"images/{k}": (36, 36) for k in sorted(PAYLOAD_FIELDS)}
    assert report.tables > 40 and report.sources is not None and report.sources[0] == report.sources[1] > 0
    assert report.unchecked == []
    res = run_cli("verify", path, "--sources", root)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr


def test_every_corrupted_record_is_named(store: tuple[Path, Path], tmp_path: Path) -> None:
    _, clean = store
    path = tmp_path / "bad.h5"
    shutil.copy(clean, path)
    s = spairstore.open(clean)
    rng = np.random.default_rng(7)
    expected = set()
    with h5py.File(clean, "r") as h, open(path, "r+b") as f:
        for field in PAYLOAD_FIELDS:
            for i in range(len(s)):
                start, length = record_span(h, field, i)
                for pos in rng.choice(length, size=int(rng.integers(1, 4)), replace=False):
                    flip(f, start + int(pos), rng)
                name = field_of_array(f"images/{field}")  # verify names the field as read() does
                expected.add(f"{name} row {i} ({s.categories[s.images.category[i]]}/{s.images.name[i]})")
    assert len(expected) >= 100
    report = verify(path)
    assert {d.what for d in report.differences} == expected
    assert all("CRC-32 is" in d.reason for d in report.differences)
    res = run_cli("verify", path)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert all(name in res.stdout for name in expected)
    assert "144 records, tables or files differ" in res.stderr


def test_corrupted_table_and_sources_are_named(store: tuple[Path, Path], tmp_path: Path) -> None:
    root_clean, clean = store
    path = tmp_path / "bad.h5"
    shutil.copy(clean, path)
    with h5py.File(clean, "r") as h:
        bbox = h["images/bbox"].id.get_offset()
    with open(path, "r+b") as f:
        flip(f, bbox + 5, np.random.default_rng(0))
    root = tmp_path / "src"
    shutil.copytree(root_clean, root)
    changed = sorted(root.glob("JPEGImages/cow/*.jpg"))[0]
    changed.write_bytes(changed.read_bytes()[:-1] + b"\x00")
    same_size = sorted(root.glob("ImageAnnotation/bird/*.json"))[0]
    same_size.write_bytes(same_size.read_bytes().replace(b'"pose": "', b'"pose": "X', 1)[:-1])
    gone = sorted(root.glob("PairAnnotation/test/*.json"))[0]
    gone.unlink()
    report = verify(path, sources=root)
    got = {d.what: d.reason for d in report.differences}
    assert got.keys() == {"images/bbox", *(p.relative_to(root).as_posix() for p in (changed, same_size, gone))}
    assert "CRC-32 of the table" in got["images/bbox"]
    assert got[changed.relative_to(root).as_posix()] == "SHA-256 differs from the manifest"
    assert got[gone.relative_to(root).as_posix()] == "missing from the source root"


def test_another_folder_as_the_source_is_one_difference(store: tuple[Path, Path], tmp_path: Path) -> None:
    from conftest import run_cli

    root, path = store
    s = spairstore.open(path)
    report = verify(path, sources=tmp_path)
    assert [str(d) for d in report.differences] == [
        f"{tmp_path.resolve()}: none of the {s.manifest.rows:,} source files checked is there (e.g. "
        f"{s.manifest.path[0]}): not the "
        f"folder the store was packed from, which was {root.resolve()}"]
    r = run_cli("verify", path, "--source", tmp_path)
    assert r.returncode == 1 and r.stderr.strip().endswith("1 record, table or file differs (listed above)"), r.stderr


def test_sample_checks_a_fraction(store: tuple[Path, Path]) -> None:
    root, path = store
    report = verify(path, sources=root, sample=0.25, seed=1)
    assert report.ok and report.sample == 0.25
    assert all(c == 9 and t == 36 for c, t in report.records.values())
    assert report.sources is not None and report.sources[0] == -(-report.sources[1] // 4)
    with pytest.raises(spairstore.SpairstoreError, match="fraction"):
        verify(path, sample=1.5)


def test_uncovered_arrays_are_reported(store: tuple[Path, Path], tmp_path: Path) -> None:
    """An array no checksum covers (a hot array without its CRC array, say) is listed, not silently trusted."""
    path = tmp_path / "extra.h5"
    shutil.copy(store[1], path)
    with h5py.File(path, "a") as h:
        h["extra/notes"] = np.arange(3)
    report = verify(path)
    assert report.ok and report.unchecked == ["extra/notes"]
    assert "not covered by a checksum: extra/notes" in str(report)


def test_feature_maps_are_verified(store: tuple[Path, Path], tmp_path: Path) -> None:
    """A feature set's maps are payload records like any other: its CRC array ``features/<name>/crc32``
    is found by the same naming rule, and a corrupted map is named."""
    from spairstore.features import extract_features
    from spairstore.store.feature_sets import sidecar_path

    path = tmp_path / "feat.h5"
    shutil.copy(store[1], path)
    extract_features(path, layers=["_blocks.4"], name="lite", batch_size=16)
    clean = verify(path)
    assert clean.ok and clean.records["features/lite/data"] == (36, 36) and clean.unchecked == []
    sidecar = sidecar_path(path, "lite")  # the set's own file beside the store
    with h5py.File(sidecar, "r") as h:
        d = h["features/lite/data"]
        start = d.id.get_offset() + 7 * int(np.prod(d.shape[1:])) * d.dtype.itemsize
    s = spairstore.open(path)
    with open(sidecar, "r+b") as f:
        flip(f, start + 3, np.random.default_rng(1))
    assert [d.what for d in verify(path).differences] == [
        f"features/lite row 7 ({s.categories[s.images.category[7]]}/{s.images.name[7]})"]


def test_evaluation_refuses_a_damaged_map_or_mask(store: tuple[Path, Path], tmp_path: Path) -> None:
    """NN reads every feature map and mask it scores with its CRC-32 checked: a flipped bit in a test
    image's map or mask stops the evaluation with the row named, not a slightly different PCK."""
    from spairstore.features import extract_features
    from spairstore.store.feature_sets import sidecar_path

    path = tmp_path / "feat.h5"
    shutil.copy(store[1], path)
    extract_features(path, layers=["_blocks.4"], name="lite", batch_size=16)
    extract_features(path, layers=["_blocks.4"], name="lite", batch_size=16, flip=True)
    s = spairstore.open(path)
    clean = spairstore.evaluate(s, "test", spairstore.NearestNeighbour("lite", flip="adaptive"))
    r = int(s.pairs("test").trg[0])
    key = f"{s.categories[s.images.category[r]]}/{s.images.name[r]}"
    with h5py.File(sidecar_path(path, "lite"), "r") as h:
        d = h["features/lite/data"]
        start = d.id.get_offset() + r * int(np.prod(d.shape[1:])) * d.dtype.itemsize
    with open(sidecar_path(path, "lite"), "r+b") as f:
        flip(f, start + 5, np.random.default_rng(2))
    with pytest.raises(spairstore.StoreError, match=rf"features/lite of image row {r} \({key}\) is damaged: .*"
                                                    "spairstore verify"):
        spairstore.evaluate(spairstore.open(path), "test", spairstore.NearestNeighbour("lite"))
    with open(sidecar_path(path, "lite"), "r+b") as f:
        flip(f, start + 5, np.random.default_rng(2))  # the same XOR again: repaired
    with h5py.File(path, "r") as h:
        offset, _ = record_span(h, "mask", r)
    with open(path, "r+b") as f:
        flip(f, offset, np.random.default_rng(3))
    res = run_cli("eval", path, "--method", "nn", "--features", "lite", "--flip", "adaptive")
    assert res.returncode == 1 and f"mask of image row {r} ({key}) is damaged" in res.stderr, res.stderr
    with open(path, "r+b") as f:
        flip(f, offset, np.random.default_rng(3))
    again = spairstore.evaluate(spairstore.open(path), "test", spairstore.NearestNeighbour("lite", flip="adaptive"))
    assert str(again) == str(clean)
