"""The frame descriptor ring of a stream's segment (data path version 3): where every frame lies, in order.

The publisher copies a frame into its slab, writes the frame's **descriptor** into slot
``seq % slots`` of the ring, then stores the ring's **position** (``seq + 1``, the number of
descriptors published).  Readers (local subscribers, the broker) load the position, then the
descriptors below it, then the samples they name: no message per frame to anyone.  The ZeroMQ
notices that remain only wake readers that sleep (:mod:`slabcast.client._local`).

Header words (bytes 136..256 of the segment header, little-endian; see :mod:`slabcast.core.shm`)::

    136  u32  ring_slots        descriptors in the ring (a power of two), written by the broker at creation
    140  u32  descriptor_bytes  64
    144  u64  ring_offset       where the ring starts in the segment (after the slabs and time tables)
    152  u64  position          descriptors published; single writer: the publisher.  Its low 32 bits
                                (bytes 152..156) are the futex word the futex wait strategy sleeps on
    160  u32  notices_wanted    version-2 subscribers, which cut from the notices: the publisher sends one
                                for every frame (batched) while this is not 0; single writer: the broker
    164  u32  futex_waiters     local subscribers that sleep on the futex word without a byte in the futex
                                sleeper table (wake futex, no ATTACH futex_sleeper); single writer: the broker
    168  u32  frames_wanted     1 while the broker cuts chunks itself (TCP and version-1 subscribers):
                                it wants a message per frame, not per slab; single writer: the broker
    172  u32  closed            1 once the publisher wrote its last descriptor (then position is final)
    176  u32  doorbells         local subscribers with a byte in the sleeper tables below: doorbell ones
                                (woken by a ZeroMQ notice, or a FUTEX_WAKE asleep on the word) and futex
                                ones that said ATTACH futex_sleeper; single writer: the broker
    180  u32  sleep_futex       1: the publisher also wakes subscribers asleep on the futex word with their
                                byte in the futex sleeper table below; single writer: the publisher, at open
    184  u32  acks_wanted       1 while the publisher is short of slabs: a subscriber that posts its cursor in
                                the cursor table (below) sends ACK when it leaves a slab, if ack_target names
                                it or nobody; single writer: the broker
    188  u32  frame_max         the most samples in one frame written so far (0: not kept); single writer: the
                                publisher, which stores it before the position of the frame that raised it
    192  u32  ack_target        0: acks_wanted asks every subscriber; 1 + e: only the one at cursor table entry
                                e (the one whose cursor holds the oldest slab back); single writer: the broker
    200  u64  ack_at            the stream index an asked subscriber's cursor must reach before it sends ACK (0:
                                any): past the retired slabs that, freed, supply the publisher; single writer: the
                                broker

After the ring, one page: the **sleeper table**, ``SLEEPERS`` bytes, one per doorbell subscriber (the
broker assigns its byte in ATTACHED).  A doorbell subscriber about to sleep sets its byte to a value
1..255 (the next one, cycling, if it read anything or took a notice since it last chose one; else the
same: a wait that timed out), makes a
full barrier, loads the position again, and sleeps on its notice socket only if it did not move;
awake, it sets its byte to 0.  The publisher, after it stores the position, makes a full barrier
and sends a notice only if some byte is set and the table differs from what it saw at its previous
write (a subscriber that it already rang for and that is not awake yet needs no second notice: the
notices do not pile up while one is unread).  A value changes only after something only a write
makes (a descriptor to read, or the notice of a look), at most twice between two writes, so an
unchanged table means nobody went to sleep again since the last look.  (Keeping the value after a
notice with nothing new lost wake-ups: the subscriber may read a frame between the publisher's store
and its look, so the look rings for a frame already read, and the next look, seeing the value it rang
for, would not ring for the next frame.)  Each side's barrier orders
its store before its load (Dekker's handshake): either the subscriber sees the new position or the
publisher sees the byte, so no wake-up is lost, and a subscriber that is busy reading costs the
publisher no message.  From
Python the barrier is :func:`barrier` (on x86-64 a lock's locked instruction; elsewhere a
``FUTEX_WAKE`` system call, whose kernel side executes ``smp_mb()`` before it looks for waiters:
kernel/futex/waitwake.c, barrier B); a publisher with futex subscribers makes its ``FUTEX_WAKE``,
which wakes them and is a full barrier too.

The next ``SLEEPERS`` bytes of that page are the **futex sleeper table**, the same byte for each doorbell
subscriber.  One that waits in a blocking ``recv`` (nobody polls its notice socket) and sees ``sleep_futex``
set sleeps on the futex word instead, no ZeroMQ hop on the way: it sets its byte there (``SLEEPER_BIT + b``
when it sleeps with a wake target's mask ``1 << b``, else ``SLEEPER_ANY``), makes the barrier, loads the
position and calls ``FUTEX_WAIT`` with what it loaded; awake, it clears the byte.  The publisher, after the
same barrier, makes a ``FUTEX_WAKE`` whenever a byte of it is set that its wake's mask can wake: a futex
keeps no wake-up for later, as a queued notice does, so such a wake is never left out; one the kernel would
deliver to no sleeper of the table is (a subscriber asleep over many frames costs the publisher no system
call for each).  The kernel compares and sleeps
atomically, so the handshake is Dekker's again.  An event loop (``recv`` without waiting, then a poll on
the notice socket) keeps the notice.

Then, at byte ``2 * SLEEPERS`` of that page, the **cursor table**: a u64 per subscriber, at its byte's index
(every version-3 local subscriber that maps the page gets one, whatever its wait).  The subscriber stores
``(tag << 48) | (cursor - start)`` there when it leaves a slab or gives a chunk's lease back, one aligned
store (``tag``: ATTACHED's ``cursor_tag``, the entry's generation, which the broker bumps for each new owner;
``start``: ATTACHED's start; ``cursor``: the stream index just past what it has read), then makes a full
barrier and loads ``acks_wanted``, ``ack_target`` and ``ack_at``: only if the broker asks (``acks_wanted`` set, and
``ack_target`` 0 or its entry + 1, and its cursor at least ``ack_at``) does it send the ACK it sent for every
slab before.  The broker reads the
table whenever it decides (a grant, a sweep, a status), and ignores a value whose tag is not its
subscriber's (a previous owner of the entry).  When it cannot keep the publisher's slabs granted ahead, it
stores whom it asks (the subscriber whose cursor holds the oldest slab back, or everyone when a reader's
lock may be what holds a slab) and from where (``ack_at``: the end of the retired slab whose freeing supplies
the publisher, so that one ACK of a subscriber that holds a fast publisher back brings slabs in batches, not
one by one: a receive window reopened by halves, not by bytes), sets ``acks_wanted``, makes the barrier,
and reads the table once more before it waits for an ACK: either it sees the subscriber's new cursor or the
subscriber sees itself asked (Dekker's handshake again, on ``ack_target`` and ``ack_at`` when only they
change), so no slab stays held by a cursor the
broker did not read.  If the table then shows another subscriber holding the slab back, it asks that one,
the same way.  A subscriber given no tag (a broker that does not read
the table), or that never writes it (the C client before 1.5.0, a read-only mapping), sends ACK for every slab,
as before.

**Wake targets.** A subscriber asleep on the futex word (either table's, or ``wake="futex"``) whose next chunk
needs ``need`` more samples than it has read (at position ``s``) needs at least ``k = ceil(need / frame_max)``
more frames, as long as no frame is larger than ``frame_max``.  It may sleep with ``FUTEX_WAIT_BITSET`` and the
mask ``1 << ((s + k) % 32)`` (``k`` at most 32), loading ``frame_max`` after the position (an acquire: it
covers every frame up to ``s``).  The publisher wakes with ``FUTEX_WAKE_BITSET`` and the mask ``1 << (p % 32)``
of the position ``p`` it just stored, and with every bit (``FUTEX_WAKE``) when the frame raised ``frame_max`` or
is the first of a slab; the broker's wakes (the end, an eviction) have every bit.  So a subscriber of chunks of
many frames is woken at the publish that can complete its chunk, not at every one, and none is late: until
``s + k`` no chunk of its completes, and a larger frame wakes everyone.  A ``block`` subscriber asleep toward a
later position still wakes once a slab and posts its cursor, so the slabs it holds back come back to the pool
(else a publisher short of slabs would wait for its bounded wait).  A subscriber that sleeps with
``FUTEX_WAIT`` (every bit: the C client, or ``k`` = 1) is woken by every publish; a publisher that keeps no
``frame_max`` (0) or wakes with ``FUTEX_WAKE`` loses nothing either.

A descriptor (64 bytes, every field aligned)::

    0   u64  seq     the descriptor's number (the ring position it was published at)
    8   u64  index   stream index of the frame's first sample
    16  f64  t0      time of the frame's first sample, seconds (the publisher's clock, as written)
    24  u64  offset  segment byte of the frame's first sample
    32  u64  floor   the lowest stream index readable contiguously in the frame's slab (its carried part)
    40  u32  n       samples in the frame (>= 1)
    44  u32  slab
    48  u32  gen     the slab's generation when the frame was written
    52  u32  flags   FLAG_DISCONTINUITY: the stream jumps before this frame
    56  u64  zero

**Order.** The publisher's stores go samples, descriptor, position, each a plain store; every load
of a reader goes position, descriptors, samples.  On x86-64 (TSO: stores are seen in the order
they were made, loads are made in order) that is all it takes (elsewhere, ARM64, each side adds a full
:func:`barrier`: before the position's store, after its load); the position is one aligned 8-byte
store and load (a numpy element, never ``struct``, which writes byte by byte).  A reader that copied
descriptors ``a..b`` checks that the position it loads *after* the copy is below ``a + slots``: the
publisher stores position ``a + slots`` before it starts overwriting slot ``a``, so a copy that
passed the check saw no descriptor of a later lap (Aeron's log buffer check).  A ``block``
subscriber is never lapped: it keeps every slab it has not read from being reused, and a publisher
writes at most ``notices_per_slab(nslabs)`` descriptors into one slab, so at most
``nslabs * notices_per_slab(nslabs) < slots`` descriptors lie ahead of it.
"""

from __future__ import annotations

import _thread
import ctypes
import os
import platform
import struct
import sys
import time
from typing import Any

import numpy as np

_hot: Any  # the compiled module, or None (HOT, below)
if os.environ.get("SLABCAST_PURE_PYTHON") == "1":
    _hot = None
else:
    try:
        from slabcast.core import _hot
    except ImportError:  # (installed without a C compiler)
        _hot = None
    if _hot is not None and getattr(_hot, "ABI", 0) != 8:  # (a module built from an older _hot.c: not ours)
        _hot = None

__all__ = [
    "DESCRIPTOR",
    "DESCRIPTOR_BYTES",
    "RING_SLOTS",
    "Descriptor",
    "Ring",
    "barrier",
    "copy_into",
    "futex_sleeper_byte",
    "futex_wait",
    "futex_wake",
    "ring_bytes",
    "ring_layout",
    "wake_mask",
    "wake_target",
    "wakes_futex_sleepers",
]

RING_SLOTS = 1 << 16  # descriptors per stream: more than nslabs * notices_per_slab(nslabs) for any nslabs
SLEEPERS = 256  # doorbell subscribers per stream (the broker's limit of subscribers per stream)
_NOBODY = bytes(SLEEPERS)
DESCRIPTOR_BYTES = 64
DESCRIPTOR = np.dtype(
    [("seq", "<u8"), ("index", "<u8"), ("t0", "<f8"), ("offset", "<u8"), ("floor", "<u8"),
     ("n", "<u4"), ("slab", "<u4"), ("gen", "<u4"), ("flags", "<u4"), ("zero", "<u8")]
)  # fmt: skip
_DESC = struct.Struct("<QQdQQIIII8x")
assert DESCRIPTOR.itemsize == DESCRIPTOR_BYTES == _DESC.size
_LITTLE = sys.byteorder == "little"


# One descriptor as read: (seq, index, t0, offset, floor, n, slab, gen, flags), the order of its fields.
Descriptor = tuple[int, int, float, int, int, int, int, int, int]

def rows_of(raw: bytes) -> list[Descriptor]:
    """Descriptors copied from the ring (64 bytes each), as tuples."""
    return list(_DESC.iter_unpack(raw))


# Header bytes of the ring's words (u64 at multiples of 8, u32 at multiples of 4).
SLOTS_AT, DESC_AT, RING_AT, POSITION_AT, NOTICES_AT, FUTEX_AT, FRAMES_AT, CLOSED_AT, DOORBELLS_AT, SLEEP_FUTEX_AT = \
    136, 140, 144, 152, 160, 164, 168, 172, 176, 180  # fmt: skip
ACKS_WANTED_AT, FRAME_MAX_AT, ACK_TARGET_AT, ACK_AT_AT = 184, 188, 192, 200
WAKE_ALL = 0xFFFFFFFF  # a futex bitset matching every waiter (FUTEX_BITSET_MATCH_ANY)
CURSOR_TAG_SHIFT = 48  # a cursor table entry: (tag << 48) | (cursor - start)
CURSOR_SPAN = 1 << CURSOR_TAG_SHIFT  # samples past its start a subscriber can post; beyond, it sends ACK


def ring_bytes(slots: int = RING_SLOTS) -> int:
    """Bytes of a ring of ``slots`` descriptors and its sleeper table (whole pages)."""
    return -(-slots * DESCRIPTOR_BYTES // 4096) * 4096 + 4096


def ring_layout(buf: Any) -> tuple[int, int]:
    """Where a mapped segment's ring lies, as its header says (``ring_offset``, ``ring_slots``): what a reader
    takes (protocol 7.7), checked against the segment's size.

    Raises
    ------
    ValueError
        A header whose ring is not one (slots not a power of two, descriptors not 64 bytes, an offset off a
        page, or a ring and sleeper page past the segment's end).
    """
    words = memoryview(buf).cast("B")[SLOTS_AT : RING_AT + 8]
    slots = int.from_bytes(words[0:4], "little")
    size = int.from_bytes(words[DESC_AT - SLOTS_AT : DESC_AT - SLOTS_AT + 4], "little")
    offset = int.from_bytes(words[RING_AT - SLOTS_AT : RING_AT - SLOTS_AT + 8], "little")
    end = offset + slots * DESCRIPTOR_BYTES + 4096
    if slots < 2 or slots & (slots - 1) or size != DESCRIPTOR_BYTES or offset % 4096 or end > len(buf):
        raise ValueError(f"the segment's header names no ring: expected ring_slots a power of two >= 2, "
                         f"descriptor_bytes {DESCRIPTOR_BYTES} and a page-aligned ring_offset whose ring and sleeper "
                         f"page end within the segment's {len(buf)} bytes, got {slots}, {size} and {offset}")
    return offset, slots


class Ring:
    """A mapped segment's ring: the publisher's writes, a reader's loads, the header words around them.

    Parameters
    ----------
    buf : buffer
        The whole segment (``mmap`` or ``memoryview``), writable for the publisher and the broker.
    offset : int
        Where the ring starts (``Geometry.ring_offset``).
    slots : int
        Descriptors in the ring (a power of two).
    sleepers : buffer, optional
        The sleeper table's page mapped writable, for a subscriber that maps the rest read-only
        (default: in ``buf``).
    """

    def __init__(self, buf: Any, offset: int, slots: int = RING_SLOTS, sleepers: Any = None) -> None:
        if slots & (slots - 1) or slots < 2:
            raise ValueError(f"ring slots must be a power of two >= 2, got {slots}")
        self.slots = slots
        self.mask = slots - 1
        self.offset = offset
        self.descriptors = np.frombuffer(buf, dtype=DESCRIPTOR, count=slots, offset=offset)
        whole = memoryview(buf).cast("B")
        self._bytes = whole[offset : offset + slots * DESCRIPTOR_BYTES]
        # The futex word: the position's low half, in the segment (not in a sleeper page mapped apart).
        self.futex_address = np.frombuffer(buf, dtype=np.uint8, count=256).ctypes.data + POSITION_AT
        at = offset + slots * DESCRIPTOR_BYTES
        if sleepers is not None:
            buf, at = sleepers, 0
        # The sleeper table: one byte per doorbell subscriber; then the futex sleeper table, the same bytes for one
        # asleep on the futex word instead of its notice socket.
        self.sleepers = memoryview(buf).cast("B")[at : at + SLEEPERS]
        self.futex_sleepers = memoryview(buf).cast("B")[at + SLEEPERS : at + 2 * SLEEPERS]
        # The cursor table: a u64 per subscriber, after the two byte tables.
        self.cursors = memoryview(buf).cast("B")[at + 2 * SLEEPERS : at + 2 * SLEEPERS + 8 * SLEEPERS].cast("Q")
        # The sleeper table at the publisher's previous look (kept in place: the compiled writer looks too).
        self.seen = bytearray(SLEEPERS)
        self.sleepers_address = np.frombuffer(buf, dtype=np.uint8, count=1, offset=at).ctypes.data
        # One aligned element each (memoryview.cast: a single native load or store, the cheapest from Python).
        self.q = whole[:256].cast("Q")  # the header's first 256 bytes as u64
        self.w = whole[:256].cast("I")  # ... and as u32
        whole.release()
        if not _LITTLE:
            raise OSError("the segment's words are little-endian; this host is not")

    def release(self) -> None:
        """Let go of the mapping (before it is unmapped); the ring is unusable after."""
        for view in (self._bytes, self.q, self.w, self.sleepers, self.futex_sleepers, self.cursors):
            view.release()
        del self.descriptors

    @property
    def sleepers_offset(self) -> int:
        """Where the sleeper table's page starts in the segment."""
        return self.offset + self.slots * DESCRIPTOR_BYTES

    # ------------------------------------------------------------ the broker

    def format(self) -> None:
        """Write the ring's header words (the broker, creating the segment)."""
        self.w[SLOTS_AT // 4] = self.slots
        self.w[DESC_AT // 4] = DESCRIPTOR_BYTES
        self.q[RING_AT // 8] = self.offset
        self.q[POSITION_AT // 8] = 0

    def set_counts(self, notices: int, doorbells: int, futex: int, frames: bool) -> None:
        """What the publisher must do after each publish (the broker, as subscriptions come and go)."""
        self.w[NOTICES_AT // 4] = notices
        self.w[DOORBELLS_AT // 4] = doorbells
        self.w[FUTEX_AT // 4] = futex
        self.w[FRAMES_AT // 4] = int(frames)

    def want_acks(self, wanted: bool, entry: int | None = None, at: int = 0) -> None:
        """Ask subscribers that post their cursor in the cursor table to send ACK too (the broker, while the
        publisher is short of slabs; a :func:`barrier` and a read of the table follow a set): the one at cursor
        table ``entry`` alone, or (None) every one, once its cursor is at stream index ``at`` or beyond (0: at
        once).  The target and ``at`` are stored first."""
        w = self.w
        if not wanted:  # (the flag first: nobody reads "every subscriber, any cursor" on its way down)
            w[ACKS_WANTED_AT // 4] = 0
        self.q[ACK_AT_AT // 8] = at
        w[ACK_TARGET_AT // 4] = 0 if entry is None else entry + 1
        w[ACKS_WANTED_AT // 4] = int(wanted)

    @property
    def acks_wanted(self) -> bool:
        """The broker asks for ACKs (from someone: :meth:`acks_wanted_from` says whether from a given entry)."""
        return bool(self.w[ACKS_WANTED_AT // 4])

    @property
    def ack_target(self) -> int | None:
        """The cursor table entry the broker asks ACKs of, or None: every subscriber's (while it asks)."""
        target: int = self.w[ACK_TARGET_AT // 4]
        return target - 1 if target else None

    @property
    def ack_at(self) -> int:
        """The stream index an asked subscriber's cursor must reach before it sends ACK (0: any)."""
        at: int = self.q[ACK_AT_AT // 8]
        return at

    def acks_wanted_from(self, entry: int | None, cursor: int | None = None) -> bool:
        """Whether the subscriber at cursor table ``entry`` with ``cursor`` (a stream index; None: whatever it is)
        must send ACK too (after it posted its cursor and made a :func:`barrier`): the broker asks for them, from
        every subscriber or from this entry, and from this cursor on."""
        w = self.w
        if not w[ACKS_WANTED_AT // 4]:
            return False
        target = w[ACK_TARGET_AT // 4]
        if target and entry is not None and target != entry + 1:
            return False
        return cursor is None or cursor >= self.q[ACK_AT_AT // 8]

    # ------------------------------------------------------------ the publisher

    def write(self, seq: int, index: int, t0: float, offset: int, floor: int, n: int, slab: int, gen: int,
              flags: int) -> None:  # fmt: skip
        """Write descriptor ``seq`` (not visible until :meth:`publish`: byte order within it does not matter)."""
        _DESC.pack_into(self._bytes, (seq & self.mask) * DESCRIPTOR_BYTES, seq, index, t0, offset, floor, n, slab,
                        gen, flags)  # fmt: skip

    def t0_of(self, seq: int) -> float:
        """The ``t0`` of descriptor ``seq`` as written (the writer's own, before the ring laps it)."""
        t0: float = _DESC.unpack_from(self._bytes, (seq & self.mask) * DESCRIPTOR_BYTES)[2]
        return t0

    def publish(self, position: int) -> None:
        """Make every descriptor below ``position`` visible (one aligned 8-byte store)."""
        if not TSO:
            barrier()  # a release: the samples and descriptor before the position
        self.q[POSITION_AT // 8] = position
        if not TSO:
            barrier()  # and the position before the next descriptor's stores (a reader's lap check needs it)

    def wake_futex_sleepers(self) -> None:
        """Say that this publisher wakes doorbell subscribers asleep on the futex word (the publisher, at open)."""
        self.w[SLEEP_FUTEX_AT // 4] = 1

    def close(self) -> None:
        """No descriptor follows: the position is final."""
        self.w[CLOSED_AT // 4] = 1

    @property
    def notices_wanted(self) -> int:
        count: int = self.w[NOTICES_AT // 4]
        return count

    @property
    def doorbells(self) -> int:
        count: int = self.w[DOORBELLS_AT // 4]
        return count

    def sleeping(self) -> bool:
        """Whether a doorbell subscriber went to sleep since the previous call and wants a notice (after a
        barrier: see the module's docstring)."""
        table = self.sleepers.tobytes()
        seen = self.seen
        rang = table != _NOBODY and table != seen
        seen[:] = table
        return rang

    def futex_sleeping(self, mask: int = WAKE_ALL) -> bool:
        """Whether a doorbell subscriber sleeps on the futex word (after the same barrier) that a wake with
        ``mask`` wakes: wake it, every time (a futex keeps no wake-up for later, as a queued notice does)."""
        return wakes_a_sleeper(self.futex_sleepers.tobytes(), mask)

    @property
    def futex_sleepers_woken(self) -> bool:
        """Whether the publisher wakes doorbell subscribers asleep on the futex word (it said so at open)."""
        return bool(self.w[SLEEP_FUTEX_AT // 4])

    @property
    def futex_waiters(self) -> int:
        count: int = self.w[FUTEX_AT // 4]
        return count

    @property
    def frames_wanted(self) -> bool:
        return bool(self.w[FRAMES_AT // 4])

    def set_frame_max(self, n: int) -> None:
        """The most samples in one frame so far (the publisher, before the position of the frame that raised it)."""
        self.w[FRAME_MAX_AT // 4] = n

    # ------------------------------------------------------------ readers

    @property
    def frame_max(self) -> int:
        """The most samples in one frame written so far, or 0 (load it after the position: see Wake targets)."""
        n: int = self.w[FRAME_MAX_AT // 4]
        return n

    @property
    def position(self) -> int:
        """Descriptors published so far."""
        position: int = self.q[POSITION_AT // 8]
        if not TSO:
            barrier()  # an acquire: the descriptors and samples after the position
        return position

    @property
    def closed(self) -> bool:
        return bool(self.w[CLOSED_AT // 4])

    def read_one(self, start: int) -> Descriptor | None:
        """Descriptor ``start`` when it is the only one published past ``start`` (a reader that keeps up); None
        when there are none, several (:meth:`read` takes a batch), or the publisher lapped ``start``."""
        q = self.q
        if q[POSITION_AT // 8] != start + 1:
            return None
        if not TSO:
            barrier()  # an acquire: the descriptor after the position
        descriptor: Descriptor = _DESC.unpack_from(self._bytes, (start & self.mask) * DESCRIPTOR_BYTES)
        if not TSO:
            barrier()
        if q[POSITION_AT // 8] - start >= self.slots:  # (loaded after the copy, as in read)
            return None
        return descriptor

    def read(self, start: int, stop: int) -> list[Descriptor] | None:
        """Descriptors ``start..stop`` (all published), copied, or None when the publisher lapped ``start``
        (a slot may already hold a later descriptor)."""
        raw = self.read_bytes(start, stop)
        return None if raw is None else rows_of(raw)

    def read_bytes(self, start: int, stop: int) -> bytes | None:
        """The bytes of descriptors ``start..stop``, copied, or None when the publisher lapped ``start`` (the
        broker's look: core/_hot.c ``runs``, :func:`rows_of` or a ``DESCRIPTOR`` array take them)."""
        if stop <= start:
            return b""
        if stop - start > self.slots:
            return None
        a, b = (start & self.mask) * DESCRIPTOR_BYTES, (stop & self.mask) * DESCRIPTOR_BYTES
        raw = self._bytes[a:b].tobytes() if a < b else self._bytes[a:].tobytes() + self._bytes[:b].tobytes()
        # Loaded after the copy: below start + slots, no slot copied was being overwritten.
        if not TSO:
            barrier()
        if self.q[POSITION_AT // 8] - start >= self.slots:
            return None
        return raw


# ---------------------------------------------------------------- futex (Linux)

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine())
# x86-64 keeps stores in order and loads in order (TSO): the ring needs no barrier there.  Elsewhere (ARM64
# reorders both) each side makes a full barrier where the order matters, by a system call (below).
TSO = platform.machine() in ("x86_64", "AMD64", "i686", "i386")
_BARRIER_WORD = ctypes.c_uint32(0)
_new_lock = _thread.allocate_lock  # barrier()'s on x86-64
_FUTEX_WAIT, _FUTEX_WAKE, _FUTEX_WAIT_BITSET, _FUTEX_WAKE_BITSET = 0, 1, 9, 10  # shared (not FUTEX_PRIVATE_FLAG)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc: Any = None


def _syscall() -> Any:
    global _libc
    if _libc is None:
        if _SYS_FUTEX is None:
            raise OSError(f"futex waits are not known on {platform.machine()}")
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        _libc = libc
    return _libc.syscall


def _py_futex_wait(address: int, expected: int, timeout: float, mask: int = WAKE_ALL) -> bool:
    """Sleep while the u32 at ``address`` (in a shared mapping) holds ``expected``, at most ``timeout`` seconds,
    until a :func:`futex_wake` whose mask shares a bit with ``mask`` (every wake, by default).

    The kernel compares and sleeps atomically with respect to :func:`futex_wake`, so a wake after the
    word changed is never lost.  Returns False on a timeout, True otherwise (woken, the word had
    changed, or a signal: the caller looks again either way).
    """
    if mask == WAKE_ALL:
        ts = _Timespec(int(timeout), int((timeout % 1.0) * 1e9))
        op = _FUTEX_WAIT
    else:  # (FUTEX_WAIT_BITSET's timeout is absolute, on CLOCK_MONOTONIC: time.monotonic's clock on Linux)
        until = time.monotonic() + timeout
        ts = _Timespec(int(until), int((until % 1.0) * 1e9))
        op = _FUTEX_WAIT_BITSET
    r = _syscall()(_SYS_FUTEX, ctypes.c_void_p(address), op, ctypes.c_uint32(expected & 0xFFFFFFFF),
                   ctypes.byref(ts), None, ctypes.c_uint32(mask))  # fmt: skip
    return r == 0 or ctypes.get_errno() != 110  # ETIMEDOUT


def _py_barrier() -> None:
    """A full memory barrier from Python: every store before it is visible to other cores before any load
    after it is made (the Dekker handshake of the sleeper table needs exactly that, on both sides).

    On x86-64 it is the acquire of a new lock, about 0.2 us: a lock's acquire is a
    LOCK-prefixed read-modify-write there (no other instruction lets one core exclude another), and x86
    makes no load after a locked instruction before the stores before it (Intel SDM vol. 3A, "Memory
    Ordering in P6 and More Recent Processor Families": locked instructions have a total order, and
    reads and writes are not reordered with them).  Elsewhere (ARM64, where a lock's acquire is only an
    acquire) it is ``FUTEX_WAKE`` on a private word nobody waits on, about 1 us: the kernel's
    ``futex_wake`` executes ``smp_mb()`` before it looks for waiters (kernel/futex/waitwake.c).
    """
    if TSO:
        # A new lock each time, acquired in one call: nothing shared between threads, nothing a signal
        # landing between two calls could leave held (a shared lock's acquire-then-release could), nothing a
        # fork could copy held.  Dropped while held, it is released and freed.
        _new_lock().acquire()
    else:
        _py_futex_wake(ctypes.addressof(_BARRIER_WORD))


def _py_futex_wake(address: int, mask: int = WAKE_ALL) -> int:
    """Wake every process sleeping on the u32 at ``address`` whose wait mask shares a bit with ``mask``
    (every one, by default); return how many were woken.

    The kernel's ``futex_wake`` (``FUTEX_WAKE`` and ``FUTEX_WAKE_BITSET`` alike) issues a full memory barrier
    before it looks for waiters, which is what orders the caller's earlier stores (the position) before any
    waiter's check.  ``address`` must be 4-byte aligned: on another the kernel fails with EINVAL before that
    barrier.
    """
    if mask == WAKE_ALL:
        return int(_syscall()(_SYS_FUTEX, ctypes.c_void_p(address), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0))
    return int(_syscall()(_SYS_FUTEX, ctypes.c_void_p(address), _FUTEX_WAKE_BITSET, 0x7FFFFFFF, None, None,
                          ctypes.c_uint32(mask)))  # fmt: skip


def _py_copy_into(to: Any, at: int, data: Any) -> None:
    """``data``'s bytes into the writable buffer ``to`` from byte ``at`` (C-contiguous both; ordinary stores)."""
    src = memoryview(data).cast("B")
    memoryview(to).cast("B")[at : at + len(src)] = src


# The compiled twins (core/_hot.c), when the C extension was built; SLABCAST_PURE_PYTHON=1 keeps these.  A cold
# process (a paced writer after its sleep) spends 7.7 us in a ctypes FUTEX_WAKE, under 1 in the compiled one; the
# compiled copy_into writes 64 KiB and more by streaming stores on x86-64 (the pool is colder than the caches).
HOT = _hot
if _hot is not None:
    futex_wait, futex_wake, barrier, copy_into = _hot.futex_wait, _hot.futex_wake, _hot.barrier, _hot.copy
else:
    futex_wait, futex_wake, barrier, copy_into = _py_futex_wait, _py_futex_wake, _py_barrier, _py_copy_into


SLEEPER_ANY = 1  # a futex sleeper table byte: asleep with every bit of the mask (the publisher always wakes it)
SLEEPER_BIT = 64  # ... 64 + b: asleep with the mask 1 << b only (b = 0..31; the publisher may skip other wakes)


def futex_sleeper_byte(mask: int) -> int:
    """The futex sleeper table byte of a doorbell subscriber asleep on the futex word with ``mask`` (every bit,
    or a wake target's one bit): what tells the publisher which of its wakes can wake it."""
    return SLEEPER_ANY if mask == WAKE_ALL else SLEEPER_BIT + mask.bit_length() - 1


def wakes_a_sleeper(table: bytes, mask: int) -> bool:
    """Whether a wake with ``mask`` can wake a subscriber whose byte is in the futex sleeper ``table``: any byte
    set for every bit of the mask, or ``SLEEPER_BIT + b`` with ``mask`` bit ``b`` set, or any unknown value."""
    if table == _NOBODY:
        return False
    if mask == WAKE_ALL:
        return True
    mine = SLEEPER_BIT + mask.bit_length() - 1
    return any(b and (b == mine or not SLEEPER_BIT <= b < SLEEPER_BIT + 32) for b in table)


def wakes_futex_sleepers(buf: Any) -> bool:
    """Whether the publisher of the segment mapped in ``buf`` said (``sleep_futex``) that it wakes subscribers
    asleep on the futex word with their byte in the futex sleeper table."""
    return bool(int.from_bytes(memoryview(buf)[SLEEP_FUTEX_AT : SLEEP_FUTEX_AT + 4], "little"))


def wake_mask(position: int) -> int:
    """The futex mask of position ``position``: what a publish that stored it wakes, and what a subscriber that
    needs it to complete its next chunk waits with (see Wake targets in the module's docstring)."""
    return 1 << (position & 31)


def wake_target(position: int, need: int | None, frame_max: int) -> int:
    """The futex mask a subscriber that read everything up to ``position`` waits with: that of ``position + k``,
    ``k = ceil(need / frame_max)`` frames at least before its next chunk can complete (at most 32), or every bit
    when the next publish may complete it, ``need`` is not known (None: a sampler's pause in seconds) or
    ``frame_max`` is not kept (0)."""
    if need is None or frame_max <= 0 or need <= frame_max:
        return WAKE_ALL
    return wake_mask(position + min(32, -(-need // frame_max)))
