"""add_feature_set: maps computed elsewhere become a feature set (HDF5 sidecar file, Zarr group), read
back equal, validated row by row, resumable."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import spairstore
from spairstore.core.errors import FeatureError
from spairstore.features.extract import partial_feature_sets
from spairstore.store.convert import convert
from spairstore.store.feature_sets import sidecar_dir, sidecar_path
from spairstore.store.verify import verify

C, CELLS = 4, 6  # maps (4, 6, 6): input_size 96, stride 16


def maps_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, C, CELLS, CELLS)).astype(np.float32)


@pytest.fixture(params=["h5", "zarr"])
def store(request: pytest.FixtureRequest, synth_store: Path, tmp_path: Path) -> Path:
    if request.param == "h5":
        return Path(shutil.copyfile(synth_store, tmp_path / "s.h5"))
    out = tmp_path / "s.zarr"
    convert(synth_store, out)
    return out


GEOMETRY = {"stride": 16, "cell_offset": 0.5, "input_size": 96}


@pytest.mark.parametrize("form", ["iterator", "function", "mapping", "rows"])
def test_round_trip(store: Path, form: str) -> None:
    s = spairstore.open(store)
    ref = maps_of(len(s))
    if form == "iterator":  # any order, float32 given, float16 stored
        maps = ((int(r), ref[r]) for r in np.random.default_rng(1).permutation(len(s)))
    elif form == "function":
        maps = ref.__getitem__
    elif form == "mapping":
        maps = {(s.categories[s.images.category[r]], str(s.images.name[r])): ref[r] for r in range(len(s))}
    else:  # keyed by image row, as a loop over ImageDataset batches fills it from batch["row"]
        maps = {np.int64(r): ref[r] for r in np.random.default_rng(2).permutation(len(s))}
    summary = spairstore.add_feature_set(store, "mine", maps, source="my-model", **GEOMETRY)
    assert summary.extracted == len(s) and summary.shape == (len(s), C, CELLS, CELLS)
    assert str(summary).startswith(f"feature set 'mine' in {store}: my-model\n")
    assert f"  run    {len(s)} maps written in " in str(summary) and " on cpu" not in str(summary)
    got = spairstore.open(store)
    np.testing.assert_array_equal(got.read("features/mine", np.arange(len(s))), ref.astype(np.float16))
    attrs = got.feature_sets["mine"]
    assert (attrs["backbone"], attrs["stride"], attrs["cell_offset"], attrs["input_size"]) == ("my-model", 16, 0.5, 96)
    assert (attrs["channels"], attrs["height"], attrs["width"], attrs["dtype"]) == (C, CELLS, CELLS, "float16")
    assert verify(store).ok and partial_feature_sets(store) == {}
    if store.suffix == ".h5":
        assert sidecar_path(store, "mine").is_file()


@pytest.mark.parametrize("dtype", ["float64", "bfloat16", "grad"])
def test_maps_as_a_model_gives_them(synth_store: Path, tmp_path: Path, dtype: str) -> None:
    """numpy's default float64 and torch tensors straight from a model (bfloat16, still needing grad) go
    in as they come and are stored as float16 of the same values."""
    import torch

    store = Path(shutil.copyfile(synth_store, tmp_path / "s.h5"))
    ref = maps_of(len(spairstore.open(store)))
    if dtype == "float64":
        given = ref.astype(np.float64)
    else:
        t = torch.from_numpy(ref)
        given = t.to(torch.bfloat16) if dtype == "bfloat16" else t.clone().requires_grad_(True) * 1
        ref = given.detach().float().numpy()
    spairstore.add_feature_set(store, "m", lambda r: given[r], **GEOMETRY)
    got = spairstore.open(store).read("features/m", np.arange(len(ref)))
    np.testing.assert_array_equal(got, ref.astype(np.float16))


def test_maps_of_zeros(store: Path) -> None:
    """Zero maps (a blank image, a ReLU that never fired) are written like any other: zarr leaves a
    chunk equal to its fill value unwritten unless told, which failed the commit with FileNotFoundError."""
    n = len(spairstore.open(store))
    ref = maps_of(n)
    ref[: n // 2] = 0
    spairstore.add_feature_set(store, "z", ref.__getitem__, **GEOMETRY)
    s = spairstore.open(store)
    np.testing.assert_array_equal(s.read("features/z", np.arange(n), check=True), ref.astype(np.float16))
    assert verify(store).ok and (s.extents["features/z/data"].offsets >= 0).all()  # every map on disk


def test_replace_needs_overwrite(store: Path) -> None:
    n = len(spairstore.open(store))
    spairstore.add_feature_set(store, "m", lambda r: maps_of(n)[r], **GEOMETRY)
    with pytest.raises(FeatureError, match="feature set 'm' exists, made with these same settings; pass overwrite=True"):
        spairstore.add_feature_set(store, "m", lambda r: maps_of(n)[r], **GEOMETRY)
    other = {**GEOMETRY, "cell_offset": GEOMETRY["cell_offset"] + 0.25}
    with pytest.raises(FeatureError, match=rf"exists, made with other settings \(cell_offset {GEOMETRY['cell_offset']} "
                                           rf"there, {other['cell_offset']} here\); pass overwrite=True"):
        spairstore.add_feature_set(store, "m", lambda r: maps_of(n)[r], **other)
    spairstore.add_feature_set(store, "m", lambda r: maps_of(n, seed=2)[r], overwrite=True, **GEOMETRY)
    np.testing.assert_array_equal(spairstore.open(store).features("m", 3), maps_of(n, seed=2)[3].astype(np.float16))


def test_interrupted_run_resumes_without_asking_for_done_rows(synth_store: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store = Path(shutil.copyfile(synth_store, tmp_path / "s.h5"))
    n = len(spairstore.open(store))  # 24 rows: units of 16 rows for an HDF5 set
    ref = maps_of(n)

    def failing(row: int) -> np.ndarray:
        if row == 20:
            raise RuntimeError("model crashed")
        return ref[row]

    with pytest.raises(RuntimeError, match="model crashed"):
        spairstore.add_feature_set(store, "r", failing, **GEOMETRY)
    assert "r" not in spairstore.open(store).feature_sets
    assert partial_feature_sets(store)["r"]["done"] == 16  # the first unit was written and flagged
    calls: list[int] = []
    summary = spairstore.add_feature_set(store, "r", lambda row: calls.append(row) or ref[row], **GEOMETRY)
    assert calls == [0, *range(16, n)] and summary.extracted == n - 16  # row 0 only to learn the shape
    np.testing.assert_array_equal(spairstore.open(store).read("features/r", np.arange(n)), ref.astype(np.float16))
    # other settings are refused by name, unless overwrite
    with pytest.raises(FeatureError, match="exists"):
        spairstore.add_feature_set(store, "r", failing, **GEOMETRY)


def test_an_unordered_iterable_keeps_what_it_gave_before_a_crash(synth_store: Path, tmp_path: Path) -> None:
    """HDF5 writes any rows as they come (no unit waits in memory for rows given later), so an iterable
    in reverse order that dies after 17 maps leaves a batch of 16 written, and `info` says what resumes it."""
    store = Path(shutil.copyfile(synth_store, tmp_path / "s.h5"))
    n = len(spairstore.open(store))
    ref = maps_of(n)

    def backwards(stop: int | None):
        for k, row in enumerate(range(n - 1, -1, -1)):
            if k == stop:
                raise RuntimeError("model crashed")
            yield row, ref[row]

    with pytest.raises(RuntimeError, match="model crashed"):
        spairstore.add_feature_set(store, "b", backwards(17), **GEOMETRY)
    partial = partial_feature_sets(store)["b"]
    assert partial["done"] == 16 and partial["resume"].startswith("call spairstore.add_feature_set again")
    summary = spairstore.add_feature_set(store, "b", backwards(None), **GEOMETRY)
    assert summary.extracted == n - 16
    np.testing.assert_array_equal(spairstore.open(store).read("features/b", np.arange(n)), ref.astype(np.float16))


def test_other_settings_are_refused_while_a_run_is_unfinished(synth_store: Path, tmp_path: Path) -> None:
    store = Path(shutil.copyfile(synth_store, tmp_path / "s.h5"))
    ref = maps_of(24)
    with pytest.raises(FeatureError, match="no array for 8 images"):
        spairstore.add_feature_set(store, "u", ((r, ref[r]) for r in range(16)), **GEOMETRY)
    with pytest.raises(FeatureError, match=r"other settings \(cell_offset 0.5 there, 0.25 now\).*--overwrite"):
        spairstore.add_feature_set(store, "u", lambda r: ref[r], **{**GEOMETRY, "cell_offset": 0.25})
    spairstore.add_feature_set(store, "u", lambda r: ref[r], overwrite=True, **{**GEOMETRY, "cell_offset": 0.25})
    assert spairstore.open(store).feature_sets["u"]["cell_offset"] == 0.25


def key(s: spairstore.Store, r: int) -> tuple[str, str]:
    return s.categories[s.images.category[r]], str(s.images.name[r])


def label(s: spairstore.Store, r: int) -> str:
    return rf"image row {r} \({'/'.join(key(s, r))}\)"


@pytest.mark.parametrize("case", ["int", "shape", "nan", "overflow", "twice", "missing", "range", "not-pairs",
                                  "unknown-key", "name-key", "same-image-key", "row-key-range", "missing-key",
                                  "geometry", "empty"])
def test_bad_maps_are_refused_naming_the_row(synth_store: Path, tmp_path: Path, case: str) -> None:
    store = Path(shutil.copyfile(synth_store, tmp_path / "s.h5"))
    s = spairstore.open(store)
    n = len(s)
    ref = maps_of(n)
    bad = ref.copy()
    geometry = GEOMETRY
    maps: object = [(r, bad[r]) for r in range(n)]
    if case == "int":
        maps[5] = (5, np.zeros((C, CELLS, CELLS), dtype=np.int64))
        message = f"maps of {label(s, 5)}: dtype int64; give floats"
    elif case == "shape":
        maps = {key(s, r): ref[r] if r != 7 else ref[r][:, :5, :5] for r in range(n)}
        message = rf"maps of {label(s, 7)}: shape \(4, 5, 5\), expected \(4, 6, 6\) like the first map"
    elif case == "nan":
        bad[9, 0, 0, 0] = np.nan
        message = f"maps of {label(s, 9)}: holds NaN or infinite values"
    elif case == "overflow":
        bad[2, 1, 1, 1] = 1e6
        message = f"maps of {label(s, 2)}: values beyond float16's range"
    elif case == "twice":
        maps = [*maps[:4], (3, ref[3]), *maps[4:]]
        message = f"maps gave {label(s, 3)} twice"
    elif case == "missing":
        maps = [m for m in maps if m[0] != 5]
        message = f"maps hold no array for 1 images, e.g. {label(s, 5)}"
    elif case == "range":
        maps = [*maps, (n, ref[0])]
        message = f"maps gave image row {n}; rows are integers 0..{n - 1}"
    elif case == "not-pairs":
        maps = list(ref)
        message = "maps gave ndarray .*an iterable must give \\(image_row, array\\) pairs"
    elif case == "unknown-key":
        maps = {**{key(s, r): ref[r] for r in range(n)}, ("cat", "nope"): ref[0]}
        message = r"maps key \('cat', 'nope'\): no such image"
    elif case == "name-key":  # the first key is looked at first, to learn the shape: refused just the same
        maps = {str(s.images.name[r]): ref[r] for r in range(n)}
        message = (rf"maps key '{s.images.name[0]}': keys must be \(category, name\) pairs of strings or image "
                   r"rows \(an image name alone is not a key: names repeat across categories\)")
    elif case == "same-image-key":
        maps = {**{key(s, r): ref[r] for r in range(n)}, 3: ref[3]}
        message = rf"maps keys \({key(s, 3)[0]!r}, {key(s, 3)[1]!r}\) and 3 are the same image, {label(s, 3)}"
    elif case == "row-key-range":
        maps = {**{r: ref[r] for r in range(n)}, n: ref[0]}
        message = f"maps key {n}: image rows are integers 0..{n - 1}"
    elif case == "missing-key":
        maps = {key(s, r): ref[r] for r in range(1, n)}
        message = f"maps hold no array for 1 images, e.g. {label(s, 0)}"
    elif case == "geometry":
        geometry = {**GEOMETRY, "input_size": 128}
        message = f"maps of {label(s, 0)} are 6x6 cells; input_size 128 / stride 16 makes 8x8"
    else:
        maps = []
        message = "maps is empty"
    with pytest.raises(FeatureError, match=message):
        spairstore.add_feature_set(store, "bad", maps, **geometry)
    assert "bad" not in spairstore.open(store).feature_sets and not sidecar_path(store, "bad").exists()


def test_bad_name_is_refused_before_any_work(synth_store: Path, tmp_path: Path) -> None:
    store = Path(shutil.copyfile(synth_store, tmp_path / "s.h5"))
    with pytest.raises(FeatureError, match=r"feature set name '\.\./x': a letter or digit first"):
        spairstore.add_feature_set(store, "../x", lambda r: maps_of(1)[0], **GEOMETRY)
    assert not sidecar_dir(store).exists() and not (tmp_path / "x.h5").exists()


def test_a_set_or_copy_that_cannot_fit_is_refused_before_writing(synth_store: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Sized from the map shape (a set) or the arrays (convert), against the disk's free space; nothing is
    left behind."""
    from collections import namedtuple

    from spairstore.store import transaction

    store = Path(shutil.copyfile(synth_store, tmp_path / "s.h5"))
    n = len(spairstore.open(store))
    monkeypatch.setattr(transaction.shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(1, 1, 1000))
    maps = n * C * CELLS * CELLS * 2
    need = (maps + maps // 100 + 2**20) / 2**20  # with the allowance for tables and metadata
    with pytest.raises(FeatureError, match=rf"^{store}: feature set 'm' needs about {need:.1f} MiB and {tmp_path} has "
                                           r"0\.0 MiB free; make room$"):
        spairstore.add_feature_set(store, "m", maps_of(n).__getitem__, **GEOMETRY)
    with pytest.raises(spairstore.SpairstoreError, match=rf"^{tmp_path / 'c.zarr'}: the converted store needs about"):
        convert(store, tmp_path / "c.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]



def test_flip_companion_for_test_time_flip(synth_store: Path, tmp_path: Path) -> None:
    """``flip_of`` makes maps of the mirrored images a ``-flip`` companion that ``eval --flip`` reads;
    a companion that could not pair with its set is refused."""
    from spairstore.eval.methods import NearestNeighbour
    from spairstore.features.backbones import flip_attrs

    store = Path(shutil.copyfile(synth_store, tmp_path / "s.h5"))
    s = spairstore.open(store)
    rows = np.arange(s.pairs("trn").rows)
    spairstore.add_feature_set(store, "mine", maps_of(len(s)).__getitem__, **GEOMETRY)
    with pytest.raises(spairstore.StoreError, match=r"needs the feature set 'mine-flip', the maps of the mirrored "
                                                    r"images: run .* again with --flip .* flip_of='mine'"):
        NearestNeighbour("mine", flip="adaptive-mutual")(spairstore.open(store), "trn", rows)
    with pytest.raises(FeatureError, match="are named 'mine-flip'"):
        spairstore.add_feature_set(store, "mirror", maps_of(len(s), 1).__getitem__, flip_of="mine", **GEOMETRY)
    with pytest.raises(FeatureError, match=r"geometry of 'mine' \(input_size 112 here, 96 in 'mine'; stride 18.6"):
        spairstore.add_feature_set(store, "mine-flip", maps_of(len(s), 1).__getitem__, flip_of="mine",
                                   **{**GEOMETRY, "input_size": 112, "stride": 112 / 6})
    with pytest.raises(spairstore.StoreError, match="no feature set 'other'"):
        spairstore.add_feature_set(store, "other-flip", maps_of(len(s), 1).__getitem__, flip_of="other", **GEOMETRY)
    assert sorted(spairstore.open(store).feature_sets) == ["mine"]

    spairstore.add_feature_set(store, "mine-flip", maps_of(len(s), 1).__getitem__, flip_of="mine", **GEOMETRY)
    s = spairstore.open(store)
    assert flip_attrs("mine").items() <= s.feature_sets["mine-flip"].items()
    flipped = NearestNeighbour("mine", device="cpu", flip="adaptive-mutual")(s, "trn", rows)
    plain = NearestNeighbour("mine", device="cpu")(s, "trn", rows)
    assert (np.nan_to_num(flipped) != np.nan_to_num(plain)).any()  # the mirrored source won some pairs
