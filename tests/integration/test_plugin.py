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


def test_the_plugin_is_registered_through_its_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="pytest11") if ep.name == "slabcast"]
    assert ep.value == "slabcast.testing"
