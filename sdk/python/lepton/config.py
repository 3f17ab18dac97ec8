"""The function's configuration through ``wasi:config/store`` (0.2.0-rc.1)."""

from __future__ import annotations

from typing import Dict, Optional

from componentize_py_types import Err
from wit_world.imports import wasi_config_store as _store


def get(key: str) -> Optional[str]:
    """The manifest's value of `key`, if set."""
    try:
        return _store.get(key)
    except Err as err:
        raise RuntimeError(str(err.value)) from None


def get_all() -> Dict[str, str]:
    try:
        return dict(_store.get_all())
    except Err as err:
        raise RuntimeError(str(err.value)) from None
