"""Sources hosted by the broker: one module per kind behind the ``Source`` protocol, their thread, their options.

A source runs on its own thread (:class:`SourceThread`) inside the broker process
and writes through an ordinary :class:`~slabcast.Publisher`, as any client does:
the broker imports none of this package; ``slabcast broker`` starts the threads
and hands the broker their status.

Internal: the public names are re-exported by :mod:`slabcast`."""

from .audio import SoundCardSource
from .base import Source
from .file import FileSource
from .kinds import source_class, source_kinds
from .lsl import LslSource
from .options import SourceOptionError, build_source, parse_source, source_options, sources_from_json
from .replay import ReplaySource
from .stdin import StdinSource
from .synthetic import SyntheticSource
from .thread import SourceThread
from .zenoh import ZenohSource

__all__ = [
    "FileSource",
    "LslSource",
    "ReplaySource",
    "SoundCardSource",
    "Source",
    "SourceOptionError",
    "SourceThread",
    "StdinSource",
    "SyntheticSource",
    "ZenohSource",
    "build_source",
    "parse_source",
    "source_class",
    "source_kinds",
    "source_options",
    "sources_from_json",
]
