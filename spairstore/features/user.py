"""A user's own network as a feature extractor: ``spairstore features STORE --backbone MODULE:FACTORY``.

``FACTORY()`` (a function or class found in ``MODULE``, a module on ``sys.path`` such as ``pkg.mod``, or
a file given as ``path/to/file.py``) returns a ``torch.nn.Module`` with its weights loaded, declaring its
geometry as attributes:

* ``input_size`` (int): side of the square, in input pixels, the letterboxed ``S x S`` store frame is
  resized to (bilinear, antialiased, as for the built-in backbones);
* ``stride`` (int): input pixels per cell; ``input_size`` must be a multiple of it;
* ``cell_offset`` (float): cell ``(j, i)`` (column, row) is centred at ``((j, i) + cell_offset) * stride``
  input pixels (0.5 for ViT patches: the patch centre);
* ``mean``, ``std`` (3 floats each): per-channel normalisation of RGB scaled to [0, 1].

``forward`` maps float32 ``(B, 3, input_size, input_size)`` (normalised) to
``(B, C, input_size / stride, input_size / stride)``; every batch's shape is checked against that.
"""
from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.errors import FeatureError
from ..core.user_code import load_factory, raised
from .backbones import Extractor

#: the attributes a user module declares, with what each must be
CONTRACT = {
    "input_size": "a positive int (input pixels)",
    "stride": "a positive int dividing input_size (input pixels per cell)",
    "cell_offset": "a float (cell j is centred at (j + cell_offset) * stride input pixels)",
    "mean": "3 floats (RGB in [0, 1])",
    "std": "3 positive floats (RGB in [0, 1])",
}


def is_factory_spec(backbone: object) -> bool:
    """Whether ``backbone`` names a user factory (``MODULE:FACTORY``) or is a module or factory object,
    rather than a registry name."""
    return not isinstance(backbone, str) or ":" in backbone


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 of ``module.state_dict()``: over the keys in sorted order, each key's name, dtype, shape and
    tensor bytes (C order, on the CPU), so equal weights give equal hashes whatever the device."""
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _declared(module: nn.Module, origin: str) -> dict[str, Any]:
    """The geometry attributes of ``module``, checked against :data:`CONTRACT`."""
    missing = [k for k in CONTRACT if not hasattr(module, k)]
    if missing:
        raise FeatureError(f"{origin}: the module has no attribute {', '.join(missing)} (a feature module declares "
                           f"{', '.join(f'{k}: {v}' for k, v in CONTRACT.items())})")
    g = {k: getattr(module, k) for k in CONTRACT}
    ok = {
        "input_size": isinstance(g["input_size"], (int, np.integer)) and g["input_size"] > 0,
        "stride": isinstance(g["stride"], (int, np.integer)) and g["stride"] > 0
        and isinstance(g["input_size"], (int, np.integer)) and g["input_size"] % g["stride"] == 0,
        "cell_offset": isinstance(g["cell_offset"], (int, float, np.floating)) and np.isfinite(g["cell_offset"]),
    }
    for k in ("mean", "std"):
        try:
            v = np.asarray(g[k], dtype=np.float64)
        except (TypeError, ValueError):
            v = np.zeros(0)
        ok[k] = v.shape == (3,) and bool(np.isfinite(v).all()) and (k == "mean" or bool((v > 0).all()))
    for k, good in ok.items():
        if not good:
            raise FeatureError(f"{origin}: attribute {k} = {g[k]!r} must be {CONTRACT[k]}")
    return g


class UserExtractor(Extractor):
    """A user's ``torch.nn.Module`` run on store images (see the module doc for its contract).

    Args:
        backbone: ``"MODULE:FACTORY"`` or ``"path/to/file.py:FACTORY"``, a factory (a callable returning
            the module), or the module itself.
        device: torch device the module runs on.
    """

    def __init__(self, backbone: str | Callable[[], nn.Module] | nn.Module, device: str = "cpu"):
        if isinstance(backbone, nn.Module):
            module, self.spec = backbone, f"{type(backbone).__module__}.{type(backbone).__qualname__}"
        else:
            if isinstance(backbone, str):
                factory, self.spec = load_factory(backbone, "--backbone", FeatureError)
            else:
                factory = backbone
                qualname = getattr(backbone, "__qualname__", type(backbone).__name__)  # a partial has none
                self.spec = f"{getattr(backbone, '__module__', '?')}.{qualname}"
            try:
                module = factory()
            except Exception as e:  # noqa: BLE001 - the user's code
                raise FeatureError(f"{self.spec}: FACTORY() raised {raised(e)}") from None
        if not isinstance(module, nn.Module):
            raise FeatureError(f"{self.spec}: FACTORY() returned {type(module).__name__}, not a torch.nn.Module")
        g = _declared(module, self.spec)
        self.input_size, self.stride = int(g["input_size"]), int(g["stride"])
        self.cell_offset = float(g["cell_offset"])
        self.size = self.input_size // self.stride
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        self.state_dict_sha256 = state_dict_sha256(self.module)
        self._normalise_with(g["mean"], g["std"])
        with torch.inference_mode():
            probe = self(np.zeros((1, 8, 8, 3), dtype=np.uint8))
        self.channels = int(probe.shape[1])

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 4 or out.shape[0] != x.shape[0] \
                or tuple(out.shape[2:]) != (self.size, self.size):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise FeatureError(f"{self.spec}: forward returned {got}, expected ({x.shape[0]}, C, {self.size}, "
                               f"{self.size}) for input_size {self.input_size} / stride {self.stride}")
        return out

    def provenance(self) -> dict[str, Any]:
        cls = type(self.module)
        try:
            source = inspect.getsourcefile(cls)
        except TypeError:  # defined in a builtin or an interactive session
            source = None
        return {
            "backbone": self.spec,
            "library": "user module",
            "layers": ["forward"],
            "module": self.spec,
            "module_class": f"{cls.__module__}.{cls.__qualname__}",
            "module_file": str(Path(source).resolve()) if source else None,
            "weights": "state_dict of the module FACTORY() returned",
            "weights_sha256": self.state_dict_sha256,
            "state_dict_sha256": self.state_dict_sha256,
        }


def default_set_name(extractor: UserExtractor) -> str:
    """A feature set name for a user module: ``<module stem>.<factory>`` (``mod.make`` for
    ``pkg/mod.py:make``), or the module's class name when given as an object."""
    where, sep, attr = extractor.spec.rpartition(":")
    if sep:
        return f"{Path(where).stem if where.endswith('.py') else where.rsplit('.', 1)[-1]}.{attr}"[:64]
    return extractor.spec.rsplit(".", 1)[-1][:64]
