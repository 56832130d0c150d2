"""The one-way architecture, asserted on the source: every import (module level or inside a function)
goes to the module's own layer or one below it.

    converters/  ->  spairstore.core                      (a converter knows file formats and the records)
    spairstore.core (0) -> store (1) -> features, torch (2) -> eval (3) -> the top: cli, sources, __init__

Only ``spairstore/sources.py`` (the pack entry point) imports ``converters``; features and torch do not
import each other; nothing below the top imports the package root (``spairstore/__init__``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RANK = {"core": 0, "store": 1, "features": 2, "torch": 2, "eval": 3}
TOP = 4


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in the file, relative ones resolved."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from pkg import name`` may import the submodule pkg.name
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names] or [(node.lineno, target)]
    return found


def _layer(module: str) -> tuple[str, int] | None:
    """(package, rank) of a spairstore/converters module; None for anything else (stdlib, libraries)."""
    parts = module.split(".")
    if parts[0] == "converters":
        return "converters", -1
    if parts[0] != "spairstore":
        return None
    if len(parts) > 1 and parts[1] in RANK:
        return parts[1], RANK[parts[1]]
    return "top", TOP


def _is_root(module: str) -> bool:
    """``spairstore`` itself, or a name imported from it (not a submodule file)."""
    parts = module.split(".")
    return parts[0] == "spairstore" and (len(parts) == 1 or (len(parts) == 2 and not _is_file(parts[1])))


def _is_file(name: str) -> bool:
    return (REPO / "spairstore" / f"{name}.py").is_file() or (REPO / "spairstore" / name).is_dir()


FILES = sorted(p for d in ("spairstore", "converters") for p in (REPO / d).rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_go_one_way(path: Path) -> None:
    me = _layer(_module(path))
    assert me is not None
    bad = []
    for line, target in _imports(path):
        there = _layer(target)
        if there is None:
            continue
        where = f"{path.relative_to(REPO)}:{line} imports {target}"
        if me[0] == "converters":
            ok = there[0] == "converters" or there[0] == "core"
        elif there[0] == "converters":
            ok = _module(path) == "spairstore.sources"
        elif me[0] == "top":
            ok = True
        else:
            ok = there[1] < me[1] or there[0] == me[0]
            ok = ok and not (_is_root(target) and me[0] != "top")
        if not ok:
            bad.append(where)
    assert not bad, "imports against the data flow:\n" + "\n".join(bad)


def test_rule_catches_a_backward_import(tmp_path: Path) -> None:
    """The checker itself: a store module importing eval, or a converter importing the store, is caught."""
    assert _layer("spairstore.eval.evaluation") == ("eval", 3)
    assert _layer("spairstore.store.reader")[1] < _layer("spairstore.eval.methods")[1]  # type: ignore[index]
    assert _layer("converters.spair71k") == ("converters", -1)
    assert _is_root("spairstore.__version__") and not _is_root("spairstore.core")


def test_import_spairstore_imports_neither_torch_nor_converters() -> None:
    import subprocess
    import sys

    code = "import sys, spairstore; print('torch' in sys.modules, 'converters' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_converters_import_without_a_circle() -> None:
    import subprocess
    import sys

    code = "import converters; print(sorted(converters.CONVERTERS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
