"""Wire protocol version 3: message kinds, field order and checked decoding (see docs/protocol.md).

Version 3 describes every frame in the segment's ring (core/ring.py): notices only wake subscribers.
Version 2 subscribers (the C client) are still served with notices that name the frames, and
version 1 clients with broker-cut CHUNK notices, exactly as those versions specified.
"""

from __future__ import annotations

import difflib
import re
import struct
from collections.abc import Iterable
from typing import Any

import msgpack
import numpy as np

from .._exceptions import ProtocolError

VERSION = 3
LEGACY_VERSIONS = (1, 2)  # 1: served with broker-cut chunks; 2: local subscribers cutting from notices

# Client -> broker.  Every message is a msgpack array whose first element is its kind.
HELLO = 1  # [HELLO, version, pid, role, label]
OPEN = 2  # [OPEN, name, dtype, channels, rate|nil, slab_bytes, nslabs, max_chunk_bytes, channel_names|nil, stats_s]
# 3 (FRAME) and 12 (FRAMES): version 2's message per frame, retired; the broker reads the ring (PUBLISHED).
CLOSE = 4  # [CLOSE]
SUBSCRIBE = 5  # [SUBSCRIBE, name, size|nil, seconds|nil, clip, policy, max_inflight, sampler, cut, wait, token|nil]
RELEASE = 6  # [RELEASE, [seq, ...], [pause, ...]]
BYE = 7  # [BYE]
STATUS = 8  # [STATUS]
UNSUBSCRIBE = 9  # [UNSUBSCRIBE]
SYNC = 10  # [SYNC, token]
STATS = 11  # [STATS, name]
PUBLISHED = 16  # [PUBLISHED, position]  the publisher moved the ring's position (a slab change, or frames wanted)
ATTACH = 15  # [ATTACH, slot]  a local subscriber's notice socket is connected (it got JOINED): start it;
#              it holds a shared lock on byte CLIENT_BASE + slot of the segment while it lives
CARRIED = 14  # [CARRIED, bytes]  a publisher confirms it now carries that much at every slab change
ACK = 13  # [ACK, consumed_index, delivered, dropped, held]  (local-cut subscriber; when its slab, drops or
#          leases changed, at most once before each wait)

# Broker -> client.
WELCOME = 101  # [WELCOME, version, broker_pid, epoch]
OPENED = 102  # [OPENED, segment, segment_bytes, header_bytes, slab_bytes, nslabs, reserve, sample_bytes,
#               notice_endpoint, stream_id, carry, [token topic, ...]]
GRANT = 103  # [GRANT, slab]
SUBSCRIBED = 104  # [SUBSCRIBED, segment, segment_bytes, dtype, channels, rate|nil, size, start, channel_names,
#                    stream_id, header_bytes, slab_bytes, nslabs, sample_bytes, notice_endpoint]
CHUNK = 105  # [CHUNK, seq, index, n, t0, offset, flags]
END = 106  # [END, code, message, seq, head]  (head: for local-cut subscribers)
ERROR = 107  # [ERROR, code, message]
STATUS_REPLY = 108  # [STATUS_REPLY, map]
SYNCED = 109  # [SYNCED, token]
STATS_REPLY = 110  # [STATS_REPLY, map]
CARRY = 111  # [CARRY, bytes]  to a publisher: copy this much of the old slab's tail into each new slab
# Published by the publisher on its notice socket (XPUB), one message part: topic + msgpack array.
NOTICE = 120  # [NOTICE, stream_id, notice_seq, index, slab, gen, offset, n|[n...], t0|[t0...], flags, floor]
NOTICE_END = 121  # [NOTICE_END, stream_id, notice_seq, code, message, head]
ATTACHED = 112  # [ATTACHED, start, seq]  the answer to ATTACH: the stream index it starts at, its first descriptor
HISTORY = 113  # [HISTORY, index, slab, gen, offset, [n...], [t0...], flags, floor]  frames already written (history)
JOINED = 122  # [JOINED]  published on a token topic as soon as the publisher sees its subscription

NAMES = {
    HELLO: "HELLO",
    OPEN: "OPEN",
    CLOSE: "CLOSE",
    SUBSCRIBE: "SUBSCRIBE",
    RELEASE: "RELEASE",
    BYE: "BYE",
    STATUS: "STATUS",
    UNSUBSCRIBE: "UNSUBSCRIBE",
    SYNC: "SYNC",
    SYNCED: "SYNCED",
    STATS: "STATS",
    PUBLISHED: "PUBLISHED",
    STATS_REPLY: "STATS_REPLY",
    WELCOME: "WELCOME",
    OPENED: "OPENED",
    GRANT: "GRANT",
    SUBSCRIBED: "SUBSCRIBED",
    CHUNK: "CHUNK",
    END: "END",
    ERROR: "ERROR",
    STATUS_REPLY: "STATUS_REPLY",
    ACK: "ACK",
    CARRIED: "CARRIED",
    ATTACH: "ATTACH",
    ATTACHED: "ATTACHED",
    CARRY: "CARRY",
    NOTICE: "NOTICE",
    NOTICE_END: "NOTICE_END",
    JOINED: "JOINED",
    HISTORY: "HISTORY",
}

# CHUNK flags.
FLAG_DISCONTINUITY = 1
FLAG_INLINE = 2  # the samples follow in a second message frame (TCP clients); offset is 0
FLAG_PARTIAL = 4  # (local, partial_tail=True) a shorter chunk: what was gathered at the end, or before a jump

# END codes.
END_CLOSED = "closed"
END_PUBLISHER_GONE = "publisher-gone"
END_BROKER_SHUTDOWN = "broker-shutdown"
END_BYE = "bye"
END_EVICTED = "evicted"

# ERROR codes.
ERR_MALFORMED = "malformed"
ERR_VERSION = "version"
ERR_UNKNOWN_STREAM = "unknown-stream"
ERR_STREAM_EXISTS = "stream-exists"
ERR_BAD_REQUEST = "bad-request"
ERR_SHM_FULL = "shm-full"
ERR_FRAME = "bad-frame"
ERR_LIMIT = "limit"  # a descriptor or client limit of the broker; the message says which and how to raise it
ERR_INTERNAL = "internal"  # a bug of the broker (logged with its traceback), not the client's fault

POLICIES = ("block", "drop")
CUTS = ("local", "broker")  # who cuts a subscriber's chunks: the subscriber itself (v2) or the broker (v1, TCP)
MAX_SAMPLER_SECONDS = 1e9  # a pause longer than ~31 years is a mistake, not a setting
MAX_MESSAGE_BYTES = 1 << 20
MAX_BATCH = 4096  # frames in one HISTORY message
MAX_NSLABS = 4096  # slabs in one stream's pool (OPEN's nslabs: 2..MAX_NSLABS)
# Slabs the broker grants ahead of the one being written (section 9.3): GRANT_AHEAD, or GRANT_AHEAD_FAST while the
# publisher's slabs change faster than every FAST_SLAB seconds in a pool of FAST_POOL slabs or more.
GRANT_AHEAD = 2
GRANT_AHEAD_FAST = 3
FAST_SLAB = 0.1
FAST_POOL = 8
# A publisher moves to a new slab after notices_per_slab(nslabs) frames, so a pool's frames (at most
# 50,000) fit in the ring (65,536 descriptors: a block subscriber, which gates the reuse of every slab it
# has not read, is never lapped) and, as notices, in one version-2 subscriber's queue: its SUB socket
# queues NOTICE_BACKLOG notices, the publisher's XPUB NOTICE_HWM more; past both, ZeroMQ drops notices
# for that subscriber alone.
NOTICE_BACKLOG = 50_000
WAKES = ("doorbell", "futex", "busy")  # how a local subscriber waits for frames (SUBSCRIBE's wake)
MAX_SPIN = 0.01  # seconds a subscriber may spin before it sleeps
# A TCP client silent this many seconds (clients send a SYNC every second while they wait) is dropped by the
# broker (section 2); each side's ZeroMQ heartbeat ends a connection whose peer sent nothing for HEARTBEAT_TIMEOUT,
# longer, so that a client paused (a debugger, Ctrl-Z, a VM stalled) up to REMOTE_SILENCE keeps its connection,
# and one paused longer is told END evicted, not cut off as if the broker had gone.
REMOTE_SILENCE = 10.0
HEARTBEAT_IVL, HEARTBEAT_TIMEOUT = 1.0, 15.0
NOTICE_HWM = 100_000


def notices_per_slab(nslabs: int) -> int:
    """The most frames a publisher writes into one slab (see NOTICE_BACKLOG)."""
    return max(1, NOTICE_BACKLOG // max(1, nslabs))


STREAM_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
DTYPE_KINDS = "biufcS"  # S: fixed-width bytes, a marker stream's UTF-8 strings


# BufferEmit's process mode (in-process API, emit/emit.py): fixed binary records over a pipe per
# worker, not msgpack (a notice must be one atomic pipe write; results carry a pickle).
#
# EMIT_NOTICE (owner -> worker), 44 bytes, little-endian:
#     offset  size  field
#     0       8     i64 seq        chunk number (>= 0), or EMIT_DROP
#     8       4     u32 slab       slab number: segment "<prefix><slab>"
#     12      8     u64 slab_bytes size of that segment
#     20      8     u64 offset     where the chunk starts in the slab
#     28      8     u64 nbytes     chunk length in bytes
#     36      8     f64 t0         time of the chunk's first frame
# EMIT_RESULT (worker -> owner), a 13-byte header then ``length`` bytes of pickle:
#     0       8     i64 seq        the notice's seq; -1 with EMIT_READY
#     8       1     u8  status     EMIT_OK (payload: return value, empty if unwanted), EMIT_ERROR
#                                  (payload: the exception) or EMIT_READY (callback loaded)
#     9       4     u32 length
EMIT_NOTICE = struct.Struct("<qIQQQd")
EMIT_RESULT = struct.Struct("<qBI")
EMIT_DROP = -2  # unmap slab: the owner unlinks it
EMIT_OK, EMIT_ERROR, EMIT_READY = 0, 1, 2


def stream_topic(name: str) -> bytes:
    """The notice-socket topic of stream ``name`` (NUL-terminated: ``mic`` never matches ``mic2``)."""
    return name.encode() + b"\x00"


def token_topic(token: bytes) -> bytes:
    """The notice-socket topic a subscriber listens on to learn that its socket is connected."""
    return b"\x01" + token


_packer = msgpack.Packer(use_bin_type=True, autoreset=True)
pack = _packer.pack


def unpack(raw: bytes) -> tuple[Any, ...]:
    """Decode one message into a tuple whose first item is an ``int`` kind.

    Raises
    ------
    ProtocolError
        If ``raw`` is not a msgpack array starting with an integer kind.
    """
    try:
        msg = msgpack.unpackb(raw, use_list=False, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises a zoo of types; none may escape
        raise ProtocolError(f"expected a msgpack array, got {len(raw)} undecodable bytes ({exc})") from exc
    if not isinstance(msg, tuple) or not msg or type(msg[0]) is not int:
        raise ProtocolError(f"expected a msgpack array starting with an integer kind, got {brief(msg)}")
    return msg


def brief(value: Any) -> str:
    """``repr(value)``, cut to 80 characters, for error messages."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_fields(msg: tuple[Any, ...], *types: Any) -> None:
    """Check that ``msg[1:]`` has one field per entry of ``types``, each of that type.

    An entry may be a type, a tuple of types, or ``None`` for "any".  ``bool`` is
    not accepted where ``int`` is expected.

    Raises
    ------
    ProtocolError
        Naming the message, the field position and what came instead.
    """
    name = NAMES.get(msg[0], str(msg[0]))
    if len(msg) - 1 != len(types):
        raise ProtocolError(f"{name} takes {len(types)} fields, got {len(msg) - 1}")
    for i, (value, expected) in enumerate(zip(msg[1:], types, strict=True), start=1):
        if expected is None:
            continue
        if isinstance(value, bool) and expected in (int, float, (int, float)):
            ok = False
        else:
            ok = isinstance(value, expected)
        if not ok:
            want = expected.__name__ if isinstance(expected, type) else "/".join(t.__name__ for t in expected)
            raise ProtocolError(f"{name} field {i} must be {want}, got {brief(value)}")


def need(msg: tuple[Any, ...], fields: int) -> None:
    """Check that ``msg`` has at least ``fields`` fields after its kind (more are ignored: schema evolution).

    Raises
    ------
    ProtocolError
        Naming the message and how many fields came.
    """
    if len(msg) - 1 < fields:
        name = NAMES.get(msg[0], str(msg[0]))
        raise ProtocolError(f"{name} must have at least {fields} fields, got {len(msg) - 1}")


def check_dtype(dtype: Any) -> np.dtype[Any]:
    """Return ``dtype`` as a numpy dtype if it is a plain numeric one, or fixed-width bytes (a marker stream).

    ``S<N>`` (``N`` >= 1) is a stream of events: each sample is ``N`` bytes, a UTF-8 string padded
    with NULs (:class:`slabcast.MarkerPublisher`, docs/lsl.md "Markers").

    Raises
    ------
    TypeError
        If it is not a boolean, integer, float, complex or ``S<N>`` dtype.
    """
    try:
        dt: np.dtype[Any] = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be a numeric numpy dtype or S<N> (markers), got {dtype!r}") from exc
    if dt.kind not in DTYPE_KINDS or dt.fields is not None or dt.subdtype is not None or dt.itemsize < 1:
        hint = "; text goes in S<N>: UTF-8 bytes, NUL padded" if dt.kind in "UO" else ""
        raise TypeError(f"dtype must be a numeric numpy dtype (bool, int, uint, float, complex) or fixed-width "
                        f"bytes S<N> with N >= 1 (a marker stream), got {dt}{hint}")  # fmt: skip
    return dt


def check_stream_name(name: Any) -> str:
    """Return ``name`` if it is a valid stream name.

    Raises
    ------
    TypeError, ValueError
        If it is not a string of 1 to 64 characters from ``A-Z a-z 0-9 _ . : -``.
    """
    if not isinstance(name, str):
        raise TypeError(f"stream name must be a str, got {type(name).__name__}")
    if not STREAM_NAME.fullmatch(name):
        raise ValueError(f"stream name must be 1 to 64 characters from A-Z a-z 0-9 _ . : -, got {name!r}")
    return name


def streams_hint(name: str, streams: Iterable[str]) -> str:
    """``"streams: a, b; did you mean 'a'?"``: what a broker has instead of stream ``name`` (a misspelling
    shows), for the words of ``ERROR unknown-stream`` and of a client whose wait for a stream expired."""
    known = sorted(streams)
    close = difflib.get_close_matches(name, known, n=1)
    return f"streams: {', '.join(known) or 'none'}" + (f"; did you mean {close[0]!r}?" if close else "")
