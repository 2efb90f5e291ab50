"""slabcast: one broker fans live streams out to many processes through shared memory."""

# General layout, bottom to top. Each layer is a subpackage and imports only itself and the layers above it
# in this list, never one below (tests/unit/test_layers.py reads every import, lazy ones too, against this):
#
#   _exceptions, _info, _version: the exception tree, StreamInfo and the statistics records, the version
#   core/       sans-io: rechunk (the rules: size, clip, sampler; index arithmetic, no data),
#               pool (the slab pool state machine), shm (segment layout, creation, lease and liveness locks)
#   wire/       protocol: every message kind and field order, defined once (docs/protocol.md, v2 and v1);
#               address: the default address, endpoint forms and ipc path limits, for clients and broker alike;
#               bridge: the Zenoh frame header and stream info, for both ends of a bridge
#   client/     connection (handshake, broker death, error mapping), publisher (one copy, one notice),
#               subscriber (cuts its own chunks, zero-copy read-only views), window, control, record, lsl,
#               markers (MarkerPublisher: a stream of UTF-8 events);
#               aio (the asyncio subscriber) and examples (task callables) stand on the client alone
#   broker/     server (the control plane: streams, grants, cursors, liveness), process (BrokerProcess),
#               lock (one broker per address)
#   sources/    hosted sources: base (the Source protocol), one module per kind (synthetic, stdin, file,
#               replay, lsl, audio, zenoh), thread (SourceThread), options (one schema: TOML, JSON, kind:k=v).
#               The broker hosts them, yet neither imports the other: a source writes through a Publisher
#               like any client, and `slabcast broker` (cli) starts the threads and hands the broker a
#               callable for their status. They sit above the broker so that cli alone joins the two.
#   emit/       BufferEmit: ocycle's in-process API on the same rechunking rules
#   bridge/     ZenohBridge: streams to other hosts (the Zenoh session set-up is the zenoh source's)
#   view/       the browser viewer
#   cli/        the `slabcast` command: main, up (supervisor) and up_config (its config), top, demo, bridge, view;
#               testing (the pytest plugin) and __main__ beside it
#   __init__    this file: re-exports the public names of every layer; nothing in the package imports it

import sys as _sys

if not _sys.platform.startswith("linux"):  # checked first: elsewhere the imports below fail obscurely, or later
    raise ImportError(
        "slabcast runs on Linux only: it needs open file description locks (F_OFD_SETLK), "
        f"posix_fallocate and /dev/shm; this is {_sys.platform!r}"
    )

import logging as _logging
from typing import TYPE_CHECKING as _TYPE_CHECKING

from ._exceptions import AccessDeniedError as AccessDeniedError
from ._exceptions import BrokerGoneError as BrokerGoneError
from ._exceptions import BrokerRunningError as BrokerRunningError
from ._exceptions import ClosedError as ClosedError
from ._exceptions import EndOfStream as EndOfStream
from ._exceptions import EvictedError as EvictedError
from ._exceptions import LimitError as LimitError
from ._exceptions import ProtocolError as ProtocolError
from ._exceptions import PublisherGoneError as PublisherGoneError
from ._exceptions import RequestError as RequestError
from ._exceptions import SamplesLostError as SamplesLostError
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
from ._version import __version__ as __version__
from .broker.process import BrokerProcess as BrokerProcess
from .client.control import broker_status as broker_status
from .client.control import stream_statistics as stream_statistics
from .client.markers import MarkerPublisher as MarkerPublisher
from .client.publisher import Publisher as Publisher
from .client.record import Recording as Recording
from .client.record import open_recording as open_recording
from .client.record import recording_streams as recording_streams
from .client.subscriber import Chunk as Chunk
from .client.subscriber import Subscriber as Subscriber
from .client.window import Window as Window
from .emit.emit import BufferEmit as BufferEmit
from .wire.address import default_address as default_address

if _TYPE_CHECKING:  # (imported on first use at run time: __getattr__ below)
    from . import aio as aio

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
    "LimitError",
    "MarkerPublisher",
    "ProtocolError",
    "Publisher",
    "PublisherGoneError",
    "Recording",
    "RequestError",
    "SamplesLostError",
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
    "recording_streams",
    "stream_statistics",
]


def _fixup_module_metadata() -> None:
    # Tracebacks and reprs show the public name (slabcast.Subscriber), not the layer it lives in.
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("slabcast."):
            obj.__module__ = "slabcast"


_fixup_module_metadata()


def __getattr__(name: str) -> object:
    # slabcast.aio is imported on first use: asyncio, which it needs, costs every process that imports slabcast
    # (the broker, each worker, each CLI command) 40 ms otherwise.
    if name == "aio":
        import importlib

        return importlib.import_module(".aio", __name__)
    raise AttributeError(f"module 'slabcast' has no attribute {name!r}")
