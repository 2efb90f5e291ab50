"""Every wire message as a type, defined once: its kind, its fields in order, their types and defaults.

Each message is a ``NamedTuple`` whose class carries ``KIND`` (set by ``@_kind``: the integer that starts its msgpack
array) and whose fields are the array's elements after the kind, in order.  :func:`encode` packs one;
:func:`decode` unpacks and checks one (field count, then each field's type: ``bool`` never passes for
an ``int``).  Fields with a default are the ones appended by a later protocol version: a message may
stop before them.  The broker decodes what clients send strictly (no fields beyond the last known);
clients decode what the broker sends leniently (fields appended by a later version are ignored), as
docs/protocol.md's schema-evolution rule says.

This table is the single source: the broker, both Python clients, the tests, the C client's generated
header (:func:`c_header`, kept equal to ``clients/c/slabcast_wire.h`` by a test) and the message
tables of docs/protocol.md (checked by a test) all come from it.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias, Union

from .._exceptions import ProtocolError
from . import protocol as P

__all__ = [
    "MESSAGES",
    "Ack",
    "Attach",
    "Attached",
    "Bye",
    "Carried",
    "Carry",
    "Chunk",
    "Close",
    "End",
    "Error",
    "Grant",
    "Hello",
    "History",
    "Joined",
    "Notice",
    "NoticeEnd",
    "Open",
    "Opened",
    "Published",
    "Release",
    "Stats",
    "StatsReply",
    "Status",
    "StatusReply",
    "Subscribe",
    "Subscribed",
    "Sync",
    "Synced",
    "Unsubscribe",
    "Welcome",
    "c_header",
    "decode",
    "encode",
    "name_of",
]

_Check: TypeAlias = Callable[[Any], bool]
_T = typing.TypeVar("_T")
_KIND_OF: dict[type[Any], int] = {}


def _kind(kind: int) -> Callable[[type[_T]], type[_T]]:
    """Give a message type its kind (``cls.KIND``, and the table :func:`encode` reads)."""

    def mark(cls: type[_T]) -> type[_T]:
        cls.KIND = kind  # type: ignore[attr-defined]
        _KIND_OF[cls] = kind
        return cls

    return mark

Number: TypeAlias = Union[int, float]  # noqa: UP007  (a runtime alias read by the checks below)

# ---------------------------------------------------------------- client -> broker


@_kind(P.HELLO)
class Hello(NamedTuple):
    """The first message of every connection."""

    version: int
    pid: int
    role: str  # "pub", "sub" or "ctl"
    label: str


@_kind(P.OPEN)
class Open(NamedTuple):
    """A publisher opens a stream."""

    name: str
    dtype: str  # numpy dtype string, e.g. "<f4"
    channels: int
    rate: Number | None
    slab_bytes: int
    nslabs: int
    max_chunk_bytes: int
    channel_names: tuple[str, ...] | None
    stats_seconds: Number
    meta: dict[str, Any] | None = None  # version 2: channel_types, channel_units, source_id, timestamps


@_kind(P.PUBLISHED)
class Published(NamedTuple):
    """A publisher moved the ring's position (version 3): the broker reads the new frames' descriptors there.

    Sent when the publisher starts a slab (the broker grants the next), while the broker cuts chunks itself
    (TCP and version-1 subscribers), and before CARRIED; never needed for anything else.
    """

    position: int


@_kind(P.CLOSE)
class Close(NamedTuple):
    """A publisher closes its stream (answered by END closed)."""



@_kind(P.SUBSCRIBE)
class Subscribe(NamedTuple):
    """A subscriber asks for a stream in chunks of its own size."""

    name: str
    size: int | None
    seconds: Number | None
    clip: bool
    policy: str  # "block" or "drop"
    max_inflight: int
    sampler: Any  # nil, a number >= 0 or an array of numbers >= 0 (broker-cut only)
    cut: str = "broker"  # version 2: "local" (the subscriber cuts) or "broker"
    wait: bool = False  # version 2: hold the request until the stream opens
    token: bytes | None = None  # version 2, cut="local": the token topic it listens on for JOINED
    history: Number | None = None  # cut="local": start this far back (seconds)
    wake: str | None = None  # version 3, cut="local": how it waits ("doorbell", "futex", "busy"; None: doorbell)


@_kind(P.RELEASE)
class Release(NamedTuple):
    """A broker-cut subscriber gives chunks back (and, with a sampler callable, more pauses)."""

    seqs: tuple[int, ...]
    pauses: tuple[Number, ...]


@_kind(P.BYE)
class Bye(NamedTuple):
    """The client leaves (answered by END bye)."""



@_kind(P.STATUS)
class Status(NamedTuple):
    """Ask for the broker's state (answered by STATUS_REPLY)."""



@_kind(P.UNSUBSCRIBE)
class Unsubscribe(NamedTuple):
    """No more chunks; the leases held stay until released."""



@_kind(P.SYNC)
class Sync(NamedTuple):
    """Answered by SYNCED once everything sent before it was handled."""

    token: int


@_kind(P.STATS)
class Stats(NamedTuple):
    """Ask for a stream's rolling statistics (answered by STATS_REPLY)."""

    name: str



@_kind(P.ACK)
class Ack(NamedTuple):
    """A local subscriber says how far it has read (cumulative counters)."""

    cursor: int  # the stream index just past the last frame it has cut
    delivered: int
    dropped: int
    held: int


@_kind(P.CARRIED)
class Carried(NamedTuple):
    """A publisher confirms that from its next slab on it carries at least ``nbytes``."""

    nbytes: int


@_kind(P.ATTACH)
class Attach(NamedTuple):
    """A local subscriber's notice socket is connected (it got JOINED): start it."""

    slot: int | None  # its liveness lock is byte CLIENT_BASE + slot of the segment's lock file
    sleeper: bool | None = None  # version 3: it maps the sleeper page writable (its sleeper byte, if a doorbell
    # subscriber, and its cursor table entry)
    futex_sleeper: bool | None = None  # version 3, optional: a wake="futex" subscriber that sets its byte in the
    # futex sleeper table before it sleeps (section 7.8): woken as a doorbell's there, not by every frame


# ---------------------------------------------------------------- broker -> client


@_kind(P.WELCOME)
class Welcome(NamedTuple):
    """The answer to HELLO."""

    version: int
    broker_pid: int
    epoch: int


@_kind(P.OPENED)
class Opened(NamedTuple):
    """The answer to OPEN: the stream's segment and where to publish notices."""

    segment: str
    segment_bytes: int
    header_bytes: int
    slab_bytes: int
    nslabs: int
    reserve: int
    sample_bytes: int
    notice_endpoint: str = ""  # version 2
    stream_id: int = 0
    carry: int = 0
    tokens: tuple[bytes, ...] = ()


@_kind(P.GRANT)
class Grant(NamedTuple):
    """A slab the publisher may now fill."""

    slab: int


@_kind(P.SUBSCRIBED)
class Subscribed(NamedTuple):
    """The answer to SUBSCRIBE."""

    segment: str
    segment_bytes: int
    dtype: str
    channels: int
    rate: Number | None
    size: int
    start: int
    channel_names: tuple[str, ...]
    stream_id: int = 0  # version 2
    header_bytes: int = 0
    slab_bytes: int = 0
    nslabs: int = 0
    sample_bytes: int = 0
    notice_endpoint: str = ""
    meta: dict[str, Any] | None = None
    futex_sleeper: bool = False  # version 3, optional: this broker takes ATTACH's futex_sleeper (section 7.8)


@_kind(P.CHUNK)
class Chunk(NamedTuple):
    """A chunk cut by the broker (version 1, TCP): ``n`` samples from stream index ``index``."""

    seq: int
    index: int  # type: ignore[assignment]  # the wire name; shadows tuple.index
    n: int
    t0: Number
    offset: int
    flags: int


@_kind(P.END)
class End(NamedTuple):
    """The subscription or stream ended; ``code`` says why."""

    code: str
    message: str
    seq: int = 0  # chunks cut for this subscriber in all (broker-cut)
    head: int = 0  # samples in the stream (local subscribers)


@_kind(P.ERROR)
class Error(NamedTuple):
    """A request was refused or could not be decoded."""

    code: str
    message: str


@_kind(P.STATUS_REPLY)
class StatusReply(NamedTuple):
    """The broker's state (informative, not normative)."""

    status: dict[str, Any]


@_kind(P.SYNCED)
class Synced(NamedTuple):
    """The answer to SYNC."""

    token: int


@_kind(P.STATS_REPLY)
class StatsReply(NamedTuple):
    """A stream's rolling statistics."""

    stats: dict[str, Any]


@_kind(P.CARRY)
class Carry(NamedTuple):
    """To a publisher: from its next slab on, copy ``nbytes`` of the old slab's tail before the new data."""

    nbytes: int


@_kind(P.ATTACHED)
class Attached(NamedTuple):
    """The answer to ATTACH: the stream index this subscriber starts at, and (version 3) the ring descriptor
    of the frame there, the first it reads, and its byte in the sleeper tables (a doorbell subscriber) and entry
    in the cursor table (any that said ATTACH sleeper): one index for both, and the tag it posts its cursor under
    there (a broker that reads the table says one; none: ACK every slab)."""

    start: int
    seq: int | None = None
    sleeper: int | None = None
    cursor_tag: int | None = None  # its cursor table entry's tag (1..65535); nil: it reports by ACK alone


@_kind(P.HISTORY)
class History(NamedTuple):
    """Before ATTACHED, to a local subscriber that asked for history: frames already written, back to back from
    ``offset`` in one slab, described as a NOTICE would (oldest first)."""

    index: int  # type: ignore[assignment]
    slab: int
    gen: int
    offset: int
    ns: tuple[int, ...]
    t0s: tuple[Number, ...]
    flags: int
    floor: int


# ------------------------------------------------------------ the notice socket


@_kind(P.NOTICE)
class Notice(NamedTuple):
    """One or several frames written back to back from ``offset`` (publisher -> subscribers)."""

    stream_id: int
    notice_seq: int
    index: int  # type: ignore[assignment]
    slab: int
    gen: int
    offset: int
    n: int | tuple[int, ...]
    t0: Number | tuple[Number, ...]
    flags: int
    floor: int


@_kind(P.NOTICE_END)
class NoticeEnd(NamedTuple):
    """The stream ended, in order after its last notice."""

    stream_id: int
    notice_seq: int
    code: str
    message: str
    head: int


@_kind(P.JOINED)
class Joined(NamedTuple):
    """Published on a subscriber's token topic once the publisher sees its subscription."""



Message: TypeAlias = Union[  # noqa: UP007
    Hello, Open, Published, Close, Subscribe, Release, Bye, Status, Unsubscribe, Sync, Stats, Ack, Carried,
    Attach, Welcome, Opened, Grant, Subscribed, Chunk, End, Error, StatusReply, Synced, StatsReply, Carry,
    Attached, Notice, NoticeEnd, Joined, History,
]  # fmt: skip

MESSAGES: dict[int, type[Any]] = {_KIND_OF[cls]: cls for cls in typing.get_args(Message)}
assert sorted(MESSAGES) == sorted(P.NAMES), "every kind of wire.protocol has a message type"


# ------------------------------------------------------------------ checking


def _check_for(hint: Any) -> tuple[_Check, str]:
    """A type check for a field's annotation, and how to name what it expects."""
    if hint is Any:
        return (lambda v: True), "any"
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        parts = [_check_for(a) for a in typing.get_args(hint)]
        return (lambda v: any(c(v) for c, _ in parts)), " or ".join(dict.fromkeys(w for _, w in parts))
    if hint is type(None):
        return (lambda v: v is None), "nil"
    if hint is bool:
        return (lambda v: type(v) is bool), "bool"
    if hint is int:
        return (lambda v: type(v) is int), "int"
    if hint is float:
        return (lambda v: type(v) is float), "float"
    if hint is str:
        return (lambda v: type(v) is str), "str"
    if hint is bytes:
        return (lambda v: type(v) is bytes), "bytes"
    if origin is tuple:
        item, _ = _check_for(typing.get_args(hint)[0])
        return (lambda v: type(v) is tuple and all(item(x) for x in v)), "array"
    if origin is dict:
        return (lambda v: type(v) is dict), "map"
    raise TypeError(f"no wire check for {hint!r}")  # pragma: no cover (a table error)


class _Spec(NamedTuple):
    name: str
    required: int  # fields without a default
    total: int
    checks: tuple[tuple[str, _Check, str], ...]


def _spec(cls: type[Any]) -> _Spec:
    hints = typing.get_type_hints(cls, globalns={**globals(), "Number": Number})
    checks = tuple((f, *_check_for(hints[f])) for f in cls._fields)
    total = len(cls._fields)
    return _Spec(P.NAMES[_KIND_OF[cls]], total - len(cls._field_defaults), total, checks)


_SPECS: dict[int, _Spec] = {kind: _spec(cls) for kind, cls in MESSAGES.items()}


def name_of(msg: Message) -> str:
    """The protocol name of ``msg``'s kind (``"END"``, ``"NOTICE"``...)."""
    return P.NAMES[_KIND_OF[type(msg)]]


def encode(msg: Message, fields: int | None = None) -> bytes:
    """Pack ``msg`` as its msgpack array: ``[KIND, field, ...]``, or only its first ``fields`` fields (for a
    peer of an earlier version, which knows only those)."""
    kind = _KIND_OF[type(msg)]
    packed: bytes = P.pack((kind, *msg) if fields is None else (kind, *msg[:fields]))
    return packed


def decode(raw: bytes | tuple[Any, ...], *, strict: bool = True, check: bool = True) -> Message:
    """Unpack and check one message.

    Parameters
    ----------
    raw : bytes or tuple
        The message's bytes, or an array already unpacked by :func:`slabcast.wire.protocol.unpack`.
    strict : bool
        ``True`` (the broker, decoding what clients send): no field beyond the last known.
        ``False`` (clients, decoding what the broker sends): fields appended by a later
        version are ignored.
    check : bool
        Check each field's type (``False`` only on paths that check what they use themselves).

    Raises
    ------
    ProtocolError
        Naming the message, the field (position and name) and what was expected and what came.
    """
    msg = P.unpack(raw) if isinstance(raw, bytes) else raw
    kind = msg[0]
    spec = _SPECS.get(kind)
    if spec is None:
        raise ProtocolError(f"unknown message kind {kind}")
    got = len(msg) - 1
    if got < spec.required or (strict and got > spec.total):
        want = str(spec.total) if spec.required == spec.total else f"{spec.required} to {spec.total}"
        raise ProtocolError(f"{spec.name} takes {want} fields, got {got}")
    values = msg[1 : spec.total + 1]
    if check:
        for i, (value, (field, ok, want)) in enumerate(zip(values, spec.checks, strict=False), start=1):
            if not ok(value):
                raise ProtocolError(f"{spec.name} field {i} ({field}) must be {want}, got {P.brief(value)}")
    cls = MESSAGES[kind]
    if got < spec.total:
        return cls._make(values + tuple(cls._field_defaults[f] for f in cls._fields[got:]))  # type: ignore[no-any-return]
    return cls._make(values)  # type: ignore[no-any-return]


# ------------------------------------------------------------ the C client


def _c_name(name: str) -> str:
    return name.upper()


def c_header() -> str:
    """The C client's wire header (``clients/c/slabcast_wire.h``): kinds, field positions, codes, flags, limits.

    Field positions count from 1 (position 0 of the array is the kind): ``SCW_<MESSAGE>_<FIELD>``;
    ``SCW_<MESSAGE>_FIELDS`` is the field count of this version and ``SCW_<MESSAGE>_REQUIRED`` the
    count without the fields appended by later versions.
    """
    lines = [
        "/* slabcast_wire.h: GENERATED from src/slabcast/wire/messages.py (slabcast.wire.messages.c_header());",
        " * do not edit (tests/unit/test_messages.py keeps it equal to the generated text). */",
        "#ifndef SLABCAST_WIRE_H",
        "#define SLABCAST_WIRE_H",
        "",
        f"#define SCW_VERSION {P.VERSION}",
        "",
        "/* Message kinds, and each message's field positions (1 = the first field after the kind). */",
    ]
    for kind, cls in sorted(MESSAGES.items()):
        name = P.NAMES[kind]
        spec = _SPECS[kind]
        lines.append(f"#define SCW_{name} {kind}")
        lines.append(f"#define SCW_{name}_FIELDS {spec.total}")
        lines.append(f"#define SCW_{name}_REQUIRED {spec.required}")
        for pos, field in enumerate(cls._fields, start=1):
            lines.append(f"#define SCW_{name}_{_c_name(field)} {pos}")
    lines += ["", "/* Chunk flags. */"]
    for flag in ("FLAG_DISCONTINUITY", "FLAG_INLINE", "FLAG_PARTIAL"):
        lines.append(f"#define SCW_{flag} {getattr(P, flag)}")
    lines += ["", "/* END and ERROR codes. */"]
    for const in sorted(c for c in dir(P) if c.startswith(("END_", "ERR_"))):
        lines.append(f'#define SCW_{const} "{getattr(P, const)}"')
    lines += ["", "/* Limits and queue sizes. */"]
    for const in ("MAX_MESSAGE_BYTES", "MAX_BATCH", "NOTICE_BACKLOG", "NOTICE_HWM"):
        lines.append(f"#define SCW_{const} {getattr(P, const)}")
    lines += ["", "#endif", ""]
    return "\n".join(lines)

