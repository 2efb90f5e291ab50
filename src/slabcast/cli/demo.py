"""``slabcast demo``: a broker, a synthetic 48 kHz stereo source and three workers with their own chunk sizes."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
from typing import Any

import numpy as np

from .. import examples
from ..broker.process import BrokerProcess
from ..client.publisher import Publisher
from ..client.subscriber import Subscriber

__all__ = ["run_demo"]

RATE = 48_000
FRAME = 480  # 10 ms
STREAM = "mic"
DEFAULT_OUT = "slabcast-demo"  # under the current directory


def _worker(address: str, ready: Any, name: str, fn: Any, options: dict[str, Any], **settings: Any) -> None:
    # Ctrl-C reaches the whole terminal process group; workers end with the stream instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with Subscriber(STREAM, address=address, label=f"demo:{name}", **settings) as sub:
        ready.put(name)
        for chunk in sub:
            with chunk:
                fn(chunk, **options)


def synthetic_frames(rng: np.random.Generator, index: int) -> np.ndarray[Any, Any]:
    """10 ms of a slowly swelling 440 Hz (left) and 1 kHz (right) tone with noise."""
    t = (index + np.arange(FRAME)) / RATE
    swell = 0.3 + 0.25 * np.sin(2 * np.pi * 0.2 * t)
    left = swell * np.sin(2 * np.pi * 440 * t)
    right = 0.5 * swell * np.sin(2 * np.pi * 1000 * t)
    frame = np.stack([left, right], axis=1) + 0.01 * rng.standard_normal((FRAME, 2))
    return frame.astype(np.float32)


def run_demo(duration: float = 15.0, out: str = DEFAULT_OUT) -> int:
    """Run the demo for ``duration`` seconds (or until Ctrl-C); leave no process or segment behind.

    The WAV worker's files are kept in ``out`` (created if needed; files of the same
    name are overwritten) and the last line names the directory and how many it wrote.
    """
    workdir = tempfile.mkdtemp(prefix="slabcast-demo-")  # only the broker's socket: removed at the end
    out_dir = os.path.abspath(out)
    os.makedirs(out_dir, exist_ok=True)
    began = time.time()
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    procs: list[Any] = []
    print(f"slabcast demo: broker + 48 kHz stereo source + 3 workers for {duration:g} s (Ctrl-C stops)", flush=True)
    try:
        with BrokerProcess(os.path.join(workdir, "broker.sock")) as broker:
            with Publisher(
                STREAM, dtype="float32", channels=2, rate=RATE, address=broker.address, channel_names=["left", "right"]
            ) as pub:
                tasks = [  # SPL every 0.5 s; a WAV every 3 s (and the rest at the end); 0.5 s of every 2 s
                    ("spl", examples.spl, {}, {"seconds": 0.5, "clip": True}),
                    ("wav", examples.wav_file, {"out": out_dir}, {"seconds": 3.0, "clip": True, "partial_tail": True}),
                    ("peak", examples.spectral_peak, {}, {"seconds": 0.5, "clip": True, "sampler": 1.5}),
                ]
                procs = [
                    ctx.Process(target=_worker, args=(broker.address, ready, n, fn, opts), kwargs=kw, name=n)
                    for n, fn, opts, kw in tasks
                ]
                for p in procs:
                    p.start()
                for _ in procs:
                    ready.get(timeout=30)
                rng = np.random.default_rng(0)
                start = time.time()
                index = 0
                try:
                    # Paced against the clock: frame k is due at start + k * 10 ms, so no drift accumulates.
                    while index < duration * RATE:
                        due = start + index / RATE
                        delay = due - time.time()
                        if delay > 0:
                            time.sleep(delay)
                        pub.write(synthetic_frames(rng, index), t0=due)
                        index += FRAME
                except KeyboardInterrupt:
                    print("slabcast demo: interrupted, stopping", flush=True)
            # The stream is closed: workers finish their last chunks and exit.
            for p in procs:
                p.join(10)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        ready.close()
        ready.join_thread()
        shutil.rmtree(workdir, ignore_errors=True)
    wavs = _written_since(out_dir, began)
    print(f"slabcast demo: done, {index / RATE:.1f} s of audio streamed, {wavs} WAV files written to {out_dir}")
    return 0


def _written_since(directory: str, began: float) -> int:
    """How many WAV files in ``directory`` this run wrote (older ones of other names may be there too)."""
    since = began - 0.1  # file times come from a coarser clock than time.time()
    with os.scandir(directory) as entries:
        return sum(1 for e in entries if e.name.endswith(".wav") and e.stat().st_mtime >= since)
