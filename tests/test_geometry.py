"""core.geometry on torch tensors: the same numbers as on numpy, on the tensor's device, no host round trip."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from spairstore.core.geometry import cell_to_store, letterbox_params, store_to_cell, to_original, to_store

GEOM = {"stride": 14, "cell_offset": 0.5, "input_size": 504, "width": 36, "height": 36}
S = 512


def _points(dtype: np.dtype = np.float64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(-20, S + 20, (3, 7, 2)).astype(dtype)  # some outside the frame: clipped cells


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_letterbox_mappings_match_numpy(dtype: torch.dtype) -> None:
    box = letterbox_params(640, 427, S)
    scale, offset = np.array(box.scale), np.array(box.offset, dtype=np.float64)
    pts = _points()
    want_store, want_orig = to_store(pts, scale, offset), to_original(pts, scale, offset)
    t = torch.from_numpy(pts).to(dtype)
    for sc, off in ((scale, offset), (torch.from_numpy(scale), torch.from_numpy(offset))):  # numpy or tensor frame
        got_store, got_orig = to_store(t, sc, off), to_original(t, sc, off)
        for got, want in ((got_store, want_store), (got_orig, want_orig)):
            assert isinstance(got, torch.Tensor) and got.dtype == dtype and got.device == t.device
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-6 if dtype == torch.float32 else 1e-12)
    np.testing.assert_allclose(to_original(to_store(t, scale, offset), scale, offset).numpy(), pts, atol=1e-3)
    # a batch of frames broadcasts as with numpy: (B, 1, 2) against (B, K, 2)
    sc, off = np.stack([scale] * 3)[:, None], np.stack([offset] * 3)[:, None]
    np.testing.assert_allclose(to_store(t, sc, off).numpy(), to_store(pts, sc, off), rtol=1e-6)


def test_cells_match_numpy() -> None:
    pts = _points()
    want = store_to_cell(pts, GEOM, S)
    assert want.dtype == np.int64 and want.min() == 0 and want.max() == 35  # clipped at both ends
    for dtype in (torch.float32, torch.float64):
        got = store_to_cell(torch.from_numpy(pts).to(dtype), GEOM, S)
        assert got.dtype == torch.int64
        if dtype == torch.float64:
            np.testing.assert_array_equal(got.numpy(), want)
        else:  # float32 inputs round the same except within float32's error of a cell boundary
            np.testing.assert_array_equal(got.numpy(), store_to_cell(pts.astype(np.float32), GEOM, S))
    cells = np.stack(np.meshgrid(np.arange(36), np.arange(36)), -1)
    centres = cell_to_store(cells, GEOM, S)
    got = cell_to_store(torch.from_numpy(cells), GEOM, S)  # int64 cells -> the default float dtype
    assert got.dtype == torch.get_default_dtype()
    np.testing.assert_allclose(got.numpy(), centres, rtol=1e-6)
    got64 = cell_to_store(torch.from_numpy(cells).double(), GEOM, S)
    np.testing.assert_array_equal(got64.numpy(), centres)
    # centres map back to their own cells, on torch too
    np.testing.assert_array_equal(store_to_cell(got64, GEOM, S).numpy(), cells)
    # an independent formula: centre of (col, row) = ((col, row) + 0.5) * 14 * 512 / 504
    np.testing.assert_allclose(centres[2, 5], (np.array([5, 2]) + 0.5) * 14 * S / 504)


@pytest.mark.cuda
def test_cuda_tensors_stay_on_the_device() -> None:
    t = torch.from_numpy(_points()).cuda()
    for got in (to_store(t, np.ones(2), np.zeros(2)), cell_to_store(t, GEOM, S), store_to_cell(t, GEOM, S)):
        assert got.device == t.device
    np.testing.assert_array_equal(store_to_cell(t, GEOM, S).cpu().numpy(), store_to_cell(_points(), GEOM, S))


def test_numpy_stays_numpy_and_core_does_not_import_torch() -> None:
    out = store_to_cell(_points(), GEOM, S)
    assert isinstance(out, np.ndarray) and isinstance(to_store([[1.0, 2.0]], np.ones(2), np.zeros(2)), np.ndarray)
    code = ("import sys, numpy as np; from spairstore.core import geometry as g; "
            "g.store_to_cell(np.zeros((1, 2)), dict(stride=8, cell_offset=.5, input_size=64, width=8, height=8), 64); "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["False"]
