"""The publisher: validates each frame, copies it once into a granted slab, tells the broker."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from . import _protocol as P
from ._client import Connection, error_for
from ._exceptions import BrokerGoneError, ClosedError, ProtocolError, SlabcastError, WriteTimeout
from ._shm import attach

__all__ = ["Publisher", "check_frame"]

DEFAULT_SLAB_BYTES = 4 << 20
DEFAULT_NSLABS = 8
# Notice batching: a write less than _SPORADIC seconds after the previous notice joins a
# batch (one FRAMES message) sent when it holds _BATCH frames or is _BATCH_DELAY old.
# Sporadic writers (every frame later than that) keep one immediate FRAME each: no delay.
_SPORADIC = 50e-6
_BATCH = 64
_BATCH_DELAY = 0.5e-3


def check_frame(data: Any, dtype: np.dtype[Any], channels: int, where: str) -> np.ndarray[Any, Any]:
    """Return ``data`` as a C-contiguous ``(n,)`` or ``(n, channels)`` array of ``dtype``, n >= 1.

    ``bytes``-like data is accepted for a byte stream (``uint8``, one channel).
    Nothing is cast: a frame of another dtype is refused.

    Raises
    ------
    TypeError
        Wrong type or dtype.
    ValueError
        Wrong shape, channel count, or an empty frame.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        if dtype != np.uint8 or channels != 1:
            raise TypeError(
                f"bytes are accepted only on a byte stream (dtype=uint8, channels=1); {where} carries "
                f"{dtype} x {channels}: pass a numpy array of shape (n, {channels}) and dtype {dtype}"
            )
        arr = np.frombuffer(data, dtype=np.uint8)
    elif isinstance(data, np.ndarray):
        if data.dtype != dtype:
            raise TypeError(f"frame dtype must be {dtype} for {where}, got {data.dtype} (nothing is cast)")
        arr = data
    else:
        raise TypeError(
            f"a frame must be a numpy array (or bytes on a byte stream) for {where}, got {type(data).__name__}"
        )
    shape = arr.shape
    if (arr.ndim == 1 and channels == 1) or (arr.ndim == 2 and shape[1] == channels):
        pass
    else:
        want = "(n,) or (n, 1)" if channels == 1 else f"(n, {channels})"
        raise ValueError(f"frame shape must be {want} (sample-major) for {where}, got {shape}")
    if shape[0] < 1:
        raise ValueError(f"a frame must hold at least one sample, got shape {shape} for {where}")
    return np.ascontiguousarray(arr)


class Publisher:
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
        The stream's pool: ``nslabs`` slabs of ``slab_bytes`` (a multiple of 4096).
    max_chunk_bytes : int, optional
        Largest chunk a subscriber may ask for; default half a slab.  The rest
        of each slab, ``slab_bytes - max_chunk_bytes``, bounds the frame size.
    timeout : float
        Seconds a ``write`` waits for a free slab before :class:`WriteTimeout`.
    channel_names : list of str, optional
        Defaults to ``ch_0 ... ch_{n-1}``.
    statistics : float
        Seconds of stream time over which the broker keeps rolling per-channel
        statistics (:func:`slabcast.stream_statistics`); 0 turns them off.  Kept
        for integer and float streams only.

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
        slab_bytes: int = DEFAULT_SLAB_BYTES,
        nslabs: int = DEFAULT_NSLABS,
        max_chunk_bytes: int | None = None,
        timeout: float = 10.0,
        channel_names: list[str] | None = None,
        statistics: float = 10.0,
    ) -> None:
        P.check_stream_name(stream)
        self.dtype = P.check_dtype(dtype)
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        if rate is not None and (isinstance(rate, bool) or not rate > 0):
            raise ValueError(f"rate must be a positive number of samples per second or None, got {rate!r}")
        self.name = stream
        self.channels = channels
        self.rate = float(rate) if rate is not None else None
        self.timeout = timeout
        self._where = f"stream {stream!r}"
        self._closed = False
        self._mm: Any = None
        self._conn = Connection(address, "pub", f"publisher:{stream}")
        try:
            self._conn.send(
                [
                    P.OPEN,
                    stream,
                    self.dtype.str,
                    channels,
                    self.rate,
                    slab_bytes,
                    nslabs,
                    max_chunk_bytes if max_chunk_bytes is not None else slab_bytes // 2,
                    list(channel_names) if channel_names is not None else None,
                    float(statistics),
                ]
            )
            reply = self._conn.recv(timeout)
            if reply is None:
                raise BrokerGoneError(f"no answer to OPEN from the {self._conn.where} within {timeout} s")
            if reply[0] == P.ERROR:
                raise error_for(reply, self._where)
            if reply[0] != P.OPENED:
                raise ProtocolError(f"expected OPENED, got {P.NAMES.get(reply[0], reply[0])}")
            P.need(reply, 7)  # fields appended by a later version are ignored
            _, seg, seg_bytes, header, self.slab_bytes, self.nslabs, self.reserve, self.sample_bytes = reply[:8]
            self._mm = attach(seg, seg_bytes, writable=True)
        except BaseException:
            self._conn.close()
            raise
        self.address = self._conn.address
        self.segment = seg
        self._header = header
        self._u8 = np.frombuffer(self._mm, dtype=np.uint8)
        self._grants: deque[int] = deque()
        self._carry = 0  # bytes of the old slab's tail to copy into each new slab (the broker says how many)
        self._slab_carry = 0  # what was carried into the slab being written
        self._offset = 0
        self._end = 0  # no slab yet
        self._frame_limit = self.slab_bytes - self.reserve
        self._next_check = 0.0
        self._sync_token = 0
        # One lock for the socket: the writer and the batch flusher both send on it.
        self._lock = threading.Lock()
        self._pend_offset = 0
        self._pend_n: list[int] = []
        self._pend_t: list[float] = []
        self._last_send = 0.0
        self._kick = threading.Event()
        threading.Thread(target=self._flusher, name=f"slabcast-flush-{stream}", daemon=True).start()
        self.frames = 0
        self.samples = 0

    def write(self, data: Any, t0: float | None = None, discontinuity: bool = False) -> None:
        """Append one frame to the stream.

        Parameters
        ----------
        data : numpy.ndarray or bytes
            ``(n,)`` or ``(n, channels)`` samples of the stream's dtype, n >= 1.
        t0 : float, optional
            Time of the frame's first sample; default ``time.time()``.
        discontinuity : bool
            The stream jumps before this frame (a device was swapped or
            reconnected): samples accumulated by subscribers are dropped so no
            chunk spans the jump, and each subscriber's next chunk has
            ``discontinuity`` set.

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
        arr = check_frame(data, self.dtype, self.channels, self._where)
        n = arr.shape[0]
        nbytes = n * self.sample_bytes
        if nbytes > self._frame_limit:
            raise ValueError(
                f"a frame of {n} samples ({nbytes} bytes) is larger than {self._where} allows "
                f"({self._frame_limit} bytes: slab_bytes - max_chunk_bytes); split it or use larger slabs"
            )
        if t0 is None:
            t0 = time.time()
        now = time.monotonic()
        if now >= self._next_check:  # errors and the broker's death are noticed within 50 ms
            self._next_check = now + 0.05
            self._take_messages(0)
            if self._conn.poll_gone():
                raise BrokerGoneError(f"the {self._conn.where} went away ({self._where})")
        offset = self._offset
        if offset + nbytes > self._end:
            offset = self._next_slab()
        self._u8[offset : offset + nbytes] = arr.reshape(-1).view(np.uint8)
        with self._lock:
            if discontinuity:
                self._flush_pending()
                self._conn.send([P.FRAME, offset, n, float(t0), P.FLAG_DISCONTINUITY, self._slab_carry])
                self._last_send = now
            elif not self._pend_n and now - self._last_send >= _SPORADIC:
                self._conn.send([P.FRAME, offset, n, float(t0), 0, self._slab_carry])
                self._last_send = now
            else:
                if not self._pend_n:
                    self._pend_offset = offset
                    self._kick.set()  # the flusher sends this batch if no write fills it
                self._pend_n.append(n)
                self._pend_t.append(float(t0))
                if len(self._pend_n) >= _BATCH:
                    self._flush_pending()
        self._offset = offset + nbytes
        self.frames += 1
        self.samples += n

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the broker has handled every frame written so far.

        ``write`` returns once the frame is in shared memory and its notice is
        queued; a process killed right after may lose notices still queued in its
        socket.  After ``flush`` they are with the broker.

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
            self._conn.send([P.SYNC, self._sync_token])
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while (left := deadline - time.monotonic()) > 0:
            with self._lock:
                msg = self._conn.recv(left)
            if msg is None:
                break
            if msg[0] == P.SYNCED and msg[1] == self._sync_token:
                return
            if msg[0] == P.GRANT:
                self._grants.append(msg[1])
            elif msg[0] == P.CARRY:
                self._carry = min(int(msg[1]), self.reserve)
            elif msg[0] in (P.ERROR, P.END):
                raise error_for(msg, self._where)
        raise WriteTimeout(f"the broker did not confirm the frames of {self._where} in time")

    def _flush_pending(self) -> None:
        """Send the batched frame notices (caller holds the lock)."""
        if self._pend_n:
            if len(self._pend_n) == 1:
                self._conn.send([P.FRAME, self._pend_offset, self._pend_n[0], self._pend_t[0], 0, self._slab_carry])
            else:
                self._conn.send([P.FRAMES, self._pend_offset, self._pend_n, self._pend_t, self._slab_carry])
            self._pend_n = []
            self._pend_t = []
            self._last_send = time.monotonic()

    def _flusher(self) -> None:
        # Sends a batch that no later write filled, at most _BATCH_DELAY after it began.
        while not self._closed:
            self._kick.wait()
            if self._closed:
                return
            time.sleep(_BATCH_DELAY)
            with self._lock:
                self._kick.clear()
                if self._closed or self._conn.closed:
                    return
                with contextlib.suppress(SlabcastError):
                    self._flush_pending()

    def _next_slab(self) -> int:
        with self._lock:
            self._flush_pending()  # subscribers may wait for these before they free a slab
        self._take_messages(0)
        if not self._grants:
            deadline = time.monotonic() + self.timeout
            while not self._grants:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WriteTimeout(
                        f"no free slab for {self._where} within {self.timeout} s: a policy='block' subscriber "
                        "holds them; nothing of this frame was written"
                    )
                self._take_messages(left)
        slab = self._grants.popleft()
        start = self._header + slab * self.slab_bytes
        data = start + self.reserve
        # Copy the tail subscribers may still be accumulating just before the new slab's data,
        # so that every chunk lies contiguously in the slab of the frame that completes it.
        carry = self._carry if self._end else 0
        if carry:
            u8 = self._u8
            u8[data - carry : data] = u8[self._offset - carry : self._offset]
        self._slab_carry = carry
        self._end = start + self.slab_bytes
        return int(data)

    def _take_messages(self, timeout: float) -> None:
        with self._lock:
            msg = self._conn.recv(timeout)
            while msg is not None:
                if msg[0] == P.GRANT:
                    self._grants.append(msg[1])
                elif msg[0] == P.CARRY:
                    self._carry = min(int(msg[1]), self.reserve)
                elif msg[0] in (P.ERROR, P.END):
                    raise error_for(msg, self._where)
                msg = self._conn.recv(0)

    def close(self) -> None:
        """End the stream: subscribers get their remaining complete chunks, then the end (idempotent)."""
        if self._closed:
            return
        with self._lock, contextlib.suppress(SlabcastError):
            self._flush_pending()
        self._closed = True
        self._kick.set()  # let the flusher thread end
        with self._lock, contextlib.suppress(SlabcastError):
            if not self._conn.gone:
                # CLOSE is answered by END once every frame sent before it was handled.
                self._conn.send([P.CLOSE])
                deadline = time.monotonic() + self.timeout
                while (left := deadline - time.monotonic()) > 0:
                    msg = self._conn.recv(left)
                    if msg is None or msg[0] in (P.END, P.ERROR):
                        break
        with self._lock:
            self._conn.close()
        self._u8 = None  # type: ignore[assignment]
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
