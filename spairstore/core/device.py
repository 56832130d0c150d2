"""The torch device a ``device`` argument names, checked once for every command and class that runs torch."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import SpairstoreError

if TYPE_CHECKING:
    import torch


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; None means ``cuda`` when CUDA is available, else ``cpu``.
    A name torch does not know, or CUDA where there is none, is a one-line :class:`SpairstoreError`."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SpairstoreError(f"unknown device {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SpairstoreError(f"device {str(device)!r}: CUDA is not available here (use cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SpairstoreError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return dev
