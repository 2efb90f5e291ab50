"""BufferEmit: cut a stream of frames into chunks and run a callback on each, serially, in threads or in processes."""

from __future__ import annotations

import math
import multiprocessing as mp
import pickle
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .._exceptions import ClosedError, WorkerDiedError
from ..core.rechunk import Rechunker, check_sampler, check_size, is_real
from .base import Callbacks, Pool, Slab, abandon, round_up
from .frames import FrameFormat
from .processes import ProcessPool
from .threads import ThreadPool

__all__ = ["BufferEmit", "WorkerDiedError"]

_MODES = ("serial", "thread", "process")
# A buffer holds at least this many bytes and room for four chunks plus a frame, so the
# pending tail is moved (or a buffer switched) at most once every few chunks.
_SERIAL_MIN = 64 << 10
_SLAB_MIN = 1 << 20
_now = time.time


class BufferEmit:
    """Collect frames of any size and call ``callback(value, t0)`` each time ``size`` samples have come.

    A drop-in for ``ocycle.BufferEmit``, cutting its chunks with the same rules as
    the broker's subscribers (:class:`slabcast.core.rechunk.Rechunker`).

    Parameters
    ----------
    callback : callable
        ``callback(value, t0)``; its return value goes to ``on_done``.  With
        ``mode="process"`` it must be picklable and importable in a spawned
        process (a function defined at module level), as with ocycle.
    size : int
        Chunk size in samples (bytes for a byte stream, rows for numpy frames).
    clip : bool
        ``False``: a chunk is emitted once at least ``size`` samples have come
        and holds whole frames.  ``True``: every chunk has exactly ``size``
        samples; the remainder starts the next chunk (it is dropped instead
        when a sampler is set).
    sampler : float or callable, optional
        After each chunk, skip the frames whose ``t0`` is less than that of the
        frame that completed the chunk plus ``sampler`` (or ``sampler()``)
        seconds.  ``0`` or ``None`` means no sampler, as in ocycle.
    asbuffer : bool
        Pass the chunk as an :class:`io.BytesIO` (positioned at 0) instead of
        :class:`bytes`.  Byte streams only.
    mode : {"serial", "thread", "process"}
        Run the callback in the writer's thread, in a pool of threads, or in a
        pool of spawned worker processes that read the chunks from shared memory.
    npool : int
        Maximum number of worker threads or processes, started as needed.
    on_done : callable, optional
        ``on_done(result)`` with each callback's return value, in this process:
        in the writer's thread (serial), the worker thread (thread), or a
        collector thread of this process (process).
    on_error : callable, optional
        ``on_error(exc)`` with each exception a callback (or ``on_done``) raised
        and each :class:`WorkerDiedError`, in the same thread as ``on_done``.
        Without it, the exception is raised from the next :meth:`write` or
        from :meth:`close` (several at once as an :class:`ExceptionGroup`).

    Raises
    ------
    TypeError
        An argument of the wrong type (a callback that is not callable, or not
        picklable with ``mode="process"``; a sampler that is neither number nor
        callable).
    ValueError
        An argument out of range (``size`` or ``npool`` < 1, an unknown mode, a
        negative sampler).

    Notes
    -----
    Frames are ``bytes``-like (chunks are then ``bytes``) or numpy arrays of shape
    ``(n,)`` or ``(n, channels)``, sample-major (chunks are then arrays of the same
    dtype and channel count as the first frame).  Values handed to a callback in
    serial and thread mode are copies it may keep.  In process mode a numpy value
    is a read-only view of shared memory, valid while the callback runs (copy it to
    keep it); a bytes value is a copy.

    Chunk buffers are recycled.  The stream is copied once, into a buffer; a chunk
    is cut from it where it lies.  In thread and process mode a buffer holding a
    chunk returns to the pool when the callback is done with it; the writer takes
    another buffer meanwhile, waiting only when ``2 * npool + 2`` are all in use
    (a buffer holds many chunks: this bounds memory, not the chunks queued for the
    callbacks, which may be hundreds when each is short).

    Differences from ocycle 0.1.0, which cuts the same values:

    - ``t0`` is always the time of the frame holding the chunk's first sample.
      ocycle passes the time of its first write for the first chunk, then that of
      the frame that completed the previous chunk (right only when a clipped
      remainder starts the chunk; with ``clip=True`` and no sampler it may be older).
    - ``t0=0`` is a time, not "now"; a non-finite ``t0`` is refused.
    - ``size`` counts samples: rows of a numpy frame, whose chunks are arrays
      (ocycle counted a numpy frame's bytes and passed ``bytes``); bytes frames
      count bytes, as in ocycle.
    - Errors are never lost (see ``on_error``); a worker process that dies is
      reported as :class:`WorkerDiedError` and replaced.
    - Process workers are spawned, not forked (a script must guard its top-level
      code with ``if __name__ == "__main__":``, or its workers fail saying so); they
      read chunks from shared memory instead of receiving pickled copies.  ``on_done`` results come in the order
      callbacks finish, as in ocycle.
    - When every buffer is in use, :meth:`write` waits for one (ocycle queues
      without bound).
    - ``with BufferEmit(...) as emit`` binds the emitter (ocycle binds None).

    Examples
    --------
    >>> chunks = []
    >>> with slabcast.BufferEmit(lambda value, t0: chunks.append(value), 6) as emit:
    ...     for frame in (b"abcd", b"efgh", b"ijkl"):
    ...         emit.write(frame, t0=1.0)
    >>> chunks
    [b'abcdefgh']
    """

    def __init__(
        self,
        callback: Callable[[Any, float], Any],
        size: int,
        *,
        clip: bool = False,
        sampler: float | Callable[[], float] | None = None,
        asbuffer: bool = False,
        mode: str = "serial",
        npool: int = 10,
        on_done: Callable[[Any], Any] | None = None,
        on_error: Callable[[BaseException], Any] | None = None,
    ) -> None:
        if not callable(callback):
            raise TypeError(f"callback must be a callable taking (value, t0), got {callback!r}")
        size = check_size(size)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of 'serial', 'thread', 'process', got {mode!r}")
        if isinstance(npool, bool) or not isinstance(npool, int):
            raise TypeError(f"npool must be a positive integer number of workers, got {npool!r}")
        if npool < 1:
            raise ValueError(f"npool must be a positive integer number of workers, got {npool!r}")
        for name, fn in (("on_done", on_done), ("on_error", on_error)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be a callable or None, got {fn!r}")
        chunker = Rechunker(size, clip, None, check_sampler(sampler))
        if mode == "process":
            if getattr(mp.current_process(), "_inheriting", False):
                # A worker re-running an unguarded main script while it starts (spawn imports the main module to
                # find the callback): said here, so that the worker dies and its parent says why, instead of this
                # copy cutting chunks for workers of its own while the parent waits for ever.
                raise RuntimeError(
                    "BufferEmit(mode='process') made while a spawned process imports its main module: guard the "
                    "script's top-level code with `if __name__ == '__main__':` (worker processes are spawned, not "
                    "forked, and import the main module to find the callback)"
                )
            try:
                pickle.dumps(callback)
            except Exception as exc:
                raise TypeError(
                    f"mode='process' needs a picklable callback (a function defined at module level), "
                    f"got {callback!r}: {exc}"
                ) from exc
        self.callback = callback
        self.size = size
        self.clip = bool(clip)
        self.sampler = sampler
        self.asbuffer = bool(asbuffer)
        self.mode = mode
        self.npool = npool
        self.on_done = on_done
        self.on_error = on_error
        self._chunker = chunker
        self._feed = chunker.feed
        self._calls = Callbacks(callback, on_done, on_error)
        self._errors = self._calls.errors  # checked after every write
        self._pool: Pool | None = None
        if mode == "thread":
            self._pool = ThreadPool(self._calls, npool, _SERIAL_MIN)
        elif mode == "process":
            self._pool = ProcessPool(self._calls, npool, _SLAB_MIN)
        self._finalizer = weakref.finalize(self, abandon, self._pool) if self._pool else None
        self._closed = False
        self._fast = False  # the next frame may take the bytes fast path (byte stream, open)
        self._sb = 0  # bytes per sample; 0 until the first frame fixes the format
        self._format: FrameFormat | None = None  # None before the first frame and once closed
        self._make: Callable[[memoryview, int, int], Any] | None = None
        self._head = 0  # stream index of the next sample
        # Writer state: samples [s, head) of the pending tail lie at
        # [pos - (head - s) * sample_bytes, pos) of the current buffer.
        self._slab: Slab | None = None
        self._mv: memoryview | None = None
        self._pos = 0
        self._end = 0

    def __repr__(self) -> str:
        name = getattr(self.callback, "__qualname__", repr(self.callback))
        state = " closed" if self._closed else ""
        return (
            f"<BufferEmit({name}) size={self.size} clip={self.clip} mode={self.mode!r} "
            f"npool={self.npool} asbuffer={self.asbuffer}{state}>"
        )

    def __enter__(self) -> BufferEmit:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def write(self, data: Any, t0: float | None = None) -> None:
        """Append a frame; call the callback for each chunk it completes.

        Parameters
        ----------
        data : bytes-like or numpy.ndarray
            The frame, of any number of samples.  Its type, dtype and channel
            count must match the first frame's.
        t0 : float, optional
            The frame's time in seconds (finite); default :func:`time.time`.

        Raises
        ------
        TypeError, ValueError
            The frame does not match the stream's format, or ``t0`` is not finite; nothing of it is
            written.  A callable ``sampler`` that raises (or returns a negative, infinite or NaN
            number) has its error come out here too: the chunk it was called for is not lost but
            cut again, with what came since, at the next ``write``.
        ClosedError
            The emitter is closed.
        Exception
            An error of an earlier callback (when no ``on_error`` is given); the
            frame was written.  (In process mode results come back as the workers
            finish: an error may come out of a later ``write`` or of :meth:`close`.)
        """
        if t0 is None:
            t0 = _now()
        elif not (is_real(t0) and math.isfinite(t0)):  # (NaN switched a sampler's skip off; inf made it skip none)
            raise ValueError(f"t0 must be a finite number of seconds, got {t0!r}; nothing was written")
        if self._fast and type(data) is bytes:
            src: Any = data
            n = nbytes = len(data)
        elif self._format is not None:
            src, n, nbytes = self._format.take(data)
        else:
            src, n, nbytes = self._first(data)
        if n:
            # Copy, then feed the rules: whatever they raise, buffer and rules agree on the stream.
            index = self._head
            pos = self._pos
            if pos + nbytes > self._end:
                start = self._chunker.start
                pos = self._make_room(index, index if start is None else start, nbytes)
            self._mv[pos : pos + nbytes] = src  # type: ignore[index]
            self._pos = pos + nbytes
            self._head = end = index + n
            chunks = self._feed(index, n, t0)
            if chunks:
                self._cut(chunks, end)
            elif self._chunker.start is None:
                self._pos = pos  # the frame fell in a sampler's pause: its bytes need no room
        if self._errors:
            self._raise_errors()

    def close(self, timeout: float | None = None) -> None:
        """Wait for the callbacks in flight, stop the workers, free the buffers.

        Idempotent.  The samples of an incomplete chunk are discarded.

        ``timeout`` (seconds, None: as long as they take): how long to wait for the callbacks in flight.
        When it expires the emitter is closed all the same and :class:`TimeoutError` says how many chunks
        were not done: in process mode every worker is killed at once and those chunks are lost (none
        reaches ``on_done`` or ``on_error``); threads cannot be stopped, so in thread mode their callbacks
        run on in the background (daemon threads; results still go to ``on_done``, errors to ``on_error``,
        or to the ``slabcast.emit`` log without one).

        Raises
        ------
        TimeoutError
            Chunks were not done after ``timeout`` seconds (an :class:`ExceptionGroup` with the callbacks'
            errors not yet raised, if any).
        ValueError
            ``timeout`` is not None nor a finite number >= 0.
        Exception
            The error of a callback not yet raised (when no ``on_error`` is given),
            or an :class:`ExceptionGroup` of several.
        """
        if timeout is not None and (not is_real(timeout) or not 0 <= timeout < math.inf):
            raise ValueError(f"timeout must be None or a finite number of seconds >= 0, got {timeout!r}")
        if self._closed:
            return
        if self._pool is not None and self._pool.owns(threading.current_thread()):
            raise RuntimeError(
                f"close() called from a thread of {self!r} (in on_done, on_error or a thread-mode callback) "
                "would wait for itself; close it from the thread that writes"
            )
        running = 0 if self._pool is None or timeout is None else self._pool.drain(timeout)
        self._closed = True
        self._fast = False
        self._format = None
        self._slab = self._mv = None
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._pool is not None:
            try:
                if not running:
                    self._pool.shutdown(wait=True)
                else:
                    self._calls.orphaned = True  # (errors from now on are logged: nothing is left to raise them)
                    if isinstance(self._pool, ProcessPool):
                        running = self._pool.abort()
                    else:
                        self._pool.shutdown(wait=False)  # (its threads take the rest, then end)
            except BaseException:
                self._pool.shutdown(wait=False)
                raise
        if running:
            assert timeout is not None
            what = "their worker processes were killed, those chunks lost" if self.mode == "process" else \
                "threads cannot be stopped: their callbacks run on in the background"  # fmt: skip
            late = TimeoutError(f"{running} chunks of {self!r} not done after {float(timeout):g} s: {what}")
            errors = self._calls.take_errors()
            if errors:
                raise ExceptionGroup(f"{self!r} closed after its timeout, with callback errors", [late, *errors])
            raise late
        if self._calls.errors:
            self._raise_errors()

    # -- internals ---------------------------------------------------------------------------

    def _raise_errors(self) -> None:
        errors = self._calls.take_errors()
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup(f"{len(errors)} callbacks of {self!r} failed", errors)

    def _first(self, data: Any) -> tuple[Any, int, int]:
        """Take the first frame (it fixes the stream's format), or refuse a frame once closed."""
        if self._closed:
            raise ClosedError(f"write() on a closed {self!r}")
        fmt = FrameFormat.first(data, self.asbuffer)
        got = fmt.take(data)
        self._set_format(fmt)
        return got

    def _set_format(self, fmt: FrameFormat) -> None:
        self._format = fmt
        self._sb = fmt.sample_bytes
        self._fast = fmt.dtype is None
        self._make = fmt.copier()
        if self._pool is not None:
            self._pool.set_format(fmt)

    def _make_room(self, index: int, lo: int, nbytes: int) -> int:
        """Make room for ``nbytes`` after the pending samples ``[lo, index)``; return where they go."""
        sb = self._sb
        pos = self._pos
        keep = (index - lo) * sb if lo < index else 0
        need = keep + nbytes
        slab = self._slab
        if slab is not None and slab.leases == 0 and need <= slab.nbytes:
            # Nobody reads this buffer: move the pending tail to its start.
            if keep:
                slab.mv[:keep] = slab.mv[pos - keep : pos]
        else:
            hint = self.size * sb + nbytes
            pool = self._pool
            # Serial mode: one buffer, replaced by a bigger one when a frame needs it.
            new = Slab(0, round_up(max(_SERIAL_MIN, 4 * hint, need))) if pool is None else pool.acquire(need, hint)
            if keep:
                new.mv[:keep] = slab.mv[pos - keep : pos]  # type: ignore[union-attr]
            if slab is not None and pool is not None:
                pool.retire(slab)
            self._slab = new
            self._mv = new.mv
            self._end = new.nbytes
        self._pos = keep
        return keep

    def _cut(self, chunks: list[tuple[int, int, float]], end: int) -> None:
        """Hand out the chunks a frame completed; ``end`` is the stream index after the frame."""
        pos = self._pos
        mv = self._mv
        assert mv is not None
        sb = self._sb
        slab = self._slab
        assert slab is not None
        pool = self._pool
        if pool is None:
            make = self._make
            calls = self._calls
            callback = self.callback
            for start, length, t0 in chunks:
                value = make(mv, pos - (end - start) * sb, length * sb)  # type: ignore[misc]
                try:
                    result = callback(value, t0)
                except Exception as exc:
                    calls.report(exc)
                else:
                    if calls.on_done is not None:
                        calls.deliver(result)
        else:
            for start, length, t0 in chunks:
                pool.dispatch(slab, pos - (end - start) * sb, length * sb, t0)
        if self._chunker.start is None and slab.leases == 0:
            self._pos = 0  # nothing pending and nobody reading: start over at the buffer's start
