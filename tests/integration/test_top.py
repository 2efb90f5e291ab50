"""`slabcast top` driven in a real terminal (tmux): renders the broker's state and quits with q."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import slabcast


def tmux(*args):
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=10, check=True).stdout


def wait_screen(session, needle, timeout=15.0):
    """Capture the pane until ``needle`` shows (the screen is the signal)."""
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-t", session)
        if needle in screen:
            return screen
        time.sleep(0.1)  # polling a terminal's contents; there is no event to wait on
    raise AssertionError(f"{needle!r} never appeared; screen was:\n{screen}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
def test_top_renders_and_quits_with_q(broker, stream_name, tmp_path):
    pub = slabcast.Publisher(stream_name, dtype="int16", channels=2, rate=1000.0, address=broker.address)
    fast = slabcast.Subscriber(stream_name, size=100, clip=True, address=broker.address, label="fast-reader")
    slow = slabcast.Subscriber(stream_name, size=100, clip=True, policy="drop", max_inflight=1,
                               address=broker.address, label="slow-reader")  # fmt: skip
    for _ in range(10):
        pub.write(np.zeros((100, 2), dtype=np.int16))
        fast.recv(timeout=5).release()
    held = slow.recv(timeout=5)  # the other nine are dropped while it holds this one
    while slow.statistics().dropped < 9:  # their notices may still be on their way to it
        with pytest.raises(TimeoutError):
            slow.recv(timeout=0.2)
    fast.statistics(), slow.statistics()  # report to the broker now (otherwise within 0.1 s of a wait)
    session = f"sctop{stream_name}"
    done = tmp_path / "exit"
    cmd = f"{sys.executable} -m slabcast top --address {broker.address} --interval 0.2; echo $? > {done}"
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "30", cmd)
    try:
        screen = wait_screen(session, "slow-reader")
        assert f"broker {broker.pid}" in screen
        assert stream_name in screen and "<i2 x 2" in screen and "1000 Hz" in screen
        fast_line = next(line for line in screen.splitlines() if "fast-reader" in line)
        slow_line = next(line for line in screen.splitlines() if "slow-reader" in line)
        assert fast_line.split()[2:7] == ["100", "yes", "block", "10", "0"]
        assert slow_line.split()[4:7] == ["drop", "1", "9"]  # delivered 1, dropped 9
        styled = tmux("capture-pane", "-p", "-e", "-t", session).splitlines()
        assert "\x1b[7m" in next(line for line in styled if "slow-reader" in line)  # drops: reverse video
        assert "\x1b[7m" not in next(line for line in styled if "fast-reader" in line)
        tmux("send-keys", "-t", session, "q")
        deadline = time.monotonic() + 10
        while not (done.exists() and done.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)  # the exit code file is written by the shell after top returns (made, then written)
        assert done.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=10)
        held.release()
        slow.close()
        fast.close()
        pub.close()
