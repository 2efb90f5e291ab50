"""What the broker checks in a request before it changes anything: OPEN and SUBSCRIBE fields, by themselves.

Pure functions (and the descriptor count's guard): a bad field raises :class:`Refused` (answered ``ERROR code``) or
:class:`~slabcast.ProtocolError` (answered ``ERROR malformed``), saying what was
expected and what came.  Checks that need the broker's state (a stream's rate or
carried part, a name already taken) are :class:`~slabcast.broker.state.BrokerState`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .._exceptions import ProtocolError
from .._info import StreamInfo
from ..wire import messages as M
from ..wire import protocol as P

__all__ = [
    "MAX_INFLIGHT",
    "PAUSE_PREFETCH_MAX",
    "DescriptorGuard",
    "OpenRequest",
    "Refused",
    "check_hello",
    "check_open",
    "check_subscribe",
]

log = logging.getLogger("slabcast.broker")

MAX_INFLIGHT = 1024
PAUSE_PREFETCH_MAX = 4096
_REFUSAL_LOG_INTERVAL = 10.0  # seconds between log lines about clients refused for want of descriptors


class Refused(Exception):
    """A request the broker answers with ERROR ``code``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class OpenRequest(NamedTuple):
    """An OPEN whose fields were checked."""

    name: str
    dtype: np.dtype[Any]
    channels: int
    rate: float | None
    slab_bytes: int
    nslabs: int
    reserve: int  # max_chunk_bytes rounded down to whole samples
    sample_bytes: int
    channel_names: tuple[str, ...]
    stats_window: float
    meta: dict[str, Any]


def check_hello(msg: tuple[Any, ...]) -> M.Hello:
    """Decode a HELLO from its unpacked array: the version first (a later version may send more fields)."""
    if len(msg) < 2:
        raise ProtocolError(f"HELLO must start [HELLO, version, ...], got {len(msg) - 1} fields")
    if type(msg[1]) is not int:
        raise ProtocolError(f"HELLO field 1 (version) must be an integer, got {P.brief(msg[1])} "
                            f"(a {type(msg[1]).__name__})")  # fmt: skip
    if msg[1] != P.VERSION and msg[1] not in P.LEGACY_VERSIONS:
        raise Refused(
            P.ERR_VERSION,
            f"protocol version mismatch: broker speaks version {P.VERSION}, client speaks version {msg[1]}",
        )
    hello = M.decode(msg)
    assert isinstance(hello, M.Hello)
    if hello.role not in ("pub", "sub", "ctl"):
        raise ProtocolError(f"HELLO role must be 'pub', 'sub' or 'ctl', got {hello.role!r}")
    if hello.version != P.VERSION and hello.role == "pub":
        raise Refused(P.ERR_VERSION, f"publishers must speak protocol version {P.VERSION}, got {hello.version}")
    return hello


def check_open(msg: M.Open) -> OpenRequest:
    """Check an OPEN's fields by themselves."""
    name, dtype_s, channels, rate, slab_bytes, nslabs, max_chunk_bytes, names, stats_window, meta = msg
    try:
        P.check_stream_name(name)
        dtype = P.check_dtype(dtype_s)
    except (TypeError, ValueError) as exc:
        raise Refused(P.ERR_BAD_REQUEST, str(exc)) from None
    if not 1 <= channels <= 65535:
        raise Refused(P.ERR_BAD_REQUEST, f"channels must be 1..65535, got {channels}")
    if rate is not None and not (rate > 0 and rate < float("inf")):
        raise Refused(P.ERR_BAD_REQUEST, f"rate must be a positive number of Hz or nil, got {rate!r}")
    if slab_bytes < 4096 or slab_bytes % 4096 or slab_bytes > 1 << 30:
        raise Refused(P.ERR_BAD_REQUEST, f"slab_bytes must be a multiple of 4096 in 4096..2**30, got {slab_bytes}")
    if not 2 <= nslabs <= P.MAX_NSLABS:
        raise Refused(P.ERR_BAD_REQUEST, f"nslabs must be 2..{P.MAX_NSLABS}, got {nslabs}")
    sample_bytes = dtype.itemsize * channels
    reserve = max_chunk_bytes // sample_bytes * sample_bytes
    if reserve < sample_bytes or slab_bytes - reserve < sample_bytes:
        raise Refused(
            P.ERR_BAD_REQUEST,
            f"max_chunk_bytes must leave room for one sample ({sample_bytes} bytes) on each side of "
            f"a {slab_bytes}-byte slab, got {max_chunk_bytes}",
        )
    if names is None:
        names = tuple(f"ch_{i}" for i in range(channels))
    elif len(names) != channels:
        raise Refused(P.ERR_BAD_REQUEST, f"channel_names must be {channels} strings, got {names!r}")
    try:
        meta = StreamInfo.check_metadata(meta, channels)
    except ValueError as exc:
        raise Refused(P.ERR_BAD_REQUEST, str(exc)) from None
    if not 0 <= stats_window <= 3600:
        raise Refused(P.ERR_BAD_REQUEST, f"statistics window must be 0..3600 s, got {stats_window!r}")
    return OpenRequest(name, dtype, channels, float(rate) if rate else None, slab_bytes, nslabs, reserve,
                       sample_bytes, tuple(names), float(stats_window), meta)  # fmt: skip


def check_subscribe(msg: M.Subscribe, remote: bool) -> None:
    """Check a SUBSCRIBE's fields by themselves (``remote``: it came over TCP)."""
    _, size, seconds, _, policy, max_inflight, sampler, cut, _, token, history, wake = msg
    if wake is not None and wake not in P.WAKES:
        raise Refused(P.ERR_BAD_REQUEST, f"wake must be one of {', '.join(P.WAKES)} or nil, got {wake!r}")
    if cut == "local" and (token is None or not 1 <= len(token) <= 32):
        raise Refused(P.ERR_BAD_REQUEST, "a local subscription needs a token of 1..32 bytes")
    if cut not in P.CUTS:
        raise Refused(P.ERR_BAD_REQUEST, f"cut must be 'local' or 'broker', got {cut!r}")
    if cut == "local" and remote:
        raise Refused(P.ERR_BAD_REQUEST, "a TCP subscriber shares no memory: it must ask for cut='broker'")
    if history is not None:
        if isinstance(history, bool) or not (history > 0 and history < float("inf")):
            raise Refused(P.ERR_BAD_REQUEST, f"history must be a finite number > 0 (seconds) or nil, "
                                             f"got {history!r}")  # fmt: skip
        if cut != "local":
            raise Refused(P.ERR_BAD_REQUEST, "history is for a local subscriber (cut='local', on the broker's "
                                             "host): a TCP or version-1 subscriber starts at the head")  # fmt: skip
    if policy not in P.POLICIES:
        raise Refused(P.ERR_BAD_REQUEST, f"policy must be 'block' or 'drop', got {policy!r}")
    if not 1 <= max_inflight <= MAX_INFLIGHT:
        raise Refused(P.ERR_BAD_REQUEST, f"max_inflight must be 1..{MAX_INFLIGHT}, got {max_inflight}")
    if (size is None) == (seconds is None):
        raise Refused(P.ERR_BAD_REQUEST, "give exactly one of size (samples) and seconds")
    if seconds is not None and not (seconds > 0 and seconds < float("inf")):
        raise Refused(P.ERR_BAD_REQUEST, f"seconds must be a finite number > 0, got {seconds!r}")
    if size is not None and size <= 0:
        raise Refused(P.ERR_BAD_REQUEST, f"size must be a positive integer number of samples, got {size}")
    if sampler is not None and not isinstance(sampler, int | float | tuple):
        raise ProtocolError(f"SUBSCRIBE sampler must be nil, a number or an array of numbers, got {sampler!r}")
    values = sampler if isinstance(sampler, tuple) else (sampler,) if sampler is not None else ()
    if len(values) > PAUSE_PREFETCH_MAX:
        raise Refused(P.ERR_BAD_REQUEST, f"sampler may hold at most {PAUSE_PREFETCH_MAX} values, got {len(values)}")
    for i, v in enumerate(values):  # (the first bad one named, not the whole array echoed: it may be megabytes)
        if not (isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= P.MAX_SAMPLER_SECONDS):
            raise Refused(P.ERR_BAD_REQUEST, f"sampler values must be numbers in 0..{P.MAX_SAMPLER_SECONDS:g} s, "
                                             f"got {P.brief(v)} (value {i} of {len(values)})")  # fmt: skip


class DescriptorGuard:
    """Refuses (``ERROR limit``) what would take the broker within ``headroom`` of its open-file limit.

    Counting is a directory listing (``open_fds``): done again only when the clients
    that came since could have used half of the room left (at most two descriptors each).
    """

    def __init__(self, pid: int, limit: int, headroom: int, open_fds: Callable[[], int]) -> None:
        self.pid = pid
        self.limit = limit
        self.headroom = headroom
        self._open_fds = open_fds
        self._check_at = 0  # number of clients at which to count descriptors again
        self._refused = 0  # clients refused since the last log line about it
        self._logged: float | None = None

    def check(self, who: str, clients: int, now: float, force: bool = False, spare: int = 0) -> None:
        """``who`` (a client or a stream) would come with ``clients`` connected; ``spare``: descriptors of
        the headroom it may use."""
        if clients < self._check_at and not force:
            return
        used = self._open_fds()
        free = self.limit - self.headroom - used
        self._check_at = clients + free // 4
        if free + spare > 0:
            return
        self._refused += 1
        if self._logged is None or now - self._logged >= _REFUSAL_LOG_INTERVAL:
            log.warning(
                "refused %s: %d descriptors open of the open-file limit %d (RLIMIT_NOFILE; %d kept free) with %d "
                "clients (%d refused since the last such line); raise the limit: LimitNOFILE= in the unit or "
                "`ulimit -n` before starting the broker",
                who, used, self.limit, self.headroom, clients, self._refused,
            )  # fmt: skip
            self._logged = now
            self._refused = 0
        raise Refused(
            P.ERR_LIMIT,
            f"the broker (pid {self.pid}) cannot take another client: {used} of its {self.limit} descriptors "
            f"are in use (its open-file limit, RLIMIT_NOFILE; {self.headroom} are kept free so that it never "
            f"runs out) with {clients} clients; raise the limit where the broker starts: LimitNOFILE=N in its "
            f"systemd unit, or `ulimit -n N` (and the hard limit) in the shell that starts `slabcast broker` "
            f"(or `slabcast up`)",
        )
