"""The suite's leak guard (tests/conftest.py) blames a test only for segments its own processes made."""

from __future__ import annotations

import _posixshmem
import contextlib
import os
import select
import subprocess
import sys

import pytest

from tests.conftest import made_by_this_session, slabcast_segments

# Makes a segment named like a broker's from a process re-parented away from this one, keeps running until
# its standard input closes, then exits without unlinking it: a broker that died.
MAKE_SEGMENT = """
import os, sys, time, _posixshmem
parent = os.getpid()
if os.fork() == 0:
    while os.getppid() == parent:  # until the middle process has exited and this one is re-parented
        time.sleep(0.005)
    name = f"slabcast.{os.getpid()}.0000f00d.0"
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    print(name, flush=True)
    sys.stdin.read()
    os._exit(0)
os._exit(0)
"""


@pytest.fixture(scope="module")
def unlink_after_the_guard():
    # Module scope: the function-scoped leak guard runs its check first, then these are removed.
    names: list[str] = []
    yield names
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            _posixshmem.shm_unlink("/" + name)


def make_segment(env, segment_owners):
    proc = subprocess.Popen(
        [sys.executable, "-c", MAKE_SEGMENT], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.wait(60) == 0  # the middle process; its child has the pipes
    name = proc.stdout.readline().strip()
    segment_owners.catch_up()  # what the guard's watch thread does while the maker lives
    maker = os.pidfd_open(int(name.split(".")[1]))  # not our child: no wait(), but a pidfd says when it ends
    try:
        proc.stdin.close()
        assert select.select([maker], [], [], 60)[0], "the segment's maker did not exit"
    finally:
        os.close(maker)
    proc.stdout.close()
    return name


def test_a_dead_broker_of_another_run_is_not_this_tests_leak(unlink_after_the_guard, segment_owners):
    # Issue 19: a second pytest run's broker died; its segments were blamed on whatever test of this
    # run ended next ("orphaned"). The guard's own check after this test is the assertion that matters.
    env = {k: v for k, v in os.environ.items() if k != "SLABCAST_TEST_SESSION"}
    name = make_segment(env, segment_owners)
    unlink_after_the_guard.append(name)
    assert name in slabcast_segments()
    assert name not in segment_owners.ours
    assert not made_by_this_session(int(name.split(".")[1]))


def test_a_segment_made_by_a_process_of_this_session_is_its_own_even_after_its_maker_died(segment_owners):
    name = make_segment(None, segment_owners)  # re-parented too, but it carries the session's mark
    try:
        assert name in segment_owners.ours, "the guard would not see this leak"
    finally:
        _posixshmem.shm_unlink("/" + name)
