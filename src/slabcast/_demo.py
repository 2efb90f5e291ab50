"""``slabcast demo``: a broker, a synthetic 48 kHz stereo source and three workers with their own chunk sizes."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
import wave
from typing import Any

import numpy as np

from ._process import BrokerProcess
from ._publisher import Publisher
from ._subscriber import Subscriber

__all__ = ["run_demo"]

RATE = 48_000
FRAME = 480  # 10 ms
STREAM = "mic"


def _worker_setup() -> None:
    # Ctrl-C reaches the whole terminal process group; workers end with the stream instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def spl_worker(address: str, ready: Any) -> None:
    """Sound pressure level of each channel, every 0.5 s."""
    _worker_setup()
    sub = Subscriber(STREAM, seconds=0.5, clip=True, address=address)
    ready.put("spl")
    with sub:
        for chunk in sub:
            with chunk:
                rms = np.sqrt(np.mean(np.square(chunk.data, dtype=np.float64), axis=0))
            level = 20 * np.log10(np.maximum(rms, 1e-12))
            print(
                f"[spl   ] t0={chunk.t0:.3f} seq={chunk.seq:3d}  L={level[0]:6.1f} dBFS  R={level[1]:6.1f} dBFS",
                flush=True,
            )


def wav_worker(address: str, ready: Any, out_dir: str) -> None:
    """A 16-bit stereo WAV file of every 3 s of the stream."""
    _worker_setup()
    sub = Subscriber(STREAM, seconds=3.0, clip=True, address=address)
    ready.put("wav")
    with sub:
        for chunk in sub:
            with chunk:
                pcm = (np.clip(chunk.data, -1, 1) * 32767).astype("<i2")
            path = os.path.join(out_dir, f"mic-{chunk.index:012d}.wav")
            with wave.open(path, "wb") as w:
                w.setnchannels(2)
                w.setsampwidth(2)
                w.setframerate(RATE)
                w.writeframes(pcm.tobytes())
            print(f"[wav   ] t0={chunk.t0:.3f} seq={chunk.seq:3d}  wrote {path} ({len(pcm) / RATE:.2f} s)", flush=True)


def peak_worker(address: str, ready: Any) -> None:
    """Spectral peak of 0.5 s of audio, then skip 1.5 s (a sampler): one analysis every 2 s."""
    _worker_setup()
    sub = Subscriber(STREAM, seconds=0.5, clip=True, sampler=1.5, address=address)
    ready.put("peak")
    with sub:
        for chunk in sub:
            with chunk:
                n = len(chunk.data)
                spectrum = np.abs(np.fft.rfft(chunk.data * np.hanning(n)[:, None], axis=0))
            freqs = np.fft.rfftfreq(n, 1 / RATE)
            peaks = freqs[np.argmax(spectrum, axis=0)]
            print(
                f"[peak  ] t0={chunk.t0:.3f} seq={chunk.seq:3d}  L peak {peaks[0]:7.1f} Hz  R peak {peaks[1]:7.1f} Hz",
                flush=True,
            )


def synthetic_frames(rng: np.random.Generator, index: int) -> np.ndarray[Any, Any]:
    """10 ms of a slowly swelling 440 Hz (left) and 1 kHz (right) tone with noise."""
    t = (index + np.arange(FRAME)) / RATE
    swell = 0.3 + 0.25 * np.sin(2 * np.pi * 0.2 * t)
    left = swell * np.sin(2 * np.pi * 440 * t)
    right = 0.5 * swell * np.sin(2 * np.pi * 1000 * t)
    frame = np.stack([left, right], axis=1) + 0.01 * rng.standard_normal((FRAME, 2))
    return frame.astype(np.float32)


def run_demo(duration: float = 15.0, out: str | None = None) -> int:
    """Run the demo for ``duration`` seconds (or until Ctrl-C); leave no process or segment behind."""
    workdir = tempfile.mkdtemp(prefix="slabcast-demo-")
    out_dir = out or os.path.join(workdir, "wav")
    os.makedirs(out_dir, exist_ok=True)
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    procs: list[Any] = []
    print(f"slabcast demo: broker + 48 kHz stereo source + 3 workers for {duration:g} s (Ctrl-C stops)", flush=True)
    try:
        with BrokerProcess(os.path.join(workdir, "broker.sock")) as broker:
            with Publisher(
                STREAM, dtype="float32", channels=2, rate=RATE, address=broker.address, channel_names=["left", "right"]
            ) as pub:
                procs = [
                    ctx.Process(target=spl_worker, args=(broker.address, ready), name="spl"),
                    ctx.Process(target=wav_worker, args=(broker.address, ready, out_dir), name="wav"),
                    ctx.Process(target=peak_worker, args=(broker.address, ready), name="peak"),
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
    print(f"slabcast demo: done, {index / RATE:.1f} s of audio streamed" + (f", WAV files in {out}" if out else ""))
    return 0
