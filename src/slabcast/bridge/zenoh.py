"""Zenoh bridge and source (work in progress)."""

from __future__ import annotations

from typing import Any

from .._info import StreamInfo

__all__ = ["ZenohSource"]


class ZenohSource:
    """A stream received from a Zenoh key expression (not built yet)."""

    def __init__(self, key: str, name: str | None = None) -> None:
        self.key = key
        self.name = name

    def connect(self) -> StreamInfo:
        """Not built yet."""
        raise NotImplementedError("the zenoh source is not built yet")

    def read(self) -> Any:
        """Not built yet."""
        raise NotImplementedError

    def disconnect(self) -> None:
        """Nothing to release."""
