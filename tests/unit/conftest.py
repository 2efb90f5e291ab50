"""The fast lane: a test under tests/unit never starts a process (those go to tests/integration).

Every way Python starts a process is replaced, for the setup, call and teardown of each unit test, by one
that records the attempt and raises; the test then fails with where it tried, even if it swallowed the
error or tried from a thread (a pool starting its workers), and does not hang waiting for a worker that
never comes.
"""

from __future__ import annotations

import _posixsubprocess
import multiprocessing.process
import os
import signal
import subprocess
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# (owner, attribute): what starts a process. subprocess and multiprocessing's resource tracker and
# forkserver end in _posixsubprocess.fork_exec (subprocess through its own alias) or os.posix_spawn.
STARTERS: list[tuple[Any, str]] = [
    (os, "fork"),
    (os, "forkpty"),
    (os, "posix_spawn"),
    (os, "posix_spawnp"),
    (os, "system"),
    (_posixsubprocess, "fork_exec"),
    (subprocess, "_fork_exec"),
    (multiprocessing.process.BaseProcess, "start"),
]


class ProcessStartedInUnitTest(RuntimeError):
    """Raised where a unit test tries to start a process."""


def _refuse(name: str, attempts: list[str]) -> Callable[..., Any]:
    def refused(*args: Any, **kwargs: Any) -> Any:
        where = "".join(traceback.format_stack(limit=8)[:-1])
        attempts.append(f"{name} was called\n{where}")
        # Code that swallows the error may then wait for a worker that never comes: interrupt the main
        # thread (at once for an attempt from another thread) unless the phase is over by then.
        in_main = threading.current_thread() is threading.main_thread()
        timer = threading.Timer(0.5 if in_main else 0.0, _kick, args=(attempts,))
        timer.daemon = True
        timer.start()
        raise ProcessStartedInUnitTest(_message(name))

    return refused


def _message(name: str) -> str:
    return f"tests/unit never starts a process ({name} was called): move this test to tests/integration"


# _kick sends this signal to the main thread. Its handler stays installed for the whole session: a signal that arrives just after a phase ends must not kill pytest (the default).
_INTERRUPT = signal.SIGUSR1
_phase_attempts: list[str] | None = None  # the attempts of the phase running now, None between phases


def _kick(attempts: list[str]) -> None:
    if _phase_attempts is attempts:
        signal.pthread_kill(threading.main_thread().ident or 0, _INTERRUPT)


def _interrupted(signum: int, frame: Any) -> None:
    if _phase_attempts:
        name = _phase_attempts[0].split(" was called", 1)[0]
        raise ProcessStartedInUnitTest(_message(name) + " (from another thread)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    return (yield from _no_process(item, "setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    return (yield from _no_process(item, "call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    return (yield from _no_process(item, "teardown"))


def _no_process(item: pytest.Item, phase: str) -> Iterator[None]:
    global _phase_attempts
    attempts: list[str] = []
    if signal.getsignal(_INTERRUPT) is not _interrupted:
        signal.signal(_INTERRUPT, _interrupted)
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr in STARTERS if hasattr(owner, attr)]
    for owner, attr, _ in saved:
        setattr(owner, attr, _refuse(f"{getattr(owner, '__name__', owner)}.{attr}", attempts))
    _phase_attempts = attempts
    try:
        result = yield
    finally:
        _phase_attempts = None
        for owner, attr, original in saved:
            setattr(owner, attr, original)
    if attempts:
        pytest.fail(
            f"{item.nodeid} tried to start a process during its {phase} ({len(attempts)} time(s)): tests/unit "
            f"is the fast lane and never starts one: move this test to tests/integration.\nFirst attempt: {attempts[0]}",
            pytrace=False,
        )
    return result
