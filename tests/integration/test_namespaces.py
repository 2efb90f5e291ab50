"""Issue 14, item 1: liveness is decided by locks that cross PID namespaces, never by a PID.

Containers that share /dev/shm but not the PID namespace: a broker started in another PID namespace must not
reap a live broker's segments, and a subscriber that is PID 1 of its namespace, killed with -9, must give its
hold on the pool back (root only: `unshare -p` needs it; CI runs as root)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import slabcast

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1) for PID namespaces"
)


def in_new_pid_namespace(code: str, **kw):
    return subprocess.Popen(["unshare", "-p", "-f", "--mount-proc", sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.PIPE, text=True, **kw)  # fmt: skip


def test_a_broker_in_another_pid_namespace_leaves_a_live_brokers_segments_alone(broker, stream_name, tmp_path):
    pub = slabcast.Publisher(stream_name, "uint8", address=broker.address)
    pub.write(b"x")
    other = in_new_pid_namespace(f"""
        import os, slabcast
        b = slabcast.BrokerProcess({str(tmp_path / "other.sock")!r}).start()
        print(os.getpid(), b.pid, flush=True)
        b.stop()
    """)
    out, _ = other.communicate(timeout=30)
    assert other.returncode == 0 and out.split()[0] == "1"  # it really ran as PID 1 of its own namespace
    sub = slabcast.Subscriber(stream_name, size=1, address=broker.address)  # the segment is still there
    pub.write(b"y")
    with sub.recv(timeout=5) as chunk:
        assert bytes(chunk.data) == b"y"
    sub.close()
    pub.close()


def test_a_subscriber_that_is_pid_1_of_its_namespace_killed_9_unblocks_the_publisher(broker, stream_name):
    pub = slabcast.Publisher(stream_name, "int32", address=broker.address, slab_bytes=8192, nslabs=2, timeout=5)
    holder = in_new_pid_namespace(f"""
        import os, slabcast, time
        sub = slabcast.Subscriber({stream_name!r}, size=256, clip=True, address={broker.address!r})
        print(os.getpid(), flush=True)
        held = sub.recv(timeout=10)   # holds this chunk, and reads nothing more
        print("holding", flush=True)
        time.sleep(60)
    """, start_new_session=True)
    assert holder.stdout.readline().split() == ["1"]
    pub.write(np.zeros(256, np.int32))
    assert holder.stdout.readline().strip() == "holding"
    os.killpg(holder.pid, signal.SIGKILL)  # unshare and the subscriber under it
    holder.wait(10)
    holder.stdout.close()
    t = time.monotonic()
    for i in range(40):  # two slabs of 8 KiB: this needs the dead subscriber's hold released
        pub.write(np.full(256, i, np.int32))
    assert time.monotonic() - t < 2.5
    assert not slabcast.broker_status(broker.address)["streams"][0]["subscribers"]
    pub.close()


def test_host_clients_of_a_broker_inside_a_pid_namespace_are_not_declared_dead(stream_name, tmp_path):
    address = tmp_path / "ns.sock"
    inside = in_new_pid_namespace(f"""
        import sys, slabcast
        b = slabcast.BrokerProcess({str(address)!r}).start()
        print("ready", flush=True)
        sys.stdin.read()
        b.stop()
    """, stdin=subprocess.PIPE)
    try:
        assert inside.stdout.readline().strip() == "ready"
        pub = slabcast.Publisher(stream_name, "uint8", address=str(address))
        sub = slabcast.Subscriber(stream_name, size=1, address=str(address))
        # The broker checks its clients every 0.5 s: let several checks pass (a wait for time, not readiness).
        time.sleep(1.5)
        pub.write(b"z")
        with sub.recv(timeout=5) as chunk:
            assert bytes(chunk.data) == b"z"
        status = slabcast.broker_status(str(address))
        assert len(status["streams"][0]["subscribers"]) == 1
        sub.close()
        pub.close()
    finally:
        inside.stdin.close()
        inside.wait(20)
        inside.stdout.close()
