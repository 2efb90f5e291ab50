"""Run on purpose by slabcast's own tests: a worker that fails before its result fails the test at once."""

from myworkers import failing_worker


def test_a_worker_fails_before_its_result(slabcast_workers):
    results = slabcast_workers.queue()
    slabcast_workers.spawn(failing_worker, results)
    slabcast_workers.get(results, timeout=60)
