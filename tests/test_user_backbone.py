"""A user's MODULE:FACTORY network as a feature set: maps equal the module run by hand, provenance, errors;
the --flip companion set equals the maps of the mirrored images."""
from __future__ import annotations

import hashlib
import re
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spairstore
from spairstore.core.errors import FeatureError
from spairstore.features import extract_features
from spairstore.features.user import UserExtractor, state_dict_sha256
from tests.conftest import run_cli

TINY = '''
import torch
from torch import nn


class Tiny(nn.Module):
    input_size = {input_size}
    stride = 8
    cell_offset = 0.5
    mean = (0.5, 0.4, 0.3)
    std = (0.2, 0.25, 0.3)

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 5, 8, stride=8)
        self.register_buffer("gain", torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).view(1, 5, 1, 1))

    def forward(self, x):
        return self.conv(x) * self.gain


def make():
    return Tiny()


def wrong_shape():
    m = Tiny()
    m.stride = 4
    return m


def no_stride():
    m = nn.Identity()
    m.input_size, m.cell_offset, m.mean, m.std = 64, 0.5, (0.5,) * 3, (0.2,) * 3
    return m


def bad_std():
    m = Tiny()
    m.std = (0.2, 0.0, 0.3)
    return m


def not_a_module():
    return 42


def broken():
    raise ValueError("no weights here")


class Crashes(Tiny):
    def forward(self, x):
        return self.conv(x)[:, :, :, 99].view(-1, 7)  # a bug in the user's forward


def crashes():
    return Crashes()


class Scaled(Tiny):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return super().forward(x) * self.factor


def nan():
    return Scaled(float("nan"))


def huge():
    return Scaled(1e9)
'''


@pytest.fixture()
def store_copy(synth_store: Path, tmp_path: Path) -> Path:
    out = tmp_path / "s.h5"
    shutil.copyfile(synth_store, out)
    return out


@pytest.fixture()
def tiny_file(tmp_path: Path) -> Path:
    f = tmp_path / "mods" / "tiny.py"
    f.parent.mkdir()
    f.write_text(textwrap.dedent(TINY.format(input_size=64)))
    return f


def by_hand(pixels: np.ndarray, module: torch.nn.Module) -> np.ndarray:
    """The contract's preprocessing written out: store frame -> input_size (bilinear, antialiased) ->
    normalise -> module."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(module.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
    x = (x - torch.tensor(module.mean).view(1, 3, 1, 1)) / torch.tensor(module.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return module(x).numpy()


def load_tiny(path: Path) -> torch.nn.Module:
    """The module the file's make() returns, imported independently of spairstore."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_by_hand", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make().eval()


def test_user_module_maps_equal_the_module_run_by_hand(store_copy: Path, tiny_file: Path) -> None:
    summary = extract_features(store_copy, backbone=f"{tiny_file}:make", batch_size=5)
    assert summary.name == "tiny.make" and summary.shape[1:] == (5, 8, 8)
    s = spairstore.open(store_copy)
    g = s.feature_sets["tiny.make"]
    module = load_tiny(tiny_file)
    rows = np.arange(len(s))
    ref = by_hand(s.read("pixels", rows), module)
    got = s.read("features/tiny.make", rows).astype(np.float32)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
    # geometry and provenance as declared
    assert (g["input_size"], g["stride"], g["cell_offset"], g["width"], g["channels"]) == (64, 8, 0.5, 8, 5)
    assert g["normalization"]["mean"] == [0.5, 0.4, 0.3] and g["normalization"]["std"] == [0.2, 0.25, 0.3]
    assert g["backbone"] == g["module"] == f"{tiny_file.resolve()}:make" and g["library"] == "user module"
    assert g["module_file"] == str(tiny_file.resolve()) and g["module_class"].endswith(".Tiny")
    # the state_dict hash, recomputed here: sorted keys, name/dtype/shape, then the tensor's bytes
    h = hashlib.sha256()
    for k, t in sorted(module.state_dict().items()):
        h.update(f"{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode() + t.contiguous().numpy().tobytes())
    assert g["state_dict_sha256"] == g["weights_sha256"] == h.hexdigest() == state_dict_sha256(module)


def test_user_module_from_sys_path_and_as_object(store_copy: Path, tiny_file: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tiny_file.parent))
    extract_features(store_copy, backbone="tiny:make", name="bypath")
    module = load_tiny(tiny_file)
    extract_features(store_copy, backbone=module, name="byobject")
    s = spairstore.open(store_copy)
    np.testing.assert_array_equal(s.read("features/bypath", [0, 3]), s.read("features/byobject", [0, 3]))
    assert s.feature_sets["bypath"]["module"] == "tiny:make"
    assert s.feature_sets["byobject"]["weights_sha256"] == s.feature_sets["bypath"]["weights_sha256"]


def test_user_module_in_the_working_directory(store_copy: Path, tiny_file: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``spairstore`` script has no working directory on sys.path (``python -m`` has): a MODULE found
    only there is imported all the same, after everything installed."""
    shutil.copyfile(tiny_file, tiny_file.with_name("tiny_in_cwd.py"))
    monkeypatch.chdir(tiny_file.parent)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != Path.cwd()])
    extract_features(store_copy, backbone="tiny_in_cwd:make", name="cwd")
    assert sys.path[-1] == str(Path.cwd())
    s = spairstore.open(store_copy)
    assert s.feature_sets["cwd"]["module_file"] == str(tiny_file.with_name("tiny_in_cwd.py").resolve())
    with pytest.raises(FeatureError, match=r"cannot import tiny_elsewhere .*PYTHONPATH"):
        extract_features(store_copy, backbone="tiny_elsewhere:make", name="nope")


def test_user_module_resumes_like_a_builtin(store_copy: Path, tiny_file: Path) -> None:
    """Staged rows of a killed run are kept by a re-run with the same module and weights."""
    from spairstore.features import extract as extract_mod

    s = spairstore.open(store_copy)
    fe = UserExtractor(f"{tiny_file}:make")
    meta = {"name": "t", "store": s.fingerprint, "rows": len(s),
            "row_shape": [fe.channels, fe.size, fe.size], "attrs": fe.attrs()}
    st = extract_mod.Staging.open(store_copy.resolve(), meta)
    target = extract_mod.set_writer(store_copy.resolve(), st.meta, batch_size=16)
    target.prepare(st.tx, replace=False)
    sink = target.sink(st.tx, 0, sync_seconds=0)
    sink(np.array([0, 1]), np.ones((2, *st.row_shape), dtype=np.float16))
    sink.close()
    st.close()
    assert extract_features(store_copy, backbone=f"{tiny_file}:make", name="t").extracted == len(s) - 2
    assert (spairstore.open(store_copy).features("t", 1) == 1).all()


def test_cli_user_module_and_flip(store_copy: Path, tiny_file: Path) -> None:
    r = run_cli("features", store_copy, "--backbone", f"{tiny_file}:make", "--name", "u", "--flip")
    assert r.returncode == 0, r.stderr
    assert "feature set 'u'" in r.stdout and "feature set 'u-flip'" in r.stdout
    s = spairstore.open(store_copy)
    module = load_tiny(tiny_file)
    rows = np.arange(len(s))
    pixels = s.read("pixels", rows)
    ref = by_hand(np.flip(pixels, axis=2), module)  # (N, S, S, 3): axis 2 is x; np.flip(image, axis=1) per image
    got = s.read("features/u-flip", rows).astype(np.float32)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3 * np.abs(ref).max())
    g, gf = s.feature_sets["u"], s.feature_sets["u-flip"]
    assert gf["flipped"] is True and gf["flip_of"] == "u" and "flipped" not in g
    shown = [ln for ln in run_cli("info", store_copy).stdout.splitlines() if ln.startswith("  features     u")]
    assert len(shown) == 2 and shown[1].endswith(", of the mirrored images (flip of u)") and "mirrored" not in shown[0]
    assert {k: gf[k] for k in ("input_size", "stride", "cell_offset", "width", "height", "channels")} == \
        {k: g[k] for k in ("input_size", "stride", "cell_offset", "width", "height", "channels")}


def test_flip_rerun_keeps_the_set_and_resumes_the_companion(store_copy: Path, tiny_file: Path) -> None:
    extract_features(store_copy, backbone=f"{tiny_file}:make", name="u")
    before = spairstore.open(store_copy).read("features/u", [0, 1])
    summary = extract_features(store_copy, backbone=f"{tiny_file}:make", name="u", flip=True)
    assert summary.extracted == 0 and summary.flipped.extracted == len(spairstore.open(store_copy))
    s = spairstore.open(store_copy)
    np.testing.assert_array_equal(s.read("features/u", [0, 1]), before)
    # the companion's map of an image is the extractor's map of that image mirrored
    mirrored = np.ascontiguousarray(np.flip(s.pixels(2), axis=1))[None]
    fe = UserExtractor(f"{tiny_file}:make")
    np.testing.assert_allclose(s.features("u-flip", 2).astype(np.float32), fe(mirrored)[0].numpy(),
                               rtol=2e-3, atol=2e-2)
    again = extract_features(store_copy, backbone=f"{tiny_file}:make", name="u")  # the same: nothing to do
    assert again.kept and again.extracted == 0 and "run    nothing to do: the store has this set" in str(again)
    np.testing.assert_array_equal(spairstore.open(store_copy).read("features/u", [0, 1]), before)


def test_user_module_on_zarr_store(store_copy: Path, tiny_file: Path, tmp_path: Path) -> None:
    from spairstore.store.convert import convert

    z = tmp_path / "s.zarr"
    convert(store_copy, z)
    extract_features(z, backbone=f"{tiny_file}:make", name="u", batch_size=4)
    extract_features(store_copy, backbone=f"{tiny_file}:make", name="u", batch_size=4)
    rows = np.arange(len(spairstore.open(z)))
    np.testing.assert_array_equal(spairstore.open(z).read("features/u", rows),
                                  spairstore.open(store_copy).read("features/u", rows))


@pytest.mark.parametrize("factory, message", [
    ("wrong_shape", r"{spec}: forward returned \(1, 5, 8, 8\), expected \(1, C, 16, 16\) for input_size 64 / stride 4"),
    ("no_stride", r"{spec}: the module has no attribute stride \(a feature module declares input_size: "),
    ("bad_std", r"{spec}: attribute std = \(0.2, 0.0, 0.3\) must be 3 positive floats"),
    ("not_a_module", r"{spec}: FACTORY\(\) returned int, not a torch.nn.Module"),
    ("broken", r"{spec}: FACTORY\(\) raised ValueError: no weights here \(.*tiny.py, line 50\)"),
    ("nothing", r"--backbone {spec}: .*tiny.py has no callable 'nothing'"),
])
def test_user_module_errors(store_copy: Path, tiny_file: Path, factory: str, message: str) -> None:
    spec = f"{tiny_file.resolve()}:{factory}"
    before = store_copy.read_bytes()
    with pytest.raises(FeatureError, match="^" + message.format(spec=spec)):
        extract_features(store_copy, backbone=spec)
    assert store_copy.read_bytes() == before


def test_factory_path_errors(store_copy: Path, tiny_file: Path) -> None:
    with pytest.raises(FeatureError, match=r"^no/such/file.py: no such file \(--backbone no/such/file.py:make\)$"):
        extract_features(store_copy, backbone="no/such/file.py:make")
    with pytest.raises(FeatureError, match=r"^--backbone nosuchpkg.mod:make: cannot import nosuchpkg.mod .*PYTHONPATH"):
        extract_features(store_copy, backbone="nosuchpkg.mod:make")
    with pytest.raises(FeatureError, match=r"^--backbone ':make': give MODULE:FACTORY"):
        extract_features(store_copy, backbone=":make")
    with pytest.raises(FeatureError, match=r"^--layers apply to registry backbones"):
        extract_features(store_copy, backbone=f"{tiny_file}:make", layers=["x"])
    with pytest.raises(FeatureError, match=r"^--input-size 32: .*tiny.py:make declares input_size 64"):
        extract_features(store_copy, backbone=f"{tiny_file}:make", input_size=32)
    r = run_cli("features", store_copy, "--backbone", f"{tiny_file}:wrong_shape")
    err = r.stderr.strip()
    assert r.returncode == 1 and "\n" not in err and err.startswith("error: ") and "expected (1, C, 16, 16)" in err


def test_an_error_in_the_users_forward_shows_their_frames(store_copy: Path, tiny_file: Path) -> None:
    """A bug in the user's forward: the traceback starts at their frame (no CLI or spairstore frames
    above it) and the last line names their file and line; the store is unchanged."""
    before = store_copy.read_bytes()
    r = run_cli("features", store_copy, "--backbone", f"{tiny_file}:crashes")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback (most recent call last; your code's frames only):" in err
    shown = "\n".join(err[err.index("Traceback (most recent call last; your code's frames only):"):])
    assert f'File "{tiny_file.resolve()}", line 55, in forward' in shown
    assert set(re.findall(r'File "([^"]+)"', shown)) == {str(tiny_file.resolve())}
    assert err[-1] == f"error: your code raised IndexError: index 99 is out of bounds for dimension 3 with size 8 " \
                      f"({tiny_file.resolve()}, line 55)"
    assert store_copy.read_bytes() == before


def test_a_module_whose_own_import_fails_is_not_called_missing(store_copy: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "needs_x.py").write_text("import nosuch_dependency_x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FeatureError, match=r"^--backbone needs_x:make: importing needs_x raised ModuleNotFoundError: "
                                           r"No module named 'nosuch_dependency_x' \(.*needs_x.py, line 1\)$"):
        extract_features(store_copy, backbone="needs_x:make")


@pytest.mark.parametrize("factory, what", [("nan", "NaN or infinite values"),
                                           ("huge", r"values beyond float16's range \(\|x\| > 65504\)")])
def test_maps_that_are_not_finite_in_float16_are_refused(store_copy: Path, tiny_file: Path, factory: str,
                                                         what: str) -> None:
    with pytest.raises(FeatureError, match=rf"^{store_copy.resolve()}: the maps of image row 0 \(aeroplane/\w+\) "
                                           rf"and \d+ more hold {what}$"):
        extract_features(store_copy, backbone=f"{tiny_file}:{factory}")
    assert not spairstore.open(store_copy).feature_sets
