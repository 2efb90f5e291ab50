"""Task callables for the microphone use case (``slabcast demo`` and ``broker/slabcast.toml``).

Each takes a :class:`~slabcast.Chunk` (and options from the config) and prints one line.
"""

from __future__ import annotations

import os
import sys
import wave
from typing import Any, Literal

import numpy as np

__all__ = ["EXAMPLE_CONFIG", "flac_file", "full_scale", "spectral_peak", "spl", "wav_file", "xdf_file"]


def _say(line: str) -> None:
    # One write(2) per line: several worker processes share the terminal, and a single
    # write of less than PIPE_BUF bytes is never interleaved with another.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


def full_scale(data: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Return ``data`` as float64 in [-1, 1): floats as they are, integers over their dtype's full scale.

    ``int16`` is divided by 32768, ``int32`` by 2**31; unsigned PCM (``uint8``, as in
    8-bit WAV) is centred first (128 is silence).
    """
    dt = data.dtype
    if dt.kind == "f":
        return data.astype(np.float64, copy=False)
    if dt.kind not in "iu":
        raise TypeError(f"audio samples must be float or integer PCM, got {dt}")
    half = float(2 ** (8 * dt.itemsize - 1))
    x = data.astype(np.float64)
    return (x - half) / half if dt.kind == "u" else x / half


def spl(chunk: Any) -> None:
    """Print the sound level of each channel in dBFS (0 dBFS: a full-scale square wave; a full-scale sine is -3.01)."""
    rms = np.sqrt(np.mean(np.square(full_scale(chunk.data)), axis=0))
    levels = "  ".join(
        f"ch{i}={v:6.1f} dBFS" for i, v in enumerate(np.atleast_1d(20 * np.log10(np.maximum(rms, 1e-12))))
    )
    _say(f"[spl   ] t0={chunk.t0:.3f} seq={chunk.seq:3d}  {levels}")


def _rate(chunk: Any, rate: float | None) -> int:
    """The sample rate to write: the one given, else the stream's."""
    if rate:
        return int(rate)
    info = getattr(chunk, "info", None)
    if info is None or not info.rate:
        raise ValueError("the stream has no rate: pass rate= in the task's options")
    return int(info.rate)


def wav_file(chunk: Any, out: str, rate: float | None = None) -> None:
    """Write the chunk as a WAV file ``<out>/<stream index>.wav`` at the stream's rate (or ``rate``).

    Integer PCM is written bit for bit at its width (``uint8`` 8-bit, ``int16``
    16-bit, ``int32`` 32-bit); float samples in [-1, 1] become 16-bit PCM (record
    with ``slabcast record --out x.wav`` or ``soundfile`` to keep floats).
    """
    rate = _rate(chunk, rate)
    data = chunk.data
    dt = data.dtype
    if dt.kind == "f":
        pcm = (np.clip(data, -1, 1) * 32767).astype("<i2")
    elif (dt.kind, dt.itemsize) in (("u", 1), ("i", 2), ("i", 4)):
        pcm = data.astype(dt.newbyteorder("<"), copy=False)
    else:
        raise TypeError(f"wav_file writes uint8, int16, int32 or float samples, got {dt}")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{chunk.index:012d}.wav")
    with wave.open(path, "wb") as w:
        w.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
        w.setsampwidth(pcm.dtype.itemsize)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    _say(f"[wav   ] t0={chunk.t0:.3f} seq={chunk.seq:3d}  wrote {path} ({len(pcm) / rate:.2f} s)")


def flac_file(chunk: Any, out: str, rate: float | None = None) -> None:
    """Write the chunk as a FLAC file ``<out>/<stream index>.flac`` through ``soundfile`` (libsndfile),
    at the stream's rate (or ``rate``).

    ``int16`` stays 16-bit and ``int32`` becomes 24-bit (FLAC's widest); floats in
    [-1, 1] become 24-bit.  Needs the ``files`` extra (``pip install slabcast[files]``).
    """
    try:
        import soundfile
    except ImportError as exc:
        raise ImportError("flac_file needs soundfile: pip install 'slabcast[files]'") from exc
    rate = _rate(chunk, rate)
    data = chunk.data
    subtype = "PCM_16" if data.dtype == np.int16 else "PCM_24"
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{chunk.index:012d}.flac")
    soundfile.write(path, data, int(rate), subtype=subtype, format="FLAC")
    _say(f"[flac  ] t0={chunk.t0:.3f} seq={chunk.seq:3d}  wrote {path} ({len(data) / rate:.2f} s)")


def spectral_peak(chunk: Any, rate: float | None = None) -> None:
    """Print the frequency of the strongest spectral peak of each channel (a stand-in for a model)."""
    rate = _rate(chunk, rate)
    data = chunk.data if chunk.data.ndim == 2 else chunk.data[:, None]
    n = len(data)
    spectrum = np.abs(np.fft.rfft(data * np.hanning(n)[:, None], axis=0))
    peaks = np.fft.rfftfreq(n, 1 / rate)[np.argmax(spectrum, axis=0)]
    text = "  ".join(f"ch{i} peak {p:7.1f} Hz" for i, p in enumerate(peaks))
    _say(f"[peak  ] t0={chunk.t0:.3f} seq={chunk.seq:3d}  {text}")


_XDF: dict[str, Any] = {}  # out path -> (XdfWriter, stream id), one per worker process


def _close_xdf() -> None:
    for writer, _ in _XDF.values():
        writer.close()
    _XDF.clear()


def xdf_file(chunk: Any, out: str = "recording.xdf", clock: Literal["wall", "lsl"] = "wall") -> None:
    """Append the chunk to the XDF file ``out`` (one Samples chunk each, written whole: a kill leaves every
    chunk before it); ``{stream}`` and ``{pid}`` in ``out`` are replaced by the stream name and the worker's pid.

    A task sees one stream, so each task writes its own file (``slabcast record --out s.xdf A B`` puts
    several streams in one). ClockOffset chunks go out every 5 s (``clock="lsl"``: LSL's
    ``local_clock`` against wall time; ``"wall"``: 0); the stream footer is written when the worker
    exits. An existing file is refused (the worker fails, naming it).
    """
    import atexit

    from .client.record_xdf import XdfWriter

    info = chunk.info
    path = out.format(stream=info.name, pid=os.getpid())
    entry = _XDF.get(path)
    if entry is None:
        if not _XDF:
            atexit.register(_close_xdf)
        writer = XdfWriter(path, clock)
        entry = _XDF[path] = (writer, writer.add_stream(info))
    writer, sid = entry
    writer.write(sid, chunk.data, chunk.times)
    writer.tick()


# `slabcast up --example` prints it (a pip install has no broker/ directory); a test keeps it equal to
# broker/slabcast.toml.
EXAMPLE_CONFIG = """# slabcast up broker/slabcast.toml
#
# The microphone use case: one audio stream, three independent tasks, each in its
# own process with its own chunk size. `slabcast up` starts the broker with its
# sources, starts one worker process per task (more with `workers = N`), restarts a
# worker that crashes (after 0.5 s, then 1, 2, 4 ... up to 30 s). On Ctrl-C or
# SIGTERM the sources end their streams, the workers finish them (the recorder
# writes its last, shorter file) and exit, then the broker stops, leaving nothing
# behind (a second Ctrl-C stops at once).

[broker]
# address = "ipc:///run/slabcast/broker.sock"   # default: $SLABCAST_ADDRESS or the per-user socket
lease_timeout = 30.0                              # evict a block subscriber that keeps the source waiting longer (s)
# shm_mode = "660"                                # segments readable by the group (consumers as another user)

# Sources run on acquisition threads inside the broker; their samples go straight
# into shared memory. Replace the synthetic one with a real device, e.g. run
#   arecord -f S16_LE -r 48000 -c 2 | slabcast up broker/slabcast.toml
# with kind = "stdin", dtype = "int16"; or a file: kind = "file", path = "speech.flac"
# (docs/up.md lists every source kind and option).
[[sources]]
kind = "synthetic"
name = "mic"
rate = 48000
channels = 2
frame = 480                 # 10 ms per frame
freqs = [440.0, 1000.0]     # one tone per channel, plus noise
nslabs = 6                  # the pool: 6 slabs of 2 MiB for frames, each carrying the longest chunk a
                            # subscriber asks for (the 10 s recorder's 3.84 MB): 34 MiB of /dev/shm
                            # once it subscribes, 38 MiB with the ring of frame descriptors (4 MiB);
                            # see docs/up.md, "Sizing"

# Each task names a callable `module:function` called as function(chunk, **options)
# for every chunk, in its worker process. chunk.data is a read-only numpy view of
# shared memory, valid during the call.

[[tasks]]
name = "spl"                # sound level every 0.5 s; never slows the others down
call = "slabcast.examples:spl"
stream = "mic"
seconds = 0.5
clip = true
policy = "drop"

[[tasks]]
name = "recorder"           # a WAV file every 10 s, lossless from its start to the end, the last partial one too
call = "slabcast.examples:wav_file"
stream = "mic"
seconds = 10.0
clip = true
policy = "block"
partial_tail = true
options = { out = "/tmp/slabcast-wav" }  # written at the stream's rate

[[tasks]]
name = "model"              # 1 s of audio to a model, then skip 1 s: it runs every 2 s of stream time
call = "slabcast.examples:spectral_peak"
stream = "mic"
seconds = 1.0
clip = true
sampler = 1.0
policy = "drop"
workers = 1

"""
