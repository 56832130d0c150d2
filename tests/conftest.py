"""Shared fixtures: a small synthetic SPair-71k root, its store, and the real annotation files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# ../shared/data beside the checkout; SPAIRSTORE_SHARED_DATA points elsewhere (e.g. from a git worktree).
SHARED_DATA = Path(os.environ.get("SPAIRSTORE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` skip where torch sees no CUDA device (torch is imported only if one is marked)."""
    marked = [item for item in items if item.get_closest_marker("cuda")]
    if marked:
        import torch

        if not torch.cuda.is_available():
            for item in marked:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def cli_command(*args: str | Path) -> list[str]:
    """``python -m spairstore ARGS``, for a fresh interpreter (see :func:`cli_env`)."""
    return [sys.executable, "-m", "spairstore", *map(str, args)]


def cli_env() -> dict[str, str]:
    """The environment that makes a child interpreter import this checkout."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))}


def run_cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter; stdout and stderr captured as text."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True, env=cli_env(), timeout=timeout)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic SPair-71k root (3 categories)."""
    from converters.synth import synthesize

    root = tmp_path_factory.mktemp("synth") / "SPair-71k"
    synthesize(root, images_per_category=8, categories=["aeroplane", "cat", "dog"], seed=1)
    return root


@pytest.fixture(scope="session")
def synth_store(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spairstore import pack

    out = tmp_path_factory.mktemp("store") / "synth.h5"
    pack(synth_root, out, size=96)
    return out


def spair_real() -> Path:
    root = SHARED_DATA / "spair71k-real"
    if not (root / "ImageAnnotation").is_dir():
        pytest.skip("../shared/data/spair71k-real is absent")
    return root


def placeholder_image(path: Path, width: int, height: int, mode: str = "RGB") -> None:
    """A JPEG/PNG of the declared size standing in for a dataset image that is not available offline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    Image.fromarray(rng.integers(0, 255 if mode == "RGB" else 21, shape, dtype=np.uint8), mode).save(path)


@pytest.fixture(scope="session")
def real_spair_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The real SPair-71k annotations with placeholder images, and every test pair file the Layout lists
    (the real files where present, the rest rebuilt by the dataset's rule). Returns (root, real root)."""
    from converters.spair71k import pair_annotation

    real = spair_real()
    root = tmp_path_factory.mktemp("real") / "SPair-71k"
    shutil.copytree(real / "ImageAnnotation", root / "ImageAnnotation")
    shutil.copytree(real / "Layout", root / "Layout")
    shutil.copytree(real / "PairAnnotation", root / "PairAnnotation")
    anns = {}
    for p in sorted((root / "ImageAnnotation").glob("*/*.json")):
        a = json.loads(p.read_text())
        anns[(p.parent.name, p.stem)] = a
        placeholder_image(root / "JPEGImages" / p.parent.name / a["filename"], a["image_width"], a["image_height"])
        placeholder_image(root / "Segmentation" / p.parent.name / f"{p.stem}.png",
                          a["image_width"], a["image_height"], mode="L")
    for stem in (root / "Layout/large/test.txt").read_text().split():
        f = root / "PairAnnotation" / "test" / f"{stem}.json"
        if not f.exists():
            head, category = stem.rsplit(":", 1)
            pid, rest = head.split("-", 1)
            src, trg = rest[:11], rest[12:]
            f.write_text(json.dumps(pair_annotation(anns[(category, src)], anns[(category, trg)], int(pid))))
    return root, real


@pytest.fixture(scope="session")
def real_store(real_spair_root: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SPair-71k annotations (all 12,234 test pairs) packed at 64 px."""
    from spairstore import pack

    out = tmp_path_factory.mktemp("realstore") / "spair-real.h5"
    pack(real_spair_root[0], out, size=64)
    return out
