"""The command line: standalone broker, status, and the default address (the demo: test_demo.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np

import slabcast


def run_cli(*args, env=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "slabcast", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_standalone_broker_status_and_default_address(tmp_path, stream_name):
    address = f"ipc://{tmp_path}/s/b.sock"
    env = {**os.environ, "SLABCAST_ADDRESS": address}
    proc = subprocess.Popen(
        [sys.executable, "-m", "slabcast", "broker"], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        assert f"serving {address}" in proc.stdout.readline()
        assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
        os.environ["SLABCAST_ADDRESS"] = address
        try:
            pub = slabcast.Publisher(stream_name, dtype="int16", channels=3, rate=100.0)
            sub = slabcast.Subscriber(stream_name, seconds=0.5, clip=True, policy="drop")
        finally:
            del os.environ["SLABCAST_ADDRESS"]
        pub.write(np.zeros((60, 3), dtype=np.int16))
        status = json.loads(run_cli("status", "--json", env=env).stdout)
        (stream,) = status["streams"]
        assert stream["name"] == stream_name
        assert (stream["channels"], stream["rate"], stream["samples"]) == (3, 100.0, 60)
        (s,) = stream["subscribers"]
        assert (s["size"], s["clip"], s["policy"], s["pid"]) == (50, True, "drop", os.getpid())
        text = run_cli("status", env=env).stdout
        assert f"stream {stream_name}: <i2 x 3, 100 Hz, 60 samples" in text
        assert s["lag_samples"] == 60 and "delivered 0 dropped 0 leases 0 lag 60 samples (0.6 s)" in text  # (read none)
        assert sub.info.channel_names == ("ch_0", "ch_1", "ch_2")
        sub.close()
        pub.write(np.zeros((40, 3), dtype=np.int16))
        pub.close()  # (no subscriber left: the broker lets it go at once, and lists it as it was at its end)
        text = run_cli("status", env=env).stdout
        assert re.search(rf"stream {stream_name}: ended \(closed\) [\d.]+ s ago after 100 samples in 2 frames", text), text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert not (tmp_path / "s" / "b.sock").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_status_without_a_broker_is_a_clear_error(tmp_path):
    result = run_cli("status", "--address", str(tmp_path / "none.sock"))
    assert result.returncode == 1
    assert "no broker at" in result.stderr


def test_top_without_a_terminal_and_status_into_a_closed_pipe_are_quiet(broker):
    top = subprocess.run([sys.executable, "-m", "slabcast", "top", "--address", broker.address],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert top.returncode == 2 and "needs a terminal" in top.stderr and "Traceback" not in top.stderr
    with slabcast.Publisher("a", address=broker.address), slabcast.Publisher("b", address=broker.address):
        # `true` leaves before status writes: its first write meets a closed pipe (EPIPE).
        status = subprocess.run(["bash", "-c", "set -o pipefail; \"$0\" -m slabcast status --address \"$1\" | true",
                                 sys.executable, broker.address], capture_output=True, text=True, timeout=30)  # fmt: skip
    assert status.returncode == 0 and status.stderr == ""


def test_status_says_who_left_without_goodbye(broker, stream_name):
    # A newcomer's kill -9 of a subscriber: it vanished from `slabcast status`, and only the broker's log said
    # "died; reclaiming its leases".  The status lists such departures for a minute.
    import time

    pub = slabcast.Publisher(stream_name, address=broker.address)
    script = (f"import slabcast, sys\nsub = slabcast.Subscriber({stream_name!r}, 10, address={broker.address!r}, "
              "label='doomed')\nprint('ready', flush=True)\nsys.stdin.read()\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        pid = proc.pid
        proc.kill()
        proc.wait(10)
    finally:
        proc.stdin.close()
        proc.stdout.close()
    deadline = time.monotonic() + 10
    while not slabcast.broker_status(broker.address).get("departed"):
        assert time.monotonic() < deadline, "the broker never saw the subscriber die"
        time.sleep(0.05)  # polling the broker's status: its sweep finds the dead client
    result = run_cli("status", "--address", broker.address)
    assert result.returncode == 0, result.stderr
    assert re.search(rf"doomed pid {pid} \(sub of '{stream_name}'\) died: its leases reclaimed, [0-9.]+ s ago",
                     result.stdout), result.stdout  # fmt: skip
    (row,) = json.loads(run_cli("status", "--json", "--address", broker.address).stdout)["departed"]
    assert (row["label"], row["pid"], row["how"]) == ("doomed", pid, "died")
    pub.close()


def test_bench_finds_its_harness_in_the_source_checkout():
    # A newcomer: `slabcast bench` looked in src/benchmarks/ (a path left from before the CLI moved into cli/) and
    # never ran.  An unknown scenario is refused by the harness itself: it was found and loaded.
    out = subprocess.run([sys.executable, "-m", "slabcast", "bench", "nosuch"], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "unknown scenario 'nosuch'; choose from fanout" in out.stderr, out.stderr
