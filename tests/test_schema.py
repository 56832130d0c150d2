"""The schema is the one declaration of the store's columns: the writer's tables, the layout check and
the datasets follow it, and a packed store holds exactly the arrays it declares."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import spairstore
from spairstore.core import schema
from spairstore.core.records import DatasetRecords, ImageRecord, PairRecord
from spairstore.core.schema import FIELDS, Encoding, encode_table, field_of, is_hot, store_fields


def _shapes(f: h5py.File) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    f.visititems(lambda k, v: out.__setitem__(k, (v.shape, v.dtype)) if isinstance(v, h5py.Dataset) else None)
    return out


def test_packed_store_holds_exactly_the_declared_arrays(synth_store: Path) -> None:
    s = spairstore.open(synth_store)
    declared = store_fields(s.shapes, s.attrs)
    assert {f.path for f in declared if not f.optional} <= set(s.shapes) <= {f.path for f in declared}
    for f in (f for f in declared if f.path in s.shapes):
        shape, dtype = s.shapes[f.path]
        assert shape[1:] == f.row_shape, f.path
        assert dtype.kind == "S" if f.dtype == "S" else dtype == f.np_dtype, f.path
    assert {f.path for f in declared if f.hot} == {k for k in s.shapes if is_hot(k)} == {
        "images/pixels", "images/mask", "images/image_blob", "images/mask_blob"}


def test_declarations_are_complete_and_consistent() -> None:
    for f in FIELDS:
        assert f.doc and "\n" not in f.doc, f.path
        assert f.table in schema.TABLES and f.frame in schema.FRAMES, f.path
        if f.table == "root attrs":
            assert f.dtype in schema.ATTR_TYPES, f.path
            continue
        assert f.frame != "none" or f.units != "pixels", f"{f.path}: pixels in which frame?"
        if f.padding:
            f.pad_value  # noqa: B018 - parses as the field's dtype
    paths = [f.path for f in FIELDS]
    assert len(paths) == len(set(paths))
    assert field_of("pairs/trn/src_kps").path == "pairs/{split}/src_kps"
    assert field_of("features/dinov2/data").hot and not field_of("features/dinov2/crc32").hot
    assert field_of("images/unknown") is None and field_of("pairs/trn/x/src") is None


def _records(tmp_path: Path) -> DatasetRecords:
    nan = float("nan")
    kps = np.array([[1, 2], [nan, nan], [3.5, 4]], np.float32)
    ims = [ImageRecord("cat", "a", tmp_path / "a.jpg", None, 200, 100, (1, 2, 30, 40), kps, azimuth=3, pose="left"),
           ImageRecord("dog", "b", tmp_path / "b.jpg", None, 50, 80, (nan,) * 4, kps * 2, pose="", depth=1)]
    pair = lambda split, i, n, src, trg: PairRecord(
        split, i, f"{i}-{src[1]}-{trg[1]}", src[0], src, trg, np.arange(n, dtype=np.int16),
        np.full((n, 2), i, np.float32), np.full((n, 2), -i, np.float32), viewpoint=i % 3, small=i == 1)
    return DatasetRecords("test", tmp_path, ["cat", "dog"], 3, ims,
                          {"trn": [pair("trn", 1, 2, ims[0].key, ims[1].key)],
                           "test": [pair("test", 1, 1, ims[1].key, ims[1].key),
                                    pair("test", 7, 3, ims[1].key, ims[1].key)]}, [])


def test_tables_encoded_from_records(tmp_path: Path) -> None:
    """Every encoded column against values written out here from the records."""
    rec = _records(tmp_path)
    enc = Encoding.of(rec, 64, ["", "left"])
    images = encode_table("images", rec.images, enc, {"S": 64, "K": 3})
    assert set(images) == {f.name for f in FIELDS if f.table == "images" and f.encode is not None}
    assert images["name"].tolist() == [b"a", b"b"] and images["category"].tolist() == [0, 1]
    assert images["size"].tolist() == [[200, 100], [50, 80]]
    # longest side to 64, centred: 64 x 32 at (0, 16); 40 x 64 at (12, 0)
    np.testing.assert_allclose(images["scale"], [[64 / 200, 32 / 100], [40 / 50, 64 / 80]])
    assert images["offset"].tolist() == [[0, 16], [12, 0]]
    assert images["pose"].tolist() == [1, 0] and images["azimuth"].tolist() == [3, -1]
    assert images["depth"].tolist() == [3, 1] and images["truncated"].tolist() == [-1, -1]
    assert images["splits"].tolist() == [0b01, 0b11]  # a: trn only; b: trn and test
    np.testing.assert_array_equal(images["keypoints"][1], rec.images[1].keypoints)
    assert images["keypoints"].dtype == np.float32 and np.isnan(images["bbox"][1]).all()

    test = encode_table("pairs", rec.pairs["test"], enc, {"M": 4})
    assert set(test) == {f.name for f in FIELDS if f.path.startswith("pairs/")}
    assert test["pair_id"].tolist() == [1, 7] and test["stem"].tolist() == [b"1-b-b", b"7-b-b"]
    assert test["src"].tolist() == [1, 1] and test["trg"].tolist() == [1, 1] and test["n_kps"].tolist() == [1, 3]
    assert test["kps_ids"].tolist() == [[0, -1, -1, -1], [0, 1, 2, -1]]
    assert test["src_kps"].shape == (2, 4, 2) and test["src_kps"][1, :3].tolist() == [[7, 7]] * 3
    assert np.isnan(test["trg_kps"][0, 1:]).all() and np.isnan(test["trg_kps"][1, 3]).all()
    assert test["viewpoint"].tolist() == [1, 1] and test["small"].tolist() == [True, False]
    assert test["subset"].tolist() == [-1, -1] and test["category"].tolist() == [1, 1]
    assert encode_table("categories", rec.categories, enc)["categories"].tolist() == [b"cat", b"dog"]


def test_writer_tables_are_the_schema_encoding(synth_root: Path, synth_store: Path) -> None:
    """Every column the writer stored is the schema's encoding of the converter's records."""
    import converters

    rec = converters.read(synth_root)
    s = spairstore.open(synth_store)
    enc = Encoding.of(rec, s.image_size, s.pose_names)
    with h5py.File(synth_store, "r") as f:
        for name, col in encode_table("images", rec.images, enc, {"S": s.image_size, "K": rec.num_keypoints}).items():
            np.testing.assert_array_equal(f[f"images/{name}"][()], col, err_msg=name)
        for split in s.splits:
            width = f[f"pairs/{split}/kps_ids"].shape[1]
            for name, col in encode_table("pairs", rec.pairs[split], enc, {"M": width}).items():
                np.testing.assert_array_equal(f[f"pairs/{split}/{name}"][()], col, err_msg=f"{split}/{name}")


def test_datasets_read_declared_pair_columns(synth_store: Path) -> None:
    from spairstore.torch.datasets import PairDataset

    declared = {f.name for f in FIELDS if f.path.startswith("pairs/")}
    assert set(PairDataset(synth_store, "test")._pairs) <= declared


@pytest.mark.parametrize("path", ["images/name", "pairs/test/src", "categories", "manifest/sha256"])
def test_layout_check_names_a_missing_declared_array(synth_store: Path, path: str) -> None:
    with h5py.File(synth_store, "r") as f:
        shapes, attrs = _shapes(f), spairstore.open(synth_store).attrs
    del shapes[path]
    assert f"{path} is missing" in schema.check_layout(shapes, attrs)


def test_verify_lists_arrays_outside_the_schema_and_missing_fields(synth_store: Path, tmp_path: Path) -> None:
    from spairstore.store.verify import verify

    assert verify(synth_store).unknown == [] and verify(synth_store).missing == []
    path = tmp_path / "odd.h5"
    path.write_bytes(synth_store.read_bytes())
    with h5py.File(path, "a") as f:
        f["images/extra"] = np.zeros(3)
        f["features/lite/data"] = np.zeros((len(f["images/name"]), 2, 1, 1), np.float16)  # no crc32 beside it
    report = verify(path)
    assert report.unknown == ["images/extra"] and report.missing == ["features/lite/crc32"]
    assert "not in the schema: images/extra" in str(report)
    assert "missing from the store: features/lite/crc32" in str(report)


def test_repr_reads_nothing(synth_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = spairstore.open(synth_store)
    counts = {split: s.shapes[f"pairs/{split}/pair_id"][0][0] for split in s.splits}

    def no_io(*args: object, **kwargs: object) -> None:
        raise AssertionError("repr did I/O")

    monkeypatch.setattr(s, "_library", no_io)
    monkeypatch.setattr(s, "_rows", no_io)
    text = repr(s)
    assert s._tables == {}  # no pair table loaded
    assert text == (f"<spairstore.Store synth.h5: spair71k, {len(s)} images, pairs "
                    f"{{{', '.join(f'{k}: {v}' for k, v in counts.items())}}}>")


# -- a self-describing store: attributes any HDF5 / Zarr reader parses -----------------------------------
def test_plain_h5py_parses_every_root_attribute(synth_store: Path) -> None:
    attrs = spairstore.open(synth_store).attrs
    assert set(attrs) <= set(schema.ROOT_ATTRS)
    with h5py.File(synth_store, "r") as f:
        listed = json.loads(f.attrs["json_attributes"])
        assert listed == sorted(k for k in attrs if schema.ROOT_ATTRS[k].dtype == "json")
        plain = {}
        for k, v in f.attrs.items():
            if k == "json_attributes":
                continue
            if k in listed:
                plain[k] = json.loads(v)
            elif schema.ROOT_ATTRS[k].dtype == "int":
                assert isinstance(v, np.integer), k
                plain[k] = int(v)
            else:
                assert isinstance(v, bytes) and f.attrs.get_id(k).get_type().get_cset() == h5py.h5t.CSET_UTF8, k
                plain[k] = v.decode()
    assert plain == attrs
    assert plain["format"] == "spairstore" and plain["format_version"] == "{}.{}".format(*schema.FORMAT_VERSION)


def test_every_array_carries_its_description(synth_store: Path, tmp_path: Path) -> None:
    from spairstore.store.convert import convert

    attrs = spairstore.open(synth_store).attrs
    with h5py.File(synth_store, "r") as f:
        names: list[str] = []
        f.visititems(lambda k, v: names.append(k) if isinstance(v, h5py.Dataset) else None)
        described = {k: {a: v.decode() for a, v in f[k].attrs.items()} for k in names}
    assert all(described[k] == schema.describe(k, attrs) and described[k]["doc"] for k in names)
    assert described["images/splits"]["bits"] == "1: trn, 2: val, 4: test"
    assert described["images/keypoints"] == {"doc": "x, y of each keypoint slot", "frame": "original px",
                                             "units": "pixels", "padding": "NaN"}
    assert described["images/pixels"]["frame"] == "store px"

    z = tmp_path / "s.zarr"
    convert(synth_store, z)
    root = json.loads((z / "zarr.json").read_text())
    assert root["attributes"] == attrs  # native JSON, nothing encoded twice
    for k in names:
        assert json.loads((z / k / "zarr.json").read_text())["attributes"] == described[k], k


def test_feature_sets_are_described(synth_store: Path, tmp_path: Path) -> None:
    from spairstore.features import extract_features
    from spairstore.store.convert import convert

    z = tmp_path / "s.zarr"
    convert(synth_store, z)
    h = tmp_path / "s.h5"
    h.write_bytes(synth_store.read_bytes())
    for path in (h, z):
        extract_features(path, layers=["_blocks.2"], name="lite", input_size=64, batch_size=32)
    from spairstore.store.feature_sets import sidecar_path

    with h5py.File(sidecar_path(h, "lite"), "r") as f:  # an HDF5 store's set lives in its own file
        assert f["features/lite/data"].attrs["doc"].decode() == schema.describe("features/x/data", {})["doc"]
        assert f["features/lite/crc32"].attrs["doc"].decode().startswith("CRC-32")
    for name in ("data", "crc32"):
        meta = json.loads((z / "features" / "lite" / name / "zarr.json").read_text())
        assert meta["attributes"] == schema.describe(f"features/lite/{name}", {})
    assert spairstore.open(z).feature_sets.keys() == {"lite"}


def test_store_before_format_1_2_still_opens(synth_store: Path, tmp_path: Path) -> None:
    """A 1.1 HDF5 store: every root attribute JSON text, no json_attributes, no array descriptions."""
    new = spairstore.open(synth_store)
    old = tmp_path / "old.h5"
    old.write_bytes(synth_store.read_bytes())
    with h5py.File(old, "a") as f:
        for k in list(f.attrs):
            del f.attrs[k]
        for k, v in {**new.attrs, "format_version": "1.1"}.items():
            f.attrs[k] = np.bytes_(json.dumps(v).encode())
        f.visititems(lambda k, v: [v.attrs.__delitem__(a) for a in list(v.attrs)] if isinstance(v, h5py.Dataset)
                     else None)
    s = spairstore.open(old)
    assert s.attrs == {**new.attrs, "format_version": "1.1"}
    np.testing.assert_array_equal(s.pairs("test").src_kps, new.pairs("test").src_kps)


def test_attribute_of_no_known_kind_is_refused(synth_store: Path, tmp_path: Path) -> None:
    p = tmp_path / "odd.h5"
    p.write_bytes(synth_store.read_bytes())
    with h5py.File(p, "a") as f:
        f.attrs["mystery"] = np.arange(3.0)
    with pytest.raises(spairstore.StoreError, match="attribute 'mystery' holds ndarray"):
        spairstore.open(p)


def test_readme_layout_table_is_the_schemas() -> None:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    begin = "<!-- schema table: generated by spairstore.core.schema.markdown_table() -->\n"
    assert text.count(begin) == 1, "README needs one generated schema table"
    table = text.split(begin)[1].split("\n<!-- end of schema table -->")[0]
    assert table == schema.markdown_table(), "README table is stale: paste markdown_table()'s output"
