"""BufferEmit's thread mode: callbacks in a pool of threads, on copies of the chunks."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from .base import Callbacks, Pool, Slab
from .frames import FrameFormat


class ThreadPool(Pool):
    """Callbacks in up to ``npool`` threads, started as the work needs them."""

    def __init__(self, calls: Callbacks, npool: int, slab_min: int) -> None:
        super().__init__(calls, npool, slab_min)
        self.tasks: queue.SimpleQueue[tuple[Slab, int, int, float] | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.idle = 0
        self.make: Callable[[memoryview, int, int], Any] | None = None

    def set_format(self, fmt: FrameFormat) -> None:
        self.make = fmt.copier()

    def dispatch(self, slab: Slab, offset: int, nbytes: int, t0: float) -> None:
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
        calls, lock, cond, make = self.calls, self.lock, self.cond, self.make
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
                result = calls.callback(value, t0)
            except Exception as exc:
                calls.report(exc)
            except BaseException as exc:  # as ThreadPoolExecutor does: this thread goes on
                failure = RuntimeError(f"the callback raised {exc!r}")
                failure.__cause__ = exc
                calls.report(failure)
            else:
                calls.deliver(result)
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
