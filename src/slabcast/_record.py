"""Recordings: a stream written losslessly to an append-only directory, and read back for replay.

Layout of a recording directory (format "slabcast-recording", version 1)::

    info.json     name, dtype (numpy string, byte order included), channels, rate,
                  channel_names, created, format, version
    samples.bin   every sample, sample-major, in the stream's dtype: np.fromfile/np.memmap read it
    frames.bin    one 24-byte record per frame: u64 first sample index, u64 samples, f64 t0
                  (little-endian), so the frames and their timestamps replay exactly

Why not HDF5 or Zarr: this needs no dependency, both files only ever grow
(``O_APPEND``), so a crash loses at most the frame being written, any language
reads it with a memory map, and a sample index is a byte offset.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._info import StreamInfo

__all__ = ["Recording", "record", "write_info"]

FORMAT = "slabcast-recording"
FRAME_RECORD = np.dtype([("index", "<u8"), ("n", "<u8"), ("t0", "<f8")])


def write_info(path: str, info: StreamInfo) -> None:
    """Create the recording directory and its ``info.json`` (the directory must not hold a recording)."""
    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, "info.json")):
        raise FileExistsError(f"{path} already holds a recording; choose another --out")
    meta = {
        "format": FORMAT,
        "version": 1,
        "name": info.name,
        "dtype": info.dtype.str,
        "channels": info.channels,
        "rate": info.rate,
        "channel_names": list(info.channel_names),
        "created": time.time(),
    }
    with open(os.path.join(path, "info.json"), "w") as f:
        json.dump(meta, f, indent=2)


@dataclass
class Recording:
    """A recording read back: its stream info, every sample, and its frames."""

    info: StreamInfo
    samples: np.ndarray[Any, Any]  # (n, channels), memory-mapped
    frames: np.ndarray[Any, Any]  # FRAME_RECORD per frame

    @classmethod
    def open(cls, path: str) -> Recording:
        """Read a recording directory.

        Raises
        ------
        ValueError
            If it is not a slabcast recording, or its files disagree.
        """
        try:
            with open(os.path.join(path, "info.json")) as f:
                meta = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"{path} is not a slabcast recording (no info.json)") from None
        if meta.get("format") != FORMAT or meta.get("version") != 1:
            raise ValueError(
                f"{path}: expected format {FORMAT} version 1, got {meta.get('format')} {meta.get('version')}"
            )
        dtype = np.dtype(meta["dtype"])
        info = StreamInfo(meta["name"], dtype, meta["channels"], meta["rate"], tuple(meta["channel_names"]))
        frames = np.fromfile(os.path.join(path, "frames.bin"), dtype=FRAME_RECORD)
        total = int(frames["n"].sum()) if len(frames) else 0
        sample_path = os.path.join(path, "samples.bin")
        if os.path.getsize(sample_path) < total * dtype.itemsize * info.channels:
            raise ValueError(f"{path}: samples.bin is shorter than frames.bin says ({total} samples)")
        samples: np.ndarray[Any, Any] = np.zeros((0, info.channels), dtype=dtype)
        if total:
            samples = np.memmap(sample_path, dtype=dtype, mode="r", shape=(total, info.channels))
        return cls(info, samples, frames)

    @property
    def duration(self) -> float:
        """Seconds of stream time (samples / rate, or the span of frame times without a rate)."""
        if self.info.rate:
            return len(self.samples) / self.info.rate
        return float(self.frames["t0"][-1] - self.frames["t0"][0]) if len(self.frames) else 0.0


def record(stream: str, out: str, seconds: float | None = None, address: str | None = None,
           progress: bool = True) -> int:  # fmt: skip
    """Record ``stream`` into the directory ``out`` until it ends, ``seconds`` of it are written, or Ctrl-C.

    A ``policy="block"`` subscriber taking whole frames, so nothing is lost or cut.
    Returns the number of samples written.
    """
    from ._exceptions import EndOfStream
    from ._subscriber import Subscriber

    sub = Subscriber(stream, 1, policy="block", address=address, wait=30.0, label=f"record:{stream}")
    written = 0
    try:
        write_info(out, sub.info)
        rate = sub.info.rate
        limit = None if seconds is None else (round(seconds * rate) if rate else None)
        t_first: float | None = None
        last_report = 0.0
        with open(os.path.join(out, "samples.bin"), "ab") as samples, open(os.path.join(out, "frames.bin"), "ab") as fr:
            try:
                while limit is None or written < limit:
                    try:
                        chunk = sub.recv(timeout=1.0)
                    except TimeoutError:
                        continue
                    with chunk:
                        data = chunk.data
                        n = len(data) if limit is None else min(len(data), limit - written)
                        samples.write(np.ascontiguousarray(data[:n]).tobytes())
                        fr.write(np.array([(chunk.index, n, chunk.t0)], dtype=FRAME_RECORD).tobytes())
                    written += n
                    t_first = chunk.t0 if t_first is None else t_first
                    if not rate and seconds is not None and chunk.t0 - t_first >= seconds:
                        break
                    now = time.monotonic()
                    if progress and now - last_report >= 0.5:
                        last_report = now
                        secs = written / rate if rate else chunk.t0 - t_first
                        mb = written * sub.info.dtype.itemsize * sub.info.channels / 1e6
                        print(f"\rrecording {stream}: {secs:8.1f} s, {written} samples, {mb:.1f} MB ", end="",
                              file=sys.stderr, flush=True)  # fmt: skip
            except (EndOfStream, KeyboardInterrupt):
                pass
    finally:
        sub.close()
    if progress:
        print(f"\rrecorded {stream}: {written} samples to {out}" + " " * 20, file=sys.stderr, flush=True)
    return written
