"""A helper object built from a model part on first use and kept on it (a plain attribute, not a parameter)."""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T", bound="KeptOn")


class KeptOn:
    """Mixin: `Cls.of(owner)` returns `Cls(owner)`, built once and kept on `owner` as the attribute `ATTR`
    (setting that attribute to None makes the next call build a new one)."""

    ATTR: str

    @classmethod
    def of(cls: type[T], owner: Any) -> T:
        kept = getattr(owner, cls.ATTR, None)
        if kept is None:
            kept = cls(owner)
            setattr(owner, cls.ATTR, kept)
        return kept
