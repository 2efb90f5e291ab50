"""The source kinds by name (``--source kind:...``, ``[[sources]] kind = ...``): one module each."""

from __future__ import annotations

from .audio import SoundCardSource
from .base import Source
from .file import FileSource
from .lsl import LslSource
from .replay import ReplaySource
from .stdin import StdinSource
from .synthetic import SyntheticSource
from .zenoh import ZenohSource

__all__ = ["source_class", "source_kinds"]

_KINDS: dict[str, type[Source]] = {
    "audio": SoundCardSource,
    "synthetic": SyntheticSource,
    "stdin": StdinSource,
    "file": FileSource,
    "replay": ReplaySource,
    "lsl": LslSource,
    "zenoh": ZenohSource,
}


def source_kinds() -> tuple[str, ...]:
    """The names of the source kinds, sorted."""
    return tuple(sorted(_KINDS))


def source_class(kind: str) -> type[Source]:
    """The class of source kind ``kind``.

    Raises
    ------
    ValueError
        For a kind not in :func:`source_kinds`, naming those.
    """
    cls = _KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown source kind {kind!r}; known: {', '.join(source_kinds())}")
    return cls
