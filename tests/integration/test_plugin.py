"""The pytest plugin, used by a user's project (tests/plugin_project) in its own pytest session."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).parent.parent / "plugin_project"


def run_project(*args):
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=PROJECT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_user_project_tests_its_worker_with_the_fixtures():
    result = run_project("test_pipeline.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_the_plugin_fails_a_test_that_leaves_a_worker_running():
    result = run_project("leaky_check.py")
    assert result.returncode == 1, result.stdout
    assert "1 passed, 1 error" in result.stdout
    assert "was still running and had to be killed" in result.stdout


def test_the_plugin_fails_a_test_whose_broker_died_and_points_clients_at_its_broker():
    # A newcomer: a test whose broker was killed under it passed (testing.md: "the test fails if it did not exit
    # 0"), and a worker given no address= went to the developer's own broker.
    result = run_project("broker_check.py")
    assert result.returncode == 1, result.stdout
    assert "2 passed, 1 error" in result.stdout, result.stdout
    assert "the broker died during the test (exit code -9)" in result.stdout, result.stdout


def test_a_worker_that_fails_before_its_result_fails_the_test_at_once_by_name():
    # A newcomer: a worker that raised left the test waiting out results.get(timeout=...) (then _queue.Empty).
    result = run_project("failing_check.py")
    assert result.returncode == 1, result.stdout
    assert "1 failed" in result.stdout, result.stdout
    assert re.search(r"worker \d+ \(SpawnProcess-1\) exited with code 1 before the result", result.stdout), result.stdout
    assert "RuntimeError: this worker fails, as the test asks" in result.stdout  # (its captured stderr)


def test_workers_take_keywords_a_get_with_every_worker_gone_fails_at_once_and_a_failed_test_is_not_blamed_twice():
    # A newcomer: spawn() took no keyword arguments; get() waited out its whole timeout (30 s by default) when every
    # worker had already exited 0 ("workers still running: none"); after a test that failed (or Ctrl-C) with
    # workers still running, the fixture waited 10 s for each in turn, then added an error blaming them.
    result = run_project("teardown_check.py")
    out = result.stdout
    assert result.returncode == 1, out
    assert re.search(r"\b2 failed, 1 passed in", out), out  # (no "error": the failed test is reported once)
    assert re.search(r"AssertionError: no result: every worker has exited without putting one \(exit codes \d+ "
                     r"\(SpawnProcess-\d+\): 0\)", out), out  # fmt: skip
    assert "this test fails, as slabcast's own test asks" in out
    assert "had to be killed" not in out, out


def test_the_plugin_is_registered_through_its_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="pytest11") if ep.name == "slabcast"]
    assert ep.value == "slabcast.testing"


def test_feed_gives_each_sample_the_time_it_is_given_or_each_frame_its_own(broker, stream_name):
    # A newcomer fed three markers and found them at 0, 1 and 2 s, with no way to give their times: times= now
    # keeps one per sample (the stream gets timestamps=True); without it, frame k starts at t0 + k (no rate).
    import numpy as np
    import pytest

    import slabcast
    from slabcast.testing import feed

    subs = []

    def subscribe(name, size):
        return lambda: subs.append(slabcast.Subscriber(name, size, clip=True, address=broker.address))

    stamps = np.array([10.25, 10.5, 12.0, 12.125, 13.0])
    feed(stream_name, np.arange(5, dtype=np.int32), frame=2, times=stamps, address=broker.address,
         ready=subscribe(stream_name, 1))  # fmt: skip
    with subs[0] as sub:
        got = [(int(c.data[0]), float(c.times[0])) for c in sub]
    assert got == [(k, stamps[k]) for k in range(5)]  # (chunk.t0 is its frame's, without a rate)
    feed(stream_name + "b", np.arange(6, dtype=np.int32), frame=2, t0=100.0, address=broker.address,
         ready=subscribe(stream_name + "b", 2))  # fmt: skip
    with subs[1] as sub:
        assert [c.t0 for c in sub] == [100.0, 101.0, 102.0]
    with pytest.raises(ValueError, match="times must be 3 finite seconds"):
        feed(stream_name + "c", np.arange(3), times=[0.0, 1.0], address=broker.address)
