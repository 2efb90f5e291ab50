"""The publisher's background thread: what no write does at once, done off the frame's path.

It sends a batch of notices no later write filled, tells the broker a slab change
after its delay, answers subscribers joining the notice socket, takes the broker's
messages (GRANT, CARRY, an error) and sees the broker go.  It sleeps on a
:class:`Kick` (an eventfd the writer writes) and on the ZeroMQ descriptors, and holds
the publisher only through a weak reference: a publisher dropped without ``close()``
is still collected.  The turns themselves are the publisher's (``_kick_delay``,
``_service``): this module owns the sleeping, not the rules.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import weakref
from typing import Protocol

__all__ = ["SAFETY", "Kick", "Serviced", "run_flusher"]

SAFETY = 1.0  # seconds between the background thread's turns when nothing wakes it (a wake ZeroMQ did not signal)


class Serviced(Protocol):
    """What the thread calls on the publisher: how long to wait once kicked, then one turn."""

    def _kick_delay(self) -> float: ...

    def _service(self) -> float | None: ...


def run_flusher(ref: weakref.ref[Serviced], kick: Kick, fds: tuple[int, ...]) -> None:
    """The publisher's background thread: sends a batch no later write filled (within BATCH_DELAY), a slab
    change SWITCH_DELAY after its first frame, answers joining subscribers and the broker's messages (GRANT,
    CARRY, an error) and sees the broker go.  It sleeps until one of these wakes it: a kick from the writer,
    or the ZeroMQ descriptors of the broker connection, its monitor and the notice socket; every SAFETY
    seconds at the latest.  A turn every 20 ms, as before, cost an idle publisher 7-18 ms of CPU a second in this
    VM (a cold turn is 150-450 us); now about 1.  A turn must make ZeroMQ process each socket's commands (_service
    receives, looks at EVENTS and polls the monitor), else a descriptor stays readable and this loop spins."""
    every = select.poll()
    for fd in (kick.fd, *fds):
        every.register(fd, select.POLLIN)
    kicks = select.poll()
    kicks.register(kick.fd, select.POLLIN)
    timeout = SAFETY
    while True:
        ready = every.poll(math.ceil(timeout * 1000))
        kicked = any(fd == kick.fd for fd, _ in ready)
        pub = ref()  # (alive: its sockets and their descriptors are open; the kick's stays while we hold it)
        if pub is None:
            return
        if kicked:
            kick.take()
            delay = pub._kick_delay()
            del pub  # (asleep, only the weak reference)
            # Kicked again meanwhile (a batch, or the next slab's carry to copy) ends the wait.
            if delay > 0 and kicks.poll(math.ceil(delay * 1000)):
                kick.take()
            pub = ref()
            if pub is None:
                return
        turn = pub._service()
        if turn is None:
            return
        timeout = turn
        del pub  # between turns, only the weak reference


class Kick:
    """Wakes the background thread: an eventfd, written by the writer, polled and read by the thread.  Closed
    when the last of the two lets go of it, so that neither ever touches a descriptor number reused."""

    __slots__ = ("fd",)

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def __call__(self) -> None:
        """Kick (one system call; a second kick before the thread took the first is the same kick)."""
        os.eventfd_write(self.fd, 1)

    def take(self) -> None:
        """Take the kicks so far (the thread, before the turn that serves them)."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.fd)

    def __del__(self) -> None:
        with contextlib.suppress(AttributeError):  # (no fd: eventfd failed)
            os.close(self.fd)
