"""What a subscriber is given, checked where it enters: chunk size or seconds, sampler, policy, waits."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.rechunk import check_sampler, check_size, is_real
from ..wire import protocol as P

__all__ = ["SubscribeArgs", "check_waits", "pause_error", "recv_timeout", "subscribe_args"]


@dataclass(frozen=True)
class SubscribeArgs:
    """A :class:`~slabcast.Subscriber`'s settings, checked (see its parameters)."""

    size: int | None
    seconds: float | None
    history: float | None
    spin: float  # -1: busy
    max_inflight: int
    sampler: Callable[[], float] | None  # None: no sampler
    wire_sampler: float | None  # a constant sampler as SUBSCRIBE carries it
    prefetch: int  # pauses drawn ahead for a broker-cut subscription (a callable sampler), else 0
    reconnect: float  # seconds to wait for a broker to come back; 0: none
    timeout: float
    wait: float


def check_waits(timeout: Any, wait: Any) -> tuple[float, float]:
    """``(timeout, wait)`` checked: a positive finite ``timeout`` (for the broker's answers) and a finite ``wait`` >= 0
    for the stream to appear (None: ``timeout``)."""
    if not is_real(timeout) or not 0 < timeout < math.inf:
        raise ValueError(f"timeout must be a positive finite number of seconds (the broker's answers), got "
                         f"{timeout!r}")  # fmt: skip
    if wait is None:
        wait = timeout
    if not is_real(wait) or not 0 <= wait < math.inf:
        raise ValueError(f"wait must be a finite number of seconds >= 0 or None, got {wait!r}")
    return float(timeout), float(wait)


def pause_error(value: float, where: str) -> ValueError | None:
    """The error for a pause a callable sampler returned (seconds), or None when it is one (0..MAX_SAMPLER_SECONDS;
    NaN and inf are not)."""
    if 0 <= value <= P.MAX_SAMPLER_SECONDS:
        return None
    return ValueError(f"sampler must return seconds in 0..{P.MAX_SAMPLER_SECONDS:g}, got {value!r} ({where})")


def recv_timeout(timeout: Any) -> float | None:
    """A ``recv``'s ``timeout`` checked: None or ``math.inf`` (for ever: None), else seconds >= 0."""
    if timeout is None:
        return None
    if not (is_real(timeout) and timeout >= 0):  # (NaN too)
        raise ValueError(f"recv's timeout must be a number of seconds >= 0 or None, got {timeout!r}")
    return None if timeout == math.inf else float(timeout)


def subscribe_args(size: Any, seconds: Any, sampler: Any, policy: Any, max_inflight: Any, timeout: Any,
                   reconnect: Any, wait: Any, history: Any, wake: Any, spin: Any) -> SubscribeArgs:  # fmt: skip
    """A :class:`~slabcast.Subscriber`'s arguments checked.

    Raises
    ------
    ValueError, TypeError
        Saying which argument, what it must be and what came.
    """
    if wake not in P.WAKES:
        raise ValueError(f"wake must be one of {', '.join(map(repr, P.WAKES))}, got {wake!r}")
    if not is_real(spin) or not 0 <= spin <= P.MAX_SPIN:
        raise ValueError(f"spin must be seconds from 0 to {P.MAX_SPIN:g}, got {spin!r}")
    if history is not None and (not is_real(history) or not 0 < history < math.inf):
        raise ValueError(f"history must be a positive finite number of seconds or None, got {history!r}")
    if (size is None) == (seconds is None):
        raise TypeError(f"give exactly one of size= (samples) and seconds=, got size={size!r} seconds={seconds!r}")
    if size is not None:
        size = check_size(size)
    elif not is_real(seconds) or not 0 < seconds < math.inf:
        raise ValueError(f"seconds must be a positive finite number, got {seconds!r}")
    if is_real(sampler) and sampler > P.MAX_SAMPLER_SECONDS:
        raise ValueError(f"sampler must be a number of seconds in 0..{P.MAX_SAMPLER_SECONDS:g}, got {sampler!r}")
    if policy not in P.POLICIES:
        raise ValueError(f"policy must be 'block' or 'drop', got {policy!r}")
    max_inflight = check_size(max_inflight, "max_inflight", "chunks")
    fn = check_sampler(sampler)
    if isinstance(reconnect, np.bool_) or reconnect is None:
        reconnect = bool(reconnect)  # (None: no reconnection, as it always was)
    if not (isinstance(reconnect, bool) or (is_real(reconnect) and 0 <= reconnect < math.inf)):
        raise ValueError(f"reconnect must be True, False or a finite number of seconds >= 0 to wait for the "
                         f"broker to come back, got {reconnect!r}")  # fmt: skip
    timeout, wait = check_waits(timeout, wait)
    # A callable sampler's pauses are drawn ahead only for a broker-cut (TCP) subscription; a local one calls it.
    return SubscribeArgs(
        size=size, seconds=None if seconds is None else float(seconds),
        history=None if history is None else float(history), spin=-1.0 if wake == "busy" else float(spin),
        max_inflight=max_inflight, sampler=fn,
        wire_sampler=float(sampler) if fn is not None and not callable(sampler) else None,
        prefetch=max_inflight + 4 if fn is not None and callable(sampler) else 0,
        reconnect=60.0 if reconnect is True else float(reconnect or 0), timeout=timeout, wait=wait,
    )  # fmt: skip
