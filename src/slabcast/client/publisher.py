"""The publisher: validates each frame, copies it once into a granted slab, describes it in the ring.

Each write copies the frame, writes its descriptor and stores the ring's position
(core/ring.py): subscribers and the broker read the ring.  Messages go only to
whom must hear now: a FUTEX_WAKE for futex subscribers, a NOTICE on the notice
socket (a ZeroMQ XPUB) when a doorbell subscriber sleeps or a version-2 one cuts
from notices, a PUBLISHED to the broker when the publisher starts a slab.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import threading
import time
import weakref
from typing import Any

import numpy as np
import zmq

from .._exceptions import BrokerGoneError, ClosedError, SlabcastError, WriteTimeout
from .._info import StreamInfo
from ..client.connection import FORKS, Connection, error_for, limit_error, unexpected
from ..core.geometry import Geometry
from ..core.ring import HOT, Ring, copy_into, futex_wake
from ..core.shm import PUBLISHER_BYTE, attach, hold, open_locks, populate
from ..wire import messages as M
from ..wire import protocol as P
from ._flusher import Kick, run_flusher
from ._notices import NoticeSocket
from ._pubargs import (
    _BYTES_LIKE,
    DEFAULT_NSLABS,
    _element_format,
    check_frame,
    check_times,
    open_args,
)
from ._pubslabs import SLICE, SlabSwitching
from ._pubstate import PublisherState
from ._telling import Telling

__all__ = ["Publisher"]

_W_NOTICES_FUTEX, _W_FRAMES, _W_DOORBELLS = 160 // 8, 168 // 8, 176 // 8  # u64 words of the ring's header
_RING_NOW = 1 << 32  # the compiled put's result: a doorbell notice is due (core/_hot.c)
_FULL = 1 << 33  # ... or: the frame does not fit before the slab's end, nothing written


log = logging.getLogger(__name__)


class Publisher(SlabSwitching, Telling):
    """Write frames into a stream that any number of subscribers read.

    Parameters
    ----------
    stream : str
        Stream name (1-64 characters from ``A-Z a-z 0-9 _ . : -``).
    dtype : dtype-like
        Sample type; ``"uint8"`` with one channel makes a byte stream that
        accepts ``bytes``.
    channels : int
        Samples per time step.
    rate : float, optional
        Samples per second; enables ``seconds=`` for subscribers and exact ``t0``.
    address : str, optional
        Broker address (default: ``$SLABCAST_ADDRESS`` or the per-user default).
    slab_bytes, nslabs : int
        The stream's pool: ``nslabs`` slabs of ``slab_bytes`` (a multiple of 4096,
        up to 2**30; default 4 MiB).
        Each slab is a carried part (the tail of the slab before, so that every
        chunk is contiguous) followed by room for frames.
    max_chunk_bytes : int, optional
        Largest chunk a subscriber may ask for: the carried part of each slab,
        whose memory the broker allocates only as subscribers ask for longer
        chunks (at first as much as the frames' room).  Given, the slabs are
        ``slab_bytes`` (default: twice ``max_chunk_bytes``, at least 4 MiB) and
        frames may be up to ``slab_bytes - max_chunk_bytes``.  Each slab change
        copies up to ``max_chunk_bytes`` into the next slab: for chunks of a MiB
        and more, give ``slab_bytes`` several times that (docs/up.md, Sizing).
        By default frames may be up to ``slab_bytes // 2`` and chunks grow to
        64 MiB (or ``slab_bytes // 2`` if more): the slabs are then that much
        longer (``self.slab_bytes``), in address space, with ``slab_bytes`` of
        each in memory until a subscriber asks for longer chunks.
    history : float, optional
        Seconds of the stream the pool should hold for subscribers that start back
        in it (``Subscriber(history=)``, ``slabcast record --pre-buffer``): raises
        ``nslabs`` to hold that much behind the slab being written (needs a rate to
        know how much; a stream without one keeps what ``nslabs`` slabs hold, said in
        the log).  Finite and > 0.
    timeout : float
        Seconds a ``write`` waits for a free slab before :class:`WriteTimeout` (finite, > 0),
        and the open waits for the broker.
    channel_names : list of str, optional
        Defaults to ``ch_0 ... ch_{n-1}``.
    channel_types, channel_units : list of str, optional
        Per channel (``"EMG"``, ``"microvolts"``), for subscribers, recordings and LSL outlets.
    source_id : str, optional
        A unique id of the data's origin (a device serial), as LSL uses it.
    timestamps : bool
        Keep a time per sample (``write(..., times=)``; subscribers read them as
        ``chunk.times``, in place).  Costs 8 bytes of shared memory per sample slot.
    statistics : float
        Seconds of stream time over which the broker keeps rolling per-channel
        statistics (:func:`slabcast.stream_statistics`); 0 turns them off.  Kept
        for integer and float streams only.

    Attributes
    ----------
    frames, samples : int
        Written so far.
    held_back_since : float or None
        ``time.monotonic()`` when the ``write`` in progress began to wait for a free slab (a
        ``policy="block"`` subscriber is behind); None while no write waits.

    Raises
    ------
    StreamExistsError
        If the stream already has a publisher.
    ShmFullError
        If ``/dev/shm`` has no room for the pool.
    BrokerGoneError
        If no broker answers at ``address``.
    """

    def __init__(
        self,
        stream: str,
        dtype: Any = "float32",
        channels: int = 1,
        rate: float | None = None,
        *,
        address: str | None = None,
        slab_bytes: int | None = None,
        nslabs: int = DEFAULT_NSLABS,
        max_chunk_bytes: int | None = None,
        timeout: float = 10.0,
        channel_names: list[str] | None = None,
        statistics: float = 10.0,
        channel_types: list[str] | None = None,
        channel_units: list[str] | None = None,
        source_id: str | None = None,
        timestamps: bool = False,
        history: float | None = None,
    ) -> None:
        P.check_stream_name(stream)
        self.dtype, channels, rate, layout, carried, nslabs = open_args(
            stream, dtype, channels, rate, slab_bytes, max_chunk_bytes, nslabs, history, timeout)  # fmt: skip
        self.name = stream
        self._pid = os.getpid()
        self._forks = FORKS[0]
        self.channels = channels
        self.rate = rate
        self.timeout = float(timeout)
        self._where = f"stream {stream!r}"
        self._closed = False
        self._mm: Any = None
        self._conn = Connection(address, "pub", f"publisher:{stream}")
        try:
            try:
                self._kick = Kick()  # (the background thread's: one descriptor more)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    raise limit_error(f"a publisher of {self._where}") from exc
                raise
            meta = StreamInfo.check_metadata(
                {"channel_types": channel_types, "channel_units": channel_units, "source_id": source_id,
                 "timestamps": bool(timestamps)},
                channels,
            )  # fmt: skip
            names = tuple(channel_names) if channel_names is not None else None
            self._conn.send(M.Open(stream, self.dtype.str, channels, self.rate, layout, nslabs, carried, names,
                                   float(statistics), meta))  # fmt: skip
            reply = self._conn.recv(timeout)
            if reply is None:
                raise BrokerGoneError(f"no answer to OPEN from the {self._conn.where} within {timeout} s")
            if isinstance(reply, M.Error):
                raise error_for(reply, self._where)
            if not isinstance(reply, M.Opened):
                raise unexpected(reply, "OPENED", self._where)
            seg, header, self.reserve = reply.segment, reply.header_bytes, reply.reserve
            self.slab_bytes, self.nslabs, self.sample_bytes = reply.slab_bytes, reply.nslabs, reply.sample_bytes
            endpoint, self._sid, carry, tokens = reply.notice_endpoint, reply.stream_id, reply.carry, reply.tokens
            self._mm = attach(seg, reply.segment_bytes, writable=True)
            # "This stream's publisher is alive", as the broker tells it in any PID namespace.
            self._live_fd = open_locks(seg)
            hold(self._live_fd, PUBLISHER_BYTE)
            self._notices = NoticeSocket(endpoint, tokens, timeout, self._conn.address, P.stream_topic(stream))
        except BaseException:
            with contextlib.suppress(OSError, AttributeError):
                os.close(self._live_fd)
            if self._mm is not None:
                with contextlib.suppress(BufferError):
                    self._mm.close()
            self._conn.close()
            raise
        self._notice_path = endpoint[len("ipc://") :]
        self.address = self._conn.address
        self.segment = seg
        self._header = header
        self._u8 = np.frombuffer(self._mm, dtype=np.uint8)
        self.timestamps = bool(timestamps)
        self._geometry = Geometry(self.nslabs, self.slab_bytes, self.sample_bytes, self.reserve, self.timestamps)
        geometry = self._geometry
        self._bounds = [(geometry.slab_start(s), geometry.data_start(s)) for s in range(self.nslabs)]  # (start, data)
        # No page fault per page on the first lap of the pool (core/shm.py): the frame areas now, each carried part
        # as far as the broker committed it when the slab is granted (_on_grant).
        populate(self._mm, self._geometry.data_ranges())
        self._populated = [0] * self.nslabs  # bytes of each slab's carried part populated
        # Where every frame is described, in order: readers need nothing else (core/ring.py).
        self._ring = Ring(self._mm, self._geometry.ring_offset)
        self._ring.wake_futex_sleepers()  # (our write wakes a doorbell subscriber asleep on the futex word)
        self._position = 0  # descriptors published
        self._frame_max = 0  # the most samples in one frame so far (the ring's frame_max)
        self._prep_asked = False  # the background thread was asked to prepare the next slab change
        self._prepared: tuple[int, int, int, int, int] | None = None  # (slab, offset, carry asked, gen, carried)
        # Grants, the carry, the write position and the batch: the rules, with no socket (see _pubstate).
        self._state = PublisherState(self.reserve, carry, P.notices_per_slab(self.nslabs), self.sample_bytes)
        self._slab = -1
        self._gen = 0
        self._floor = 0  # lowest stream index readable contiguously in the current slab
        self._nseq = 0  # notices published
        self._failure: BaseException | None = None  # an error the background thread met, raised by write
        self._frame_limit = self._geometry.frame_bytes
        self._room_rule = "slab_bytes - max_chunk_bytes" if max_chunk_bytes is not None else \
            "half of slab_bytes when max_chunk_bytes is not given"  # fmt: skip
        # The compiled frame path (core/_hot.c), when built; a stream with per-sample times keeps the Python one.
        self._takes_bytes = self.dtype == np.uint8 and self.channels == 1  # (bytes-like frames: check_frame)
        self._writer = None if HOT is None or self.timestamps else HOT.Writer(
            self._mm, self._geometry.ring_offset, self._ring.slots, self._ring.seen, _element_format(self.dtype),
            self.dtype.itemsize, self.channels, self._frame_limit)  # fmt: skip
        self._sync_token = 0
        self._synced = 0  # the highest SYNC token the broker answered
        # One lock for the socket: the writer and the batch flusher both send on it.
        self._lock = threading.Lock()
        # The thread holds only a weak reference: a Publisher dropped without close() is still collected
        # (its __del__ closes the stream).
        self._flusher = threading.Thread(target=run_flusher, daemon=True, name=f"slabcast-flush-{stream}",
                                         args=(weakref.ref(self), self._kick, (*self._conn.fds(), self._notices.fd)))
        self._flusher.start()
        self.frames = 0
        self.samples = 0
        self.held_back_since: float | None = None  # (SlabSwitching._next_slab: a write waits for a slab)

    @property
    def max_frame(self) -> int:
        """The most samples one :meth:`write` takes (``slab_bytes`` minus the carried part, in samples)."""
        return int(self._frame_limit // self.sample_bytes)

    def write(self, data: Any, t0: float | None = None, discontinuity: bool = False, times: Any = None) -> None:
        """Append one frame to the stream.

        Parameters
        ----------
        data : numpy.ndarray or bytes
            ``(n,)`` or ``(n, channels)`` samples of the stream's dtype, n >= 1.
        t0 : float, optional
            Time of the frame's first sample in seconds (any clock the stream agrees on; finite);
            default ``time.time()`` (wall clock, which NTP or an operator may step).
        discontinuity : bool
            The stream jumps before this frame (a device was swapped or
            reconnected): samples accumulated by subscribers are dropped so no
            chunk spans the jump, and each subscriber's next chunk has
            ``discontinuity`` set.
        times : array-like, optional
            ``(n,)`` seconds, one per sample, for a stream opened with
            ``timestamps=True`` (default: ``t0 + k / rate``); ``t0`` defaults to ``times[0]``.

        Raises
        ------
        TypeError, ValueError
            If the frame does not match the stream; nothing of it is written.
        WriteTimeout
            If no slab came free within ``timeout`` (a ``policy="block"``
            subscriber is behind); nothing of it is written.
        BrokerGoneError
            If the broker is gone.
        """
        if self._closed:
            raise ClosedError(f"publisher of {self._where} is closed")
        if FORKS[0] != self._forks:
            raise ClosedError(
                f"the publisher of {self._where} was created in process {self._pid}; its ZeroMQ sockets do not "
                "survive fork(): create the Publisher in the process that writes"
            )
        if discontinuity is not False and discontinuity is not True and type(discontinuity) is not np.bool_:
            raise TypeError(f"discontinuity must be True or False, got {discontinuity!r} ({self._where}); nothing "
                            f"was written")  # fmt: skip  (a string, "no", set the flag)
        writer = self._writer
        state = self._state
        if writer is not None and times is None and not (state.fresh or state.pend_n) and (
                type(data) is np.ndarray or (self._takes_bytes and type(data) in _BYTES_LIKE)):  # fmt: skip
            # The compiled path (core/_hot.c): the same steps as below in one call, which in a cold process
            # (a paced writer after its sleep) cost 3 us against 13.  It declines (0) whatever is not plain
            # (a frame to check, a t0 to refuse): the Python steps below take it then.  A plain frame that does
            # not fit (FULL) starts the next slab here, and goes in as its first frame.
            if self._failure is not None:
                raise self._failure
            offset = state.offset
            position = self._position
            index = self.samples
            flags = P.FLAG_DISCONTINUITY if discontinuity else 0
            first = False
            end = state.end if state.slab_frames < state.frame_cap else 0
            if self._prepared is None:
                n = writer.put(data, t0, flags, offset, end, position, index, self._floor, self._slab, self._gen,
                               self._frame_max, False)  # fmt: skip
            else:  # (the background thread prepared the next slab: a frame that does not fit goes there at once)
                n, switched = self._put_prepared(data, t0, flags, offset, end, position, index)
                if switched:
                    offset = state.slab_data
                    first = state.fresh  # (False: told to the broker already, with the change before it)
            if n == _FULL:
                if t0 is None:
                    t0 = time.time()  # (stamped when write was called, as below: the slab change may wait)
                offset = self._next_slab()  # (WriteTimeout if no slab came free: nothing written)
                first = state.fresh  # (a slab change; the stream's first slab is none)
                n = writer.put(data, t0, flags, offset, state.end, position, index, self._floor, self._slab,
                               self._gen, self._frame_max, first)  # fmt: skip
                if n == _FULL:  # (a frame within frame_limit fits an empty slab: this is a bug, said as one)
                    raise RuntimeError(f"a frame of {len(data)} samples did not fit a new slab of {self._where}")
            if n:
                told = n > 0  # (else the frame is published and the tell part is ours)
                n = n if told else -n
                ring_now = n > _RING_NOW  # (and a doorbell subscriber sleeps: its notice is ours to send)
                if ring_now:
                    n -= _RING_NOW
                nbytes = n * self.sample_bytes
                state.offset = offset + nbytes
                state.slab_frames += 1
                self._position = position + 1
                self.frames += 1
                self.samples = index + n
                grew = n > self._frame_max
                if grew:
                    self._frame_max = n
                if first:
                    state.first_frame(time.monotonic())  # (its slab change is due to the broker from now on)
                if not told:
                    self._tell(index, offset, n, nbytes, self._ring.t0_of(position), flags, grew, first, position + 1)
                elif ring_now:  # (the wakes and the doorbell look were put's)
                    self._tell_rest(index, offset, n, self._ring.t0_of(position), flags, ring_now, first)
                elif state.switch_unsent and (first or state.switch_due(time.monotonic())):
                    self._tell_switch(first)
                if state.end - offset < 2 * nbytes and not self._prep_asked:
                    self._prep_asked = True
                    self._kick()
                return
        arr = check_frame(data, self.dtype, self.channels, self._where)
        n = arr.shape[0]
        nbytes = n * self.sample_bytes
        if nbytes > self._frame_limit:
            raise ValueError(
                f"a frame of {n} samples ({nbytes} bytes) is larger than {self._where} allows "
                f"({self._frame_limit} bytes: a slab's room for frames, {self._room_rule}); split it, or give "
                f"the Publisher a larger slab_bytes (docs/up.md, Sizing); nothing was written"
            )
        stamps = None
        if times is not None or self.timestamps:
            stamps = check_times(times, n, t0, self.rate, self.timestamps, self._where)
            if t0 is None:
                t0 = float(stamps[0])
        if t0 is None:
            t0 = time.time()
        elif isinstance(t0, bool) or not isinstance(t0, int | float | np.integer | np.floating) \
                or not math.isfinite(t0):  # fmt: skip
            raise ValueError(f"t0 must be a finite number of seconds, got {t0!r} ({self._where}); nothing was written")
        if self._failure is not None:
            # The background thread takes the broker's messages and sees its death as they come, off the
            # frame's path (looking here every 50 ms cost 2% of a paced writer's frames 150-200 us: its p99).
            raise self._failure
        offset = state.offset
        if offset + nbytes > state.end or state.slab_frames >= state.frame_cap:  # (state.needs_slab, inlined)
            offset = self._next_slab()
        copy_into(self._u8, offset, arr)  # the frame's one copy, as the compiled put makes it
        if stamps is not None:
            at = self._geometry.time_at(offset)
            self._u8[at : at + 8 * n] = stamps.view(np.uint8)
        t0 = float(t0)
        index = self.samples
        ring = self._ring
        position = self._position
        flags = P.FLAG_DISCONTINUITY if discontinuity else 0
        ring.write(position, index, t0, offset, self._floor, n, self._slab, self._gen, flags)
        grew = n > self._frame_max
        if grew:  # (before the position: a subscriber's wake target counts frames of at most frame_max)
            self._frame_max = n
            ring.set_frame_max(n)
        self._position = position = position + 1
        ring.publish(position)  # samples, descriptor, then position: the order readers load them in
        first = state.fresh
        if first:
            state.first_frame(time.monotonic())  # (its slab change is due to the broker from now on)
        state.slab_frames += 1  # (descriptors per slab are bounded: a block subscriber is never lapped)
        # The header words the broker keeps, two to a load: (notices_wanted, futex_waiters), (frames_wanted,
        # closed), (doorbells, sleep_futex).
        words = ring.q
        if not (words[_W_NOTICES_FUTEX] or words[_W_FRAMES] & 0xFFFFFFFF or words[_W_DOORBELLS] & 0xFFFFFFFF
                or state.pend_n or state.switch_unsent):  # fmt: skip
            state.offset = offset + nbytes  # the common case: nobody to tell
            self.frames += 1
            self.samples += n
            if state.end - offset < 2 * nbytes and not self._prep_asked:  # (as at the end; here no wake to wait for)
                self._prep_asked = True
                self._kick()
            return
        self._tell(index, offset, n, nbytes, t0, flags, grew, first, position)
        self.frames += 1
        self.samples += n
        if state.end - offset < 2 * nbytes and not self._prep_asked:
            # Another frame of this size will not fit: the background thread copies the carry into the next slab
            # meanwhile (_prepare_switch), after this frame's wake.
            self._prep_asked = True
            self._kick()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the broker has read every frame written so far.

        ``write`` returns once the frame is in shared memory and described in the
        ring, where subscribers read it; the broker reads the ring lazily (its head,
        statistics and history).  After ``flush`` it has read them.

        Raises
        ------
        WriteTimeout
            If the broker did not answer within ``timeout`` (default: the
            publisher's ``timeout``).
        """
        if self._closed:
            raise ClosedError(f"publisher of {self._where} is closed")
        self._sync_token += 1
        with self._lock:
            self._flush_pending()
            self._published()
            self._conn.send(M.Sync(self._sync_token))
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        token = self._sync_token
        # The background thread may take the answer off the socket too: both go through _take_locked,
        # which notes it; wait in short slices so either way it is seen at once.
        while self._synced < token and (left := deadline - time.monotonic()) > 0:
            with self._lock:
                self._take_locked(min(left, SLICE))
        if self._synced >= token:
            return
        raise WriteTimeout(f"the broker did not confirm the frames of {self._where} in time")

    def close(self) -> None:
        """End the stream: subscribers get their remaining complete chunks, then the end (idempotent)."""
        self._end(None)

    def abort(self, reason: str) -> None:
        """End the stream as failed (what feeds it broke): subscribers get everything written, then
        :class:`PublisherGoneError` with ``reason``, never a clean end; a no-op once closed."""
        self._end(reason)

    def _end(self, failure: str | None) -> None:
        if self._closed:
            return
        if os.getpid() != self._pid:  # inherited through fork(): the parent's to close, not ours
            self._closed = True
            return
        # The ring says it first (whatever becomes of the messages below): no descriptor follows.
        self._ring.close()
        futex_wake(self._ring.futex_address)
        with self._lock, contextlib.suppress(SlabcastError, zmq.ZMQError):
            self._flush_pending()
            if self._conn.poll_gone():
                raise BrokerGoneError("no stream to close: the broker is gone")  # suppressed just above
            # In order after the last notice: subscribers end once they have read everything.
            code, text = (P.END_CLOSED, f"stream {self.name!r} closed") if failure is None \
                else (P.END_PUBLISHER_GONE, failure)  # fmt: skip
            end = M.NoticeEnd(self._sid, self._nseq, code, text, self.samples)
            self._notices.send_end(end)
            self._nseq += 1
        self._closed = True
        self._kick()  # let the flusher thread end
        with self._lock, contextlib.suppress(SlabcastError):
            if not self._conn.gone and not isinstance(self._failure, BrokerGoneError):  # (a dead one answers none)
                # CLOSE is answered by END once every frame sent before it was handled; BYE without it (a failure)
                # ends the stream as publisher-gone (docs/protocol.md section 4).
                self._conn.send(M.Close() if failure is None else M.Bye())
                deadline = time.monotonic() + self.timeout
                while (left := deadline - time.monotonic()) > 0:
                    msg = self._conn.recv(left)
                    if msg is None or isinstance(msg, M.End | M.Error):
                        break
        with self._lock:
            self._conn.close()
            self._notices.close()
        with contextlib.suppress(OSError):
            os.unlink(self._notice_path)
        with contextlib.suppress(OSError):
            os.close(self._live_fd)
        self._u8 = None  # type: ignore[assignment]
        if self._writer is not None:
            self._writer.close()
        with self._lock:  # (the background thread, if it still runs, looks at the ring only under it)
            self._ring.release()
        if self._mm is not None:
            with contextlib.suppress(BufferError):
                self._mm.close()
            self._mm = None

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.frames} frames"
        return f"<Publisher {self.name!r} {self.dtype} x {self.channels} @ {self.rate} Hz, {state}>"
