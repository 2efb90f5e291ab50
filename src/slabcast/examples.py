"""Task callables for the microphone use case (``slabcast demo`` and ``broker/slabcast.toml``).

Each takes a :class:`~slabcast.Chunk` (and options from the config) and prints one line.
"""

from __future__ import annotations

import os
import sys
import wave
from typing import Any

import numpy as np

__all__ = ["spectral_peak", "spl", "wav_file"]


def _say(line: str) -> None:
    # One write(2) per line: several worker processes share the terminal, and a single
    # write of less than PIPE_BUF bytes is never interleaved with another.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def spl(chunk: Any) -> None:
    """Print the sound level of each channel in dBFS."""
    rms = np.sqrt(np.mean(np.square(chunk.data, dtype=np.float64), axis=0))
    levels = "  ".join(
        f"ch{i}={v:6.1f} dBFS" for i, v in enumerate(np.atleast_1d(20 * np.log10(np.maximum(rms, 1e-12))))
    )
    _say(f"[spl   ] t0={chunk.t0:.3f} seq={chunk.seq:3d}  {levels}")


def wav_file(chunk: Any, out: str = ".", rate: int = 48_000) -> None:
    """Write the chunk as a 16-bit WAV file ``<out>/<stream index>.wav`` (float samples in [-1, 1])."""
    data = chunk.data
    pcm = (np.clip(data, -1, 1) * 32767).astype("<i2") if data.dtype.kind == "f" else data.astype("<i2")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{chunk.index:012d}.wav")
    with wave.open(path, "wb") as w:
        w.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    _say(f"[wav   ] t0={chunk.t0:.3f} seq={chunk.seq:3d}  wrote {path} ({len(pcm) / rate:.2f} s)")


def spectral_peak(chunk: Any, rate: float = 48_000.0) -> None:
    """Print the frequency of the strongest spectral peak of each channel (a stand-in for a model)."""
    data = chunk.data if chunk.data.ndim == 2 else chunk.data[:, None]
    n = len(data)
    spectrum = np.abs(np.fft.rfft(data * np.hanning(n)[:, None], axis=0))
    peaks = np.fft.rfftfreq(n, 1 / rate)[np.argmax(spectrum, axis=0)]
    text = "  ".join(f"ch{i} peak {p:7.1f} Hz" for i, p in enumerate(peaks))
    _say(f"[peak  ] t0={chunk.t0:.3f} seq={chunk.seq:3d}  {text}")
