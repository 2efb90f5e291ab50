"""BufferEmit: cut a stream of frames into chunks and run a callback on each, serially, in threads or in processes."""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import pickle
import queue
import secrets
import select
import signal
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from .._exceptions import ClosedError, WorkerDiedError
from ..core.rechunk import Rechunker, check_sampler, check_size
from ..core.shm import Segment, attach, segment_prefix
from ..wire import protocol as P

__all__ = ["BufferEmit", "WorkerDiedError"]

_MODES = ("serial", "thread", "process")
_PAGE = 4096
# A buffer holds at least this many bytes and room for four chunks plus a frame, so the
# pending tail is moved (or a buffer switched) at most once every few chunks.
_SERIAL_MIN = 64 << 10
_SLAB_MIN = 1 << 20
# Chunks queued per worker process.  Results come back in batches (see _BATCH_SECONDS), so a
# worker needs enough queued to stay busy between two batches; few enough (32 notices are
# 1408 bytes) that a notice write never blocks on the pipe.
_DEPTH = 32
# Notices for a busy worker are written in batches of this many (one system call and one
# wake-up of the worker each); a worker with nothing left to do gets its notice at once.
_NOTICE_BATCH = 8
# While results flow, the collector takes them in batches at most this often, rather than
# waking (and taking the GIL from the writer) once per chunk; when they stop, it answers at once.
_BATCH_SECONDS = 0.001
# Workers that die before loading the callback, in a row, before the pool gives up.
_START_ATTEMPTS = 3
_JOIN_TIMEOUT = 10.0
_now = time.time


# -- process mode: the notices between the owner and its worker processes -------------------
#
# Each worker has two pipes of its own: notices in, results out.  Per-worker pipes (rather
# than one shared queue, or ZeroMQ PUSH/PULL which round-robins blindly) let the owner know
# exactly which chunks each worker holds, so a worker that dies costs the one chunk it was
# running and the others go to another worker; a pipe never drops a message, and its end-of-file
# tells of the worker's death as soon as the kernel closes its files.  The chunk data itself
# never crosses a pipe: it stays in a shared-memory slab.
#
# Their two messages, the notice (owner -> worker, 44 bytes: a pipe write this small is atomic)
# and the result (worker -> owner), are defined with every other message in wire/protocol.py.
_NOTICE, _RESULT = P.EMIT_NOTICE, P.EMIT_RESULT
_DROP = P.EMIT_DROP
_OK, _ERROR, _READY = P.EMIT_OK, P.EMIT_ERROR, P.EMIT_READY


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pack_exception(exc: BaseException) -> bytes:
    exc.add_note(
        f"(raised by the callback in worker process {os.getpid()}:)\n{''.join(traceback.format_exception(exc))}"
    )
    try:
        return pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
    except Exception:
        stand_in = RuntimeError(f"the callback raised an exception that cannot be pickled: {exc!r}")
        stand_in.__notes__ = list(getattr(exc, "__notes__", []))
        return pickle.dumps(stand_in, pickle.HIGHEST_PROTOCOL)


def _worker_main(
    notices: Any,
    results: Any,
    callback: Callable[..., Any],
    prefix: str,
    fmt: tuple[str, int, bool] | None,
    asbuffer: bool,
    want_result: bool,
) -> None:
    """Body of a worker process: map slabs read-only, run the callback on each chunk."""
    # The owner decides when to stop (it closes our notice pipe); a terminal's Ctrl-C is its.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rfd, wfd = notices.fileno(), results.fileno()
    dtype = np.dtype(fmt[0]) if fmt else None
    channels = fmt[1] if fmt else 1
    oned = fmt[2] if fmt else True
    with contextlib.suppress(BrokenPipeError):  # the owner died: nobody to answer
        _serve(rfd, wfd, callback, prefix, dtype, channels, oned, asbuffer, want_result)


def _serve(
    rfd: int,
    wfd: int,
    callback: Callable[..., Any],
    prefix: str,
    dtype: np.dtype[Any] | None,
    channels: int,
    oned: bool,
    asbuffer: bool,
    want_result: bool,
) -> None:
    maps: dict[int, Any] = {}
    itemsize = dtype.itemsize if dtype is not None else 1
    size = _NOTICE.size
    _write_all(wfd, _RESULT.pack(-1, _READY, 0))
    rest = b""
    while True:
        data = os.read(rfd, 1 << 16)
        if not data:
            break  # the owner closed the pipe (close) or died
        if rest:
            data = rest + data
        whole = len(data) - len(data) % size
        rest = data[whole:]
        for seq, slab, slab_bytes, offset, nbytes, t0 in _NOTICE.iter_unpack(memoryview(data)[:whole]):
            if seq == _DROP:
                mm = maps.pop(slab, None)
                if mm is not None:
                    with contextlib.suppress(BufferError):  # the callback kept a view: unmapped at exit
                        mm.close()
                continue
            mm = maps.get(slab)
            if mm is None:
                mm = maps[slab] = attach(f"{prefix}{slab}", slab_bytes)
            value: Any
            if dtype is None:
                value = mm[offset : offset + nbytes]  # bytes: the one copy bytes cannot avoid
                if asbuffer:
                    value = io.BytesIO(value)
            else:
                # A read-only view of the slab: no copy.  Valid while the callback runs.
                value = np.frombuffer(mm, dtype, nbytes // itemsize, offset)
                if not oned:
                    value = value.reshape(-1, channels)
            try:
                result = callback(value, t0)
            except Exception as exc:
                status, payload = _ERROR, _pack_exception(exc)
            else:
                status, payload = _OK, b""
                if want_result:
                    try:
                        payload = pickle.dumps(result, pickle.HIGHEST_PROTOCOL)
                    except Exception as exc:
                        err = TypeError(f"the callback returned a value that cannot be pickled: {exc}")
                        status, payload = _ERROR, _pack_exception(err)
                result = None
            del value
            # What the callback printed shows now, not when the worker exits (or never, if it is killed).
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            _write_all(wfd, _RESULT.pack(seq, status, len(payload)) + payload)


# -- buffers and the pools that recycle them ---------------------------------------------------


def _round_up(nbytes: int) -> int:
    return -(-nbytes // _PAGE) * _PAGE


class _Slab:
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


def _value_maker(
    dtype: np.dtype[Any] | None, channels: int, oned: bool, asbuffer: bool
) -> Callable[[memoryview, int, int], Any]:
    """Return ``make(mv, offset, nbytes)`` building a callback's value as a copy it may keep."""
    if dtype is None:
        if asbuffer:
            return lambda mv, off, nb: io.BytesIO(mv[off : off + nb])
        return lambda mv, off, nb: bytes(mv[off : off + nb])
    itemsize = dtype.itemsize

    def make(mv: memoryview, off: int, nb: int) -> Any:
        arr = np.frombuffer(mv, dtype, nb // itemsize, off)
        return (arr if oned else arr.reshape(-1, channels)).copy()

    return make


class _Core:
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

    def report(self, exc: Exception) -> None:
        """Hand ``exc`` to ``on_error``, or keep it for the next write/close to raise."""
        if self.on_error is not None:
            try:
                self.on_error(exc)
                return
            except Exception as failure:
                if failure.__context__ is None:
                    failure.__context__ = exc
                exc = failure
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


class _Pool:
    """The recycled buffers of an asynchronous emitter, and the chunks still out with a callback."""

    def __init__(self, core: _Core, npool: int, slab_min: int) -> None:
        self.core = core
        self.lock = core.lock
        self.cond = threading.Condition(core.lock)
        self.npool = npool
        # Enough buffers that every worker can hold chunks while the writer fills another;
        # beyond that the writer waits for one to come back (backpressure, not unbounded memory).
        self.max_slabs = 2 * npool + 2
        self.slab_min = slab_min
        self.slab_bytes = 0
        self.slabs: dict[int, _Slab] = {}
        self.free: list[_Slab] = []
        self.next_id = 0
        self.outstanding = 0  # chunks handed out whose callback (and on_done) has not finished
        self.waiters = 0  # threads waiting for a buffer or for the last chunk: no batching then
        self.broken: Exception | None = None
        self.closed = False

    # Called by the writer.

    def set_format(self, dtype: np.dtype[Any] | None, channels: int, oned: bool, asbuffer: bool) -> None:
        """Learn the stream's format from its first frame."""

    def acquire(self, need: int, hint: int) -> _Slab:
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
                        self.slab_bytes = _round_up(max(self.slab_min, 4 * hint, need))
                    slab = self._create(self.next_id, self.slab_bytes)
                    self.slabs[slab.id] = slab
                    self.next_id += 1
                    return slab
                self._wait()

    def retire(self, slab: _Slab) -> None:
        """The writer moved on from ``slab``: it is free once its last chunk is done."""
        with self.lock:
            slab.retired = True
            if slab.leases == 0:
                self._free(slab)

    def drain(self) -> None:
        """Wait until every chunk handed out is done (its callback and on_done returned)."""
        with self.cond:
            while self.outstanding and self.broken is None:
                self._wait()

    def _wait(self) -> None:
        self.waiters += 1
        try:
            self._wake()
            self.cond.wait()
        finally:
            self.waiters -= 1

    def _wake(self) -> None:
        """Have the pool's collector (if any) look at the results now."""

    # Called with the lock held.

    def _release(self, slab: _Slab) -> None:
        slab.leases -= 1
        if slab.retired and slab.leases == 0:
            self._free(slab)

    def _free(self, slab: _Slab) -> None:
        slab.retired = False
        if self.closed:
            self._destroy(slab)
        else:
            self.free.append(slab)
            self.cond.notify_all()

    def _create(self, ident: int, nbytes: int) -> _Slab:
        return _Slab(ident, nbytes)

    def _destroy(self, slab: _Slab) -> None:
        self.slabs.pop(slab.id, None)

    def _destroy_all(self) -> None:
        self.free.clear()
        for slab in list(self.slabs.values()):
            self._destroy(slab)

    # Implemented by each pool.

    def dispatch(self, slab: _Slab, offset: int, nbytes: int, t0: float) -> None:
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


def _abandon(pool: _Pool) -> None:
    """Finalizer of an emitter never closed: stop its pool without waiting for its callbacks."""
    here = threading.current_thread()
    if pool.owns(here):
        # Collected in one of the pool's own threads (a cycle through on_done, say), maybe
        # holding the pool's lock: stop it from another thread.
        threading.Thread(target=pool.shutdown, args=(False,), name="slabcast-emit-stop", daemon=True).start()
    else:
        pool.shutdown(False)


class _ThreadPool(_Pool):
    """Callbacks in up to ``npool`` threads, started as the work needs them."""

    def __init__(self, core: _Core, npool: int) -> None:
        super().__init__(core, npool, _SERIAL_MIN)
        self.tasks: queue.SimpleQueue[tuple[_Slab, int, int, float] | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.idle = 0
        self.make: Callable[[memoryview, int, int], Any] | None = None

    def set_format(self, dtype: np.dtype[Any] | None, channels: int, oned: bool, asbuffer: bool) -> None:
        self.make = _value_maker(dtype, channels, oned, asbuffer)

    def dispatch(self, slab: _Slab, offset: int, nbytes: int, t0: float) -> None:
        with self.lock:
            slab.leases += 1
            self.outstanding += 1
            start = self.idle == 0 and len(self.threads) < self.npool
            if self.idle:
                self.idle -= 1
            elif start:
                thread = threading.Thread(target=self._run, name=f"slabcast-emit-{len(self.threads)}", daemon=True)
                self.threads.append(thread)
        self.tasks.put((slab, offset, nbytes, t0))
        if start:
            thread.start()

    def _run(self) -> None:
        core, lock, cond, make = self.core, self.lock, self.cond, self.make
        assert make is not None
        while True:
            task = self.tasks.get()
            if task is None:
                return
            slab, offset, nbytes, t0 = task
            value = result = None
            try:
                try:
                    value = make(slab.mv, offset, nbytes)
                finally:
                    # The value is a copy: the buffer goes back to the pool before the callback runs.
                    with lock:
                        self._release(slab)
                result = core.callback(value, t0)
            except Exception as exc:
                core.report(exc)
            except BaseException as exc:  # as ThreadPoolExecutor does: this thread goes on
                failure = RuntimeError(f"the callback raised {exc!r}")
                failure.__cause__ = exc
                core.report(failure)
            else:
                core.deliver(result)
            finally:
                value = result = None
                with lock:
                    self.outstanding -= 1
                    self.idle += 1
                    if not self.outstanding:
                        cond.notify_all()

    def owns(self, thread: threading.Thread) -> bool:
        """Whether ``thread`` is one of this pool's."""
        return thread in self.threads

    def _stop(self, wait: bool) -> None:
        threads = list(self.threads)
        for _ in threads:
            self.tasks.put(None)
        if wait:
            for thread in threads:
                if thread is not threading.current_thread():
                    thread.join()
        with self.lock:
            self._destroy_all()


class _Worker:
    """A worker process and the owner's ends of its two pipes."""

    __slots__ = (
        "gone",
        "inflight",
        "notices",
        "outbox",
        "proc",
        "rbuf",
        "ready",
        "results",
        "rfd",
        "stopping",
        "wfd",
    )

    def __init__(self, proc: Any, notices: Any, results: Any) -> None:
        self.proc = proc
        self.notices = notices
        self.results = results
        self.wfd: int = notices.fileno()
        self.rfd: int = results.fileno()
        # Chunks given to this worker without a result yet, oldest first; the last len(outbox)
        # of them are not sent yet.  The worker answers in order: the oldest sent one is running.
        self.inflight: deque[tuple[int, _Slab, int, int, float]] = deque()
        self.outbox: list[bytes] = []
        self.rbuf = bytearray()
        self.ready = False  # it loaded the callback
        self.stopping = False  # shutdown closed its notice pipe
        self.gone = False  # a notice could not be written: it died, the collector will see


class _ProcessPool(_Pool):
    """Callbacks in up to ``npool`` spawned processes, fed chunks through shared-memory slabs.

    The writer fills slabs and sends each worker a notice per chunk; a collector
    thread reads the results, returns the slabs to the pool, calls ``on_done`` and
    replaces workers that die.
    """

    def __init__(self, core: _Core, npool: int, asbuffer: bool) -> None:
        super().__init__(core, npool, _SLAB_MIN)
        self._stopping: list[_Worker] = []  # the workers being stopped (see _closing)
        self.ctx = mp.get_context("spawn")
        self.prefix = segment_prefix(os.getpid(), secrets.randbits(32))
        self.asbuffer = asbuffer
        self.fmt: tuple[str, int, bool] | None = None
        self.workers: list[_Worker] = []
        self.by_fd: dict[int, _Worker] = {}
        self.pending: deque[tuple[int, _Slab, int, int, float]] = deque()  # waiting for a worker
        self.seq = 0
        self.start_failures = 0
        self.poller = select.poll()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.poller.register(self.wake_r, select.POLLIN)
        self.nap = select.poll()  # the collector's pause between batches; the wake pipe ends it
        self.nap.register(self.wake_r, select.POLLIN)
        self.collector: threading.Thread | None = None
        self.stop_collector = False

    def set_format(self, dtype: np.dtype[Any] | None, channels: int, oned: bool, asbuffer: bool) -> None:
        self.fmt = None if dtype is None else (dtype.str, channels, oned)

    def _create(self, ident: int, nbytes: int) -> _Slab:
        return _Slab(ident, nbytes, Segment(f"{self.prefix}{ident}", nbytes))

    def _destroy(self, slab: _Slab) -> None:
        super()._destroy(slab)
        drop = _NOTICE.pack(_DROP, slab.id, 0, 0, 0, 0.0)
        for w in self.workers:
            if not w.stopping:
                with contextlib.suppress(OSError):
                    os.write(w.wfd, drop)
        seg, slab.seg = slab.seg, None
        del slab.mv
        if seg is not None:
            seg.destroy()

    # Called by the writer.

    def dispatch(self, slab: _Slab, offset: int, nbytes: int, t0: float) -> None:
        with self.lock:
            if self.broken is not None:
                raise self.broken
            slab.leases += 1
            self.outstanding += 1
            self.seq = seq = self.seq + 1
            self.pending.append((seq, slab, offset, nbytes, t0))
            self._pump()

    # Called with the lock held.

    def _pump(self) -> None:
        """Give waiting chunks to the least busy workers, starting workers up to ``npool``."""
        pending = self.pending
        workers = self.workers
        while pending:
            best = None
            least = _DEPTH
            for w in workers:
                if len(w.inflight) < least and not (w.stopping or w.gone):
                    best, least = w, len(w.inflight)
            if (best is None or least) and len(workers) < self.npool:
                best, least = self._spawn(), 0
            if best is None:
                return
            task = pending.popleft()
            best.inflight.append(task)
            outbox = best.outbox
            outbox.append(_NOTICE.pack(task[0], task[1].id, task[1].nbytes, task[2], task[3], task[4]))
            if len(outbox) >= _NOTICE_BATCH or len(outbox) > least:  # a batch, or the worker idles
                self._flush(best)

    def _flush(self, w: _Worker) -> None:
        if w.outbox and not w.gone:
            try:
                os.write(w.wfd, b"".join(w.outbox))
            except OSError:
                w.gone = True  # it died; the collector will see its end-of-file and give its chunks to another
            w.outbox.clear()

    def _spawn(self) -> _Worker:
        r_notices, w_notices = self.ctx.Pipe(duplex=False)
        r_results, w_results = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(
            target=_worker_main,
            args=(
                r_notices,
                w_results,
                self.core.callback,
                self.prefix,
                self.fmt,
                self.asbuffer,
                self.core.on_done is not None,
            ),
            name=f"slabcast-emit-{self.prefix}",
            daemon=True,
        )
        try:
            proc.start()
        finally:
            # The worker has its own copies now; ours would hide its end-of-file.
            r_notices.close()
            w_results.close()
        w = _Worker(proc, w_notices, r_results)
        self.workers.append(w)
        self.by_fd[w.rfd] = w
        self.poller.register(w.rfd, select.POLLIN)
        if self.collector is None:
            self.collector = threading.Thread(target=self._collect, name="slabcast-emit-collector", daemon=True)
            self.collector.start()
        else:
            self._wake()
        return w

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self.wake_w, b"\0")

    # The collector thread.

    def _collect(self) -> None:
        try:
            while not self.stop_collector:
                events = self.poller.poll()
                done: list[tuple[int, Any, float]] = []
                with self.lock:
                    for fd, _ in events:
                        if fd == self.wake_r:
                            os.read(fd, 4096)
                            continue
                        w = self.by_fd.get(fd)
                        if w is None:
                            continue
                        data = os.read(fd, 1 << 16)
                        if data:
                            w.rbuf += data
                            self._parse(w, done)
                        else:
                            self._exited(w, done)
                    self._pump()
                    for w in self.workers:
                        self._flush(w)
                if done:
                    self._deliver(done)
                    if not self.waiters:
                        self.nap.poll(_BATCH_SECONDS * 1e3)
        except BaseException as exc:  # a bug here must not leave the writer waiting forever
            failure = RuntimeError(f"the BufferEmit collector thread failed: {exc!r}")
            failure.__cause__ = exc
            with self.lock:
                self.broken = failure
                self.cond.notify_all()
            self.core.report(failure)

    def _parse(self, w: _Worker, done: list[tuple[int, Any, float]]) -> None:
        buf = w.rbuf
        head = _RESULT.size
        while len(buf) >= head:
            seq, status, length = _RESULT.unpack_from(buf)
            if len(buf) < head + length:
                return
            payload = bytes(buf[head : head + length])
            del buf[: head + length]
            if status == _READY:
                w.ready = True
                self.start_failures = 0
                continue
            task = w.inflight.popleft()
            assert task[0] == seq, f"worker {w.proc.pid} answered chunk {seq}, expected {task[0]}"
            self._release(task[1])
            done.append((status, payload, task[4]))

    def _exited(self, w: _Worker, done: list[tuple[int, Any, float]]) -> None:
        self.poller.unregister(w.rfd)
        del self.by_fd[w.rfd]
        self.workers.remove(w)
        w.results.close()
        with contextlib.suppress(OSError):
            w.notices.close()
        if w.stopping and not w.inflight:
            return  # stopped by shutdown
        w.proc.join(_JOIN_TIMEOUT)
        code = w.proc.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        if not w.ready:
            # It died before loading the callback, so it ran none of its chunks: give them to another.
            self.pending.extendleft(reversed(w.inflight))
            self.start_failures += 1
            if self.start_failures >= _START_ATTEMPTS:
                self.broken = WorkerDiedError(
                    f"{self.start_failures} worker processes in a row {how} before loading the callback "
                    f"(the last: pid {w.proc.pid}); a callback for mode='process' must be importable in a "
                    "spawned process (a function defined at module level, main module guarded by "
                    "if __name__ == '__main__'); see the worker's stderr"
                )
                lost = list(self.pending)
                self.pending.clear()
                for task in lost:
                    self._release(task[1])
                self.cond.notify_all()
                done.append((-1, self.broken, float(len(lost))))
            return
        if len(w.inflight) > len(w.outbox):  # the oldest chunk sent to it was running
            task = w.inflight.popleft()
            self.pending.extendleft(reversed(w.inflight))
            self._release(task[1])
            exc = WorkerDiedError(
                f"worker process {w.proc.pid} {how} while running the callback on the chunk at t0={task[4]!r}; "
                "that chunk is lost, another worker takes the next ones"
            )
            done.append((-2, exc, task[4]))
        else:
            self.pending.extendleft(reversed(w.inflight))
            done.append((-3, WorkerDiedError(f"worker process {w.proc.pid} {how} while idle"), 0.0))

    def _deliver(self, done: list[tuple[int, Any, float]]) -> None:
        core = self.core
        finished = 0
        for status, payload, extra in done:
            if status == _OK:
                finished += 1
                if core.on_done is not None:
                    try:
                        result = pickle.loads(payload)
                    except Exception as exc:
                        core.report(exc)
                    else:
                        core.deliver(result)
            elif status == _ERROR:
                finished += 1
                try:
                    error = pickle.loads(payload)
                except Exception as failure:
                    error = RuntimeError(f"the callback raised an exception that cannot be unpickled here: {failure!r}")
                core.report(error)
            elif status == -1:  # the pool broke: its waiting chunks are dropped
                finished += int(extra)
                core.report(payload)
            elif status == -2:  # a worker died with a chunk
                finished += 1
                core.report(payload)
            else:  # a worker died idle
                core.report(payload)
        if finished:
            with self.lock:
                self.outstanding -= finished
                if not self.outstanding:
                    self.cond.notify_all()

    def owns(self, thread: threading.Thread) -> bool:
        """Whether ``thread`` is this pool's collector."""
        return thread is self.collector

    def _closing(self) -> None:
        self._stopping = list(self.workers)
        for w in self._stopping:
            w.stopping = True
            with contextlib.suppress(OSError):
                w.notices.close()  # end-of-file: the worker exits once its notices are done

    def _stop(self, wait: bool) -> None:
        workers = self._stopping
        for w in workers:
            w.proc.join(_JOIN_TIMEOUT if wait else 1.0)
            if w.proc.exitcode is None:
                w.proc.kill()
                w.proc.join(_JOIN_TIMEOUT)
        collector = self.collector
        if collector is not None:
            self.stop_collector = True
            self._wake()
            if collector is not threading.current_thread():
                collector.join()
        with self.lock:
            for w in list(self.workers):
                self.poller.unregister(w.rfd)
                w.results.close()
                self.workers.remove(w)
            self.by_fd.clear()
            for w in workers:
                with contextlib.suppress(ValueError):
                    w.proc.close()
            self._destroy_all()
            for fd in (self.wake_r, self.wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)


# -- the public class ---------------------------------------------------------------------------


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
    another buffer meanwhile, waiting only when ``2 * npool + 2`` are all in use.

    Differences from ocycle 0.1.0, which cuts the same values:

    - ``t0`` is always the time of the frame holding the chunk's first sample.
      ocycle passes the time of its first write for the first chunk, then that of
      the frame that completed the previous chunk (right only when a clipped
      remainder starts the chunk; with ``clip=True`` and no sampler it may be older).
    - ``t0=0`` is a time, not "now".
    - Errors are never lost (see ``on_error``); a worker process that dies is
      reported as :class:`WorkerDiedError` and replaced.
    - Process workers are spawned, not forked; they read chunks from shared memory
      instead of receiving pickled copies.  ``on_done`` results come in the order
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
        self._core = _Core(callback, on_done, on_error)
        self._errors = self._core.errors  # checked after every write
        self._pool: _Pool | None = None
        if mode == "thread":
            self._pool = _ThreadPool(self._core, npool)
        elif mode == "process":
            self._pool = _ProcessPool(self._core, npool, self.asbuffer)
        self._finalizer = weakref.finalize(self, _abandon, self._pool) if self._pool else None
        self._closed = False
        self._fast = False  # the next frame may take the bytes fast path (byte stream, open)
        self._sb = 0  # bytes per sample; 0 until the first frame fixes the format
        self._dtype: np.dtype[Any] | None = None
        self._channels = 1
        self._oned = True
        self._make: Callable[[memoryview, int, int], Any] | None = None
        self._head = 0  # stream index of the next sample
        # Writer state: samples [s, head) of the pending tail lie at
        # [pos - (head - s) * sample_bytes, pos) of the current buffer.
        self._slab: _Slab | None = None
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
            The frame's time in seconds; default :func:`time.time`.

        Raises
        ------
        TypeError, ValueError
            The frame does not match the stream's format; nothing of it is written.
        ClosedError
            The emitter is closed.
        Exception
            An error of an earlier callback (when no ``on_error`` is given); the
            frame was written.
        """
        if t0 is None:
            t0 = _now()
        if self._fast and type(data) is bytes:
            src: Any = data
            n = nbytes = len(data)
        else:
            src, n, nbytes = self._check(data)
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

    def close(self) -> None:
        """Wait for the callbacks in flight, stop the workers, free the buffers.

        Idempotent.  The samples of an incomplete chunk are discarded.

        Raises
        ------
        Exception
            The error of a callback not yet raised (when no ``on_error`` is given),
            or an :class:`ExceptionGroup` of several.
        """
        if self._closed:
            return
        if self._pool is not None and self._pool.owns(threading.current_thread()):
            raise RuntimeError(
                f"close() called from a thread of {self!r} (in on_done, on_error or a thread-mode callback) "
                "would wait for itself; close it from the thread that writes"
            )
        self._closed = True
        self._fast = False
        self._slab = self._mv = None
        if self._finalizer is not None:
            self._finalizer.detach()
        if self._pool is not None:
            try:
                self._pool.shutdown(wait=True)
            except BaseException:
                self._pool.shutdown(wait=False)
                raise
        if self._core.errors:
            self._raise_errors()

    # -- internals ---------------------------------------------------------------------------

    def _raise_errors(self) -> None:
        errors = self._core.take_errors()
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup(f"{len(errors)} callbacks of {self!r} failed", errors)

    def _check(self, data: Any) -> tuple[Any, int, int]:
        """Validate a frame (the first one fixes the format); return (source buffer, samples, bytes)."""
        if self._closed:
            raise ClosedError(f"write() on a closed {self!r}")
        if isinstance(data, np.ndarray):
            if data.ndim == 1:
                channels = 1
            elif data.ndim == 2:
                channels = data.shape[1]
            else:
                raise ValueError(f"a numpy frame must have shape (n,) or (n, channels), got shape {data.shape}")
            if not self._sb:
                self._set_format(data.dtype, channels, data.ndim == 1)
            elif self._dtype is None:
                raise TypeError(
                    f"this BufferEmit carries bytes (fixed by its first frame), got a numpy array of dtype "
                    f"{data.dtype}; nothing of the frame was written"
                )
            elif data.dtype != self._dtype:
                raise TypeError(
                    f"frame dtype must be {self._dtype} (fixed by the first frame), got {data.dtype}; "
                    "nothing of the frame was written (nothing is cast)"
                )
            elif channels != self._channels:
                raise ValueError(
                    f"frame must have {self._channels} channel(s) (fixed by the first frame), got shape "
                    f"{data.shape}; nothing of the frame was written"
                )
            n = data.shape[0]
            if not n:
                return None, 0, 0
            return np.ascontiguousarray(data).reshape(-1).view(np.uint8), n, data.nbytes
        if isinstance(data, bytes | bytearray | memoryview):
            if not self._sb:
                self._set_format(None, 1, True)
            elif self._dtype is not None:
                raise TypeError(
                    f"this BufferEmit carries numpy frames of dtype {self._dtype} x {self._channels} channel(s) "
                    f"(fixed by its first frame), got {type(data).__name__}; nothing of the frame was written"
                )
            view = memoryview(data)
            if not view.nbytes:
                return None, 0, 0
            if not view.c_contiguous:
                view = memoryview(view.tobytes())
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            return view, view.nbytes, view.nbytes
        raise TypeError(f"a frame must be bytes-like or a numpy array, got {type(data).__name__}")

    def _set_format(self, dtype: np.dtype[Any] | None, channels: int, oned: bool) -> None:
        if dtype is None:
            sb = 1
        else:
            if self.asbuffer:
                raise TypeError(
                    f"asbuffer=True hands the callback an io.BytesIO and applies to byte streams, "
                    f"got a numpy frame of dtype {dtype}"
                )
            if dtype.hasobject:
                raise TypeError(f"numpy frames must hold plain data, got dtype {dtype}")
            sb = dtype.itemsize * channels
            if sb <= 0:
                raise ValueError(f"a sample must have at least one byte, got dtype {dtype} x {channels} channel(s)")
        self._dtype = dtype
        self._channels = channels
        self._oned = oned
        self._sb = sb
        self._fast = dtype is None
        self._make = _value_maker(dtype, channels, oned, self.asbuffer)
        if self._pool is not None:
            self._pool.set_format(dtype, channels, oned, self.asbuffer)

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
            new = _Slab(0, _round_up(max(_SERIAL_MIN, 4 * hint, need))) if pool is None else pool.acquire(need, hint)
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
            core = self._core
            callback = self.callback
            for start, length, t0 in chunks:
                value = make(mv, pos - (end - start) * sb, length * sb)  # type: ignore[misc]
                try:
                    result = callback(value, t0)
                except Exception as exc:
                    core.report(exc)
                else:
                    if core.on_done is not None:
                        core.deliver(result)
        else:
            for start, length, t0 in chunks:
                pool.dispatch(slab, pos - (end - start) * sb, length * sb, t0)
        if self._chunker.start is None and slab.leases == 0:
            self._pos = 0  # nothing pending and nobody reading: start over at the buffer's start
