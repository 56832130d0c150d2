"""Source manifest: relative path, size and SHA-256 of every source file a store was built from."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
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


def build_manifest(root: Path, paths: Iterable[Path], known: Mapping[str, tuple[int, str]]) -> dict[str, np.ndarray]:
    """Arrays ``path`` (UTF-8 POSIX path relative to ``root``), ``size`` (bytes) and ``sha256`` (hex).

    ``known`` maps relative paths already hashed (as they were read) to ``(size, sha256)``; the rest
    are read and hashed here, on two threads (hashing releases the GIL).
    """
    paths = list(paths)
    rel = [p.relative_to(root).as_posix() for p in paths]
    missing = [i for i, r in enumerate(rel) if r not in known]
    with ThreadPoolExecutor(2) as pool:
        hashed = dict(zip(missing, pool.map(lambda i: (paths[i].stat().st_size, sha256_file(paths[i])), missing)))
    entries = [known[r] if r in known else hashed[i] for i, r in enumerate(rel)]
    enc = [r.encode() for r in rel]
    return {
        "path": np.array(enc, dtype=f"S{max((len(r) for r in enc), default=1)}"),
        "size": np.array([e[0] for e in entries], dtype=np.int64),
        "sha256": np.array([e[1].encode() for e in entries], dtype="S64"),
    }
