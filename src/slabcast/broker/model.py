"""The broker's plain state: clients, streams, the two kinds of subscription, rolling statistics, pool ranges.

No sockets and no clock: whoever changes these passes the time in.  The decisions
that change them are :class:`slabcast.broker.state.BrokerState`'s.
"""

from __future__ import annotations

import fcntl
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np

from .._exceptions import ShmFullError
from .._info import StreamInfo
from ..core.geometry import GEN_OFFSET, Geometry, copy_carry
from ..core.pool import SlabPool
from ..core.rechunk import Rechunker
from ..core.ring import CURSOR_SPAN, CURSOR_TAG_SHIFT, SLEEPERS, Ring, futex_wake
from ..core.shm import Segment, lock_slab
from ..wire import messages as M
from ..wire import protocol as P
from .checks import OpenRequest, Refused
from .statistics import Statistics

__all__ = [
    "BrokerCutSub",
    "Client",
    "Cut",
    "LocalSub",
    "Out",
    "Policy",
    "Role",
    "Statistics",
    "Stream",
    "Subscription",
    "open_stream",
]

Role = Literal["pub", "sub", "ctl"]
Policy = Literal["block", "drop"]
Cut = Literal["local", "broker"]

log = logging.getLogger("slabcast.broker")

TCP_PREFIX = b"T"  # routing ids of TCP clients get this prefix (ZeroMQ's own ids start with 0x00)


class Out(NamedTuple):
    """One message to send: to ``client`` (its routing id), ``message`` (a typed message of
    :mod:`slabcast.wire.messages`, or bytes already encoded), and for a chunk sent by value to a TCP client,
    its samples as a second message part."""

    client: bytes
    message: Any
    data: bytes | None = None


class Client:
    """One connection that said HELLO."""

    __slots__ = ("ident", "label", "last_seen", "live", "local_pid", "pid", "remote", "role", "stream", "sub",
                 "version")  # fmt: skip

    def __init__(self, ident: bytes, pid: int, role: Role, label: str, version: int, now: float) -> None:
        self.ident = ident  # routing id; prefixed with b"T" for clients of the TCP socket
        self.remote = ident[:1] == TCP_PREFIX
        self.last_seen = now
        self.pid = pid  # as the client said (its own namespace): for logs and status
        self.local_pid = 0  # as our namespace sees it (SO_PEERCRED); 0: unknown
        self.role: Role = role
        self.label = label
        self.version = version
        self.stream: Stream | None = None  # the stream this client publishes
        self.sub: LocalSub | BrokerCutSub | None = None
        # (segment's stream, lock byte) this client holds while it lives; None: judged by its pid.
        self.live: tuple[Stream, int] | None = None


class Subscription:
    """What both kinds of subscription have: who, to what, chunk size and policy, and the counters."""

    cut: ClassVar[Cut]
    __slots__ = ("client", "clip", "delivered", "dropped", "max_inflight", "overflows", "policy", "seq", "size",
                 "stream")  # fmt: skip

    def __init__(self, client: Client, stream: Stream, size: int, clip: bool, policy: Policy,
                 max_inflight: int) -> None:  # fmt: skip
        self.client = client
        self.stream = stream
        self.size = size
        self.clip = clip
        self.policy: Policy = policy
        self.max_inflight = max_inflight
        self.seq = 0
        self.delivered = 0
        self.dropped = 0
        self.overflows = 0  # chunks that had to wait for credit (policy="block")


class LocalSub(Subscription):
    """The subscriber cuts its own chunks from the stream's frame notices; the broker keeps its cursor (for
    ``block``) and its counters as reported by ACK."""

    cut: ClassVar[Cut] = "local"
    __slots__ = ("base", "cursor", "futex_sleeper", "gate", "held", "history", "page", "ring_seq", "sleeper",
                 "stalled_since", "tag", "token", "wake")  # fmt: skip

    def __init__(self, client: Client, stream: Stream, size: int, clip: bool, policy: Policy, max_inflight: int,
                 token: bytes) -> None:  # fmt: skip
        super().__init__(client, stream, size, clip, policy, max_inflight)
        self.cursor = stream.head  # index just past the last frame it has read
        self.stalled_since: float | None = None  # since when its cursor gates the publisher
        self.token = token  # the token topic it waits to see JOINED on
        self.held = 0  # chunks it holds, as last reported
        self.history: float | None = None  # SUBSCRIBE's history (seconds)
        self.gate = 0  # until its cursor reaches this index it holds slabs back whatever its policy (its history)
        self.ring_seq = 0  # the descriptor of the frame at its start (its first to read from the ring)
        self.wake: str | None = None  # how it waits (SUBSCRIBE's wake; None: a version-2 client, every notice)
        self.futex_sleeper = False  # a futex one that sleeps with its byte in the futex sleeper table (ATTACH)
        self.sleeper: int | None = None  # its byte in the ring's sleeper tables, and its cursor table entry
        self.page = True  # it maps the sleeper page writable (ATTACH's sleeper)
        self.tag = 0  # its cursor table entry's tag, given in ATTACHED (0: none yet)
        self.base = 0  # the stream index its cursor table entry counts from (ATTACHED's start)

    @property
    def tabled(self) -> bool:
        """It sets its byte in the sleeper tables before it sleeps (a doorbell subscriber, or a futex one that said
        ATTACH futex_sleeper): the publisher looks at the tables for it (``doorbells``) instead of waking it at every
        frame (``futex_waiters``)."""
        return self.sleeper is not None and (self.wake == "doorbell" or (self.wake == "futex" and self.futex_sleeper))


class BrokerCutSub(Subscription):
    """Protocol version 1 and TCP subscribers: the broker runs the rechunker, leases, backlog and credit."""

    cut: ClassVar[Cut] = "broker"
    __slots__ = ("backlog", "chunker", "const_pause", "delivered_at", "end", "inflight", "jumped", "last_pause",
                 "leases", "pauses", "remote_held", "starts")  # fmt: skip

    def __init__(self, client: Client, stream: Stream, size: int, clip: bool, policy: Policy, max_inflight: int,
                 sampler: Any) -> None:  # fmt: skip
        super().__init__(client, stream, size, clip, policy, max_inflight)
        self.inflight = 0
        self.leases: dict[int, int] = {}  # seq -> slab
        # (seq, CHUNK, offset, nbytes) awaiting credit
        self.backlog: deque[tuple[int, Any, int, int]] = deque()
        self.delivered_at: deque[tuple[int, float]] = deque()  # (seq, time delivered), oldest first
        self.starts: dict[int, int] = {}  # seq -> stream index of the chunk's first sample, while leased
        self.remote_held: set[int] = set()  # chunks sent by value to a TCP client, not yet released
        self.jumped = False  # the next chunk follows a discontinuity
        self.end: tuple[str, str] | None = None  # END to send once the backlog is empty
        self.pauses: deque[float] = deque()
        self.last_pause = 0.0
        self.const_pause: float | None = None
        next_pause: Callable[[], float] | None = None
        if isinstance(sampler, int | float):
            self.const_pause = float(sampler)
            next_pause = self._const
        elif isinstance(sampler, tuple):
            self.pauses.extend(sampler)
            next_pause = self._next_pause
        self.chunker = Rechunker(size, clip, stream.rate, next_pause)

    def _const(self) -> float:
        return self.const_pause  # type: ignore[return-value]

    def _next_pause(self) -> float:
        # Pauses are drawn in the subscriber's process ahead of use; when it has fallen
        # further behind than its prefetch, the last value drawn stands in.
        if self.pauses:
            self.last_pause = self.pauses.popleft()
        return self.last_pause


FAST_CHANGES = 4  # slab changes over which Stream.fast reckons the publisher's pace


class Stream:
    """A stream's segment, slab pool, notice counter and the position of its newest sample."""

    def __init__(
        self,
        name: str,
        sid: int,
        dtype: np.dtype[Any],
        channels: int,
        rate: float | None,
        geometry: Geometry,
        channel_names: list[str],
        segment: Segment,
        notice_path: str,
        committed: int,
    ) -> None:
        self.name = name
        self.sid = sid
        self.notice_path = notice_path  # the publisher's notice socket (ipc file)
        self.dtype = dtype
        self.channels = channels
        self.rate = rate
        self.geometry = geometry  # where its slabs, carried parts and time tables lie
        self.sample_bytes = geometry.sample_bytes
        self.slab_bytes = geometry.slab_bytes
        self.nslabs = nslabs = geometry.nslabs
        self.reserve = geometry.reserve  # the carried part of each slab: the longest chunk a subscriber may ask
        # How much of it is in memory, per slab: grown for all as subscribers ask, given back slab by slab as
        # slabs are granted again; never below what the stream opened with.
        self.first_committed = committed
        self.slab_committed = [committed] * nslabs
        self.peak = committed  # the most any slab has (looked at on every grant)
        self.give_back = True  # False where holes cannot be punched
        # When (the broker's clock) it read the last slab changes of this stream, several at one time when one
        # PUBLISHED told them together: their pace over FAST_CHANGES intervals says whether the publisher is fast.
        self.switch_times: deque[float] = deque(maxlen=FAST_CHANGES + 1)
        # Whether a slab holds less than P.FAST_SLAB seconds of stream (or the stream has no rate) in a pool of
        # P.FAST_POOL slabs or more: then a publisher whose slabs change that fast is granted one more ahead.
        self.may_be_fast = nslabs >= P.FAST_POOL and (
            not rate or geometry.frame_bytes < P.FAST_SLAB * rate * geometry.sample_bytes)
        self.header = geometry.header_bytes
        self.channel_names = channel_names
        self.segment = segment
        self.u8 = np.frombuffer(segment.buf, dtype=np.uint8)
        self.gens = np.frombuffer(segment.buf, dtype="<u4", count=nslabs, offset=GEN_OFFSET)
        self.ring = Ring(segment.buf, geometry.ring_offset)  # where the publisher describes every frame
        fd = segment.fd

        def take(slab: int) -> bool:
            return lock_slab(fd, slab, fcntl.F_WRLCK)

        def put(slab: int) -> None:
            lock_slab(fd, slab, fcntl.F_UNLCK)

        self.pool = SlabPool(nslabs, self.gens, take, put)  # type: ignore[arg-type]
        self.base_index = 0  # offset(index) = base_offset + (index - base_index) * sample_bytes
        self.base_offset = 0
        self.next_offset = -1
        self.slab_end = 0
        self.floor = 0  # lowest index readable contiguously from the current slab (its carry)
        self.carry = 0  # bytes of each slab's tail the publisher copies into the next (asked)
        self.carried = 0  # ... (confirmed by the publisher: new subscriptions are admitted against this)
        self.head = 0  # index of the next sample
        self.frames = 0  # frames read from the ring: the next descriptor to read
        self.reading = False  # reading the ring right now
        self.free_sleepers = list(range(SLEEPERS - 1, -1, -1))  # bytes of the sleeper table not assigned
        self.entry_tags = [0] * SLEEPERS  # each cursor table entry's generation: its owner's tag (0: never had one)
        self.publisher: Client | None = None
        self.subs: list[LocalSub | BrokerCutSub] = []
        self.broker_cut: list[BrokerCutSub] = []  # subs whose chunks the broker cuts: kept, not searched per frame
        self.waiting: list[LocalSub] = []  # local subscriptions waiting until the publisher carries enough
        self.joining: list[LocalSub] = []  # offered (SUBSCRIBED), waiting for their ATTACH
        self.meta: dict[str, Any] = StreamInfo.check_metadata(None, channels)  # channel types, units, source_id
        self.tokens: list[bytes] = []  # those the publisher must see join before its first frame
        self.ended = False
        # Since when (the broker's clock, as of its sweeps) the publisher, with no slab left, has stopped while a block
        # subscriber's cursor holds the oldest back: the status' "held back" (each subscriber's own stall timer,
        # stalled_since, restarts when its cursor moves: a slow one that moves within a slab is no less a hold).
        self.held_since: float | None = None
        # The head as the last sweep saw it, and when it last moved: a publisher still writing into its current slab
        # is not held back, granted slab or not (liveness.stalled).
        self.head_seen = -1
        self.head_moved = 0.0
        self.final_row: dict[str, Any] | None = None  # its status row at its end (status' ended_streams)
        self.final_subs: list[LocalSub | BrokerCutSub] = []  # its subscribers then, in that row's order
        self.stats = Statistics(dtype, channels, rate)
        # Per slab not granted again since it was written: its floor and its FRAME/FRAMES as they came (index,
        # offset, samples per frame, t0 per frame, flags), in order; what a subscription asking for history is
        # told.  Bounded by the notice cap: at most notices_per_slab messages per slab.
        self.kept: dict[int, tuple[list[int], list[tuple[int, int, tuple[int, ...], tuple[float, ...], int]]]] = {}

    def slab_start(self, slab: int) -> int:
        return self.geometry.slab_start(slab)

    @property
    def committed(self) -> int:
        """How much of its carried part every slab has in memory: the longest chunk it carries now."""
        return min(self.slab_committed)

    def grow(self, need: int) -> bool:
        """Commit each slab's carried part up to ``need`` bytes (a new subscriber's chunk); True if it grew.

        Raises
        ------
        ShmFullError
            /dev/shm has no room for it; the pool stays as it was.
        """
        if need <= self.committed:
            return False
        hi = min(self.reserve, -(-need // self.sample_bytes) * self.sample_bytes)
        ranges = self.geometry.carried_ranges(self.slab_committed, hi)
        self.segment.commit(ranges, headroom=True)  # other programs keep some of /dev/shm
        self.slab_committed = [max(c, hi) for c in self.slab_committed]
        self.peak = max(self.peak, hi)
        return True

    def shrink(self, slabs: list[int]) -> int:
        """Give back the carried part of ``slabs`` (just granted: nobody can read them, the publisher has not
        been told yet) that no subscriber needs any more; return the bytes given back.

        Never below what the publisher may still carry (asked or confirmed) nor the stream's first size.
        """
        # Safe because (1) nothing reads or writes a slab between its grant and its GRANT message, (2) the
        # publisher gets CARRY and GRANT in order on one socket, so it carries at most `carry` into this slab,
        # and (3) every carry raise goes through grow(), which commits every slab again first. Reading a
        # punched page allocates it (SIGBUS on a full /dev/shm) just as writing does.
        keep = max(self.carry, self.carried, self.needed_carry(), self.first_committed)
        keep = -(-keep // self.sample_bytes) * self.sample_bytes
        ranges: list[tuple[int, int]] = []
        shrunk = [s for s in slabs if self.slab_committed[s] > keep]
        geometry = self.geometry
        for slab in shrunk:
            ranges += geometry.carried_ranges(keep, self.slab_committed[slab], slabs=[slab])
        if not ranges:
            return 0
        if not self.segment.release(ranges):
            self.give_back = False  # not here (no hole punching): the pool keeps what it grew to
            return 0
        for slab in shrunk:
            self.slab_committed[slab] = keep
        self.peak = max(self.slab_committed)
        return sum(n for _, n in ranges)

    def read_cursors(self) -> list[LocalSub]:
        """The local subscribers, their cursors brought up to what they posted in the ring's cursor table."""
        subs = [u for u in self.subs if isinstance(u, LocalSub)]
        if self.ended:
            return subs
        table = self.ring.cursors
        for sub in subs:
            if sub.sleeper is None or not sub.tag:
                continue
            value = table[sub.sleeper]
            if value >> CURSOR_TAG_SHIFT == sub.tag:
                cursor = sub.base + (value & (CURSOR_SPAN - 1))
                if cursor > sub.cursor:
                    sub.cursor = cursor
                    sub.stalled_since = None
        return subs

    def post_start(self, sub: LocalSub) -> int | None:
        """A subscriber is told where it starts (ATTACHED, once): its cursor table entry counts from there, empty,
        under a new tag (the entry's next generation, never its previous owner's); return the tag (None: no
        entry)."""
        if sub.tag:
            return sub.tag  # (a repeated ATTACH: the entry keeps its start)
        if sub.sleeper is None or self.ended:
            return None
        entry = sub.sleeper
        sub.tag = self.entry_tags[entry] = self.entry_tags[entry] % 0xFFFF + 1
        sub.base = sub.cursor
        self.ring.cursors[entry] = 0
        return sub.tag

    def floor_sub(self) -> LocalSub | None:
        """The lossless local subscriber (or one still reading its history) with the lowest cursor, the first
        of them on a tie, cursors as posted now; None if there is none."""
        subs = [u for u in self.read_cursors() if u.policy == "block" or u.cursor < u.gate]
        return min(subs, key=_cursor_of, default=None)

    def floor_index(self) -> int | None:
        """The lowest cursor of the lossless local subscribers (and of those still reading their history), or
        None if there are none."""
        sub = self.floor_sub()
        return None if sub is None else sub.cursor

    def needed_carry(self) -> int:
        """Bytes of tail every subscriber's chunks may need carried into a new slab."""
        size = max((u.size for u in [*self.subs, *self.waiting, *self.joining]), default=0)
        return min(self.reserve, size * self.sample_bytes)

    def remember(self, index: int, offset: int, ns: tuple[int, ...], t0s: tuple[float, ...], jump: int) -> None:
        """Keep the descriptors of frames just written in the current slab, for subscriptions asking for history."""
        kept = self.kept.get(self.pool.current)  # type: ignore[arg-type]
        if kept is not None:
            kept[1].append((index, offset, ns, t0s, jump))

    def chunk_size(self, size: int | None, seconds: float | None, max_subscribers: int) -> int:
        """The chunk size, in samples, of a new subscription asking for ``size`` samples or ``seconds``; its
        slabs grown to carry such chunks.

        Raises
        ------
        Refused
            ``bad-request`` (no rate for ``seconds``, larger than max_chunk_bytes, too many subscribers) or
            ``shm-full`` (no room to grow).
        """
        if seconds is not None:
            if self.rate is None:
                raise Refused(
                    P.ERR_BAD_REQUEST, f"seconds= needs a stream with a rate; {self.name!r} has none, use size="
                )
            size = max(1, round(seconds * self.rate))
        assert size is not None
        if size * self.sample_bytes > self.reserve:
            raise Refused(
                P.ERR_BAD_REQUEST,
                f"a chunk of {size} samples ({size * self.sample_bytes} bytes) is larger than stream {self.name!r} "
                f"allows (max_chunk_bytes={self.reserve}); open the stream with a larger max_chunk_bytes",
            )
        if len(self.subs) >= max_subscribers:
            raise Refused(P.ERR_BAD_REQUEST, f"stream {self.name!r} has the maximum of {max_subscribers} subscribers")
        try:
            if self.grow(size * self.sample_bytes):
                log.info("stream %r: slabs grown to carry chunks of %d bytes (%d bytes of shared memory)",
                         self.name, self.committed, self.segment.allocated)  # fmt: skip
        except ShmFullError as exc:
            raise Refused(P.ERR_SHM_FULL, f"chunks of {size} samples on stream {self.name!r}: {exc}") from None
        return size

    def start(self, sub: LocalSub | BrokerCutSub) -> None:
        """A subscription starts: it gets what comes from now on."""
        if isinstance(sub, LocalSub):
            sub.cursor = self.head
            sub.ring_seq = self.frames  # one descriptor per frame: the frame at the head has this one
            if sub.wake is not None and sub.page and self.free_sleepers:
                sub.sleeper = self.free_sleepers.pop()
        else:
            self.broker_cut.append(sub)
        self.subs.append(sub)
        self.tell_publisher()
        log.info("%s subscribed to %r: size=%d clip=%s policy=%s cut=%s", sub.client.label, self.name, sub.size,
                 sub.clip, sub.policy, sub.cut)  # fmt: skip

    def remove(self, sub: LocalSub | BrokerCutSub) -> None:
        """A subscription ends (or never started): it is in none of the stream's lists any more."""
        if isinstance(sub, BrokerCutSub):
            for seq, *_ in sub.backlog:  # never sent: their pins go
                self.pool.unpin(sub.leases.pop(seq))
            sub.backlog.clear()
            if sub in self.broker_cut:
                self.broker_cut.remove(sub)
        else:
            for pending in (self.waiting, self.joining):
                if sub in pending:
                    pending.remove(sub)
        if sub in self.subs:
            self.subs.remove(sub)
        if isinstance(sub, LocalSub):
            self.remove_sleeper(sub)
        self.tell_publisher()

    def remove_sleeper(self, sub: LocalSub) -> None:
        """Take back a subscription's byte of the sleeper table (it may have died asleep: the byte is cleared)."""
        if sub.sleeper is not None:
            if not self.ended:
                self.ring.sleepers[sub.sleeper] = 0
                self.ring.futex_sleepers[sub.sleeper] = 0
            # Reused last: a previous owner that wakes late (evicted) clears its byte, which must not be a new one's.
            self.free_sleepers.insert(0, sub.sleeper)
            sub.sleeper = None
            self.tell_publisher()

    def tell_publisher(self) -> None:
        """Say in the ring's header words how subscribers wait, which the publisher reads at each write: how many
        need a notice (doorbells, and version-2 subscribers, which cut from them), how many a FUTEX_WAKE, and
        whether the broker cuts chunks itself (then it wants to hear of every frame)."""
        if self.ended:
            return
        local = [u for u in (*self.subs, *self.joining, *self.waiting) if isinstance(u, LocalSub)]
        # A futex subscriber with its byte in the futex sleeper table is counted with the doorbells (tabled).
        futex = sum(1 for u in local if u.wake == "futex" and not u.tabled)
        doorbells = sum(1 for u in local if u.tabled)
        # Version 2 (it cuts from every notice), and a doorbell subscriber without its sleeper byte yet.
        notices = sum(1 for u in local if u.wake is None or (u.wake == "doorbell" and u.sleeper is None))
        self.ring.set_counts(notices, doorbells, futex, bool(self.broker_cut))

    def end(self, code: str, message: str) -> list[Out]:
        """The stream ends: the ENDs to send (a broker-cut subscriber with a backlog gets its END after it)."""
        self.ended = True
        futex_wake(self.ring.futex_address)  # subscribers asleep on the ring look at their connection (END)
        log.info("stream %r ended (%s) after %d samples", self.name, code, self.head)
        if self.publisher is not None:
            self.publisher.stream = None
            self.publisher = None
        out = []
        for sub in [*self.waiting, *self.joining]:
            out.append(Out(sub.client.ident, M.End(code, message, 0, self.head)))
            sub.client.sub = None
        self.waiting.clear()
        self.joining.clear()
        self.pool.close()
        for u in self.subs:
            if isinstance(u, LocalSub):
                # It ends once it has read the notices up to `head` (the publisher's own NOTICE_END
                # usually gets there first, in order with them).
                out.append(Out(u.client.ident, M.End(code, message, u.seq, self.head)))
            elif u.backlog:
                u.end = (code, message)  # sent once the backlog has drained
            else:
                out.append(Out(u.client.ident, M.End(code, message, u.seq)))
        return out

    def destroy(self) -> None:
        """Unmap and unlink the segment (the stream's last views of it go first)."""
        del self.u8
        del self.gens
        self.ring.release()
        self.pool.gens = []  # the last view of the segment: it can be unmapped
        self.segment.destroy()
        log.info("stream %r: segment %s unlinked", self.name, self.segment.name)

    def subscribed(self, size: int) -> M.Subscribed:
        """SUBSCRIBED for a subscription of chunks of ``size`` samples."""
        return M.Subscribed(self.segment.name, self.segment.nbytes, self.dtype.str, self.channels, self.rate, size,
                            self.head, tuple(self.channel_names), self.sid, self.header, self.slab_bytes,
                            self.nslabs, self.sample_bytes, f"ipc://{self.notice_path}", self.meta,
                            True)  # fmt: skip

    def place(self, offset: int, n: int, carry: int) -> bool:
        """Check where a frame of ``n`` samples lands; on a new slab, switch to it (True: the publisher left one,
        which may now be reclaimed)."""
        if n <= 0:
            raise Refused(P.ERR_FRAME, f"FRAME must hold at least one sample, got n={n}")
        if offset == self.next_offset:
            return False
        # The first frame of a new slab: the publisher moved to the oldest slab it was granted.
        granted = self.pool.granted
        if not granted or offset != self.slab_start(granted[0]) + self.reserve:
            expected = f"{self.next_offset}" if self.pool.current is not None else "none yet"
            raise Refused(
                P.ERR_FRAME,
                f"FRAME offset {offset} is neither the next offset ({expected}) nor the data start "
                f"of the next granted slab (granted: {list(granted)})",
            )
        if not 0 <= carry <= self.reserve:
            raise Refused(P.ERR_FRAME, f"FRAME carry must be 0..{self.reserve} bytes, got {carry}")
        return self.switch_slab(granted[0], carry)

    def switched(self, now: float) -> None:
        """The broker read a slab change at ``now``."""
        self.switch_times.append(now)

    def fast(self, now: float) -> bool:
        """Whether the publisher gets P.GRANT_AHEAD_FAST slabs ahead: :attr:`may_be_fast`, and its last
        FAST_CHANGES slab changes were read, up to ``now``, less than P.FAST_SLAB seconds apart on average (read
        in twos or threes when it keeps changes for the next, each pair apart by two slabs' time)."""
        times = self.switch_times
        return self.may_be_fast and len(times) > FAST_CHANGES and now - times[0] < FAST_CHANGES * P.FAST_SLAB

    def fill(self, offset: int, n: int) -> None:
        """A frame of ``n`` samples was written at ``offset`` of the current slab."""
        nbytes = n * self.sample_bytes
        if offset + nbytes > self.slab_end:
            raise Refused(P.ERR_FRAME, f"FRAME of {nbytes} bytes at offset {offset} overruns its slab")
        self.next_offset = offset + nbytes

    def account(self, now: float, offset: int, n: int, last: int, jump: bool = False) -> None:
        """Keep where a run of frames written from ``offset`` in the current slab lies (``n`` samples, the newest
        frame ``last`` long; ``jump``: the first is flagged as a discontinuity), for statistics computed when
        asked (never able to stop the stream: an error turns them off for it)."""
        stats = self.stats
        if not stats.window:
            return
        try:
            slab = self.pool.current
            assert slab is not None
            stats.account(now, n, last, slab, int(self.gens[slab]), offset, jump)
        except Exception:
            log.exception("statistics of stream %r failed; turning them off for this stream", self.name)
            stats.window = 0.0

    def statistics(self, out: dict[str, Any]) -> dict[str, Any]:
        """Add the rolling statistics to ``out`` (none once the segment is gone, or after an error)."""
        if not self.stats.window or self.segment is None or not hasattr(self, "u8"):
            return out
        try:
            return self.stats.summary(out, self.u8, self.gens)
        except Exception:
            log.exception("statistics of stream %r failed; turning them off for this stream", self.name)
            self.stats.window = 0.0
            return out

    def switch_slab(self, slab: int, carry: int) -> bool:
        """The publisher's first frame in ``slab``, with ``carry`` bytes carried before its data; True when it
        left a slab (which may then be reclaimed)."""
        head = self.head
        old_end = self.next_offset
        old = self.pool.switch(slab, head)
        start = self.slab_start(slab)
        # What lies contiguously in the old slab before its write position (what it carried in, then its
        # frames): never copy more, or bytes of another slab (or of nothing) would pass for samples.
        need = min(self.needed_carry(), (head - self.floor) * self.sample_bytes)
        if old is not None and carry < need:
            # A subscription arrived after the publisher last heard how much to carry: copy the
            # missing older part here (the old slab is intact: only we decide when it is reused).
            copy_carry(self.u8, self.geometry, old_end, start + self.reserve, need, carry)
            carry = need
        self.base_index = head
        self.base_offset = start + self.reserve
        self.slab_end = start + self.slab_bytes
        # The publisher copied the last `carry` bytes before this slab's data: chunks may start there.
        floor = head - carry // self.sample_bytes if old is not None else head
        self.floor = floor
        self.kept[slab] = ([floor], [])
        for sub in self.broker_cut:
            chunker = sub.chunker
            if chunker.start is not None and chunker.start < floor:
                # Only right after a subscription that asked for a longer carry than this slab got.
                if chunker.rate:
                    chunker.t0 += (floor - chunker.start) / chunker.rate
                chunker.start = floor
        return old is not None


def open_stream(req: OpenRequest, sid: int, segment_name: str, notice_path: str, broker_pid: int, epoch: int,
                shm_mode: int, make_segment: Callable[..., Segment]) -> Stream:  # fmt: skip
    """Create a stream's segment (frame areas committed, and as much carried room as a frame area) and its
    state.

    Raises
    ------
    Refused
        ``shm-full``: /dev/shm has no room for it.
    """
    dtype, nslabs, slab_bytes, reserve = req.dtype, req.nslabs, req.slab_bytes, req.reserve
    sample_bytes = req.sample_bytes
    geometry = Geometry(nslabs, slab_bytes, sample_bytes, reserve, bool(req.meta.get("timestamps")))
    header = geometry.header_bytes
    try:
        # Memory for the frame area and as much carried room as frames; the rest of the carried part
        # stays address space until a subscriber asks for longer chunks.
        committed = min(reserve, geometry.frame_bytes // sample_bytes * sample_bytes)
        ranges = geometry.carried_ranges(0, committed, frames=True)
        ring = (geometry.ring_offset, geometry.segment_bytes - geometry.ring_offset)
        segment = make_segment(segment_name, geometry.segment_bytes, shm_mode, commit=[(0, header), *ranges, ring])
    except ShmFullError as exc:
        raise Refused(P.ERR_SHM_FULL, str(exc)) from None
    segment.write_header(header_bytes=header, slab_bytes=slab_bytes, nslabs=nslabs, sample_bytes=sample_bytes,
                         channels=req.channels, broker_pid=broker_pid, rate=req.rate, dtype=dtype.str, epoch=epoch,
                         name=req.name)  # fmt: skip
    stream = Stream(req.name, sid, dtype, req.channels, req.rate, geometry, list(req.channel_names), segment,
                    notice_path, committed)  # fmt: skip
    stream.meta = req.meta
    stream.ring.format()
    # Raw byte streams have no sample values to summarise.
    byte_stream = dtype == np.uint8 and req.channels == 1
    if dtype.kind in "iuf" and not byte_stream and req.stats_window > 0:
        stream.stats.configure(req.stats_window)
    return stream


def _cursor_of(sub: LocalSub) -> int:
    return sub.cursor
