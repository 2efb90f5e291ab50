"""BufferEmit's process mode: spawned worker processes fed chunks through shared-memory slabs and pipes."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import secrets
import select
import threading
from collections import deque
from typing import Any

from .._exceptions import WorkerDiedError
from ..core.shm import Segment, segment_prefix
from ..wire import protocol as P
from .base import Callbacks, Pool, Slab
from .frames import FrameFormat
from .worker import worker_main

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
        self.inflight: deque[tuple[int, Slab, int, int, float]] = deque()
        self.outbox: list[bytes] = []
        self.rbuf = bytearray()
        self.ready = False  # it loaded the callback
        self.stopping = False  # shutdown closed its notice pipe
        self.gone = False  # a notice could not be written: it died, the collector will see


class ProcessPool(Pool):
    """Callbacks in up to ``npool`` spawned processes, fed chunks through shared-memory slabs.

    The writer fills slabs and sends each worker a notice per chunk; a collector
    thread reads the results, returns the slabs to the pool, calls ``on_done`` and
    replaces workers that die.
    """

    def __init__(self, calls: Callbacks, npool: int, slab_min: int) -> None:
        super().__init__(calls, npool, slab_min)
        self._stopping: list[_Worker] = []  # the workers being stopped (see _closing)
        self.ctx = mp.get_context("spawn")
        self.prefix = segment_prefix(os.getpid(), secrets.randbits(32))
        self.fmt: FrameFormat | None = None  # the stream's, from its first frame
        self.workers: list[_Worker] = []
        self.by_fd: dict[int, _Worker] = {}
        self.pending: deque[tuple[int, Slab, int, int, float]] = deque()  # waiting for a worker
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
        self.aborted = False  # close's timeout expired: workers killed, what they had is lost, nothing restarted
        self.delivering = 0  # chunks whose result the collector is handing on now (counted done, not lost)

    def set_format(self, fmt: FrameFormat) -> None:
        self.fmt = fmt

    def _create(self, ident: int, nbytes: int) -> Slab:
        return Slab(ident, nbytes, Segment(f"{self.prefix}{ident}", nbytes))

    def _destroy(self, slab: Slab) -> None:
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

    def dispatch(self, slab: Slab, offset: int, nbytes: int, t0: float) -> None:
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
        if self.closed:
            return  # (no worker starts once closed: a worker's chunks put back when it died stay undone)
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
        assert self.fmt is not None  # a chunk was cut, so a frame fixed the format
        r_notices, w_notices = self.ctx.Pipe(duplex=False)
        r_results, w_results = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(
            target=worker_main,
            args=(
                r_notices,
                w_results,
                self.calls.callback,
                self.prefix,
                self.fmt,
                self.calls.on_done is not None,
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
            self.calls.report(failure)

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
        if self.aborted:  # killed by abort(), which counted its chunks as lost (nothing is handed on now)
            for task in w.inflight:
                self._release(task[1])
            w.inflight.clear()
            return
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
        # One result at a time, counted done once handed on: abort() counts as lost exactly what was not.
        for status, payload, extra in done:
            count = 1 if status in (_OK, _ERROR, -2) else int(extra) if status == -1 else 0
            with self.lock:
                if self.aborted:
                    return  # (close's timeout: what is left was told as lost)
                self.delivering = count
            try:
                self._hand_on(status, payload)
            finally:
                with self.lock:
                    self.delivering = 0
                    if count:
                        self.outstanding -= count
                        if not self.outstanding:
                            self.cond.notify_all()

    def _hand_on(self, status: int, payload: Any) -> None:
        """One result to on_done, or an error to on_error (or to raise)."""
        calls = self.calls
        if status == _OK:
            if calls.on_done is not None:
                try:
                    result = pickle.loads(payload)
                except Exception as exc:
                    calls.report(exc)
                else:
                    calls.deliver(result)
        elif status == _ERROR:
            try:
                error = pickle.loads(payload)
            except Exception as failure:
                error = RuntimeError(f"the callback raised an exception that cannot be unpickled here: {failure!r}")
            calls.report(error)
        else:  # -1: the pool broke (its waiting chunks are dropped); -2: a worker died with a chunk; -3: idle
            calls.report(payload)

    def owns(self, thread: threading.Thread) -> bool:
        """Whether ``thread`` is this pool's collector."""
        return thread is self.collector

    def abort(self) -> int:
        """Stop at once (close's timeout expired): kill every worker, drop the chunks not yet done; return how
        many (running in a worker, queued for one, or not yet sent)."""
        with self.lock:
            if self.closed:
                return 0
            self.closed = self.aborted = True
            lost = self.outstanding - self.delivering
            waiting = list(self.pending)  # (never sent to a worker)
            self.pending.clear()
            for task in waiting:
                self._release(task[1])
            self.outstanding -= len(waiting)
            self._closing()
            for w in self._stopping:
                with contextlib.suppress(ValueError):  # (a process already closed)
                    w.proc.kill()
            self.cond.notify_all()
        self._stop(False)
        return lost

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
                # (aborted: it may be stuck in the user's on_done or on_error; it is a daemon)
                collector.join(1.0 if self.aborted else None)
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
