"""DINOv2 and DINOv3 ViTs through Hugging Face ``transformers`` (``pip install 'spairstore[dino]'``), which
imports beside a CPU torch where timm (through torchvision) does not.

Registry names: ``dinov2-vit{s,b,l,g}14`` and, with 4 register tokens, ``dinov2-vit{s,b,l,g}14-reg``;
``dinov3-vit{s,b,l}16``. The map is the patch tokens of the tapped layer, class and register tokens
dropped, in raster order: cell ``(j, i)`` is patch column ``j``, row ``i``, centred at
``((j, i) + 0.5) * patch`` input pixels (``cell_offset`` 0.5, ``stride`` = the patch, 14 or 16), exact
for any input size that is a multiple of the patch (518 = 37 x 14 is DINOv2's own; the position
embeddings are resampled bicubically to other grids by transformers). Layers: ``encoder.layer.N``
(DINOv3: ``model.layer.N``), the output of block ``N``; or ``layernorm`` (DINOv3: ``norm``), the final
normalised tokens (the default); integer ``N`` indexes that list (``N`` = depth is the final norm).

Weights (``--weights``):

* a Hugging Face model folder (``config.json`` + ``model.safetensors``, what ``save_pretrained`` writes or
  the hub's ``facebook/dinov2-small`` snapshot holds), loaded with ``from_pretrained`` offline;
* the original checkpoint, ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`` or Meta's
  ``dinov3_vit{s,b,l}16_pretrain_lvd1689m-<hash>.pth``, whose keys are mapped onto the transformers model
  by :func:`from_original` (fused ``qkv`` split into q, k, v, DINOv3's masked key bias dropped, ...);
* ``random``: the architecture from its config with seeded random weights (tests).

Without ``--weights`` the original file in the torch hub cache (``<hub>/checkpoints/``) or the model's
folder in the Hugging Face cache is used when present.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import FeatureError
from ..core.manifest import sha256_file
from .backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone, Tap, _hub_checkpoint, _import, _torch_load

_DINOV2 = {  # size letter -> (hub size name, hidden size, heads, blocks, SwiGLU MLP)
    "s": ("small", 384, 6, 12, False),
    "b": ("base", 768, 12, 12, False),
    "l": ("large", 1024, 16, 24, False),
    "g": ("giant", 1536, 24, 40, True),
}
_DINOV3 = {"s": ("small", 384, 6, 12), "b": ("base", 768, 12, 12), "l": ("large", 1024, 16, 24)}


def _transformers(backbone: str) -> Any:
    tr = _import("transformers", backbone, extra="dino")
    if int(tr.__version__.split(".")[0]) < 5:
        raise FeatureError(f"backbone {backbone} needs transformers >= 5 (found {tr.__version__}); "
                           f"pip install 'spairstore[dino]'")
    return tr


@dataclass(frozen=True)
class _Original:
    """How an original checkpoint's keys become a transformers model's: whole tensors renamed (``top``;
    a target name ending in ``:3d`` is reshaped to (1, 1, D)), block parts renamed (``parts``), under the
    transformers block list ``blocks``; ``key_bias``: whether transformers' key projection has a bias (DINOv3
    masks the key third of the fused ``qkv`` bias to zero at run time, so it has none)."""

    family: str
    top: dict[str, str]
    blocks: str
    parts: dict[str, str]
    key_bias: bool


_ORIGINAL = {
    "dinov2": _Original(
        "DINOv2", {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
                   "mask_token": "embeddings.mask_token", "register_tokens": "embeddings.register_tokens",
                   "patch_embed.proj": "embeddings.patch_embeddings.projection", "norm": "layernorm"},
        "encoder.layer", {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1",
                          "mlp.fc2": "mlp.fc2", "mlp.w3": "mlp.down_proj"}, key_bias=True),
    "dinov3": _Original(
        "DINOv3", {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token:3d",
                   "storage_tokens": "embeddings.register_tokens", "patch_embed.proj": "embeddings.patch_embeddings",
                   "norm": "norm"},
        "model.layer", {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.up_proj",
                        "mlp.fc2": "mlp.down_proj"}, key_bias=False),
}


def from_original(state: dict[str, torch.Tensor], family: str = "dinov2") -> dict[str, torch.Tensor]:
    """An original checkpoint's state dict renamed, and fused tensors split, to the state dict of the
    transformers model: DINOv2 (``dinov2_vit*14[_reg4]_pretrain.pth``: ``cls_token``, ``pos_embed``,
    ``patch_embed.proj.*``, ``blocks.N.attn.qkv.*``, ``blocks.N.ls1.gamma``, ``norm.*``, ...) onto
    ``Dinov2Model`` / ``Dinov2WithRegistersModel``; ``family="dinov3"`` (``dinov3_vit{s,b,l}16_pretrain_*.pth``:
    ``storage_tokens``, ``rope_embed.periods``, ``blocks.N.attn.qkv.bias_mask``, ...) onto ``DINOv3ViTModel``.
    DINOv3's ``qkv`` bias is multiplied by its ``bias_mask``, as the original does at run time (a key third
    left non-zero is refused: transformers has no key bias). Its RoPE periods are not weights
    (transformers computes them; :meth:`HFDinoV3.check_original` compares) and are left out. Unknown keys
    are a :class:`FeatureError` naming them."""
    lay = _ORIGINAL[family]
    out: dict[str, torch.Tensor] = {}
    unknown = []
    masks = {k.removesuffix("_mask"): v for k, v in state.items() if k.endswith(".attn.qkv.bias_mask")}
    for key, t in state.items():
        head, _, leaf = key.rpartition(".")
        if key in lay.top or head in lay.top:
            name = lay.top[key] if key in lay.top else f"{lay.top[head]}.{leaf}"
            out[name.removesuffix(":3d")] = t.reshape(1, 1, -1) if name.endswith(":3d") else t
        elif family == "dinov3" and key == "rope_embed.periods":
            continue
        elif m := re.fullmatch(r"blocks\.(?:\d+\.)?(\d+)\.(.+)\.(weight|bias|gamma|bias_mask)", key):  # chunked too
            block, part, leaf = m.groups()
            p = f"{lay.blocks}.{block}."
            if part in ("ls1", "ls2") and leaf == "gamma":
                out[p + f"layer_scale{part[-1]}.lambda1"] = t
            elif part == "attn.qkv" and leaf in ("weight", "bias"):  # rows: q, then k, then v
                if key in masks:  # the original multiplies the bias by its mask at run time
                    t = t * masks[key].to(t.dtype)
                for name, piece in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                    if lay.key_bias or (name, leaf) != ("k_proj", "bias"):
                        out[p + f"attention.{name}.{leaf}"] = piece.clone()
                    elif piece.any():
                        raise FeatureError(f"{key}: its key third is not masked to zero (bias_mask), and "
                                           f"transformers' {lay.family} has no key bias")
            elif part == "attn.qkv" and leaf == "bias_mask" and not lay.key_bias:
                continue
            elif part == "mlp.w12" and family == "dinov2":  # SwiGLU (ViT-g): rows: gate, then up
                for name, piece in zip(("gate_proj", "up_proj"), t.chunk(2, dim=0)):
                    out[p + f"mlp.{name}.{leaf}"] = piece.clone()
            elif part in lay.parts and leaf in ("weight", "bias"):
                out[p + f"{lay.parts[part]}.{leaf}"] = t
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise FeatureError(f"not an original {lay.family} checkpoint: unknown keys {', '.join(unknown[:3])}"
                           + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""))
    return out


class _HFViT(Backbone):
    """A transformers ViT whose patch tokens become the map (prefix tokens dropped by the extractor)."""

    tokens = True
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    weights_dirs = True
    hub_id: str
    file: str  #: file name (a glob) of the original checkpoint in the torch hub cache
    original: str  #: its key layout, for :func:`from_original`
    blocks: str  #: dotted path of the block list
    final_norm: str

    @property
    def family(self) -> str:  # type: ignore[override]
        return f"transformers {_transformers(self.name).__version__}"

    def model_class(self) -> Any:
        raise NotImplementedError

    def config(self) -> Any:
        raise NotImplementedError

    def build(self, input_size: int) -> nn.Module:
        return self.model_class()(self.config())

    def load(self, model: nn.Module, path: Path, input_size: int) -> nn.Module:
        """A Hugging Face model folder, or a file: the original checkpoint, keys mapped by :func:`from_original`."""
        if not path.is_dir():
            try:
                state = _torch_load(path)
                self.check_original(model, state)
                model.load_state_dict(from_original(state, self.original), strict=True)
            except (FeatureError, RuntimeError) as e:
                raise FeatureError(f"{path}: not {self.name} weights ({str(e).splitlines()[0]})") from None
            return model
        try:
            loaded = self.model_class().from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise FeatureError(f"{path}: not a {self.name} model folder ({str(e).splitlines()[0]})") from None
        want, got = self.config(), loaded.config
        keys = ("model_type", "hidden_size", "num_hidden_layers", "patch_size", "num_register_tokens")
        if any(getattr(want, k, None) != getattr(got, k, None) for k in keys):
            raise FeatureError(f"{path}: holds a {got.model_type} ViT with hidden size {got.hidden_size}, "
                               f"{got.num_hidden_layers} blocks and {getattr(got, 'num_register_tokens', 0)} "
                               f"registers, not {self.name}")
        return loaded

    def check_original(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Refuse an original checkpoint whose non-weight settings differ from the model's."""

    def cached_weights(self) -> Path | None:
        """The original checkpoint in the torch hub cache, else the model's folder in the Hugging Face cache."""
        hits = sorted(_hub_checkpoint("").glob(self.file))
        if hits:
            return hits[0]
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        hit = try_to_load_from_cache(self.hub_id, "config.json")
        return Path(hit).parent if isinstance(hit, str) and (Path(hit).parent / "model.safetensors").is_file() else None

    def weights_sha256(self, path: Path) -> str:
        """Of a file; of a folder, over its config and weight files' names and SHA-256s, in sorted order."""
        if not path.is_dir():
            return sha256_file(path)
        h = hashlib.sha256()
        for f in sorted(path.iterdir()):
            if f.suffix in (".json", ".safetensors", ".bin") and f.is_file():
                h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
        return h.hexdigest()

    def units(self, model: nn.Module) -> list[str]:
        n = len(model.get_submodule(self.blocks))
        return [f"{self.blocks}.{i}" for i in range(n)] + [self.final_norm]

    def tap(self, model: nn.Module, module: str) -> Tap:
        if module not in self.units(model):
            raise FeatureError(f"{self.name}: cannot tap {module!r} (choose {self.blocks}.0 .. {self.blocks}."
                               f"{len(model.get_submodule(self.blocks)) - 1}, {self.final_norm}, or an index)")
        return Tap(module, self.multiple, 0.5)

    def forward(self, model: nn.Module, x: torch.Tensor) -> None:
        model(pixel_values=x)


class HFDinoV2(_HFViT):
    """DINOv2 ViT-S/B/L/g with 14-pixel patches, optionally with 4 register tokens."""

    multiple = 14
    original = "dinov2"
    blocks, final_norm = "encoder.layer", "layernorm"
    default_layers = ("layernorm",)

    def __init__(self, size: str, registers: bool = False):
        self.size, self.registers = size, registers
        self.name = f"dinov2-vit{size}14" + ("-reg" if registers else "")
        self.file = f"dinov2_vit{size}14{'_reg4' if registers else ''}_pretrain.pth"
        self.hub_id = f"facebook/dinov2-{'with-registers-' if registers else ''}{_DINOV2[size][0]}"

    def model_class(self) -> Any:
        tr = _transformers(self.name)
        return tr.Dinov2WithRegistersModel if self.registers else tr.Dinov2Model

    def config(self) -> Any:
        tr = _transformers(self.name)
        _, hidden, heads, depth, swiglu = _DINOV2[self.size]
        cls, extra = ((tr.Dinov2WithRegistersConfig, {"num_register_tokens": 4}) if self.registers
                      else (tr.Dinov2Config, {}))
        # the original models' settings: 518 px training size (37 x 37 position embeddings), LayerNorm eps 1e-6
        return cls(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=depth, mlp_ratio=4,
                   use_swiglu_ffn=swiglu, image_size=518, patch_size=14, layer_norm_eps=1e-6, layerscale_value=1e-5,
                   **extra)

    def weights_hint(self) -> str:
        folder = f"dinov2_vit{self.size}14{'_reg' if self.registers else ''}"
        return (f"download https://dl.fbaipublicfiles.com/dinov2/{folder}/{self.file} into {_hub_checkpoint('')} "
                f"(the torch hub cache), or pass --weights PATH (that file, or a folder holding {self.hub_id}'s "
                f"config.json and model.safetensors)")


class HFDinoV3(_HFViT):
    """DINOv3 ViT-S/B/L with 16-pixel patches, 4 register tokens and rotary position embeddings."""

    multiple = 16
    original = "dinov3"
    blocks, final_norm = "model.layer", "norm"
    default_layers = ("norm",)

    def __init__(self, size: str):
        self.size = size
        self.name = f"dinov3-vit{size}16"
        self.file = f"dinov3_vit{size}16_pretrain_lvd1689m*.pth"  # the released names end in a hash: -08c60483.pth
        self.hub_id = f"facebook/dinov3-vit{size}16-pretrain-lvd1689m"

    def model_class(self) -> Any:
        return _transformers(self.name).DINOv3ViTModel

    def config(self) -> Any:
        _, hidden, heads, depth = _DINOV3[self.size]
        return _transformers(self.name).DINOv3ViTConfig(
            hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=heads, num_hidden_layers=depth,
            num_register_tokens=4, patch_size=16, image_size=224, layer_norm_eps=1e-5, rope_theta=100.0,
            key_bias=False)  # the released ViT-S/B/L/16 settings, pinned rather than taken from defaults

    def check_original(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Meta's files hold the periods rounded to bfloat16 (relative steps of 2**-8), so that is the
        tolerance; a different RoPE base or head size is far outside it. The model keeps transformers'
        exact periods, as the Hugging Face conversions of the same weights do."""
        periods = state.get("rope_embed.periods")
        want = 1 / model.get_submodule("rope_embeddings").inv_freq
        if periods is not None and (periods.shape != want.shape
                                    or not torch.allclose(periods.float(), want, rtol=2**-8, atol=0)):
            raise FeatureError(f"its RoPE periods (rope_embed.periods, {tuple(periods.shape)}) are not those of "
                               f"{self.name} (base {model.config.rope_theta:g}, head dim {4 * want.numel()})")

    def weights_hint(self) -> str:
        return (f"put Meta's {self.file.replace('*', '-<hash>')} into {_hub_checkpoint('')} (the torch hub cache), "
                f"or pass --weights PATH (that file, or a folder holding {self.hub_id}'s config.json and "
                f"model.safetensors)")


DINO_BACKBONES: tuple[Backbone, ...] = (
    *(HFDinoV2(size) for size in _DINOV2), *(HFDinoV2(size, registers=True) for size in _DINOV2),
    *(HFDinoV3(size) for size in _DINOV3))
