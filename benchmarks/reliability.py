"""Time to reclaim a dead subscriber's leases and to detect a dead broker (docs/reliability.md)."""

import multiprocessing as mp
import os
import signal
import statistics
import tempfile
import threading
import time

import numpy as np
from tests.integration import workers as W

import slabcast


def main():
    tmp = tempfile.mkdtemp(prefix="slabcast-rel-")
    ctx = mp.get_context("spawn")
    rec, det, pubgone = [], [], []
    for trial in range(5):
        with slabcast.BrokerProcess(os.path.join(tmp, f"m{trial}", "b.sock")) as b:
            pub = slabcast.Publisher("s", dtype="int32", slab_bytes=8192, nslabs=4, timeout=10, address=b.address)
            q = ctx.Queue()
            p = ctx.Process(target=W.hold_and_wait, args=(b.address, "s", 256, q))
            p.start()
            q.get(timeout=30)
            for i in range(2):
                pub.write(np.full(256, i, np.int32))
            q.get(timeout=30)
            done = threading.Event()

            def w(pub=pub, done=done):
                for i in range(40):
                    pub.write(np.full(256, i, np.int32))
                done.set()

            t = threading.Thread(target=w)
            t.start()
            done.wait(0.3)
            t0 = time.monotonic()
            os.kill(p.pid, signal.SIGKILL)
            done.wait(10)
            rec.append(time.monotonic() - t0)
            t.join()
            p.join()
            pub.close()
        with slabcast.BrokerProcess(os.path.join(tmp, f"m{trial}", "b.sock")) as b:
            pub = slabcast.Publisher("s", address=b.address)
            sub = slabcast.Subscriber("s", size=10, address=b.address)
            t0 = time.monotonic()
            b.kill(group=True)
            try:
                sub.recv(timeout=5)
            except slabcast.BrokerGoneError:
                det.append(time.monotonic() - t0)
            t0 = time.monotonic()
            try:
                while True:
                    pub.write(np.zeros(10, np.float32))
            except slabcast.BrokerGoneError:
                pubgone.append(time.monotonic() - t0)
            sub.close()
            pub.close()
        slabcast.core.shm.reap_stale()
    for name, xs in (
        ("reclaim after kill -9 of a subscriber", rec),
        ("subscriber detects broker kill -9", det),
        ("publisher detects broker kill -9", pubgone),
    ):
        print(f"{name}: median {statistics.median(xs) * 1000:.1f} ms, max {max(xs) * 1000:.1f} ms over {len(xs)}")


if __name__ == "__main__":
    main()
