"""slabcast: one broker fans live streams out to many processes through shared memory."""

# General layout, bottom to top:
#
#   _shm        shared-memory segments: created and unlinked by the broker, mapped by clients
#   _rechunk    the rechunking rules (size, clip, sampler), pure index arithmetic, no data
#   _pool       the slab pool state machine (sans-io): grants, retiring, cursors, reader locks
#   _protocol   wire protocol v2 (and v1, still served): msgpack arrays over ZeroMQ (docs/protocol.md)
#   _broker     the broker: control plane (streams, grants, cursors, liveness); cuts chunks only for v1/TCP
#   _client     a client's connection: handshake, broker-death detection, error mapping
#   _publisher  Publisher: copies each frame once into a slab, publishes its notice, tells the broker
#   _subscriber Subscriber/Chunk: cuts its own chunks, zero-copy read-only views, kernel lease locks
#   _process    BrokerProcess: a broker in a child process
#   _sources    sources hosted by the broker (synthetic, stdin, replay, lsl, audio)
#   _window     Window: the latest seconds of a stream, and a display envelope
#   _record     recordings: WAV/FLAC (soundfile), Zarr v3, or append-only directories; replay
#   _emit       BufferEmit: ocycle's in-process API on the same rechunking rules
#   aio         the asyncio subscriber
#   testing     the pytest plugin
#   _up, _top   `slabcast up` (supervisor) and `slabcast top` (live view)
#   _cli        the `slabcast` command

import logging as _logging

from . import aio as aio
from ._address import default_address as default_address
from ._control import broker_status as broker_status
from ._control import stream_statistics as stream_statistics
from ._emit import BufferEmit as BufferEmit
from ._exceptions import AccessDeniedError as AccessDeniedError
from ._exceptions import BrokerGoneError as BrokerGoneError
from ._exceptions import BrokerRunningError as BrokerRunningError
from ._exceptions import ClosedError as ClosedError
from ._exceptions import EndOfStream as EndOfStream
from ._exceptions import EvictedError as EvictedError
from ._exceptions import ProtocolError as ProtocolError
from ._exceptions import PublisherGoneError as PublisherGoneError
from ._exceptions import RequestError as RequestError
from ._exceptions import ShmFullError as ShmFullError
from ._exceptions import SlabcastError as SlabcastError
from ._exceptions import StreamExistsError as StreamExistsError
from ._exceptions import StreamNotFoundError as StreamNotFoundError
from ._exceptions import WorkerDiedError as WorkerDiedError
from ._exceptions import WouldBlock as WouldBlock
from ._exceptions import WriteTimeout as WriteTimeout
from ._info import StreamInfo as StreamInfo
from ._info import StreamStatistics as StreamStatistics
from ._info import SubscriberStatistics as SubscriberStatistics
from ._process import BrokerProcess as BrokerProcess
from ._publisher import Publisher as Publisher
from ._record import Recording as Recording
from ._record import open_recording as open_recording
from ._subscriber import Chunk as Chunk
from ._subscriber import Subscriber as Subscriber
from ._window import Window as Window

__version__ = "0.1.0"

# Library code is silent unless the application configures logging.
_logging.getLogger("slabcast").addHandler(_logging.NullHandler())

__all__ = [
    "AccessDeniedError",
    "BrokerGoneError",
    "BrokerProcess",
    "BrokerRunningError",
    "BufferEmit",
    "Chunk",
    "ClosedError",
    "EndOfStream",
    "EvictedError",
    "ProtocolError",
    "Publisher",
    "PublisherGoneError",
    "Recording",
    "RequestError",
    "ShmFullError",
    "SlabcastError",
    "StreamExistsError",
    "StreamInfo",
    "StreamNotFoundError",
    "StreamStatistics",
    "Subscriber",
    "SubscriberStatistics",
    "Window",
    "WorkerDiedError",
    "WouldBlock",
    "WriteTimeout",
    "broker_status",
    "default_address",
    "open_recording",
    "stream_statistics",
]
