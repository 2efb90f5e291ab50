"""What a subscriber's transport offers: the seam between :class:`~slabcast.Subscriber` and how chunks reach it.

Two implementations: :mod:`._local` (``ipc://``: this process cuts its own chunks from
the publisher's frame notices, zero-copy views of shared memory under kernel leases) and
:mod:`._remote` (``tcp://``: chunks cut by the broker, by value).  The ``Subscriber``
keeps the settings, (re)connecting, iteration and the counters of earlier brokers, and
hands everything else to one receiver per broker connection.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from .._exceptions import SlabcastError
from .chunk import Chunk

__all__ = ["Counts", "Receiver"]


class Counts(NamedTuple):
    """A receiver's counters, for the subscription to one broker."""

    received: int  # chunks handed out
    released: int  # of those, chunks whose last view is gone
    dropped: int  # chunks cut for this subscriber and not handed out
    last_seq: int  # seq of the last chunk handed out, -1 before the first


class Receiver(Protocol):
    """One subscription to one broker, as a subscriber's transport serves it."""

    #: The end met (EndOfStream, or the broker's death once no reconnect follows): raised by every later recv.
    end: SlabcastError | None
    #: The next chunk handed out gets ``discontinuity`` (set after a resubscription).
    jumped: bool

    def recv(self, timeout: float | None) -> Chunk | None:
        """The next chunk, or None if none came within ``timeout`` seconds (None: wait, 0: do not wait).

        Raises EndOfStream (or a subclass), BrokerGoneError (the subscriber decides whether to
        resubscribe), SamplesLostError, or the sampler's error.
        """
        ...

    def counts(self, report: bool = True) -> Counts:
        """The counters, brought up to date (``report``: and sent to the broker, where it keeps a copy)."""
        ...

    def pollables(self) -> tuple[Any, ...]:
        """The ZeroMQ sockets whose input may wake this receiver (for event loops)."""
        ...

    def keepalive(self, interval: float) -> None:
        """Prove to the broker that this subscriber lives, if it said nothing for ``interval`` seconds."""
        ...

    def close(self) -> None:
        """Unsubscribe; chunks still viewed keep their memory until their last view dies."""
        ...

    def abandon(self) -> None:
        """The broker is gone (its connection closed): drop everything this receiver holds of it."""
        ...
