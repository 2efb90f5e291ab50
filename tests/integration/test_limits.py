"""Limits are errors, never aborts: descriptors and ZeroMQ sockets, in a client process and in the broker."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap

import pytest

import slabcast

# Run in a child whose RLIMIT_NOFILE is set first: it opens Subscribers on `streams` until `count` or an error.
_OPEN_MANY = textwrap.dedent(
    """
    import json, resource, sys
    soft = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, soft))
    import slabcast
    address, count, streams = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    subs, error = [], None
    try:
        while len(subs) < count:
            subs.append(slabcast.Subscriber(streams[len(subs) % len(streams)], size=10, address=address, timeout=10))
    except BaseException as exc:
        error = {"type": type(exc).__module__ + "." + type(exc).__qualname__, "message": str(exc),
                 "slabcast": isinstance(exc, slabcast.SlabcastError)}
    print(json.dumps({"opened": len(subs), "error": error}))
    """
)


def _open_many(address: str, soft: int, count: int, streams: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", _OPEN_MANY, str(soft), address, str(count), *streams],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_process_opens_more_than_255_subscribers(broker, stream_name):
    # pyzmq's context holds 1023 sockets: the 255th Subscriber of a process got a raw ZMQError (issue 19, item 11).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard RLIMIT_NOFILE here is {hard}; this test gives a child 4096")
    names = [f"{stream_name}a", f"{stream_name}b"]  # 256 subscribers per stream at most
    pubs = [slabcast.Publisher(n, dtype="int32", channels=1, address=broker.address) for n in names]
    try:
        result = _open_many(broker.address, 4096, 300, names)
    finally:
        for pub in pubs:
            pub.close()
    assert result == {"opened": 300, "error": None}


def test_running_out_of_descriptors_in_a_client_is_a_clear_slabcast_error(broker, stream_name):
    pub = slabcast.Publisher(stream_name, dtype="int32", channels=1, address=broker.address)
    try:
        result = _open_many(broker.address, 128, 1000, [stream_name])
    finally:
        pub.close()
    error = result["error"]
    assert error is not None and error["slabcast"], result
    assert error["type"] == "slabcast.LimitError"
    assert "RLIMIT_NOFILE" in error["message"] and "is 128" in error["message"]
    assert "ulimit -n" in error["message"] and "LimitNOFILE" in error["message"]
    assert 5 <= result["opened"] < 20

