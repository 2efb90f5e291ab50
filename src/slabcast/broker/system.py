"""The broker state's seams to the operating system, with the real ones as defaults (unit tests fake some)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..core.shm import Segment, lock_held, pid_alive

__all__ = ["System", "open_fds"]


def open_fds() -> int:
    """Descriptors this process has open now."""
    return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


@dataclass
class System:
    """What :class:`~slabcast.broker.state.BrokerState` asks of the operating system."""

    segment: Callable[..., Segment] = Segment  # (name, nbytes, mode, commit=ranges) -> a new segment
    lock_held: Callable[[int, int], bool] = lock_held  # (segment fd, byte): its holder lives
    pid_alive: Callable[[int], bool] = pid_alive
    open_fds: Callable[[], int] = open_fds
    unlink: Callable[[str], None] = _unlink  # a dead publisher's notice socket file (gone already: fine)
