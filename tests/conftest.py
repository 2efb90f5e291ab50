"""Shared fixtures: slabcast's own tests use the fixtures of its pytest plugin (slabcast.testing)."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import secrets
import select
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import slabcast
from slabcast.testing import Workers

CTX = mp.get_context("spawn")
collect_ignore = ["plugin_project"]  # a user's project, run by test_plugin.py as its own pytest session


# The lanes, in the order they run: a unit failure shows within seconds, before any process is started.
LANES = ("unit", "property", "integration")
_TESTS = Path(__file__).resolve().parent


def _lane(item: pytest.Item) -> int:
    try:
        return LANES.index(item.path.relative_to(_TESTS).parts[0])
    except (ValueError, IndexError):
        return len(LANES)


def pytest_configure(config: pytest.Config) -> None:
    """Write the bytecode of the package and of the tests' worker modules once, up front.  Where
    PYTHONDONTWRITEBYTECODE is set (containers, CI images: this machine sets it), Python writes none, and
    each of the suite's thousand-odd broker, worker and CLI processes compiled slabcast's sources again:
    50-60 ms a process.  A cached .pyc is read whatever that variable says."""
    import compileall

    for root in (Path(slabcast.__file__).resolve().parent, _TESTS):
        compileall.compile_dir(root, quiet=2, workers=1)  # (a read-only tree: nothing written, nothing lost)


@pytest.hookimpl(tryfirst=True)  # before -m selects by the marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark everything under tests/integration `integration`, and run the lanes in order (a stable sort)."""
    for item in items:
        if _lane(item) == LANES.index("integration"):
            item.add_marker(pytest.mark.integration)
    items.sort(key=_lane)


def slabcast_segments() -> set[str]:
    """Names of slabcast's shared-memory segments that exist now."""
    return set(slabcast.core.shm.broker_segments())


# Every process this session starts carries this mark (children inherit it, grandchildren too, even when
# their parent dies and they are re-parented): the leak guard tells this session's brokers by it.
SESSION_MARK = f"{os.getpid()}-{secrets.token_hex(4)}"
os.environ["SLABCAST_TEST_SESSION"] = SESSION_MARK

_IN_CREATE, _IN_MOVED_TO, _IN_Q_OVERFLOW = 0x100, 0x80, 0x4000
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len, then the name


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def made_by_this_session(pid: int) -> bool:
    """Whether process ``pid`` (alive, or a zombie not yet reaped) is this session or was started by it."""
    me = os.getpid()
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            if f"SLABCAST_TEST_SESSION={SESSION_MARK}".encode() in f.read().split(b"\0"):
                return True
        for _ in range(64):  # a zombie has no environment left, but still its parent
            if pid == me:
                return True
            if pid <= 1:
                return False
            pid = _parent(pid)
    except (OSError, ValueError, IndexError):
        pass
    return False


class SegmentOwners:
    """Names of the segments made by this session's processes, learnt as they appear in /dev/shm.

    The owner of a segment may be dead by the time a test ends (killed on purpose, or crashed); then its
    PID says nothing, and another pytest run's dead broker must not be blamed on this test. So each new
    segment is attributed when it appears (inotify on the directory; its creator is alive then, or a
    zombie of ours), by the session mark in its creator's environment or by its ancestry.
    """

    def __init__(self, directory: str = slabcast.core.shm.SHM_DIR) -> None:
        self.ours: set[str] = set()
        self.overflowed = False
        self._lock = threading.Lock()
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0 or libc.inotify_add_watch(self._fd, directory.encode(), _IN_CREATE | _IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), f"cannot watch {directory}")
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="slabcast-segment-owners", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self._fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            self.catch_up()

    def catch_up(self) -> None:
        """Attribute every segment that appeared until now (the watch thread does this continuously)."""
        with self._lock:
            while True:
                try:
                    buf = os.read(self._fd, 65536)
                except BlockingIOError:
                    return
                offset = 0
                while offset < len(buf):
                    _, mask, _, length = _EVENT.unpack_from(buf, offset)
                    start, offset = offset + _EVENT.size, offset + _EVENT.size + length
                    name = buf[start:offset].rstrip(b"\0").decode(errors="replace")
                    if mask & _IN_Q_OVERFLOW:
                        self.overflowed = True
                    elif name.startswith("slabcast.") and made_by_this_session(_owner(name)):
                        self.ours.add(name)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join()
        for fd in (self._fd, self._stop_r, self._stop_w):
            os.close(fd)


def _owner(name: str) -> int:
    try:
        return int(name.split(".")[1])
    except (IndexError, ValueError):
        return -1


@pytest.fixture(scope="session")
def segment_owners() -> Iterator[SegmentOwners]:
    """The session's record of which new segments its own processes made."""
    owners = SegmentOwners()
    yield owners
    owners.close()


@pytest.fixture(autouse=True)
def no_leaked_segments(segment_owners: SegmentOwners) -> Iterator[None]:
    """Fail a test that leaves a slabcast segment of its own behind (other processes' segments are theirs)."""
    before = slabcast_segments()
    yield
    segment_owners.catch_up()
    new = slabcast_segments() - before
    # Not seen appear (the kernel's event queue overflowed): only a live owner can still be attributed.
    leaked = sorted(n for n in new if n in segment_owners.ours or made_by_this_session(_owner(n)))
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
