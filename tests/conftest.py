"""Shared fixtures: an isolated broker per test, spawned worker processes, leak checks."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import slabcast

CTX = mp.get_context("spawn")


def slabcast_segments() -> set[str]:
    """Names of slabcast's shared-memory segments that exist now."""
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith("slabcast.")}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Fail a test that leaves a slabcast segment of its own behind."""
    before = slabcast_segments()
    yield
    leaked = slabcast_segments() - before
    assert not leaked, f"shared-memory segments left behind: {sorted(leaked)}"


@pytest.fixture
def stream_name(request: pytest.FixtureRequest) -> str:
    """A stream name unique to this test."""
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]
    return f"t{digest}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[slabcast.BrokerProcess]:
    """A broker process at a socket under ``tmp_path``; stopped, reaped and checked afterwards."""
    proc = slabcast.BrokerProcess(tmp_path / "broker.sock")
    proc.start()
    try:
        yield proc
    finally:
        code = proc.stop()
        sock = slabcast._address.ipc_path(proc.address)
        assert sock is not None
        if code == 0:
            assert not os.path.exists(sock), "the broker left its socket file"
            assert not os.path.exists(sock + ".lock"), "the broker left its lock file"
        else:
            # A test that killed the broker on purpose: the reaper of the next broker
            # cleans up; here we unlink what it made so the leak check stays meaningful.
            slabcast._shm.reap_stale()


class Workers:
    """Spawned processes that are killed and reaped when the test ends."""

    def __init__(self) -> None:
        self.procs: list[Any] = []

    def spawn(self, target: Callable[..., Any], *args: Any) -> Any:
        proc = CTX.Process(target=target, args=args, daemon=True)
        proc.start()
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
        for p in self.procs:
            p.close()


@pytest.fixture
def workers() -> Iterator[Workers]:
    """Start helper processes with ``workers.spawn(fn, *args)``; all are reaped at the end."""
    w = Workers()
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def queue() -> Iterator[Any]:
    """A spawn-context queue for results and ready signals from workers."""
    q = CTX.Queue()
    yield q
    q.close()
    q.join_thread()
