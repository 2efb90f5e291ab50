"""A subscriber's compiled look at the ring (core/_hot.c ``Reader.take_chunk``) against the Python steps it replaces
(``LocalReceiver._take_one``, ``_cut_chunk``, ``_hand_out``): two subscribers of one stream on a real broker, one
each way, read after every write; every chunk and the receivers' whole state must be the same after every one."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import pytest

import slabcast
from slabcast.core import ring as R

if R.HOT is None:
    if os.environ.get("SLABCAST_REQUIRE_C") == "1":
        pytest.fail("the compiled module (core/_hot.c) is not built (SLABCAST_REQUIRE_C=1)", pytrace=False)
    pytest.skip("the compiled module (core/_hot.c) is not built", allow_module_level=True)

RX_STATE = ("_rseq", "_noticed", "_cursor", "_last", "_seq", "_received", "_last_seq", "_dropped", "_cur_slab",
            "_posted", "jumped")  # fmt: skip


def _take(sub: slabcast.Subscriber) -> Any:
    try:
        return sub.recv(timeout=0)
    except TimeoutError:
        return None


def _state(sub: slabcast.Subscriber) -> tuple[Any, ...]:
    rx = sub._rx
    leases = rx._leases
    locks = {slab: tuple(entry) for slab, entry in leases.locks.items()}
    return (*(getattr(rx, name) for name in RX_STATE), leases.handed, leases.released, locks,
            sorted(leases.slab_of.items()), sorted(leases.refs), len(rx._ready), len(rx._frames))  # fmt: skip


@pytest.mark.parametrize(
    ("options", "channels", "timestamps", "rate"),
    [
        ({"size": 1000, "clip": True}, 1, False, 1000.0),
        ({"size": 700, "clip": False}, 2, True, 1000.0),
        ({"size": 333, "clip": True, "policy": "drop", "max_inflight": 2}, 1, False, 1000.0),
        ({"seconds": 0.25, "clip": True, "sampler": 0.5}, 2, False, 1000.0),
        ({"size": 500, "clip": True, "sampler": 0.02}, 1, False, None),  # (frame times stepping back: jumped)
    ],
    ids=["clip", "whole-frames-times-2ch", "drop-held", "sampler", "no-rate-clock-steps-back"],
)
def test_the_compiled_look_leaves_every_chunk_and_the_receiver_as_the_python_steps_do(
    broker: slabcast.BrokerProcess, stream_name: str, options: dict[str, Any], channels: int, timestamps: bool,
    rate: float | None,
) -> None:  # fmt: skip
    rng = random.Random(f"{stream_name}{options}")
    pub = slabcast.Publisher(stream_name, dtype="int32", channels=channels, rate=rate, address=broker.address,
                             slab_bytes=65536, nslabs=6, max_chunk_bytes=16384, timestamps=timestamps,
                             timeout=10)  # fmt: skip
    compiled = slabcast.Subscriber(stream_name, address=broker.address, timeout=10, **options)
    python = slabcast.Subscriber(stream_name, address=broker.address, timeout=10, **options)
    python._rx._reader = None  # (the Python steps)
    assert compiled._rx._reader is not None
    taken, flagged = [0], [0]
    reader = compiled._rx._reader

    class Counted:  # how many chunks the compiled call handed out whole
        def take_chunk(self, receiver: Any) -> Any:
            got = reader.take_chunk(receiver)
            taken[0] += got is not None and type(got) is not tuple
            flagged[0] += got is not None and type(got) is not tuple and got.discontinuity
            return got

        def close(self) -> None:
            reader.close()

    compiled._rx._reader = Counted()
    held: list[tuple[Any, Any]] = []  # a drop subscriber keeps some chunks: its max_inflight is reached
    try:
        index = 0
        for k in range(400):
            n = rng.choice([1, 7, 250, 333, 1000, 1500])
            data = np.arange(index * channels, (index + n) * channels, dtype=np.int32).reshape(n, channels)
            jump = k % 97 == 96
            times = 100.0 + (index + np.arange(n)) / 1000.0 if timestamps else None
            t0 = None if rate else 100.0 + k * 0.01 - (0.5 if k % 50 == 49 else 0.0)  # (a step back now and then)
            pub.write(data if channels > 1 else data[:, 0], t0=t0, times=times, discontinuity=jump)
            index += n
            while True:
                a, b = _take(compiled), _take(python)
                assert (a is None) == (b is None), (k, a, b)
                if a is None:
                    break
                assert (a.index, a.seq, a.t0, a.flags, len(a)) == (b.index, b.seq, b.t0, b.flags, len(b)), k
                assert np.array_equal(a.data, b.data) and a.data.shape == b.data.shape
                if timestamps:
                    assert np.array_equal(a.times, b.times)
                if options.get("policy") == "drop" and k % 5 == 0:
                    held.append((a, b))
                else:
                    a.release()
                    b.release()
                if len(held) > 1:
                    for x in held.pop(0):
                        x.release()
                assert _state(compiled) == _state(python), k
        assert taken[0] > 50, "the compiled call handed out too few chunks to prove anything"
        if rate is None:  # a clock step back restarted the sampler's schedule: flagged on a chunk handed out in one call
            assert flagged[0] > 0
    finally:
        for pair in held:
            for x in pair:
                x.release()
        compiled.close()
        python.close()
        pub.close()
