"""Bad input: one case per check. By default a pack stops at the bad file with one clear error line
(file and reason), exit code 1, no traceback, and leaves nothing at the output path; with
``--on-error skip`` it leaves every bad image and pair out and lists each with its reason."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import spairstore
from spairstore.cli import main
from spairstore.store.verify import verify
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic root with enough images and pairs for every breaker to get its own target."""
    from converters.synth import synthesize

    root = tmp_path_factory.mktemp("bad") / "SPair-71k"
    synthesize(root, images_per_category=10, categories=["aeroplane", "cat", "dog"], seed=3)
    return root


@pytest.fixture()
def root(source: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "SPair-71k"
    shutil.copytree(source, dst)
    return dst


# -- targets: image breakers take aeroplane/dog images, pair breakers cat pairs; all distinct -----------
def image_ann(root: Path, k: int) -> Path:
    return sorted([*root.glob("ImageAnnotation/aeroplane/*.json"), *root.glob("ImageAnnotation/dog/*.json")])[k]


def duplicate_pair(root: Path) -> tuple[Path, Path]:
    """Two cat pairs adjacent in the trn layout: the second is the one a duplicate id is blamed on."""
    stems = [s for s in (root / "Layout/large/trn.txt").read_text().split() if s.endswith(":cat")]
    return tuple(root / "PairAnnotation/trn" / f"{s}.json" for s in stems[-2:])  # type: ignore[return-value]


def cat_pair(root: Path, k: int) -> Path:
    reserved = set(duplicate_pair(root))
    return sorted(p for p in root.glob("PairAnnotation/*/*:cat.json") if p not in reserved)[k]


def rel(root: Path, p: Path) -> str:
    return p.relative_to(root).as_posix()


def edit(path: Path, change: Callable[[dict], None]) -> None:
    a = json.loads(path.read_text())
    change(a)
    path.write_text(json.dumps(a))


def image_file(root: Path, ann: Path) -> Path:
    return root / "JPEGImages" / ann.parent.name / f"{ann.stem}.jpg"


def first_point(a: dict) -> str:
    return next(k for k, v in a["kps"].items() if v is not None)


# -- image breakers: (root, k) -> (file named in the error, reason fragment) ---------------------------
def malformed_json(root: Path, k: int) -> tuple[str, str]:
    p = image_ann(root, k)
    p.write_text(p.read_text()[:-5])
    return rel(root, p), "malformed JSON"


def json_edit(name: str, target: Callable[[Path, int], Path], change: Callable[[dict], None], reason: str
              ) -> Callable[[Path, int], tuple[str, str]]:
    """A breaker that edits the JSON file ``target(root, k)``; the error names that file."""
    def breaker(root: Path, k: int) -> tuple[str, str]:
        p = target(root, k)
        edit(p, change)
        return rel(root, p), reason

    breaker.__name__ = name
    return breaker


def annotation_edit(name: str, change: Callable[[dict], None], reason: str) -> Callable:
    return json_edit(name, image_ann, change, reason)


missing_key = annotation_edit("missing_key", lambda a: a.pop("kps"), "missing key(s) kps")
wrong_type = annotation_edit("wrong_type", lambda a: a.update(image_width=str(a["image_width"])),
                             "image_width must be an integer")
keypoint_outside = annotation_edit(
    "keypoint_outside", lambda a: a["kps"].update({first_point(a): [a["image_width"] + 50, 1]}), "lies outside the")
bbox_outside = annotation_edit("bbox_outside", lambda a: a["bndbox"].__setitem__(3, a["image_height"] + 10),
                               "bndbox")
bbox_inverted = annotation_edit(
    "bbox_inverted", lambda a: a.update(bndbox=[a["bndbox"][2], a["bndbox"][1], a["bndbox"][0], a["bndbox"][3]]),
    "is inverted")
filename_escapes_root = annotation_edit("filename_escapes_root", lambda a: a.update(filename="../../../outside.jpg"),
                                        "not a plain file name")


def annotated_size_differs_from_file(root: Path, k: int) -> tuple[str, str]:
    p = image_ann(root, k)
    a = json.loads(p.read_text())
    edit(p, lambda a: a.update(image_width=a["image_width"] + 1, bndbox=[1, 1, 2, 2], kps={
        key: None for key in a["kps"]}))
    for q in root.glob("PairAnnotation/*/*.json"):  # pairs repeat the size: keep them consistent
        if q.stem.endswith(f":{a['category']}"):
            def grow(b: dict) -> None:
                for side in ("src", "trg"):
                    if b[f"{side}_imname"] == a["filename"]:
                        b[f"{side}_imsize"][0] += 1
            edit(q, grow)
    return rel(root, image_file(root, p)), "but annotated as"


def truncated_jpeg(root: Path, k: int) -> tuple[str, str]:
    f = image_file(root, image_ann(root, k))
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 3 // 5])
    return rel(root, f), "truncated"


def not_a_jpeg(root: Path, k: int) -> tuple[str, str]:
    f = image_file(root, image_ann(root, k))
    buf = io.BytesIO()
    Image.open(f).save(buf, "PNG")
    f.write_bytes(buf.getvalue())
    return rel(root, f), "holds a PNG image, but its name says JPEG"


def missing_image_file(root: Path, k: int) -> tuple[str, str]:
    f = image_file(root, image_ann(root, k))
    f.unlink()
    return rel(root, f), "image file not found"


def mask_size_mismatch(root: Path, k: int) -> tuple[str, str]:
    p = image_ann(root, k)
    m = root / "Segmentation" / p.parent.name / f"{p.stem}.png"
    with Image.open(m) as im:
        im.resize((im.width + 3, im.height)).save(m)
    return rel(root, m), "mask is"


def decompression_bomb(root: Path, k: int) -> tuple[str, str]:
    f = image_file(root, image_ann(root, k))
    data = bytearray(f.read_bytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = b"\xff\xff\xff\xff"  # a 65535 x 65535 frame header
    f.write_bytes(bytes(data))
    return rel(root, f), "too large to decode safely"


def linked_outside(target: Callable[[Path, int], Path]) -> Callable[[Path, int], tuple[str, str]]:
    """A breaker that moves ``target(root, k)`` out of the root and leaves a symbolic link to it."""
    def breaker(root: Path, k: int) -> tuple[str, str]:
        p = target(root, k)
        outside = root.parent / f"outside-{k}{p.suffix}"
        shutil.move(p, outside)
        p.symlink_to(outside)
        return rel(root, p), "is a symbolic link to"

    breaker.__name__ = f"{target.__name__}_linked_outside"
    return breaker


def annotation_file(root: Path, k: int) -> Path:
    return image_ann(root, k)


def jpeg_file(root: Path, k: int) -> Path:
    return image_file(root, image_ann(root, k))


annotation_linked_outside = linked_outside(annotation_file)
jpeg_linked_outside = linked_outside(jpeg_file)


def unknown_category_folder(root: Path, k: int) -> tuple[str, str]:
    folder = root / "ImageAnnotation" / "unicorn"
    folder.mkdir()
    shutil.copy(sorted(root.glob("ImageAnnotation/cat/*.json"))[0], folder / "2007_000001.json")
    return "ImageAnnotation/unicorn", "unknown category folder"


# -- pair and layout breakers ----------------------------------------------------------------------
def pair_edit(name: str, change: Callable[[dict], None], reason: str) -> Callable:
    return json_edit(name, cat_pair, change, reason)


pair_missing_key = pair_edit("pair_missing_key", lambda a: a.pop("kps_ids"), "missing key(s) kps_ids")
pair_wrong_type = pair_edit("pair_wrong_type", lambda a: a.update(mirror="no"), "mirror must be an integer")
imsize_disagrees = pair_edit(
    "imsize_disagrees", lambda a: a["src_imsize"].__setitem__(0, a["src_imsize"][0] + 7), "src_imsize")
pair_keypoint_outside = pair_edit(
    "pair_keypoint_outside", lambda a: a["trg_kps"].__setitem__(0, [1, a["trg_imsize"][1] + 40]), "trg_kps: point")
pair_bbox_outside = pair_edit(
    "pair_bbox_outside", lambda a: a["src_bndbox"].__setitem__(2, a["src_imsize"][0] + 9), "src_bndbox")
unknown_category = pair_edit("unknown_category", lambda a: a.update(category="unicorn"),
                             "unknown category 'unicorn'")
pair_names_missing_image = pair_edit("pair_names_missing_image", lambda a: a.update(trg_imname="2099_999999.jpg"),
                                     "names no image annotation")
absolute_imname = pair_edit("absolute_imname", lambda a: a.update(src_imname="/etc/passwd"), "not a plain file name")


huge_pair_id = pair_edit("huge_pair_id", lambda a: a.update(pair_id=10**30), "pair_id must be in 0..2147483647")
superscript_kps_id = pair_edit("superscript_kps_id", lambda a: a["kps_ids"].__setitem__(0, "\u00b2"),
                               "kps_ids must be keypoint id strings like '7', got '²'")
long_kps_id = pair_edit("long_kps_id", lambda a: a["kps_ids"].__setitem__(0, "9" * 40),
                        "kps_ids must be keypoint id strings")


def duplicate_pair_id(root: Path, k: int) -> tuple[str, str]:
    first, second = duplicate_pair(root)
    pid = json.loads(first.read_text())["pair_id"]
    edit(second, lambda a: a.update(pair_id=pid))
    return rel(root, second), f"duplicate pair_id {pid}"


def layout_line_without_file(root: Path, k: int) -> tuple[str, str]:
    p = root / "Layout" / "large" / "val.txt"
    p.write_text(p.read_text() + "999999-2099_000001-2099_000002:cat\n")
    return "Layout/large/val.txt", "names no file"


def layout_line_escapes_root(root: Path, k: int) -> tuple[str, str]:
    p = root / "Layout" / "large" / "test.txt"
    p.write_text(p.read_text() + "../../ImageAnnotation/cat/x\n")
    return "Layout/large/test.txt", "not a plain file name"


IMAGE_BREAKERS = [malformed_json, missing_key, wrong_type, keypoint_outside, bbox_outside, bbox_inverted,
                  annotated_size_differs_from_file, truncated_jpeg, not_a_jpeg, missing_image_file,
                  mask_size_mismatch, filename_escapes_root, decompression_bomb, unknown_category_folder,
                  annotation_linked_outside, jpeg_linked_outside]
PAIR_BREAKERS = [pair_missing_key, pair_wrong_type, imsize_disagrees, pair_keypoint_outside, pair_bbox_outside,
                 unknown_category, pair_names_missing_image, absolute_imname, duplicate_pair_id,
                 layout_line_without_file, layout_line_escapes_root, huge_pair_id, superscript_kps_id, long_kps_id]


def run_main(argv: list[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The console entry point, in process: (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["spairstore", *map(str, argv)]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("breaker", IMAGE_BREAKERS + PAIR_BREAKERS, ids=lambda b: b.__name__)
def test_bad_input_fails_with_one_line(breaker, root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad, reason = breaker(root, 0)
    out = tmp_path / "out.h5"
    code, _, err = run_main(["pack", root, out, "--size", "16"], capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 1 and len(errors) == 1, err
    assert bad in errors[0] and reason in errors[0], errors[0]
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.h5")]


def test_skip_lists_every_bad_item(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = [b(root, k) for k, b in enumerate(IMAGE_BREAKERS)] + [b(root, k) for k, b in enumerate(PAIR_BREAKERS)]
    out = tmp_path / "out.h5"
    code, summary, err = run_main(["pack", root, out, "--size", "16", "--on-error", "skip"], capsys)
    assert code == 0, err
    s = spairstore.open(out)
    stored = [f"{d['kind']} {d['key']}: {d['path']}: {d['reason']}" for d in s.attrs["skipped"]]
    code, listing, _ = run_main(["info", out, "--skipped"], capsys)
    listed = listing.splitlines()
    assert code == 0 and listed == stored  # info lists every item the store keeps
    # The summary counts them per kind and cause, with the first few of each: every item in one group.
    groups = [ln.strip() for ln in summary.splitlines() if ln.startswith("    ") and not ln.startswith("      ")]
    counts = [int(g.split()[0].replace(",", "")) if g.endswith(", e.g.") else 1 for g in groups]
    assert sum(counts) == len(stored) > 10 and len(summary.splitlines()) < 4 * len(groups) + 10
    assert any(g.endswith("pairs: uses an image that was skipped, e.g.") for g in groups)
    code, described, _ = run_main(["info", out], capsys)
    assert code == 0 and f"  skipped      {len(stored)} source items (--skipped lists each)" in described
    for bad, reason in expected:
        assert any(bad in ln and reason in ln for ln in listed), (bad, reason)
    # an image left out takes its pairs with it, each saying why
    skipped_images = {d["key"] for d in s.attrs["skipped"] if d["kind"] == "image"}
    assert len(skipped_images) == len(IMAGE_BREAKERS)
    assert any(d["kind"] == "pair" and "which was skipped" in d["reason"] for d in s.attrs["skipped"])
    kept = {f"{s.categories[c]}/{n}" for c, n in zip(s.images.category, s.images.name)}
    assert not kept & skipped_images and len(kept) == 30 - (len(IMAGE_BREAKERS) - 1)  # the unicorn was extra
    for split in s.splits:
        t = s.pairs(split)
        assert (t.src < len(s)).all() and (t.trg < len(s)).all()
    assert verify(out, sources=root).ok  # the manifest covers exactly what was packed


def test_skip_mode_with_nothing_left_fails(root: Path, tmp_path: Path) -> None:
    for f in root.glob("JPEGImages/*/*.jpg"):
        f.write_bytes(b"not a jpeg")
    with pytest.raises(spairstore.SpairstoreError, match="every image was skipped"):
        spairstore.pack(root, tmp_path / "o.h5", size=16, on_error="skip")


def test_cli_prints_one_line_without_traceback(root: Path, tmp_path: Path) -> None:
    """The same through a real interpreter and the console entry point."""
    bad, _ = malformed_json(root, 0)
    res = run_cli("pack", root, tmp_path / "o.h5", "--size", "32")
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and bad in lines[0] and "malformed JSON" in lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o.h5").exists()


def test_unknown_on_error_choice(root: Path, tmp_path: Path) -> None:
    with pytest.raises(spairstore.SpairstoreError, match="on_error must be one of fail, skip"):
        spairstore.pack(root, tmp_path / "o.h5", size=16, on_error="ignore")  # type: ignore[arg-type]


def test_open_rejects_non_store_files(tmp_path: Path) -> None:
    p = tmp_path / "x.h5"
    p.write_bytes(b"not hdf5 at all")
    with pytest.raises(spairstore.StoreError, match="x.h5"):
        spairstore.open(p)
    with pytest.raises(spairstore.StoreError, match="no such store"):
        spairstore.open(tmp_path / "missing.h5")


def test_open_refuses_newer_major_version(synth_store: Path, tmp_path: Path) -> None:
    import h5py

    p = tmp_path / "future.h5"
    shutil.copy(synth_store, p)
    with h5py.File(p, "a") as f:
        f.attrs["format_version"] = np.bytes_(b"2.0")
    with pytest.raises(spairstore.StoreError, match="newer"):
        spairstore.open(p)


def test_linked_category_folder_is_refused_unless_followed(root: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A whole category folder that a link leads to outside the root: every file in it is refused (one
    line under fail), and --follow-links packs it byte for byte."""
    folder = root / "ImageAnnotation" / "dog"
    outside = root.parent / "dog-annotations"
    shutil.move(folder, outside)
    folder.symlink_to(outside, target_is_directory=True)
    code, _, err = run_main(["pack", root, tmp_path / "a.h5", "--size", "16"], capsys)
    assert code == 1 and "ImageAnnotation/dog/" in err and f"is a symbolic link to {outside}/" in err
    assert not (tmp_path / "a.h5").exists()
    code, _, err = run_main(["pack", root, tmp_path / "b.h5", "--size", "16", "--follow-links"], capsys)
    assert code == 0, err
    with spairstore.open(tmp_path / "b.h5") as s:
        assert "dog" in {s.categories[c] for c in s.images.category}
        packed = dict(zip(s.manifest.path, s.manifest.sha256))
    ann = sorted(outside.glob("*.json"))[0]
    assert packed[f"ImageAnnotation/dog/{ann.name}"] == hashlib.sha256(ann.read_bytes()).hexdigest()


def test_oddities_are_kept_with_a_note(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What can be a real annotation is packed as annotated, and the summary and the store say so once
    per kind: keypoints a pixel past the image's edge, a pair listing a keypoint twice, a pair of an image
    with itself, an EXIF-rotated JPEG, an image_depth unlike the file's channels, a mask value outside the classes; a Layout file that
    starts with a UTF-8 byte-order mark is read."""
    ann = image_ann(root, 0)
    edit(ann, lambda a: a["kps"].update({first_point(a): [a["image_width"] + 1.5, 0]}))
    dup = cat_pair(root, 0)
    edit(dup, lambda a: (a["kps_ids"].append(a["kps_ids"][0]), a["src_kps"].append(a["src_kps"][0]),
                         a["trg_kps"].append(a["trg_kps"][0])))
    same = cat_pair(root, 1)
    edit(same, lambda a: a.update(trg_imname=a["src_imname"], trg_imsize=a["src_imsize"], trg_bndbox=a["src_bndbox"],
                                  trg_kps=a["src_kps"]))
    layout = root / "Layout" / "large" / "trn.txt"
    layout.write_bytes(b"\xef\xbb\xbf" + layout.read_bytes())
    rotated = image_file(root, image_ann(root, 1))
    img, exif = Image.open(rotated), Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees by viewers that honour EXIF
    img.save(rotated, "JPEG", quality=95, exif=exif)
    edit(image_ann(root, 2), lambda a: a.update(image_depth=1))
    mask_path = root / "Segmentation" / image_ann(root, 3).parent.name / f"{image_ann(root, 3).stem}.png"
    mask = Image.open(mask_path)
    mask.putpixel((0, 0), 77)
    mask.save(mask_path)
    code, summary, err = run_main(["pack", root, tmp_path / "s.h5", "--size", "16"], capsys)
    assert code == 0, err
    notes = [ln.strip() for ln in summary.splitlines() if ln.strip().startswith("note:")]
    assert f"note: 1 keypoints up to 5 px outside their image (kept as annotated), e.g. {rel(root, ann)}" in notes
    assert f"note: 1 pairs that list a keypoint id twice (kept as annotated), e.g. {rel(root, dup)}" in notes
    assert f"note: 1 pairs of an image with itself (kept), e.g. {rel(root, same)}" in notes
    assert f"note: 1 images with an EXIF rotation (packed as stored, unrotated, as annotated), e.g. " \
           f"{rel(root, rotated)}" in notes
    assert f"note: 1 images whose channels differ from their image_depth (kept), e.g. " \
           f"{rel(root, image_file(root, image_ann(root, 2)))}" in notes
    assert f"note: 1 masks with values outside the dataset's classes 0..20 and 255 (kept), e.g. " \
           f"{rel(root, image_file(root, image_ann(root, 3)))}" in notes
    with spairstore.open(tmp_path / "s.h5") as s:
        assert [f"note: {n}" for n in s.attrs["notes"]] == notes
        t = s.pairs("trn")
        assert t.rows == len(layout.read_text(encoding="utf-8-sig").split())  # the BOM line's pair too
        row = s.image_row(ann.parent.name, ann.stem)
        assert np.nanmax(s.images.keypoints[row, :, 0]) == s.images.size[row, 0] + 1.5
