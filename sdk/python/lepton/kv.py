"""Key-value stores through ``wasi:keyvalue`` (0.2.0-draft): only the stores the
manifest grants (``key_value_stores = ["default"]``)."""

from __future__ import annotations

from typing import List, Optional

from componentize_py_types import Err
from wit_world.imports import atomics, wasi_keyvalue_store as _store


class KvError(Exception):
    """``access-denied``, ``no-such-store`` or the host's message (a limit)."""


def _error(err: Err) -> KvError:
    value = err.value
    if isinstance(value, _store.Error_AccessDenied):
        return KvError("access-denied: the store is not granted to this function")
    if isinstance(value, _store.Error_NoSuchStore):
        return KvError("no-such-store")
    return KvError(getattr(value, "value", str(value)))


class Store:
    def __init__(self, bucket) -> None:
        self._bucket = bucket

    @classmethod
    def open(cls, name: str) -> "Store":
        try:
            return cls(_store.open(name))
        except Err as err:
            raise _error(err) from None

    def get(self, key: str) -> Optional[bytes]:
        try:
            return self._bucket.get(key)
        except Err as err:
            raise _error(err) from None

    def set(self, key: str, value: bytes) -> None:
        try:
            self._bucket.set(key, bytes(value))
        except Err as err:
            raise _error(err) from None

    def delete(self, key: str) -> None:
        try:
            self._bucket.delete(key)
        except Err as err:
            raise _error(err) from None

    def keys(self) -> List[str]:
        keys: List[str] = []
        cursor = None
        try:
            while True:
                page = self._bucket.list_keys(cursor)
                keys.extend(page.keys)
                if page.cursor is None:
                    return keys
                cursor = page.cursor
        except Err as err:
            raise _error(err) from None

    def increment(self, key: str, delta: int = 1) -> int:
        try:
            return atomics.increment(self._bucket, key, delta)
        except Err as err:
            raise _error(err) from None
