"""The exceptions slabcast raises, one hierarchy rooted at :class:`SlabcastError`.

::

    SlabcastError
    ├── ClosedError            you closed this object; it cannot be used any more
    ├── BrokerGoneError        the broker died, shut down or cannot be reached
    ├── BrokerRunningError     another broker already serves this address
    ├── AccessDeniedError      the broker refused this client's CURVE key (TCP), or file permissions keep
    │                          this user from the broker's socket or directory (also a PermissionError)
    ├── EvictedError           the broker evicted this subscriber (a chunk held past lease_timeout)
    ├── ProtocolError          a peer spoke another protocol version or sent a malformed message
    ├── StreamNotFoundError    no stream of that name exists on the broker
    ├── StreamExistsError      a publisher already owns a stream of that name
    ├── RequestError           the broker refused a request (bad settings, limits)
    ├── ShmFullError           /dev/shm has no room for a stream's slabs
    ├── LimitError             a limit on open files or sockets was reached, in this process or the broker
    │                          (also an OSError; the message names the limit and how to raise it)
    ├── WriteTimeout           a publisher waited longer than its timeout for free slabs
    ├── WouldBlock             ``recv_nowait`` found no chunk ready
    ├── SamplesLostError       a lossless subscriber missed a range of samples (named in the error)
    ├── WorkerDiedError        a worker process of a ``mode="process"`` BufferEmit died
    └── EndOfStream            the publisher closed the stream; no more chunks will come
        └── PublisherGoneError the publisher died without closing the stream

``zmq`` and ``msgpack`` errors never escape the public API: they are mapped to
these where slabcast calls those libraries.
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "BrokerGoneError",
    "BrokerRunningError",
    "ClosedError",
    "EndOfStream",
    "EvictedError",
    "LimitError",
    "ProtocolError",
    "PublisherGoneError",
    "RequestError",
    "SamplesLostError",
    "ShmFullError",
    "SlabcastError",
    "StreamExistsError",
    "StreamNotFoundError",
    "WorkerDiedError",
    "WouldBlock",
    "WriteTimeout",
]


class SlabcastError(Exception):
    """Base class of every error slabcast raises on purpose."""


class ClosedError(SlabcastError):
    """The object was closed by its owner and cannot be used any more."""


class BrokerGoneError(SlabcastError):
    """The broker died, shut down, or could not be reached in time."""


class BrokerRunningError(SlabcastError):
    """Another live broker already serves the requested address."""


class AccessDeniedError(SlabcastError, PermissionError):
    """This client may not use the broker.

    Over TCP: the broker refused this client's CURVE key, or the CURVE handshake
    failed (a wrong broker public key).  Over ipc: file permissions keep this user
    from the broker's socket or its directory (the message names the path, its
    owner and its mode).  Also a :class:`PermissionError`.

    ``hung_up`` is True when the peer closed the connection during the handshake: a broker
    that cannot decrypt our hello (the wrong broker key), or a proxy or tunnel whose broker is
    down; a subscriber resubscribing with keys that worked before retries it (``reconnect=``).
    """

    hung_up: bool = False


class EvictedError(SlabcastError):
    """The broker evicted this subscriber: it held a chunk longer than the broker's ``lease_timeout``.

    Chunks it still holds stay intact until released; no more chunks come.
    """


class ProtocolError(SlabcastError):
    """A peer speaks another protocol version or sent a malformed message."""


class StreamNotFoundError(SlabcastError):
    """The broker has no stream of the requested name."""


class StreamExistsError(SlabcastError):
    """A publisher already owns a stream of the requested name."""


class RequestError(SlabcastError):
    """The broker refused a request: settings out of range or a limit reached."""


class ShmFullError(SlabcastError, OSError):
    """``/dev/shm`` has no room for the slabs of a stream."""


class LimitError(SlabcastError, OSError):
    """A limit on open files or sockets was reached, in this process or in the broker.

    The message names the limit and how to raise it (``ulimit -n``, ``LimitNOFILE=``
    in a systemd unit, :func:`resource.setrlimit`).  Nothing was opened.
    """


class WriteTimeout(SlabcastError, TimeoutError):
    """A publisher waited longer than its ``timeout`` for a free slab.

    Nothing of the frame was written; the same frame may be written again.
    """


class WouldBlock(SlabcastError):
    """``recv_nowait`` found no chunk ready."""


class SamplesLostError(SlabcastError):
    """A ``policy="block"`` subscriber missed samples ``start`` to ``stop`` (stream indices, ``stop`` excluded).

    Raised by ``recv`` in place of the first chunk after the hole, once every chunk before
    it was handed out; the next ``recv`` goes on after the hole (its chunk has
    ``discontinuity`` set), or ends the stream if the hole was its tail.  It never
    happens while the publisher and this subscriber are alive and connected: the pool
    holds the publisher back instead.  It names what a crash or a broken notice queue cost.

    Attributes
    ----------
    start, stop : int
        The missing samples, ``[start, stop)`` in the stream's sample index.
    """

    def __init__(self, message: str, start: int = 0, stop: int = 0) -> None:
        super().__init__(message)
        self.start = start
        self.stop = stop


class WorkerDiedError(SlabcastError):
    """A worker process of a ``mode="process"`` :class:`~slabcast.BufferEmit` died.

    The chunk it was running, if any, is lost; the pool starts another worker
    for the chunks that follow.
    """


class EndOfStream(SlabcastError):
    """The publisher closed the stream and every complete chunk was delivered."""


class PublisherGoneError(EndOfStream):
    """The publisher died (or disconnected) without closing its stream.

    Every complete chunk written before it died was delivered first.
    """
