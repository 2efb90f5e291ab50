"""What every BufferEmit mode shares: the buffers (slabs), the callbacks and their errors, the pool interface.

The serial writer uses a slab directly; thread mode (threads.py) and process mode
(processes.py) implement ``Pool``, which recycles slabs and runs the callbacks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..core.shm import Segment
from .frames import FrameFormat

log = logging.getLogger("slabcast.emit")

_PAGE = 4096


def round_up(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages."""
    return -(-nbytes // _PAGE) * _PAGE


class Slab:
    """One buffer: a bytearray, or a shared-memory segment in process mode.

    A slab has no header: it holds stream bytes only, and a chunk is the bytes
    ``[offset, offset + nbytes)`` that its notice names.  The writer appends frames
    and cuts chunks where they lie; a slab is written again only when no chunk in
    it is out with a callback (``leases == 0``).
    """

    __slots__ = ("id", "leases", "mv", "nbytes", "retired", "seg")

    def __init__(self, ident: int, nbytes: int, seg: Segment | None = None) -> None:
        self.id = ident
        self.nbytes = nbytes
        self.seg = seg
        self.mv: memoryview = seg.buf if seg is not None else memoryview(bytearray(nbytes))
        self.leases = 0  # chunks in this buffer that a callback still needs
        self.retired = False  # the writer moved on; free it when the last lease ends


class Callbacks:
    """What an emitter shares with its worker threads: the callbacks, the lock, errors to raise."""

    def __init__(
        self,
        callback: Callable[..., Any],
        on_done: Callable[[Any], Any] | None,
        on_error: Callable[[BaseException], Any] | None,
    ) -> None:
        self.callback = callback
        self.on_done = on_done
        self.on_error = on_error
        self.lock = threading.Lock()
        self.errors: list[Exception] = []
        self.orphaned = False  # closed with callbacks still running (close's timeout): nobody raises errors now

    def report(self, exc: Exception) -> None:
        """Hand ``exc`` to ``on_error``, or keep it for the next write/close to raise (log it, once the emitter
        was closed with callbacks still running: no write or close is left to raise it)."""
        if self.on_error is not None:
            try:
                self.on_error(exc)
                return
            except Exception as failure:
                if failure.__context__ is None:
                    failure.__context__ = exc
                exc = failure
        if self.orphaned:
            log.error("a callback failed after its emitter was closed (close's timeout)", exc_info=exc)
            return
        with self.lock:
            self.errors.append(exc)

    def deliver(self, result: Any) -> None:
        """Pass a callback's return value to ``on_done``; its failure is reported like the callback's."""
        if self.on_done is not None:
            try:
                self.on_done(result)
            except Exception as exc:
                self.report(exc)

    def take_errors(self) -> list[Exception]:
        with self.lock:
            errors = list(self.errors)
            self.errors.clear()  # in place: the writer holds this list
        return errors


class Pool:
    """The recycled buffers of an asynchronous emitter, and the chunks still out with a callback."""

    def __init__(self, calls: Callbacks, npool: int, slab_min: int) -> None:
        self.calls = calls
        self.lock = calls.lock
        self.cond = threading.Condition(calls.lock)
        self.npool = npool
        # Enough buffers that every worker can hold chunks while the writer fills another;
        # beyond that the writer waits for one to come back (backpressure, not unbounded memory).
        self.max_slabs = 2 * npool + 2
        self.slab_min = slab_min
        self.slab_bytes = 0
        self.slabs: dict[int, Slab] = {}
        self.free: list[Slab] = []
        self.next_id = 0
        self.outstanding = 0  # chunks handed out whose callback (and on_done) has not finished
        self.waiters = 0  # threads waiting for a buffer or for the last chunk: no batching then
        self.broken: Exception | None = None
        self.closed = False

    # Called by the writer.

    def set_format(self, fmt: FrameFormat) -> None:
        """Learn the stream's format from its first frame."""

    def acquire(self, need: int, hint: int) -> Slab:
        """Return a free buffer of at least ``need`` bytes; wait only when every buffer is in use."""
        with self.cond:
            while True:
                if self.broken is not None:
                    raise self.broken
                for i, slab in enumerate(self.free):
                    if slab.nbytes >= need:
                        return self.free.pop(i)
                # Free buffers too small for this frame make room for a bigger one.
                while self.free:
                    self._destroy(self.free.pop())
                if len(self.slabs) < self.max_slabs:
                    if need > self.slab_bytes:
                        self.slab_bytes = round_up(max(self.slab_min, 4 * hint, need))
                    slab = self._create(self.next_id, self.slab_bytes)
                    self.slabs[slab.id] = slab
                    self.next_id += 1
                    return slab
                self._wait()

    def retire(self, slab: Slab) -> None:
        """The writer moved on from ``slab``: it is free once its last chunk is done."""
        with self.lock:
            slab.retired = True
            if slab.leases == 0:
                self._free(slab)

    def drain(self, timeout: float | None = None) -> int:
        """Wait until every chunk handed out is done (its callback and on_done returned), or ``timeout``
        seconds; return how many are still out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self.outstanding and self.broken is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return self.outstanding
                self._wait(left)
            return 0

    def _wait(self, timeout: float | None = None) -> None:
        self.waiters += 1
        try:
            self._wake()
            self.cond.wait(timeout)
        finally:
            self.waiters -= 1

    def _wake(self) -> None:
        """Have the pool's collector (if any) look at the results now."""

    # Called with the lock held.

    def _release(self, slab: Slab) -> None:
        slab.leases -= 1
        if slab.retired and slab.leases == 0:
            self._free(slab)

    def _free(self, slab: Slab) -> None:
        slab.retired = False
        if self.closed:
            self._destroy(slab)
        else:
            self.free.append(slab)
            self.cond.notify_all()

    def _create(self, ident: int, nbytes: int) -> Slab:
        return Slab(ident, nbytes)

    def _destroy(self, slab: Slab) -> None:
        self.slabs.pop(slab.id, None)

    def _destroy_all(self) -> None:
        self.free.clear()
        for slab in list(self.slabs.values()):
            self._destroy(slab)

    # Implemented by each pool.

    def dispatch(self, slab: Slab, offset: int, nbytes: int, t0: float) -> None:
        raise NotImplementedError

    def shutdown(self, wait: bool) -> None:
        """Stop the workers (after the chunks out with them are done, if ``wait``) and free the buffers."""
        if wait:
            self.drain()
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self._closing()
        self._stop(wait)

    def _closing(self) -> None:
        """Called once, under the lock, as the pool closes (no new chunk can be dispatched)."""

    def _stop(self, wait: bool) -> None:
        raise NotImplementedError

    def owns(self, thread: threading.Thread) -> bool:
        raise NotImplementedError


def abandon(pool: Pool) -> None:
    """Finalizer of an emitter never closed: stop its pool without waiting for its callbacks."""
    here = threading.current_thread()
    if pool.owns(here):
        # Collected in one of the pool's own threads (a cycle through on_done, say), maybe
        # holding the pool's lock: stop it from another thread.
        threading.Thread(target=pool.shutdown, args=(False,), name="slabcast-emit-stop", daemon=True).start()
    else:
        pool.shutdown(False)
