"""Run on purpose by slabcast's own tests: what the plugin says when workers exit without a result, and after a
test that failed with a worker still running."""

from myworkers import silent_worker, stuck_worker


def test_keyword_arguments_reach_the_worker(slabcast_workers):
    results = slabcast_workers.queue()
    slabcast_workers.spawn(silent_worker, results, say="hello")
    assert slabcast_workers.get(results, timeout=60) == "hello"


def test_every_worker_exited_without_a_result(slabcast_workers):
    results = slabcast_workers.queue()
    slabcast_workers.spawn(silent_worker, results)
    slabcast_workers.get(results, timeout=60)  # (fails at once, not after 60 s)


def test_fails_with_a_worker_still_running(slabcast_workers):
    slabcast_workers.timeout = 60  # (a test that failed gives its workers a second, not this)
    slabcast_workers.spawn(stuck_worker)
    raise AssertionError("this test fails, as slabcast's own test asks")
