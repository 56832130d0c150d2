"""DINOv2 / DINOv3 through transformers: the CLI with random weights, geometry, the original-checkpoint key
mapping against an independent forward pass of the original architecture, HF folders, register tokens."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import spairstore
from spairstore.core.errors import FeatureError
from spairstore.features import RANDOM_WEIGHTS, FeatureExtractor
from spairstore.features.backbones import get_backbone
from spairstore.features.dinov2 import from_original
from tests.conftest import run_cli

transformers = pytest.importorskip("transformers")


def original_state_dict(dim: int, heads: int, depth: int, registers: int, grid: int, swiglu: bool = False,
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the original DINOv2 checkpoint's key names and shapes (ViT with ``grid`` x
    ``grid`` position embeddings); layer-scale and norm weights far from 1 so that every tensor matters."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.05, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale + mean

    hidden = 4 * dim
    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 1 + grid * grid, dim, scale=0.5), "mask_token": r(1, dim),
          "patch_embed.proj.weight": r(dim, 3, 14, 14), "patch_embed.proj.bias": r(dim),
          "norm.weight": r(dim, mean=1, scale=0.3), "norm.bias": r(dim)}
    if registers:
        sd["register_tokens"] = r(1, registers, dim, scale=1.0)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": r(dim, mean=1, scale=0.3), b + "norm1.bias": r(dim),
                   b + "attn.qkv.weight": r(3 * dim, dim, scale=0.1), b + "attn.qkv.bias": r(3 * dim),
                   b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
                   b + "ls1.gamma": r(dim, mean=1, scale=0.3), b + "norm2.weight": r(dim, mean=1, scale=0.3),
                   b + "norm2.bias": r(dim), b + "ls2.gamma": r(dim, mean=1, scale=0.3)})
        if swiglu:
            h = (int(hidden * 2 / 3) + 7) // 8 * 8
            sd.update({b + "mlp.w12.weight": r(2 * h, dim), b + "mlp.w12.bias": r(2 * h),
                       b + "mlp.w3.weight": r(dim, h), b + "mlp.w3.bias": r(dim)})
        else:
            sd.update({b + "mlp.fc1.weight": r(hidden, dim), b + "mlp.fc1.bias": r(hidden),
                       b + "mlp.fc2.weight": r(dim, hidden), b + "mlp.fc2.bias": r(dim)})
    return sd


def original_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """The original DINOv2 ViT written out (input at the position embeddings' own grid): final normalised
    patch tokens as a map (B, C, h, w)."""
    dim = sd["cls_token"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    side = t.shape[-1]
    t = t.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(len(x), -1, -1), t], 1) + sd["pos_embed"]
    n_reg = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    if n_reg:  # registers go after the class token, after the position embedding
        t = torch.cat([t[:, :1], sd["register_tokens"].expand(len(x), -1, -1), t[:, 1:]], 1)
    B, N, _ = t.shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        w = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}.__getitem__
        h = F.layer_norm(t, (dim,), w("norm1.weight"), w("norm1.bias"), eps=1e-6)
        q, k, v = F.linear(h, w("attn.qkv.weight"), w("attn.qkv.bias")).reshape(
            B, N, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1) @ v
        t = t + w("ls1.gamma") * F.linear(a.transpose(1, 2).reshape(B, N, dim), w("attn.proj.weight"),
                                          w("attn.proj.bias"))
        h = F.layer_norm(t, (dim,), w("norm2.weight"), w("norm2.bias"), eps=1e-6)
        if f"blocks.{i}.mlp.w12.weight" in sd:  # SwiGLU
            x1, x2 = F.linear(h, w("mlp.w12.weight"), w("mlp.w12.bias")).chunk(2, dim=-1)
            h = F.linear(F.silu(x1) * x2, w("mlp.w3.weight"), w("mlp.w3.bias"))
        else:
            h = F.linear(F.gelu(F.linear(h, w("mlp.fc1.weight"), w("mlp.fc1.bias"))), w("mlp.fc2.weight"),
                         w("mlp.fc2.bias"))
        t = t + w("ls2.gamma") * h
    t = F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)[:, 1 + n_reg:]
    return t.transpose(1, 2).reshape(B, dim, side, side)


@pytest.fixture()
def tiny_archs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry's ViT-S and ViT-B shrunk (dims 64 and 32, 2 blocks) to keep the tests fast: the registry
    path (config, key mapping, loading) is the same at any size."""
    from spairstore.features import dinov2

    monkeypatch.setitem(dinov2._DINOV2, "s", ("small", 64, 2, 2, False))
    monkeypatch.setitem(dinov2._DINOV2, "b", ("base", 32, 2, 2, False))
    monkeypatch.setitem(dinov2._DINOV3, "s", ("small", 64, 2, 2))


@pytest.fixture()
def store_copy(synth_store: Path, tmp_path: Path) -> Path:
    out = tmp_path / "s.h5"
    shutil.copyfile(synth_store, out)
    return out


def by_hand(pixels: np.ndarray, input_size: int) -> torch.Tensor:
    """Store pixels -> input_size (bilinear, antialiased) -> ImageNet normalisation, written out."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(input_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
    return (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)


def test_cli_random_vits14_on_a_store(store_copy: Path) -> None:
    r = run_cli("features", store_copy, "--backbone", "dinov2-vits14", "--weights", "random", "--input-size", "56",
                "--batch-size", "8")
    assert r.returncode == 0, r.stderr
    s = spairstore.open(store_copy)
    g = s.feature_sets["dinov2-vits14"]
    assert (g["stride"], g["cell_offset"], g["input_size"], g["width"], g["height"], g["channels"]) == \
        (14, 0.5, 56, 4, 4, 384)
    assert g["layers"] == ["layernorm"] and g["library"] == f"transformers {transformers.__version__}"
    assert g["weights"] == "random (seed 0)"
    # the same maps from the transformers model built by hand from the same seed and config
    torch.manual_seed(0)
    model = transformers.Dinov2Model(get_backbone("dinov2-vits14").config()).eval()
    rows = [0, 4, len(s) - 1]
    with torch.no_grad():
        tokens = model(pixel_values=by_hand(s.read("pixels", rows), 56)).last_hidden_state
    ref = tokens[:, 1:].transpose(1, 2).reshape(3, 384, 4, 4).numpy()
    got = s.read("features/dinov2-vits14", rows).astype(np.float32)
    np.testing.assert_allclose(got, ref, rtol=5e-3, atol=5e-3 * np.abs(ref).max())
    # numbers of an untrained network say so wherever they are shown
    line = next(x for x in run_cli("info", store_copy).stdout.splitlines() if "features     dinov2-vits14:" in x)
    assert line.endswith(", untrained: random (seed 0) weights"), line
    r = run_cli("eval", store_copy, "--method", "nn", "--features", "dinov2-vits14", "--device", "cpu", "--json")
    assert json.loads(r.stdout)["provenance"]["feature_sets"]["dinov2-vits14"]["weights"] == "random (seed 0)"
    report = spairstore.evaluate(s, "test", spairstore.NearestNeighbour("dinov2-vits14", device="cpu"))
    assert "feature set dinov2-vits14: dinov2-vits14 layernorm at 56 px, stride 14, untrained: random (seed 0) " \
        "weights" in str(report)


@pytest.mark.parametrize("backbone, layer", [("dinov2-vits14", "encoder.layer.0"), ("dinov2-vits14-reg", "0"),
                                             ("dinov3-vits16", "model.layer.0")])
def test_tokens_become_a_map_in_raster_order(backbone: str, layer: str) -> None:
    """One bright patch at row 3, column 5 changes cell (row 3, col 5) most: prefix tokens (class and
    registers) are dropped, and patches are in raster order."""
    b = get_backbone(backbone)
    p = b.multiple
    fe = FeatureExtractor(backbone, [layer], input_size=8 * p, weights=RANDOM_WEIGHTS)
    assert fe.size == 8 and fe.channels == 384 and fe.taps[0].cell_offset == 0.5 and fe.stride == p
    x = np.zeros((2, 8 * p, 8 * p, 3), dtype=np.uint8)
    x[1, 3 * p:4 * p, 5 * p:6 * p] = 255
    change = (fe(x)[1] - fe(x)[0]).norm(dim=0)
    assert np.unravel_index(int(change.argmax()), change.shape) == (3, 5)


@pytest.mark.parametrize("backbone, registers", [("dinov2-vits14", 0), ("dinov2-vits14-reg", 4)])
def test_original_checkpoint_maps_onto_the_transformers_model(backbone: str, registers: int, tmp_path: Path,
                                                               tiny_archs: None) -> None:
    """A checkpoint under the original key names (fused qkv, ls1.gamma, ...) loads through --weights FILE and
    gives the maps of the original architecture written out above."""
    sd = original_state_dict(64, 2, 2, registers, grid=37)
    path = tmp_path / "dinov2_pretrain.pth"
    torch.save(sd, path)
    fe = FeatureExtractor(backbone, input_size=518, weights=path)
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got = fe.maps(x)
        ref = original_forward(sd, x, heads=2)
    assert got.shape == (1, 64, 37, 37)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert fe.attrs()["weights"] == str(path.resolve()) and len(fe.attrs()["weights_sha256"]) == 64


def test_original_swiglu_mapping_vit_g_style() -> None:
    """ViT-g's fused SwiGLU (w12 = gate rows, then up rows; w3) on a small model of that layout."""
    sd = original_state_dict(64, 2, 2, 0, grid=4, swiglu=True)
    cfg = transformers.Dinov2Config(hidden_size=64, num_attention_heads=2, num_hidden_layers=2, use_swiglu_ffn=True,
                                    image_size=56, patch_size=14, layer_norm_eps=1e-6)
    model = transformers.Dinov2Model(cfg).eval()
    model.load_state_dict(from_original(sd), strict=True)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4)
    torch.testing.assert_close(got, original_forward(sd, x, heads=2), rtol=1e-4, atol=1e-4)


def test_hf_folder_weights(tmp_path: Path, tiny_archs: None) -> None:
    """--weights FOLDER (save_pretrained layout) loads that model; a folder of another size is refused."""
    torch.manual_seed(5)
    model = transformers.Dinov2WithRegistersModel(get_backbone("dinov2-vits14-reg").config()).eval()
    folder = tmp_path / "dinov2-small-reg"
    model.save_pretrained(folder)
    fe = FeatureExtractor("dinov2-vits14-reg", input_size=56, weights=folder)
    x = np.random.default_rng(0).integers(0, 255, (2, 56, 56, 3), dtype=np.uint8)
    with torch.no_grad():
        tokens = model(pixel_values=by_hand(x, 56)).last_hidden_state
    assert tokens.shape[1] == 1 + 4 + 16  # class, 4 registers, 4 x 4 patches: the registers are dropped
    ref = tokens[:, 5:].transpose(1, 2).reshape(2, 64, 4, 4)
    torch.testing.assert_close(fe(x), ref, rtol=1e-4, atol=1e-4)
    assert fe.attrs()["weights"] == str(folder.resolve())
    with pytest.raises(FeatureError, match=f"^{folder}: holds a dinov2_with_registers ViT with hidden size 64, 2 "
                                           f"blocks and 4 registers, not dinov2-vitb14-reg$"):
        FeatureExtractor("dinov2-vitb14-reg", input_size=56, weights=folder)


def test_dinov3_folder_weights(tmp_path: Path, tiny_archs: None) -> None:
    torch.manual_seed(6)
    model = transformers.DINOv3ViTModel(get_backbone("dinov3-vits16").config()).eval()
    model.save_pretrained(tmp_path / "v3")
    fe = FeatureExtractor("dinov3-vits16", input_size=64, weights=tmp_path / "v3")
    x = np.random.default_rng(1).integers(0, 255, (1, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        tokens = model(pixel_values=by_hand(x, 64)).last_hidden_state
    torch.testing.assert_close(fe(x), tokens[:, 5:].transpose(1, 2).reshape(1, 64, 4, 4), rtol=1e-4, atol=1e-4)


def original_v3_state_dict(dim: int, heads: int, depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the key names and shapes of Meta's DINOv3 ViT checkpoints (4 storage tokens,
    RoPE periods of base 100, a fused qkv whose key third of the bias is masked by ``bias_mask``). The
    released files' qkv biases are all zero; random ones here make a misplaced bias visible."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.05, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale + mean

    head_dim = dim // heads
    sd = {"cls_token": r(1, 1, dim, scale=1.0), "storage_tokens": r(1, 4, dim, scale=1.0), "mask_token": r(1, dim),
          "patch_embed.proj.weight": r(dim, 3, 16, 16), "patch_embed.proj.bias": r(dim),
          "rope_embed.periods": 100.0 ** (torch.arange(head_dim // 4) * 4 / head_dim),
          "norm.weight": r(dim, mean=1, scale=0.3), "norm.bias": r(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": r(dim, mean=1, scale=0.3), b + "norm1.bias": r(dim),
                   b + "attn.qkv.weight": r(3 * dim, dim, scale=0.1), b + "attn.qkv.bias": r(3 * dim, scale=1.0),
                   b + "attn.qkv.bias_mask": torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)]),
                   b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
                   b + "ls1.gamma": r(dim, mean=1, scale=0.3), b + "norm2.weight": r(dim, mean=1, scale=0.3),
                   b + "norm2.bias": r(dim), b + "ls2.gamma": r(dim, mean=1, scale=0.3),
                   b + "mlp.fc1.weight": r(4 * dim, dim), b + "mlp.fc1.bias": r(4 * dim),
                   b + "mlp.fc2.weight": r(dim, 4 * dim), b + "mlp.fc2.bias": r(dim)})
    return sd


def original_v3_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """DINOv3's ViT written out: tokens [class, 4 storage, patches], no position embedding; in each block
    RoPE on the patch tokens' queries and keys (patch centres in [-1, 1], (y, x) order, angles 2 pi c / period,
    halves rotated). Final normalised patch tokens as a map (B, C, h, w)."""
    dim = sd["cls_token"].shape[-1]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16)
    side = t.shape[-1]
    B = len(x)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), sd["storage_tokens"].expand(B, -1, -1),
                   t.flatten(2).transpose(1, 2)], 1)
    N, hd = t.shape[1], dim // heads
    c = (torch.arange(side) + 0.5) / side * 2 - 1
    coords = torch.stack(torch.meshgrid(c, c, indexing="ij"), -1).reshape(-1, 2)  # (y, x) per patch
    angles = (2 * torch.pi * coords[:, :, None] / sd["rope_embed.periods"]).flatten(1).tile(2)  # (hw, hd)
    cos, sin = angles.cos(), angles.sin()

    def rope(z: torch.Tensor) -> torch.Tensor:
        p = z[..., 5:, :]
        half = torch.cat([-p[..., hd // 2:], p[..., :hd // 2]], -1)
        return torch.cat([z[..., :5, :], p * cos + half * sin], -2)

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        w = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}.__getitem__
        h = F.layer_norm(t, (dim,), w("norm1.weight"), w("norm1.bias"), eps=1e-5)
        q, k, v = F.linear(h, w("attn.qkv.weight"), w("attn.qkv.bias") * w("attn.qkv.bias_mask")).reshape(
            B, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
        a = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / hd ** 0.5, dim=-1) @ v
        t = t + w("ls1.gamma") * F.linear(a.transpose(1, 2).reshape(B, N, dim), w("attn.proj.weight"),
                                          w("attn.proj.bias"))
        h = F.layer_norm(t, (dim,), w("norm2.weight"), w("norm2.bias"), eps=1e-5)
        h = F.linear(F.gelu(F.linear(h, w("mlp.fc1.weight"), w("mlp.fc1.bias"))), w("mlp.fc2.weight"),
                     w("mlp.fc2.bias"))
        t = t + w("ls2.gamma") * h
    t = F.layer_norm(t, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-5)[:, 5:]
    return t.transpose(1, 2).reshape(B, dim, side, side)


def test_original_dinov3_checkpoint_maps_onto_the_transformers_model(tmp_path: Path, tiny_archs: None,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Meta's DINOv3 layout (storage tokens, masked key bias, RoPE periods) loads through --weights FILE, is
    found in the torch hub cache under its released name, and gives the maps of DINOv3 written out above."""
    sd = original_v3_state_dict(64, 2, 2)
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    path = hub / "checkpoints" / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save(sd, path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert get_backbone("dinov3-vits16").cached_weights() == path
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for weights in (path, None):
        fe = FeatureExtractor("dinov3-vits16", input_size=64, weights=weights)
        with torch.inference_mode():
            got = fe.maps(x)
        assert got.shape == (2, 64, 4, 4)
        torch.testing.assert_close(got, original_v3_forward(sd, x, heads=2), rtol=1e-4, atol=1e-4)
    assert fe.attrs()["weights"] == str(path.resolve())
    bf16 = tmp_path / "bf16.pth"  # Meta's files hold the periods rounded to bfloat16
    torch.save({**sd, "rope_embed.periods": sd["rope_embed.periods"].to(torch.bfloat16)}, bf16)
    with torch.inference_mode():
        torch.testing.assert_close(FeatureExtractor("dinov3-vits16", input_size=64, weights=bf16).maps(x), got)
    bad = tmp_path / "b.pth"
    unmasked = {k: torch.ones_like(v) if k.endswith("bias_mask") else v for k, v in sd.items()}
    torch.save(unmasked, bad)
    with pytest.raises(FeatureError, match=r"\(blocks.0.attn.qkv.bias: its key third is not masked to zero "
                                           r"\(bias_mask\), and transformers' DINOv3 has no key bias\)$"):
        FeatureExtractor("dinov3-vits16", input_size=64, weights=bad)
    torch.save({**sd, "rope_embed.periods": sd["rope_embed.periods"] * 2}, bad)
    with pytest.raises(FeatureError, match=f"^{bad}: not dinov3-vits16 weights \\(its RoPE periods "
                                           r"\(rope_embed.periods, \(8,\)\) are not those of dinov3-vits16 "
                                           r"\(base 100, head dim 32\)\)$"):
        FeatureExtractor("dinov3-vits16", input_size=64, weights=bad)
    torch.save({}, bad)
    with pytest.raises(FeatureError, match=f"^{bad}: not dinov3-vits16 weights \\(Error\\(s\\) in loading"):
        FeatureExtractor("dinov3-vits16", input_size=64, weights=bad)
    with pytest.raises(FeatureError, match=r"^not an original DINOv3 checkpoint: unknown keys pos_embed$"):
        from_original({"pos_embed": torch.zeros(1)}, "dinov3")


def test_bad_checkpoints(tmp_path: Path, tiny_archs: None) -> None:
    with pytest.raises(FeatureError, match=r"^not an original DINOv2 checkpoint: unknown keys head.weight$"):
        from_original({"head.weight": torch.zeros(1), "cls_token": torch.zeros(1, 1, 8)})
    path = tmp_path / "b.pth"
    torch.save(original_state_dict(64, 2, 2, 0, grid=37), path)
    with pytest.raises(FeatureError, match=f"^{path}: not dinov2-vitb14 weights \\(Error\\(s\\) in loading"):
        FeatureExtractor("dinov2-vitb14", input_size=56, weights=path)
    with pytest.raises(FeatureError, match=r"cannot tap 'embeddings' \(choose encoder.layer.0 .. "
                                           r"encoder.layer.1, layernorm, or an index\)"):
        FeatureExtractor("dinov2-vits14", ["embeddings"], input_size=56, weights=RANDOM_WEIGHTS)
    with pytest.raises(FeatureError, match="input size 50 must be a positive multiple of 14"):
        FeatureExtractor("dinov2-vits14", input_size=50, weights=RANDOM_WEIGHTS)
