"""Loading a user's code named on the command line: ``MODULE:FACTORY`` or ``path/to/file.py:FACTORY``
(``spairstore features --backbone``, ``spairstore eval --method``)."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import SpairstoreError


def load_factory(spec: str, option: str, error: type[SpairstoreError] = SpairstoreError
                 ) -> tuple[Callable[[], Any], str]:
    """The callable ``spec`` (``MODULE:FACTORY`` or ``path/to/file.py:FACTORY``) names, and ``spec`` with a
    file path made absolute (the provenance recorded). Failures raise ``error``, one line naming ``option``."""
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
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's code: report whatever it raised in one line
            del sys.modules[name]
            raise error(f"{path}: importing it raised {type(e).__name__}: {e}") from None
        spec = f"{path}:{attr}"
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise error(f"{option} {spec}: cannot import {where} ({e}); put its folder on PYTHONPATH or "
                        f"give path/to/file.py:{attr}") from None
        except Exception as e:  # noqa: BLE001 - the user's code
            raise error(f"{option} {spec}: importing {where} raised {type(e).__name__}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise error(f"{option} {spec}: {where} has no callable {attr!r}")
    return factory, spec
