"""How a user tests a worker pipeline with slabcast's fixtures."""

import numpy as np
import pytest
from myworkers import spl_worker


def test_spl_worker_reports_the_level_of_each_half_second(
    slabcast_broker, slabcast_workers, slabcast_feed, slabcast_stream_name
):
    rate = 8000.0
    t = np.arange(int(2 * rate)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # -9.03 dBFS
    results = slabcast_workers.queue()

    def start_worker():
        slabcast_workers.spawn(spl_worker, slabcast_broker.address, slabcast_stream_name, results)
        assert slabcast_workers.get(results) == "ready"

    slabcast_feed(slabcast_stream_name, tone, frame=800, rate=rate, ready=start_worker)
    levels = []
    while (item := slabcast_workers.get(results)) != "done":
        levels.append(item)
    assert [round(t0, 6) for t0, _ in levels] == [0.0, 0.5, 1.0, 1.5]
    assert all(level == pytest.approx(-9.03, abs=0.05) for _, level in levels)
