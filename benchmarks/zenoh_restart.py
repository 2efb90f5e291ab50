"""How long after a Zenoh bridge is started again its frames reach the far broker (a `kill -9`'d bridge).

A 1 kHz stream (frames of 10 samples) on broker A, bridged to broker B's `zenoh` source over an explicit
endpoint (the bridge listens, the source connects); the bridge is killed, started again ``--down`` seconds
later, and the time from that start to the far subscriber's first chunk after the gap is printed, with the
origin sample it starts at.  Zenoh's reconnect back-off decides it (docs/zenoh.md).

    python benchmarks/zenoh_restart.py --trials 2 [--down 3]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

import slabcast


def trial(down: float) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="zenoh-restart-") as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        endpoint, prefix, name = f"tcp/127.0.0.1:{port}", "slabcast/restart", "zr"
        origin = slabcast.BrokerProcess(f"{tmp}/a.sock").start()

        def bridge() -> subprocess.Popen[bytes]:
            return subprocess.Popen([sys.executable, "-m", "slabcast", "bridge", "--zenoh", name, "--address",
                                     origin.address, "--key-prefix", prefix, "--listen", endpoint, "--no-multicast"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

        spec = (f"zenoh:key={prefix}/{name},connect={endpoint},multicast=false,timeout=0.5,slab_bytes=262144,"
                "nslabs=8,lost_after=0.3")  # fmt: skip
        far = slabcast.BrokerProcess(f"{tmp}/b.sock", args=("--source", spec))
        proc = bridge()
        pub = slabcast.Publisher(name, "int64", rate=1000.0, address=origin.address)
        stop = threading.Event()

        def write() -> None:
            i = 0
            while not stop.is_set():
                pub.write(np.arange(i, i + 10, dtype=np.int64), t0=i / 1000.0)
                i += 10
                time.sleep(0.01)

        writer = threading.Thread(target=write)
        writer.start()
        try:
            far.start()
            sub = slabcast.Subscriber(name, 10, address=far.address, wait=30)
            sub.recv(timeout=30).release()  # (crossing)
            time.sleep(1.0)
            proc.kill()
            proc.wait()
            time.sleep(down)  # the bridge's downtime
            proc = bridge()
            started = time.monotonic()
            while True:
                with sub.recv(timeout=30) as chunk:
                    if chunk.discontinuity:
                        return time.monotonic() - started, int(chunk.data[0])
        finally:
            stop.set()
            writer.join()
            pub.close()
            proc.terminate()
            proc.wait()
            far.stop()
            origin.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--down", type=float, default=3.0, help="seconds the bridge stays down (default 3)")
    args = parser.parse_args()
    for k in range(args.trials):
        after, first = trial(args.down)
        print(f"trial {k}: first frame at the far broker {after:.2f} s after the bridge's start (origin sample "
              f"{first}, {args.down:g} s down)")


if __name__ == "__main__":
    main()
