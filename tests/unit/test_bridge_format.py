"""What the Zenoh bridge puts on the network (slabcast.wire.bridge): frame headers and stream info.

Moved from tests/integration/test_zenoh.py, which runs brokers and bridges; this needs no zenoh.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import slabcast
from slabcast.wire.bridge import FLAG_DISCONTINUITY, FrameHeader, decode_info, encode_info


def test_frame_header_and_info_round_trip_and_refuse_garbage():
    times = np.array([1.5, 2.25, 3.0])
    head = FrameHeader(FLAG_DISCONTINUITY, 2, np.dtype("<i2"), 2**63 + 5, 123456789012, 1.0e9 + 0.125, 3)
    raw = head.encode(times)
    back, got = FrameHeader.decode(raw, 3 * 2 * 2)
    assert back == head and np.array_equal(got, times)
    assert FrameHeader.decode(head.encode(), 12) == (head, None)
    with pytest.raises(ValueError, match="the payload has 11"):
        FrameHeader.decode(raw, 11)
    with pytest.raises(ValueError, match="format 1 expected, got 9"):
        FrameHeader.decode(b"\x09" + raw[1:], 12)
    with pytest.raises(ValueError, match="header is 40 bytes"):
        FrameHeader.decode(b"\x01", 0)
    info = slabcast.StreamInfo("emg", np.dtype("<f4"), 2, 512.0, ("a", "b"), ("EMG", "EMG"), ("uV", "uV"),
                               "dev-7", True)  # fmt: skip
    back_info, epoch = decode_info(encode_info(info, 42, "hostA"), "emg-remote")
    assert epoch == 42 and back_info == dataclasses.replace(info, name="emg-remote")
    with pytest.raises(ValueError, match="not a slabcast stream info"):
        decode_info(b"[1, 2]", "x")


def test_a_forwarder_waiting_for_its_broker_says_so_once_at_info(tmp_path, caplog):
    # A newcomer: a bridge whose broker was away logged "trying again" at INFO every second.
    import logging
    import threading
    import types

    from slabcast.bridge.zenoh import _Forwarder

    stopping = threading.Event()
    stopping.set()  # (its pause between two tries returns at once)
    bridge = types.SimpleNamespace(prefix="slabcast/here", policy="drop", address=f"ipc://{tmp_path}/none.sock",
                                   stopping=stopping)  # fmt: skip
    forwarder = _Forwarder(bridge, "mic")  # type: ignore[arg-type]
    with caplog.at_level(logging.DEBUG, logger="slabcast.bridge"):
        for _ in range(3):
            forwarder._serve_once(None)
    tries = [r for r in caplog.records if "trying again" in r.getMessage()]
    assert [r.levelno for r in tries] == [logging.INFO, logging.DEBUG, logging.DEBUG], tries
    assert "mic" in tries[0].getMessage()
