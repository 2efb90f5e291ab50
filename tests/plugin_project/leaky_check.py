"""Run on purpose by slabcast's own tests: the plugin must fail this test, which leaves a worker running."""

from myworkers import stuck_worker


def test_leaves_a_worker_running(slabcast_workers):
    slabcast_workers.timeout = 0.5
    slabcast_workers.spawn(stuck_worker)
