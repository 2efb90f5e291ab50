"""``slabcast up CONFIG``: check the whole config (cli/up_config.py), then start the broker, its sources and
supervised task workers.

Each task's workers are processes that subscribe and call the task on every chunk; one that crashes is restarted
with a back-off, one that an eviction or its stream's end stops is said.  A worker whose stream ends exits 0 and
is done; when every worker is done (finite sources: a file, a pipe), ``up`` exits 0.  Stopped (Ctrl-C, SIGTERM to
``up`` or to its process group), ``up`` lets each worker finish its stream, partial tail included, within its
task's ``stop_timeout``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from .._exceptions import BrokerGoneError
from ..broker.process import BrokerProcess
from .up_config import Config, ConfigError, Task, load_config, resolve

__all__ = ["Config", "ConfigError", "Task", "load_config", "run_up"]  # (the config's names: cli/up_config.py)

log = logging.getLogger("slabcast.up")

_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
_HEALTHY = 60.0  # seconds a worker must live for its restart back-off to start again from the first step
_STATUS_EVERY = 1.0  # seconds between looks at the broker's status (evicted workers)
_ECHO = 0.3  # seconds within which a signal after the first is the same stop relayed again, not a second one
_GONE = -1  # a restarted worker's `skipped`: its (finite) stream had ended and was gone (task_main); it exits 0
_STOPPED = 128 + signal.SIGTERM  # a worker's exit code when up stopped it (0: it finished its stream)
# How up stops a worker (between two chunks).  Not SIGTERM: SIGTERM and SIGINT sent to up's whole process group
# (timeout(1), `kill -- -PGID`, Ctrl-C) are up's, which stops its workers itself after they finish their
# streams; a worker drops them.  (The broker has a session of its own; a SIGTERM to every process of up's cgroup,
# systemd's KillMode=control-group, reaches it too, and ends its sources' streams only: --sigterm-ends-sources.)
_STOP_WORKER = signal.SIGUSR2
_WORKER_SIGNALS = {signal.SIGINT, signal.SIGTERM, _STOP_WORKER}  # blocked from a worker's start to its handlers


def _dropped(*_: Any) -> None:
    """A worker's handler of SIGINT and SIGTERM: up's signals (see task_main)."""
_ABSENT_LOOK = 0.5  # seconds between the drain's looks for streams that never appeared
_STOP_LOOK = 0.1  # seconds a worker waiting for a chunk goes without looking whether up stopped it
_STOP_WAIT = 5.0  # seconds a stopped worker gets to finish the chunk in its callback before up names where it was


def task_main(task: Task, address: str, index: int, reached: int | None = None, directory: str = "",
              progress: Any = None, finite: bool = False, skipped: Any = None) -> None:  # fmt: skip
    """A worker process: subscribe with the task's settings and call the task on every chunk.

    ``reached``: for a restarted worker, the stream index its predecessor had processed up to;
    the samples between it and this worker's start are reported as missed.  ``progress``: a shared
    integer (``multiprocessing.Value``) this worker sets to the stream index it has processed up to:
    its start once subscribed, then the end of each chunk whose callback returned.  ``directory``
    (the config's) goes first on the import path.  ``finite``: the stream's source ends (a file, a pipe):
    a restarted worker that finds it gone (it ended, and was unlinked once its last reader left) exits 0
    having set ``skipped`` to ``_GONE``, instead of waiting for a stream that never comes back.
    ``skipped``: a shared integer this (restarted) worker sets to the samples it reports as missed.
    Returns (exit code 0) when the stream ends; any error ends the process with a traceback.
    """
    from .._exceptions import EndOfStream, StreamNotFoundError
    from ..client.subscriber import Subscriber

    if directory and directory not in sys.path:
        sys.path.insert(0, directory)

    importing = [True]  # the task's module is imported: a stop meanwhile is acted on once it is done
    subscribed = [False]  # the subscriber is made: a stop only asks from then on
    stopped = [False]

    def stop(*_: Any) -> None:
        stopped[0] = True  # seen between two chunks, or by a wait within _STOP_LOOK: never inside the callback (a file
        if not subscribed[0] and not importing[0]:  # half written), the client's recv (a multipart message half
            # read) nor the task's import (which may start programs: they inherit no blocked signal of ours).
            # Still in Subscriber(), waiting for the stream to appear (as long as it takes): raised there (the
            # constructor cleans up after itself; nothing of the task's is lost), or just after it returned (its
            # __del__ closes it then).
            raise SystemExit(_STOPPED)

    # SIGINT and SIGTERM to our group (Ctrl-C, systemd, timeout) are up's, which stops us itself: caught and
    # dropped (not SIG_IGN, which a program the task runs would inherit through exec).  They, and up's stop,
    # were blocked from before this process started (up's _start): a signal meanwhile waits for its handler.
    signal.signal(signal.SIGINT, _dropped)
    signal.signal(signal.SIGTERM, _dropped)
    signal.signal(_STOP_WORKER, stop)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(name)s %(levelname)s %(message)s")
    fn = resolve(task.call)
    importing[0] = False
    if stopped[0]:
        raise SystemExit(_STOPPED)  # (stopped while it imported)
    # The broker holds the subscription until the stream exists: a worker may start first.  Not a restarted
    # worker of a finite stream: it was there, and once gone it has ended.
    try:
        sub = Subscriber(task.stream, task.size, seconds=task.seconds, clip=task.clip, sampler=task.sampler,
                         policy=task.policy, max_inflight=task.max_inflight, address=address,
                         wait=0 if finite and reached is not None else 86400.0, label=f"task:{task.name}#{index}",
                         partial_tail=task.partial_tail)  # fmt: skip
    except (StreamNotFoundError, EndOfStream):  # (gone, or ending as it answered)
        if not (finite and reached is not None):
            raise
        if skipped is not None:
            skipped.value = _GONE  # (up reads it: an exit code could be the task's own)
        return
    subscribed[0] = True
    with sub:
        if reached is not None and sub.start_index > reached:
            # A restarted worker: what its predecessor did not read is not ours to see (a lossless
            # task must know what it missed).
            line = (f"task {task.name}#{index} restarted at stream index {sub.start_index}: samples "
                    f"{reached}..{sub.start_index - 1} ({sub.start_index - reached}) were not processed")  # fmt: skip
            logging.getLogger("slabcast.up").warning(line)
            if skipped is not None:
                skipped.value = sub.start_index - reached
        if progress is not None:
            progress.value = sub.start_index
        done = sub.start_index
        ended = False
        try:
            while not stopped[0]:
                try:
                    chunk = sub.recv(_STOP_LOOK)
                except TimeoutError:
                    continue
                except EndOfStream as exc:
                    if type(exc) is EndOfStream:
                        ended = True  # (closed: every chunk taken, done whatever came after; a publisher gone is
                        break  # an error)
                    raise
                with chunk:
                    if stopped[0]:
                        break  # (stopped while it waited: not one chunk more)
                    fn(chunk, **task.options)
                    done = chunk.index + len(chunk)
                    if progress is not None:
                        progress.value = done  # (its callback returned: processed)
        except BrokerGoneError as exc:
            # (`up` itself killed, its broker with it: one line, not a traceback that reads as the task's bug)
            logging.getLogger("slabcast.up").error("task %s#%d: %s, having processed its stream up to index %d",
                                                   task.name, index, exc, done)  # fmt: skip
            raise SystemExit(1) from None
    if stopped[0] and not ended:
        raise SystemExit(_STOPPED)  # (the subscription said goodbye: nothing looks dead)


def _stop_worker(proc: Any) -> None:
    """Stop a worker between two chunks (it exits with _STOPPED)."""
    with contextlib.suppress(ProcessLookupError, TypeError):  # (gone, or never started: pid None)
        os.kill(proc.pid, _STOP_WORKER)


@dataclass
class _Slot:
    task: Task
    index: int
    proc: Any = None
    restarts: int = 0
    streak: int = 0  # crashes in a row (the back-off step)
    started: float = 0.0
    due: float = 0.0
    done: bool = False
    failed: bool = False  # gave up after max_failures in a row
    seen: bool = False  # it has been seen subscribed in the broker's status
    missing_since: float = 0.0
    reached: int | None = None  # the stream index its last worker had processed up to
    progress: Any = None  # the running worker's: its start, then the end of each chunk processed (-1: none yet)
    skipped: Any = None  # the running worker's: samples between its predecessor's progress and its start
    missed: int = 0  # samples its restarted workers did not process, all told (said at the end)
    missed_end: int | None = None  # where the samples up to its ended stream's end went unprocessed (_GONE)
    finished: bool = False  # a worker of it finished its stream (exit 0)

    def processed(self) -> int | None:
        """The stream index the running (or last) worker processed up to, or None if it never subscribed."""
        value = -1 if self.progress is None else int(self.progress.value)
        return value if value >= 0 else None

    @property
    def name(self) -> str:
        return f"{self.task.name}#{self.index}"

    @property
    def label(self) -> str:
        return f"task:{self.name}"


def _subscribed_labels(status: dict[str, Any]) -> set[tuple[str, int]]:
    """(label, pid) of every subscriber the broker lists.  (Where a worker has processed to is its own word:
    ``_Slot.progress``.)"""
    return {(u["label"], u["pid"]) for s in status["streams"] for u in s["subscribers"]}


def _check_sources(status: dict[str, Any], failed: dict[str, str], say: Any) -> None:
    """Say each hosted source that failed (its stream will not come: no room in /dev/shm, a device gone for good)
    once, and keep it in ``failed`` (stream -> why): up exits 1 at the end, as for a failed task."""
    for source in status.get("sources", ()):
        if source.get("state") == "failed" and source["name"] not in failed:
            failed[source["name"]] = why = source.get("error") or "no reason given"
            say(f"source {source['name']!r} failed ({why}); the tasks on its stream get nothing from it")


def _never_appeared(address: str, names: set[str]) -> set[str]:
    """Those of ``names`` the broker neither serves nor ended in the last minute (empty if it cannot say)."""
    from ..client.control import broker_status

    if not names:
        return set()
    try:
        status = broker_status(address, timeout=1.0)
    except Exception:  # the broker is stopping: nothing said
        return set()
    seen = {s["name"] for s in status["streams"]} | {s["name"] for s in status.get("ended_streams", ())}
    return names - seen


def run_up(path: str, output: Any = print, log_level: str = "WARNING") -> int:
    """Run the system described by the config at ``path`` until SIGINT/SIGTERM, or until every task is done.

    Returns the exit code: 0 after a clean stop or when every worker finished its
    stream; 1 if the broker failed, a task gave up (``max_failures``), a hosted
    source failed, or a worker did not finish its stream after the stop (its
    ``stop_timeout``, or a crash; not after a second Ctrl-C).
    """
    config = load_config(path)

    def say(line: str) -> None:
        with contextlib.suppress(BrokenPipeError, ValueError):  # a closed stdout must not stop the shutdown
            output(line)

    # Signals counted, nothing more: a handler that took a lock (Event.set) deadlocked when a second signal
    # came while the first handler held it (Ctrl-C relayed twice). The loop looks every 0.1 s.
    signals = [0]
    first = [0.0, 0]  # (when, which) the first signal came

    def count(signum: int, *_: Any) -> None:
        # One Ctrl-C reaches up twice within milliseconds when up runs under a relay in the terminal's process
        # group (`timeout 90 slabcast up ...`: the terminal's SIGINT, then timeout's): counted once.  A second
        # Ctrl-C ("stop now") is another signal, or the same one later than _ECHO after the first.
        now = time.monotonic()
        if signals[0] == 1 and signum == first[1] and now - first[0] < _ECHO:
            return
        if not signals[0]:
            first[0], first[1] = now, signum
        signals[0] += 1

    old = [signal.signal(signal.SIGTERM, count), signal.signal(signal.SIGINT, count)]
    ctx = mp.get_context("spawn")
    # Spawn's resource tracker started now, not inside the first worker's start(): its launch unblocks SIGINT and
    # SIGTERM in this thread, undoing the block a worker must start under (a reviewer: the first worker died of a
    # group Ctrl-C in its import).
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    slots = [_Slot(t, i) for t in config.tasks for i in range(t.workers)]
    args = (*config.broker_args, "--sigterm-ends-sources")  # (stopped with SIGINT: see below)
    if "--log-level" not in args:
        args += ("--log-level", log_level)
    # The broker's and its sources' log lines go to our standard error, prefixed by component, through a
    # pipe whose last lines say why, should the broker not start.
    tail: collections.deque[str] = collections.deque(maxlen=20)
    read_fd, write_fd = os.pipe()
    pump = threading.Thread(target=_pump, args=(read_fd, tail), name="broker-stderr", daemon=True)
    pump.start()
    broker = BrokerProcess(config.address, args=args, stderr_fd=write_fd)
    try:
        broker.start()
    except BrokerGoneError:
        os.close(write_fd)
        pump.join(5)
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
        code = broker.process.returncode if broker.process is not None else None
        reason = "; ".join(tail) or "it printed nothing"
        how = f"exited with code {code}" if code is not None else f"did not serve within {broker.startup_timeout} s"
        say(f"the broker {how} before serving: {reason}")
        raise BrokerGoneError(f"the broker {how} before serving: {reason}") from None
    os.close(write_fd)
    finished = False
    cut_off = False  # a task did not finish its stream after the stop (not for a second Ctrl-C)
    broker_died = False
    failed_sources: dict[str, str] = {}  # stream -> why its hosted source failed
    from ..client.control import broker_status

    try:
        say(f"broker {broker.pid} serving {broker.address}")
        next_status = time.monotonic() + _STATUS_EVERY
        while not signals[0]:
            now = time.monotonic()
            for slot in slots:
                if slot.proc is not None and not slot.proc.is_alive():
                    _reap(slot, now, say)
                if slot.proc is None and not slot.done and now >= slot.due:
                    slot.progress = ctx.Value("q", -1, lock=False)
                    slot.skipped = ctx.Value("q", 0, lock=False)
                    slot.proc = ctx.Process(target=task_main, args=(slot.task, broker.address, slot.index,
                                                                    slot.reached, config.directory, slot.progress,
                                                                    slot.task.stream in config.finite,
                                                                    slot.skipped),
                                            name=f"slabcast-task-{slot.name}")  # fmt: skip
                    # Blocked in the child from its first instruction until task_main's handlers (a group
                    # signal meanwhile would kill it): the mask is inherited, unblocked there.
                    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
                    try:
                        slot.proc.start()
                    finally:
                        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                    slot.started, slot.seen, slot.missing_since = now, False, 0.0
                    say(f"task {slot.name} started, pid {slot.proc.pid}")
            if all(slot.done for slot in slots):
                failed = sorted({s.task.name for s in slots if s.failed})
                say(f"every task is done; failed: {', '.join(failed)}" if failed else "every task finished its stream")
                finished = True
                break
            if broker.process is not None and broker.process.poll() is not None:
                say(f"the broker exited with code {broker.process.returncode}")  # ("stopping" follows)
                broker_died = True
                break
            if now >= next_status:
                next_status = now + _STATUS_EVERY
                try:
                    status = broker_status(broker.address, timeout=1.0)
                except Exception:  # the broker is busy or stopping; look again next time
                    status = None
                if status is not None:
                    _check_sources(status, failed_sources, say)
                    _check_evicted(slots, status, config.lease_timeout, now, say)
            time.sleep(0.1)
    finally:
        say("stopping")
        if not finished and broker.process is not None and broker.process.poll() is None:
            # The sources end their streams first, and the tasks on them finish them (every sample, the
            # last partial chunk too) and exit by themselves; one still busy after its stop_timeout is stopped.
            with contextlib.suppress(ProcessLookupError):
                os.kill(broker.pid, signal.SIGUSR1)
            say("the sources end their streams; the tasks finish them (Ctrl-C again: stop now)")
            cut_off = _drain(slots, broker.address, time.monotonic(), signals, say, failed_sources)
        for slot in slots:
            if slot.proc is not None and slot.proc.is_alive():
                _stop_worker(slot.proc)
        for slot in slots:
            if slot.proc is not None:
                slot.proc.join(5)
                if slot.proc.is_alive():
                    slot.proc.kill()
                    slot.proc.join()
                slot.proc.close()
        # SIGINT: its SIGTERM ends the sources' streams only (a SIGTERM to our whole cgroup, systemd's
        # KillMode=control-group, reaches it too).  8 s: longer than it gives its sources' threads to stop (5 s).
        code = broker.stop(timeout=8.0, sig=signal.SIGINT)
        if broker_died:  # (its segments stayed in /dev/shm until the next broker started; a newcomer)
            from ..core.shm import reap_stale

            reaped = reap_stale()
            if reaped:
                say(f"removed the shared memory the broker left: {', '.join(reaped)}")
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
    say(f"stopped (broker exit code {code}, {sum(s.restarts for s in slots)} restarts)")
    for slot in slots if broker_died else ():  # (its workers' own lines race with their stop: said here, each)
        if not slot.done:
            where = slot.processed()
            say(f"task {slot.name} processed its stream up to index {where} when the broker died" if where is not None
                else f"task {slot.name} had not subscribed when the broker died")  # fmt: skip
    for slot in slots:  # (a newcomer: said only in a worker's log line, easy to miss; up exited 0 all the same)
        _took_skipped(slot)  # (a worker still running at the stop)
        parts = [f"{slot.missed} samples"] if slot.missed else []
        if slot.missed_end is not None:
            parts.append(f"the samples from stream index {slot.missed_end} to its stream's end, if any")
        elif slot.failed:  # (no longer restarted: what came after its last worker went unprocessed too)
            after = "its stream's start" if slot.reached is None else f"stream index {slot.reached}"
            parts.append(f"the samples from {after} on (it was no longer restarted)")
        if parts:
            n = slot.restarts
            restarts = f", across its {n} restart{'' if n == 1 else 's'}" if n else ""
            say(f"task {slot.name} did not process {' and '.join(parts)}{restarts}")
    if failed_sources:
        say(f"failed: source{'s' * (len(failed_sources) > 1)} {', '.join(map(repr, failed_sources))}")
    if any(s.failed for s in slots) or cut_off or failed_sources:
        return 1  # a task or a source gave up, or a task did not finish its stream in time: not all was done
    if finished:
        return 0
    return 0 if code in (0, None) else 1


def _drain(slots: list[_Slot], address: str, stop: float, signals: list[int], say: Any,
           failed: dict[str, str]) -> bool:
    """After the stop (at ``stop``), while the workers finish their streams: name each one that finished, one
    that exited otherwise (a crash on its last chunks), and one still busy after its task's ``stop_timeout``,
    which is stopped then (between two chunks) with the stream index it had processed to (said once it has
    exited); a second Ctrl-C stops and names the rest at once.  Return whether a worker did not finish its
    stream (not counting a second Ctrl-C)."""
    pending = [s for s in slots if s.proc is not None and not s.task.external]
    cut = False
    # A worker still waiting for a stream that never appeared (not served, not ended lately) has nothing to
    # finish: stopped at once, said so (a lab newcomer's Ctrl-C before the device came waited 10 s, then said
    # the stream was cut).
    stopping: dict[int, tuple[str, float]] = {}  # id(slot) -> (why, when): stopped, said once it is gone
    next_look = 0.0  # (looked at again every _ABSENT_LOOK s: a worker still importing its task subscribes late)

    def index_of(slot: _Slot) -> str:
        at = slot.processed()
        return f" at stream index {at}" if at is not None else ""

    while pending:
        now = time.monotonic()
        if now >= next_look:
            next_look = now + _ABSENT_LOOK
            absent = _never_appeared(address, {s.task.stream for s in pending if id(s) not in stopping})
            for slot in [s for s in pending if s.task.stream in absent and id(s) not in stopping]:
                pending.remove(slot)
                why = "its source failed" if slot.task.stream in failed else "never appeared"
                say(f"task {slot.name} stopped: its stream {slot.task.stream!r} {why}")
                _stop_worker(slot.proc)
        for slot in list(pending):
            late = now >= stop + slot.task.stop_timeout
            alive = slot.proc.is_alive()
            if id(slot) in stopping:
                # Said once it exited (it finishes the chunk in its callback first): the index is then exact.
                # (After a second Ctrl-C too: it finishes its callback first either way, and said before, the
                # index named the chunk in that callback as not processed.)
                when, since = stopping[id(slot)]
                if alive and now - since < _STOP_WAIT:
                    continue
                pending.remove(slot)
                busy = f" (still in the callback of its next chunk after {_STOP_WAIT:g} s)" if alive else ""
                say(f"task {slot.name} had not finished its stream {when}: stopped{index_of(slot)}{busy}; the "
                    f"samples after it up to the stream's end were not processed")  # fmt: skip
            elif not alive:
                pending.remove(slot)
                code = slot.proc.exitcode
                if _took_skipped(slot) and code == 0:
                    say(_gone_line(slot))
                elif code == 0:
                    say(f"task {slot.name} finished its stream")
                else:
                    say(f"task {slot.name} exited with code {code} before the end of its stream")
                    cut = True
            elif late or signals[0] >= 2:
                when = "when Ctrl-C came again" if signals[0] >= 2 else f"{slot.task.stop_timeout:g} s after the stop"
                stopping[id(slot)] = (when, now)
                _stop_worker(slot.proc)  # (between two chunks: task_main)
                cut = cut or signals[0] < 2
        time.sleep(0.05)
    return cut


def _pump(fd: int, tail: collections.deque[str]) -> None:
    """Copy the broker's standard error to ours, keeping its last lines."""
    with open(fd, "rb") as f:
        for line in f:
            tail.append(line.decode(errors="replace").rstrip())
            with contextlib.suppress(OSError):
                os.write(2, line)


def _reap(slot: _Slot, now: float, say: Any) -> None:
    """A worker exited: done (code 0, its stream ended) or crashed (restart with back-off)."""
    code = slot.proc.exitcode
    gone = _took_skipped(slot)
    slot.proc.close()
    slot.proc = None
    if gone and code == 0:
        slot.done = True  # (a newcomer's restarted recorder waited for ever, and up with it)
        say(_gone_line(slot))
        return
    if (at := slot.processed()) is not None:
        slot.reached = at  # what its successor reports as missed starts here
    if code == 0:
        slot.finished = True
    if code == 0 and not slot.task.restart_on_end:
        slot.done = True
        say(f"task {slot.name} finished its stream")
        return
    if code == _STOPPED:  # (SIGUSR2 to the worker, by hand: a restart asked for, between two chunks; no failure)
        slot.restarts += 1
        slot.due = now + _BACKOFF_FIRST
        say(f"task {slot.name} was stopped by SIGUSR2; restart {slot.restarts} in {_BACKOFF_FIRST:g} s")
        return
    if now - slot.started >= _HEALTHY:
        slot.streak = 0  # it ran well for a while: this is a new failure, not the same one again
    slot.streak += 1
    if code != 0 and slot.task.max_failures and slot.streak >= slot.task.max_failures:
        slot.done = slot.failed = True  # the others go on; up exits 1 at the end
        times = f"{slot.streak} time{'' if slot.streak == 1 else 's'} in a row"
        say(f"task {slot.name} failed: exited with code {code}, {times}; not restarted "
            f"(max_failures = {slot.task.max_failures})")  # fmt: skip
        return
    slot.restarts += 1
    delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (slot.streak - 1))
    slot.due = now + delay
    say(f"task {slot.name} exited with code {code}; restart {slot.restarts} in {delay:g} s")


def _took_skipped(slot: _Slot) -> bool:
    """Add what the slot's exited worker reported as missed to its count; True if it found its stream gone."""
    value = int(slot.skipped.value) if slot.skipped is not None else 0
    slot.skipped = None
    if value == _GONE:
        if not slot.finished:  # (a worker that finished its stream before, restarted on its end: nothing lost)
            slot.missed_end = slot.reached
        return True
    slot.missed += value
    return False


def _gone_line(slot: _Slot) -> str:
    if slot.missed_end is None:
        return f"task {slot.name}: its stream ended and is gone: done"
    return (f"task {slot.name}: its stream ended before this restart and is gone: the samples from stream index "
            f"{slot.missed_end} to its end, if any, were not processed")  # fmt: skip


def _check_evicted(slots: list[_Slot], status: dict[str, Any], lease_timeout: float, now: float, say: Any) -> None:
    """A live worker that the broker no longer lists (evicted: stuck past its lease) is killed and restarted."""
    present = _subscribed_labels(status)
    for slot in slots:
        if slot.proc is None or not slot.proc.is_alive():
            continue
        if (slot.label, slot.proc.pid) in present:
            slot.seen, slot.missing_since = True, 0.0
            continue
        if not slot.seen:
            continue  # still starting, or waiting for its stream
        if not slot.missing_since:
            slot.missing_since = now
        elif now - slot.missing_since >= min(5.0, lease_timeout):
            say(f"task {slot.name} (pid {slot.proc.pid}) lost its subscription (evicted: stuck past the "
                f"lease timeout); killing it to restart")  # fmt: skip
            slot.proc.kill()
