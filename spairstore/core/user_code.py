"""Loading a user's code named on the command line: ``MODULE:FACTORY`` or ``path/to/file.py:FACTORY``
(``spairstore features --backbone``, ``spairstore eval --method``)."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import SpairstoreError

#: source files of the user's code loaded so far: an error raised there is shown from its first frame there
_USER_FILES: set[str] = set()


def user_frames(e: BaseException) -> traceback.StackSummary | None:
    """The frames of ``e``'s traceback from the first one in the user's code on (what the user debugs:
    spairstore's and the CLI's frames above it say nothing about their bug), or None if the error did
    not pass through the user's code."""
    frames = traceback.extract_tb(e.__traceback__)
    first = next((k for k, f in enumerate(frames) if _is_user(f)), None)
    return None if first is None else traceback.StackSummary.from_list(frames[first:])


def _is_user(frame: traceback.FrameSummary) -> bool:
    return frame.filename in _USER_FILES or str(Path(frame.filename).resolve()) in _USER_FILES


def raised(e: BaseException) -> str:
    """``e`` in one line, with the file and line of the user's code it came from (deepest first)."""
    frames = user_frames(e)
    at = next((f for f in reversed(frames) if _is_user(f)), None) if frames else None
    return f"{type(e).__name__}: {e}" + (f" ({at.filename}, line {at.lineno})" if at else "")


def load_factory(spec: str, option: str, error: type[SpairstoreError] = SpairstoreError
                 ) -> tuple[Callable[[], Any], str]:
    """The callable ``spec`` (``MODULE:FACTORY`` or ``path/to/file.py:FACTORY``) names, and ``spec`` with a
    file path made absolute (the provenance recorded). ``MODULE`` is looked up on ``sys.path``, then in the
    working directory. Failures raise ``error``, one line naming ``option``."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise error(f"{option} {spec!r}: give MODULE:FACTORY (e.g. mypkg.feats:make or path/to/file.py:make)")
    if where.endswith(".py") or "/" in where:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise error(f"{where}: no such file ({option} {spec})")
        name = f"spairstore_user_{hashlib.sha256(str(path).encode()).hexdigest()[:12]}_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise error(f"{path}: not a Python file ({option} {spec})")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up here
        _USER_FILES.add(str(path))
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's code: report whatever it raised in one line
            del sys.modules[name]
            raise error(f"{path}: importing it raised {raised(e)}") from None
        spec = f"{path}:{attr}"
    else:
        _cwd_if_there(where)
        try:
            found = importlib.util.find_spec(where)
        except Exception:  # noqa: BLE001 - a parent package that fails to import: import_module says so below
            found = None
        if found is not None and found.origin:
            _USER_FILES.add(str(Path(found.origin).resolve()))
        try:
            module = importlib.import_module(where)
        except Exception as e:  # noqa: BLE001 - the user's code
            # Not found is the module itself (or a parent) missing; an import inside it failing is its error.
            if isinstance(e, ModuleNotFoundError) and (e.name is None or f"{where}.".startswith(f"{e.name}.")):
                raise error(f"{option} {spec}: cannot import {where} ({e}); put its folder on PYTHONPATH or "
                            f"give path/to/file.py:{attr}") from None
            raise error(f"{option} {spec}: importing {where} raised {raised(e)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise error(f"{option} {spec}: {where} has no callable {attr!r}")
    return factory, spec


def _cwd_if_there(where: str) -> None:
    """Put the working directory on ``sys.path`` (last, so it shadows nothing installed) when ``where``'s
    top-level module is found only there: ``python -m spairstore`` and ``torchrun -m`` see it, and the
    ``spairstore`` script should too (as uvicorn's and gunicorn's ``MODULE:APP`` do)."""
    top = where.partition(".")[0]
    cwd = Path.cwd()
    if any(p in ("", ".") or Path(p).resolve() == cwd for p in sys.path if isinstance(p, str)):
        return
    if importlib.util.find_spec(top) is None and ((cwd / f"{top}.py").is_file() or (cwd / top).is_dir()):
        sys.path.append(str(cwd))  # spawned workers inherit sys.path, so they import it too
