"""pytest plugin: an isolated broker per test, workers in spawned processes, feeding a stream, leak checks.

Registered through the ``pytest11`` entry point, so installing slabcast makes these
fixtures available in any project (see docs/testing.md):

``slabcast_broker``
    A :class:`~slabcast.BrokerProcess` on a socket under ``tmp_path``, stopped after
    the test; the test fails if the broker did not exit cleanly or left its socket
    file or any shared-memory segment behind.
``slabcast_stream_name``
    A stream name unique to the test.
``slabcast_workers``
    ``slabcast_workers.spawn(fn, *args)`` runs ``fn(*args)`` in a spawned process;
    at the end every worker is joined (killed after ``timeout``); the test fails if
    one had to be killed or exited with a non-zero code (unless ``check=False``).
``slabcast_feed``
    ``slabcast_feed(name, array, frame=..., rate=..., ready=...)`` publishes an
    array as a stream in frames and closes it; ``ready()`` runs once the stream
    exists, before the first frame (start and await your workers there).
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .broker.process import BrokerProcess
from .client.publisher import Publisher
from .core.shm import broker_segments
from .wire.address import ipc_path

__all__ = ["Workers", "broker_segments", "feed"]


class Workers:
    """Worker processes started with the ``spawn`` method, reaped when the test ends.

    Parameters
    ----------
    timeout : float
        Seconds each worker may take to finish after the test body.
    """

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._ctx = mp.get_context("spawn")
        self.procs: list[tuple[Any, bool]] = []

    def spawn(self, target: Callable[..., Any], *args: Any, check: bool = True, **kwargs: Any) -> Any:
        """Start ``target(*args, **kwargs)`` in a new process and return the ``multiprocessing.Process``;
        ``check=False``: its exit code is not checked (a worker the test kills)."""
        proc = self._ctx.Process(target=target, args=args, kwargs=kwargs, daemon=True)
        proc.start()
        self.procs.append((proc, check))
        return proc

    def queue(self) -> Any:
        """A queue that spawned workers can use to send results or ready signals."""
        return self._ctx.Queue()

    def get(self, queue: Any, timeout: float = 30.0) -> Any:
        """The next item a worker put on ``queue``: as ``queue.get(timeout=timeout)``, but a checked worker that
        exits non-zero meanwhile fails the test at once, naming it (its traceback is in the captured stderr),
        instead of the whole timeout and an empty-queue error.

        Raises
        ------
        AssertionError
            A checked worker exited non-zero first, every worker exited without putting anything, or nothing
            came within ``timeout`` seconds.
        """
        import queue as queue_module

        deadline = time.monotonic() + timeout
        while True:
            exited = bool(self.procs) and all(proc.exitcode is not None for proc, _ in self.procs)
            try:
                # (once every worker exited, what one put before it did is in the queue's pipe: a last look)
                return queue.get(timeout=0.2 if exited else max(0.0, min(0.05, deadline - time.monotonic())))
            except queue_module.Empty:
                pass
            if exited and all(proc.exitcode == 0 or not check for proc, check in self.procs):
                codes = ", ".join(f"{proc.pid} ({proc.name}): {proc.exitcode}" for proc, _ in self.procs)
                raise AssertionError(f"no result: every worker has exited without putting one (exit codes {codes})")
            for proc, check in self.procs:
                if check and proc.exitcode not in (None, 0):
                    with contextlib.suppress(queue_module.Empty):
                        return queue.get_nowait()  # (put just before it exited)
                    raise AssertionError(f"worker {proc.pid} ({proc.name}) exited with code {proc.exitcode} "
                                         f"before the result the test waited for (its traceback: the captured "
                                         f"stderr)")  # fmt: skip
            if time.monotonic() >= deadline:
                alive = [f"{p.pid} ({p.name})" for p, _ in self.procs if p.is_alive()]
                raise AssertionError(f"no result within {timeout} s; workers still running: {alive or 'none'}")

    def close(self, grace: float | None = None) -> list[str]:
        """Join every worker, giving them ``grace`` seconds in all (default: ``timeout``), and kill those still
        running then; return the problems."""
        problems = []
        deadline = time.monotonic() + (self.timeout if grace is None else grace)
        for proc, _ in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc, check in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
                problems.append(f"worker {proc.pid} ({proc.name}) was still running and had to be killed")
            elif check and proc.exitcode != 0:
                problems.append(f"worker {proc.pid} ({proc.name}) exited with code {proc.exitcode}")
        for proc, _ in self.procs:
            proc.close()
        self.procs.clear()
        return problems


def feed(
    name: str,
    array: Any,
    *,
    frame: int = 1024,
    rate: float | None = None,
    t0: float = 0.0,
    address: str | None = None,
    close: bool = True,
    ready: Callable[[], Any] | None = None,
    times: Any = None,
    **publisher_options: Any,
) -> Publisher:
    """Publish ``array`` (``(n,)`` or ``(n, channels)``) as stream ``name`` in frames of ``frame`` samples.

    Frame ``k`` gets ``t0 + k * frame / rate`` (or ``t0 + k`` seconds without a rate).
    ``times``, ``(n,)`` seconds, one per sample (events, markers): the stream keeps a
    time per sample (``timestamps=True``) and each frame starts at its first sample's.
    ``ready()``, if given, is called once the stream exists and before the first
    frame: start the workers there and wait until they have subscribed, so they see
    the stream from its first sample.  Returns the publisher (closed unless
    ``close=False``).

    Raises
    ------
    ValueError
        ``times`` not one finite number per sample (the stream is not opened).
    """
    data = np.ascontiguousarray(array)
    channels = 1 if data.ndim == 1 else data.shape[1]
    stamps = None
    if times is not None:
        stamps = np.asarray(times, dtype=np.float64)
        if stamps.shape != (len(data),) or not np.isfinite(stamps).all():
            raise ValueError(f"times must be {len(data)} finite seconds, one per sample of the array, got an array "
                             f"of shape {stamps.shape}")  # fmt: skip
        publisher_options.setdefault("timestamps", True)
    pub = Publisher(name, dtype=data.dtype, channels=channels, rate=rate, address=address, **publisher_options)
    if ready is not None:
        ready()
    for k, start in enumerate(range(0, len(data), frame)):
        if stamps is not None:
            pub.write(data[start : start + frame], times=stamps[start : start + frame])
        else:
            pub.write(data[start : start + frame], t0=t0 + (start / rate if rate else k))
    if close:
        pub.close()
    return pub


@pytest.fixture
def slabcast_stream_name(request: pytest.FixtureRequest) -> str:
    """A stream name unique to this test."""
    return "t" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:12]


@pytest.fixture
def slabcast_broker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokerProcess]:
    """A broker on a socket under ``tmp_path``; the test fails if it leaves anything behind."""
    proc = BrokerProcess(tmp_path / "broker.sock")
    proc.start()
    monkeypatch.setenv("SLABCAST_ADDRESS", proc.address)  # a client or worker given no address= finds this broker
    try:
        yield proc
    finally:
        died = proc.process is not None and proc.process.poll() is not None and not proc.killed
        code = proc.stop()
        sock = ipc_path(proc.address)
        leftovers = broker_segments(proc.pid)
        if code not in (0, None):
            from .core.shm import reap_stale

            reap_stale()  # a new broker would clean up the same way
            # Killed with BrokerProcess.kill(): on purpose.  Otherwise it died under the test, or failed its stop.
            what = "died during the test" if died else "did not exit 0 when stopped"
            assert proc.killed, f"the broker {what} (exit code {code}): {proc.stderr()[-2000:]}"
        else:
            assert not leftovers, f"the broker left shared-memory segments behind: {leftovers}"
            assert sock is None or not os.path.exists(sock), f"the broker left its socket file {sock}"


_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
_GRACE_AFTER_FAILURE = 1.0  # seconds the workers of a test that failed (or was interrupted) get to exit


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # (not wrapper=True: pluggy 1.1+ only, and pytest 7 may have 1.0)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test (``slabcast_workers`` reads whether its body passed)."""
    outcome = yield
    report = outcome.get_result()
    item.stash.setdefault(_REPORTS, {})[report.when] = report


@pytest.fixture
def slabcast_workers(request: pytest.FixtureRequest) -> Iterator[Workers]:
    """Start worker processes with ``slabcast_workers.spawn(fn, *args)``; checked and reaped at the end.

    After a test that passed, each worker has ``timeout`` seconds in all to exit 0, else the test errors.  After
    one that failed or was interrupted (Ctrl-C), its workers get a second, then are killed, and nothing is added
    to the test's own report: it says what went wrong (a worker's traceback is in the captured stderr).
    """
    workers = Workers()
    try:
        yield workers
    finally:
        body = request.node.stash.get(_REPORTS, {}).get("call")
        passed = body is not None and body.passed
        problems = workers.close(None if passed else _GRACE_AFTER_FAILURE)
    assert not passed or not problems, "; ".join(problems)


@pytest.fixture
def slabcast_feed(slabcast_broker: BrokerProcess) -> Callable[..., Publisher]:
    """``slabcast_feed(name, array, frame=..., rate=...)``: publish an array to the test's broker."""

    def _feed(name: str, array: Any, **options: Any) -> Publisher:
        options.setdefault("address", slabcast_broker.address)
        return feed(name, array, **options)

    return _feed
