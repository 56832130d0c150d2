"""Augmentation hooks: keypoints, boxes and the store -> original mapping follow the pixels."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import spairstore
from converters.spair71k import CATEGORIES, FLIP_PAIRS, NUM_KEYPOINTS, flip_permutation
from spairstore import ImageDataset, PairDataset, SpairstoreError, StoreError
from spairstore.core.geometry import to_original
from spairstore.torch.augment import Compose, HFlip, RandomCrop
from tests.conftest import spair_real

FIELDS = ("pixels", "mask", "keypoints")


def test_store_carries_the_converters_flip_table(synth_store: Path) -> None:
    s = spairstore.open(synth_store)
    for c, name in enumerate(s.categories):
        perm = s.keypoint_flip[c]
        assert perm.tolist() == flip_permutation(name)
        np.testing.assert_array_equal(perm[perm], np.arange(NUM_KEYPOINTS))  # an involution


def test_flip_relabels_keypoints_by_the_permutation(synth_store: Path) -> None:
    s = spairstore.open(synth_store)
    size = s.image_size
    plain = PairDataset(synth_store, "trn", fields=FIELDS)
    flipped = PairDataset(synth_store, "trn", fields=FIELDS, augment=HFlip(p=1.0))
    idx = list(range(12))
    a, b = plain.fetch(idx), flipped.fetch(idx)
    assert b["src_flipped"].all() and b["trg_flipped"].all()
    for side in ("src", "trg"):
        np.testing.assert_array_equal(b[f"{side}_pixels"].numpy(), a[f"{side}_pixels"].numpy()[:, :, ::-1])
        np.testing.assert_array_equal(b[f"{side}_mask"].numpy(), a[f"{side}_mask"].numpy()[:, :, ::-1])
    relabelled = 0
    for j in range(len(idx)):
        n = int(b["n_kps"][j])
        for side in ("src", "trg"):
            row = int(b[f"{side}_row"][j])
            perm = s.keypoint_flip[s.images.category[row]]
            slots = s.images.keypoints[row]  # original pixels, every slot
            for k, p in zip(b["kps_ids"][j, :n].tolist(), b[f"{side}_kps"][j, :n].numpy()):
                # slot k of the mirrored image is the part that was slot perm[k], now mirrored
                part = s.to_store(slots[perm[k]], row)
                np.testing.assert_allclose(p, [size - part[0], part[1]], atol=1e-4)
                scale, offset = b[f"{side}_scale"][j].numpy(), b[f"{side}_offset"][j].numpy()
                np.testing.assert_allclose(to_original(p, scale, offset), slots[perm[k]], atol=1e-3)
                relabelled += perm[k] != k
            bbox = b[f"{side}_bbox"][j].numpy()
            orig = a[f"{side}_bbox"][j].numpy()
            np.testing.assert_allclose(bbox, [size - orig[2], orig[1], size - orig[0], orig[3]], atol=1e-4)
        # a pair keeps exactly the slots present in both flipped images
        present = [set(s.keypoint_flip[s.images.category[int(b[f"{x}_row"][j])]][
            np.flatnonzero(np.isfinite(s.images.keypoints[int(b[f"{x}_row"][j])]).all(axis=1))].tolist())
            for x in ("src", "trg")]
        assert set(b["kps_ids"][j, :n].tolist()) == present[0] & present[1]
    assert relabelled > 0


def test_flipping_twice_is_the_identity(synth_store: Path) -> None:
    for make in (lambda aug: PairDataset(synth_store, "val", fields=FIELDS, augment=aug),
                 lambda aug: ImageDataset(synth_store, fields=FIELDS, augment=aug)):
        a = make(Compose(RandomCrop(p=0.0))).fetch([0, 3, 1])
        b = make(Compose(HFlip(p=1.0), HFlip(p=1.0))).fetch([0, 3, 1])
        for k in a:
            if k.endswith("flipped"):
                assert not b[k].any()
            elif k.endswith("kps") or k.endswith("keypoints") or k.endswith("bbox"):
                np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-4)
            else:
                np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)


def test_image_dataset_flip_moves_each_slot_to_its_mirror(synth_store: Path) -> None:
    s = spairstore.open(synth_store)
    a = ImageDataset(synth_store, fields=FIELDS).fetch(list(range(len(s))))
    b = ImageDataset(synth_store, fields=FIELDS, augment=HFlip(p=1.0)).fetch(list(range(len(s))))
    for i in range(len(s)):
        perm = s.keypoint_flip[s.images.category[i]]
        np.testing.assert_array_equal(b["keypoints_valid"][i].numpy(), a["keypoints_valid"][i].numpy()[perm])
        valid = b["keypoints_valid"][i].numpy()
        expect = a["keypoints"][i].numpy()[perm]
        np.testing.assert_allclose(b["keypoints"][i].numpy()[valid, 0], s.image_size - expect[valid, 0], atol=1e-4)
        np.testing.assert_allclose(b["keypoints"][i].numpy()[valid, 1], expect[valid, 1], atol=1e-4)


def test_flip_table_fits_the_real_annotations() -> None:
    """The table's (right, left) slots are mirror counterparts in the real annotations: within an image the
    right part of every pair lies on the same side, and in frontal views that is the smaller x."""
    root = spair_real()
    for category in CATEGORIES:
        agree, total, frontal, used = 0.0, 0, [], set()
        for f in sorted((root / "ImageAnnotation" / category).glob("*.json")):
            ann = json.loads(f.read_text())
            kps = {int(k): v for k, v in ann["kps"].items() if v is not None}
            used |= set(kps)
            signs = np.array([np.sign(kps[r][0] - kps[l][0]) for r, l in FLIP_PAIRS[category]
                              if r in kps and l in kps and kps[r][0] != kps[l][0]])
            if len(signs) >= 2:
                total += 1
                agree += np.mean(signs == (np.sign(signs.sum()) or 1))
            if ann["pose"] == "Frontal" and len(signs):
                frontal.append(signs.mean())
        assert total and agree / total >= 0.85, category
        assert not frontal or np.mean(frontal) < 0, category
        slots = {k for pair in FLIP_PAIRS[category] for k in pair}
        assert slots <= used, (category, slots - used)  # real slot ids, not renumbered ones


def _without_flip_table(synth_store: Path, tmp_path: Path) -> Path:
    store = tmp_path / "noflip.h5"
    shutil.copy(synth_store, store)
    with h5py.File(store, "a") as f:
        del f.attrs["keypoint_flip"]
    return store


def test_flip_refused_without_a_table(synth_store: Path, tmp_path: Path) -> None:
    store = _without_flip_table(synth_store, tmp_path)
    assert spairstore.open(store).keypoint_flip is None
    for aug in (HFlip(), Compose(RandomCrop(), HFlip(0.1))):
        with pytest.raises(SpairstoreError, match="no left/right keypoint permutation"):
            PairDataset(store, "trn", augment=aug)
    PairDataset(store, "trn", fields=FIELDS, augment=RandomCrop(p=1.0)).fetch([0, 1])  # crop needs none


def test_bad_flip_table_is_a_store_error(synth_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "bad.h5"
    shutil.copy(synth_store, store)
    with h5py.File(store, "a") as f:
        table = json.loads(f.attrs["keypoint_flip"])
        table["cat"] = [0] * NUM_KEYPOINTS
        f.attrs["keypoint_flip"] = json.dumps(table)
    with pytest.raises(StoreError, match="not a permutation"):
        spairstore.open(store)


def test_random_crop_keeps_the_box_and_the_geometry(synth_store: Path) -> None:
    s = spairstore.open(synth_store)
    size = s.image_size
    plain = PairDataset(synth_store, "trn", fields=FIELDS)
    crop = PairDataset(synth_store, "trn", fields=FIELDS, augment=RandomCrop(p=1.0, min_fraction=0.3), seed=4)
    idx = list(range(len(plain)))
    a, b = plain.fetch(idx), crop.fetch(idx)
    assert not b["src_flipped"].any()
    np.testing.assert_array_equal(a["kps_ids"].numpy(), b["kps_ids"].numpy())
    changed = 0
    for side in ("src", "trg"):
        k = b[f"{side}_scale"].numpy() / a[f"{side}_scale"].numpy()
        assert (k >= 1 - 1e-9).all() and np.allclose(k[:, 0], k[:, 1])  # square crops, resized up
        corner = a[f"{side}_offset"].numpy() - b[f"{side}_offset"].numpy() / k  # crop's corner, uncropped frame
        box = (np.clip(a[f"{side}_bbox"].numpy(), 0, size) - np.tile(corner, 2)) * np.tile(k, 2)
        assert (box >= -1e-3).all() and (box <= size + 1e-3).all()  # the box stays whole in the crop
        centres = np.stack(np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5), axis=-1)
        for j in idx:
            n = int(b["n_kps"][j])
            got = to_original(b[f"{side}_kps"][j, :n].numpy(), b[f"{side}_scale"][j].numpy(), b[f"{side}_offset"][j].numpy())
            want = to_original(a[f"{side}_kps"][j, :n].numpy(), a[f"{side}_scale"][j].numpy(), a[f"{side}_offset"][j].numpy())
            np.testing.assert_allclose(got, want, atol=1e-3)
            # the mask moved with the geometry: each output pixel shows the source pixel its centre maps to
            ix = np.clip(np.floor(centres / k[j] + corner[j]).astype(int), 0, size - 1)
            expect = a[f"{side}_mask"][j].numpy()[ix[..., 1], ix[..., 0]]
            assert (b[f"{side}_mask"][j].numpy() == expect).mean() > 0.97
            changed += not np.array_equal(a[f"{side}_pixels"][j].numpy(), b[f"{side}_pixels"][j].numpy())
    assert changed > len(idx)
    again = PairDataset(synth_store, "trn", fields=FIELDS, augment=RandomCrop(p=1.0, min_fraction=0.3), seed=4)
    np.testing.assert_array_equal(again.fetch(idx)["src_pixels"].numpy(), b["src_pixels"].numpy())
    again.set_epoch(1)
    assert not np.array_equal(again.fetch(idx)["src_pixels"].numpy(), b["src_pixels"].numpy())


def test_random_crop_rejects_a_bad_fraction() -> None:
    with pytest.raises(ValueError, match="min_fraction"):
        RandomCrop(min_fraction=0)


def test_random_crop_without_boxes_keeps_the_keypoints(synth_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "nobox.h5"  # like PF-WILLOW: no boxes, the keypoints' extent stands in
    shutil.copy(synth_store, store)
    with h5py.File(store, "a") as f:
        f["images/bbox"][...] = np.nan
    ds = PairDataset(store, "trn", fields=FIELDS, augment=RandomCrop(p=1.0, min_fraction=0.2))
    b = ds.fetch(list(range(len(ds))))
    valid = b["kps_valid"].numpy()
    for side in ("src", "trg"):
        pts = b[f"{side}_kps"].numpy()[valid]
        assert (pts >= -1e-3).all() and (pts <= ds.image_size + 1e-3).all()
        assert (b[f"{side}_scale"].numpy() > spairstore.open(store).images.scale[b[f"{side}_row"].numpy()]).any()
