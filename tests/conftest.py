"""Shared fixtures: slabcast's own tests use the fixtures of its pytest plugin (slabcast.testing)."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator
from typing import Any

import pytest

import slabcast
from slabcast.testing import Workers

CTX = mp.get_context("spawn")
collect_ignore = ["plugin_project"]  # a user's project, run by test_plugin.py as its own pytest session


def slabcast_segments() -> set[str]:
    """Names of slabcast's shared-memory segments that exist now."""
    return set(slabcast.core.shm.broker_segments())


def _ours_or_orphaned(name: str) -> bool:
    # Other processes on this machine may run brokers too: a new segment is this test's
    # leak if its broker is dead, or is still alive as a child of this process.
    pid = int(name.split(".")[1])
    if pid == os.getpid():  # made by this process itself (BufferEmit's process mode)
        return True
    if not slabcast.core.shm.pid_alive(pid):
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return int(stat[stat.rindex(b")") + 2 :].split()[1]) == os.getpid()


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Fail a test that leaves a slabcast segment of its own behind."""
    before = slabcast_segments()
    yield
    leaked = sorted(n for n in slabcast_segments() - before if _ours_or_orphaned(n))
    assert not leaked, f"shared-memory segments left behind: {leaked}"


@pytest.fixture
def stream_name(slabcast_stream_name: str) -> str:
    """A stream name unique to this test (the plugin's)."""
    return slabcast_stream_name


@pytest.fixture
def broker(slabcast_broker: slabcast.BrokerProcess) -> slabcast.BrokerProcess:
    """The plugin's isolated broker."""
    return slabcast_broker


@pytest.fixture
def workers() -> Iterator[Workers]:
    """The plugin's worker pool, without the exit-code check (some tests kill workers on purpose)."""
    w = Workers()
    yield w
    w.close()


@pytest.fixture
def queue() -> Iterator[Any]:
    """A spawn-context queue for results and ready signals from workers."""
    q = CTX.Queue()
    yield q
    q.close()
    q.join_thread()
