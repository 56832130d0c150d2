"""Bad input gives one clear error naming the file, and leaves nothing at the output path."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import spairstore


@pytest.fixture()
def root(synth_root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "SPair-71k"
    shutil.copytree(synth_root, dst)
    return dst


def first(root: Path, pattern: str) -> Path:
    return sorted(root.glob(pattern))[0]


def break_missing_image(root: Path) -> str:
    p = first(root, "JPEGImages/*/*.jpg")
    p.unlink()
    return p.relative_to(root).as_posix()


def break_malformed_json(root: Path) -> str:
    p = first(root, "ImageAnnotation/*/*.json")
    p.write_text(p.read_text()[:-5])
    return p.relative_to(root).as_posix()


def break_unknown_image(root: Path) -> str:
    p = first(root, "PairAnnotation/test/*.json")
    a = json.loads(p.read_text())
    a["trg_imname"] = "2099_999999.jpg"
    p.write_text(json.dumps(a))
    return p.relative_to(root).as_posix()


def break_size_mismatch(root: Path) -> str:
    p = first(root, "ImageAnnotation/*/*.json")
    a = json.loads(p.read_text())
    a["image_width"] += 1
    p.write_text(json.dumps(a))
    # pairs repeat the size; keep them consistent so the image file itself is found at fault
    for q in root.glob("PairAnnotation/*/*.json"):
        b = json.loads(q.read_text())
        for side in ("src", "trg"):
            if b["category"] == a["category"] and b[f"{side}_imname"] == a["filename"]:
                b[f"{side}_imsize"][0] += 1
        q.write_text(json.dumps(b))
    return f"JPEGImages/{a['category']}/{a['filename']}"


def break_missing_key(root: Path) -> str:
    p = first(root, "PairAnnotation/val/*.json")
    a = json.loads(p.read_text())
    del a["kps_ids"]
    p.write_text(json.dumps(a))
    return p.relative_to(root).as_posix()


def break_layout_line(root: Path) -> str:
    p = root / "Layout" / "large" / "val.txt"
    p.write_text(p.read_text() + "999999-nothing-here:cat\n")
    return "Layout/large/val.txt"


@pytest.mark.parametrize("breaker", [break_missing_image, break_malformed_json, break_unknown_image,
                                     break_size_mismatch, break_missing_key, break_layout_line])
def test_bad_input_names_the_file(root: Path, tmp_path: Path, breaker) -> None:
    bad = breaker(root)
    out = tmp_path / "out.h5"
    with pytest.raises(spairstore.SourceError) as e:
        spairstore.pack(root, out, size=32)
    assert bad in str(e.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.h5")]


def test_cli_prints_one_line_without_traceback(root: Path, tmp_path: Path) -> None:
    bad = break_malformed_json(root)
    res = subprocess.run([sys.executable, "-m", "spairstore", "pack", str(root), str(tmp_path / "o.h5"),
                          "--size", "32"], capture_output=True, text=True)
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and bad in lines[0] and "malformed JSON" in lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o.h5").exists()


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
        f.attrs["format_version"] = json.dumps("2.0")
    with pytest.raises(spairstore.StoreError, match="newer"):
        spairstore.open(p)
