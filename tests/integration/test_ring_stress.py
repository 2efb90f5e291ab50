"""Shared-memory ordering, proven by a stress test (data path v3, issue 21 item 4).

A writer process writes frames of random sizes at full speed (samples, their times, the descriptor,
then the ring's position, each a plain store); subscriber processes of every kind read the ring at
full speed and check every byte of every chunk against the sample it claims to start at: values,
per-sample times and ``t0``.  A ``block`` subscriber must get every sample in order; a ``drop``
subscriber may skip (lapped, or behind its ``max_inflight``) but only with ``discontinuity`` set and
never a wrong byte.  ``SLABCAST_STRESS_SECONDS`` runs it longer (the figure in docs/reliability.md is
from a 300 s run).
"""

from __future__ import annotations

import os

import pytest

from slabcast.core import ring as ring_module
from tests.integration import workers as W

SECONDS = float(os.environ.get("SLABCAST_STRESS_SECONDS", "3"))

READERS = [
    {"size": 1000, "policy": "block", "wake": "doorbell"},
    {"size": 4801, "clip": True, "policy": "block", "wake": "futex"},
    {"size": 333, "policy": "drop", "max_inflight": 2, "wake": "busy"},
    # (python_look: this one reads the ring by LocalReceiver._take_one's Python steps, the others by the compiled
    # Reader.take_one where it is built)
    {"size": 20000, "clip": True, "policy": "block", "wake": "doorbell", "spin": 0.001, "python_look": True},
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("timestamps", "stream_min"),
    [(True, None), (False, None), (False, 0)],
    ids=["times-python-path", "t0-compiled-path", "t0-compiled-streaming-stores"],
)
def test_every_byte_of_every_chunk_is_where_its_descriptor_says(broker, workers, queue, stream_name, timestamps,
                                                                stream_min):  # fmt: skip
    # Per-sample times keep the publisher's Python steps; a t0 per frame takes the compiled ones (core/_hot.c)
    # where they are built, which copy frames of 64 KiB and more by streaming stores on x86-64 (the stress
    # frames are up to 72 KB): stream_min=0 copies every frame so, of every size and alignment, the store
    # fence before the position their only order.
    if stream_min is not None and ring_module.HOT is None:
        if os.environ.get("SLABCAST_REQUIRE_C") == "1":
            pytest.fail("the compiled module (core/_hot.c) is not built (SLABCAST_REQUIRE_C=1)", pytrace=False)
        pytest.skip("streaming stores are the compiled writer's; core/_hot.c is not built")
    results = workers.queue()
    go = workers._ctx.Event()
    # (480 kHz: a slab holds 0.09 s of stream, so the broker may grant this writer three slabs ahead, and it then
    # tells about every other slab change: protocol 9.3; test_data_path_v3.py shows that it does)
    workers.spawn(W.stress_write, broker.address, stream_name, 3, 480_000.0, SECONDS, 7, queue, go, results,
                  timestamps, stream_min)  # fmt: skip
    assert queue.get(timeout=30)[0] == "pub-ready"
    for kwargs in READERS:
        workers.spawn(W.stress_read, broker.address, stream_name, kwargs, queue, results)
    for _ in READERS:
        assert queue.get(timeout=30)[0] == "sub-ready"
    go.set()
    got = [results.get(timeout=120 + 2 * SECONDS) for _ in range(1 + len(READERS))]
    errors = [r for r in got if r[0].endswith("-error")]
    assert not errors, errors
    (pub,) = [r for r in got if r[0] == "pub-done"]
    _, total, frames, compiled, held = pub
    assert frames > 1000, "the writer wrote too little to prove anything"
    if timestamps or ring_module.HOT is None:
        assert compiled == 0
    else:  # (all but the first frame of each slab, and those a batch or a doorbell sent to the Python steps)
        assert compiled > frames // 2, (compiled, frames)
    print(f"\nwriter: {frames} frames, {total} samples ({total * 3 * 8 / 1e9:.2f} GB) in {SECONDS:g} s, up to {held} "
          f"slabs granted ahead")  # fmt: skip
    for _, kwargs, chunks, samples, gaps, dropped, at, problems in (r for r in got if r[0] == "sub-done"):
        print(f"reader {kwargs}: {chunks} chunks, {samples} samples checked, {gaps} gaps, {dropped} dropped")
        assert problems == [], (kwargs, problems)
        size = kwargs["size"]
        if kwargs["policy"] == "block":
            # Every sample, in order: every complete chunk (clip: exactly `size` each), at most an unfinished tail
            # shorter than a chunk left over.
            assert gaps == 0 and dropped == 0, kwargs
            if kwargs.get("clip"):
                assert samples == total // size * size, (kwargs, samples, total)
            else:
                assert total - size < samples <= total, (kwargs, samples, total)
        else:
            assert chunks > 0 and at <= total, kwargs
