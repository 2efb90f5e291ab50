"""The fast lane's guard (tests/unit/conftest.py): a unit test that starts a process fails, quickly."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

GUARD = Path(__file__).with_name("conftest.py")

# Run by an inner pytest session, in this process, under a copy of the guard.
INNER_TESTS = """
import multiprocessing as mp
import os
import subprocess
import threading

import pytest


def test_pure():
    assert sum(range(4)) == 6


def test_subprocess():
    subprocess.run(["true"], check=True)


def test_spawned_process():
    mp.get_context("spawn").Process(target=print).start()


def test_fork():
    if os.fork() == 0:
        os._exit(0)


def test_swallowed():
    try:
        subprocess.run(["true"], check=True)
    except Exception:
        pass


def test_from_a_thread_then_waiting():
    # a pool starting its worker from a thread (which keeps the error), the caller waiting for the worker
    def start_worker():
        try:
            subprocess.run(["true"], check=True)
        except Exception:
            pass

    threading.Thread(target=start_worker, daemon=True).start()
    threading.Event().wait(60)


def test_swallowed_then_waiting():
    try:
        mp.get_context("spawn").Process(target=print).start()
    except Exception:
        threading.Event().wait(60)


@pytest.fixture
def worker():
    yield subprocess.Popen(["true"])


def test_in_a_fixture(worker):
    pass
"""


def test_a_unit_test_that_starts_a_process_fails_at_once_and_says_where_it_belongs(pytester):
    pytester.mkpydir("unit")
    (pytester.path / "unit" / "conftest.py").write_text(GUARD.read_text())
    (pytester.path / "unit" / "test_inner.py").write_text(INNER_TESTS)
    starters = (os.fork, subprocess._fork_exec)  # this test's own guard's, put back after the inner session
    began = time.monotonic()
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    elapsed = time.monotonic() - began
    failed = {r.nodeid.split("::")[1] for r in result.reprec.getreports("pytest_runtest_logreport") if r.failed}
    assert failed == {
        "test_subprocess",
        "test_spawned_process",
        "test_fork",
        "test_swallowed",
        "test_from_a_thread_then_waiting",
        "test_swallowed_then_waiting",
        "test_in_a_fixture",
    }, result.stdout.str()
    result.assert_outcomes(passed=1, failed=6, errors=1)
    assert elapsed < 15, f"the inner session took {elapsed:.1f} s: a waiting test was not interrupted"
    out = result.stdout.str()
    assert out.count("move this test to tests/integration") >= 7, out  # each failure says where it belongs
    assert "unit/test_inner.py::test_swallowed tried to start a process during its call" in out
    assert (os.fork, subprocess._fork_exec) == starters


def test_the_guard_is_on_in_this_lane():
    assert "refused" in os.fork.__qualname__
    assert "refused" in subprocess._fork_exec.__qualname__
