"""Property: through a real broker, every subscriber's chunks follow the rules for any frames and sizes."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import slabcast
from tests.reference import expected_chunks

_names = itertools.count()

subscriber = st.tuples(st.integers(1, 1500), st.booleans(), st.sampled_from([None, None, 0.01, 0.2]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    frames=st.lists(st.integers(1, 500), min_size=1, max_size=60),
    subs=st.lists(subscriber, min_size=1, max_size=3),
)
def test_concatenation_rule_through_the_broker(broker, stream_name, frames, subs):
    name = f"{stream_name}-{next(_names)}"
    rate = 1000.0
    pub = slabcast.Publisher(
        name, dtype="int16", channels=2, rate=rate, slab_bytes=16384, nslabs=32, address=broker.address
    )
    readers = [
        slabcast.Subscriber(name, size=size, clip=clip, sampler=pause, address=broker.address)
        for size, clip, pause in subs
    ]
    stream, t = [], 50.0
    for i, n in enumerate(frames):
        frame = (np.arange(2 * n, dtype=np.int16).reshape(n, 2) + i * 7) % 1000
        pub.write(frame.astype(np.int16), t0=t)
        stream.append((frame.astype(np.int16), t))
        t += n / rate
    pub.close()
    whole = np.concatenate([f for f, _ in stream])
    timed = [(len(f), t0) for f, t0 in stream]
    for (size, clip, pause), sub in zip(subs, readers, strict=True):
        got = []
        for chunk in sub:
            with chunk:
                np.testing.assert_array_equal(chunk.data, whole[chunk.index : chunk.index + len(chunk.data)])
                got.append((chunk.index, len(chunk.data), chunk.t0, chunk.seq))
        sub.close()
        want = expected_chunks(timed, size, clip, rate, pause)
        assert [g[:2] for g in got] == [w[:2] for w in want]
        assert np.allclose([g[2] for g in got], [w[2] for w in want], atol=1e-9, rtol=0)
        assert [g[3] for g in got] == list(range(len(got)))
        if clip and pause is None:  # the concatenation of clipped chunks is the stream
            joined = np.concatenate([whole[i : i + n] for i, n, *_ in got]) if got else whole[:0]
            np.testing.assert_array_equal(joined, whole[: len(got) * size])
