"""Source manifest: relative path, size and SHA-256 of every source file a store was built from."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(root: Path, paths: Iterable[Path], known: Mapping[Path, str] | None = None
                   ) -> dict[str, np.ndarray]:
    """Arrays ``path`` (UTF-8, relative to ``root``, POSIX), ``size`` (bytes) and ``sha256`` (hex).

    ``known`` maps paths already hashed (e.g. images the writer read anyway) to their digest.
    """
    known = known or {}
    rel, sizes, digests = [], [], []
    for p in paths:
        rel.append(p.relative_to(root).as_posix().encode())
        sizes.append(p.stat().st_size)
        digests.append((known.get(p) or sha256_file(p)).encode())
    return {
        "path": np.array(rel, dtype=f"S{max((len(r) for r in rel), default=1)}"),
        "size": np.array(sizes, dtype=np.int64),
        "sha256": np.array(digests, dtype="S64"),
    }
