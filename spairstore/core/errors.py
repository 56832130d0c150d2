"""Exceptions raised by spairstore.

Every error a user can cause (a bad source file, a bad store, a bad argument) is a
:class:`SpairstoreError`; the CLI prints it as one line and exits non-zero, without a traceback.
"""
from __future__ import annotations

from pathlib import Path


class SpairstoreError(Exception):
    """Base class of every error spairstore raises on purpose."""


class SourceError(SpairstoreError):
    """A file of the source dataset is missing, unreadable or inconsistent.

    ``path`` names the offending file (relative to the dataset root where known), ``reason`` says what
    is wrong with it.
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class StoreError(SpairstoreError):
    """A store cannot be opened or read: missing, corrupted, wrong format or version."""


class NotAStore(StoreError):
    """Something other than a store where one was expected (e.g. a dataset folder); ``path`` names it."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message)
        self.path = path


class FeatureError(SpairstoreError):
    """Features cannot be extracted as asked: unknown backbone or layer, missing weights, bad option,
    or an unfinished run that does not match the one asked for."""


def require_batch_size(batch_size: int, error: type[SpairstoreError] = SpairstoreError) -> None:
    """Refuse a batch size below 1 as ``error``, before it turns into a bare ``range()`` error far inside."""
    if batch_size < 1:
        raise error(f"batch size must be at least 1, got {batch_size}")
