"""Name -> tower family tables, with one-line errors that list the valid names."""
from __future__ import annotations

from typing import Generic, TypeVar

from clipfromscratch.errors import UsageError

T = TypeVar("T")

MODEL_SIZES = ("tiny", "base")


class Registry(Generic[T]):
    """A named table of tower families; `fallback` says in words what else a name may be."""

    def __init__(self, kind: str, fallback: str):
        self.kind = kind
        self.fallback = fallback
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> None:
        self._entries[name] = entry

    def unregister(self, name: str) -> None:
        del self._entries[name]

    def get(self, name: str) -> T | None:
        return self._entries.get(name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def unknown(self, name: str) -> UsageError:
        return UsageError(f"unknown {self.kind} '{name}': choose one of {', '.join(self.names())}, or {self.fallback}")


def check_size(size: str) -> str:
    if size not in MODEL_SIZES:
        raise UsageError(f"unknown model size '{size}': choose one of {', '.join(MODEL_SIZES)}")
    return size
