"""Zarr v3 recordings: one stream in a group of its own, or several streams, one group each (a session).

A stream's group (docs/recording.md, "Zarr layout"): ``samples`` ``(sample, channel)``, ``channel``
(the channel names: a coordinate, so xarray labels the channels), ``times`` ``(sample,)`` for a
stream with per-sample stamps, ``frames/index``, ``frames/n``, ``frames/t0`` ``(frame,)``, and the
stream info in the attribute ``slabcast``. Every array has ``dimension_names``, so
``xarray.open_zarr(PATH, group=NAME, consolidated=False)`` opens a stream as a labelled Dataset.
A marker stream's ``samples`` are Zarr strings (variable-length UTF-8, Zarr v3's ``string``: its
``S<N>`` bytes have no Zarr v3 specification yet); they read back as the stream's ``S<N>``.

A session (``slabcast record --out s.zarr A B``) is a root group whose attribute ``slabcast`` is
``{"format": "slabcast-session", "version": 1, "streams": [names]}`` with one such group per stream.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

from .._info import StreamInfo
from .record import FRAME_RECORD, Recording, _info_from, _Writer, _ZarrSamples

__all__ = ["SESSION_FORMAT", "ZarrSession", "open_zarr", "zarr_streams"]

SESSION_FORMAT = "slabcast-session"


def _zarr() -> Any:
    try:
        import zarr
    except ImportError as exc:
        raise ImportError("Zarr recordings need zarr: pip install 'slabcast[zarr]'") from exc
    return zarr


def create_root(path: str) -> Any:
    """A new Zarr v3 group at ``path`` (an existing one is refused)."""
    zarr = _zarr()
    try:
        return zarr.open_group(path, mode="w-", zarr_format=3)
    except Exception as exc:  # ContainsGroupError, FileExistsError ...
        raise FileExistsError(f"{path} already holds something ({exc}); choose another --out") from exc


class ZarrWriter(_Writer):
    """One stream into a Zarr group: ``write`` frames, ``flush`` now and then (appends), ``close``."""

    def __init__(self, group: Any, info: StreamInfo, meta: dict[str, Any]) -> None:
        self.group = group
        group.attrs["slabcast"] = meta
        block = max(4096, int(info.rate or 4096))  # about a second of samples per Zarr chunk
        self.strings = info.dtype.kind == "S"  # markers: stored as Zarr strings (see the module's docstring)
        # dimension_names: xarray.open_zarr takes the group as a Dataset (samples: sample x channel).
        self.samples = group.create_array("samples", shape=(0, info.channels), dtype=str if self.strings
                                          else info.dtype, chunks=(block, info.channels),
                                          dimension_names=("sample", "channel"))  # fmt: skip
        # The channel names as the `channel` dimension's coordinate: xarray labels the channels with them.
        names = group.create_array("channel", shape=(info.channels,), dtype=str, dimension_names=("channel",))
        names[:] = np.array(info.channel_names, dtype=str)
        self.index, self.n, self.t0 = (
            group.create_array(f"frames/{name}", shape=(0,), dtype=dtype, chunks=(4096,), dimension_names=("frame",))
            for name, dtype in (("index", "<u8"), ("n", "<u8"), ("t0", "<f8")))  # fmt: skip
        self.pending: list[np.ndarray[Any, Any]] = []
        self.pending_frames: list[tuple[int, int, float]] = []
        self.pending_times: list[np.ndarray[Any, Any]] = []
        self.times: Any = None
        if info.timestamps:
            self.times = group.create_array("times", shape=(0,), dtype="<f8", chunks=(block,),
                                            dimension_names=("sample",))  # fmt: skip

    def write_times(self, times: np.ndarray[Any, Any]) -> None:
        self.pending_times.append(np.array(times, dtype="<f8"))

    def write(self, data: np.ndarray[Any, Any], index: int, t0: float) -> None:
        block = np.array(data if data.ndim == 2 else data[:, None])
        self.pending.append(np.char.decode(block, "utf-8", "replace") if self.strings else block)
        self.pending_frames.append((index, len(data), t0))

    def flush(self) -> None:
        if not self.pending:
            return
        # Samples first, then the frames that describe them: a kill between the two loses frames, not sense.
        self.samples.append(np.concatenate(self.pending), axis=0)
        if self.pending_times:
            self.times.append(np.concatenate(self.pending_times))
            self.pending_times = []
        frames = np.array(self.pending_frames, dtype=FRAME_RECORD)
        self.index.append(frames["index"])
        self.n.append(frames["n"])
        self.t0.append(frames["t0"])
        self.pending, self.pending_frames = [], []

    def close(self) -> None:
        self.flush()


class ZarrSession:
    """Several streams into one Zarr v3 group, one sub-group per stream (thread-safe: a thread per stream)."""

    keeps_jumps = False  # (as a one-stream recording: it ends at a discontinuity)

    def __init__(self, path: str, meta: Any) -> None:
        self.root = create_root(path)
        self.meta = meta  # StreamInfo -> the stream's attribute (record._meta)
        self.root.attrs["slabcast"] = {"format": SESSION_FORMAT, "version": 1, "streams": [], "created": time.time()}
        self.lock = threading.Lock()
        self.writers: list[ZarrWriter] = []

    def add_stream(self, info: StreamInfo) -> int:
        with self.lock:
            if info.name in self.root:
                raise ValueError(f"stream {info.name!r} is in this session twice")
            writer = ZarrWriter(self.root.create_group(info.name), info, self.meta(info))
            attrs = dict(self.root.attrs["slabcast"])
            attrs["streams"] = [*attrs["streams"], info.name]
            self.root.attrs["slabcast"] = attrs
            self.writers.append(writer)
            return len(self.writers) - 1

    def write(self, sid: int, data: np.ndarray[Any, Any], times: np.ndarray[Any, Any] | None, index: int,
              t0: float) -> None:  # fmt: skip
        writer = self.writers[sid]
        with self.lock:
            writer.write(data, index, t0)
            if writer.times is not None and times is not None:
                writer.write_times(times)

    def flush(self, sid: int) -> None:
        with self.lock:
            self.writers[sid].flush()

    def tick(self) -> None:
        pass

    def close(self) -> None:
        with self.lock:
            for writer in self.writers:
                writer.close()


def _open_group(path: str) -> Any:
    zarr = _zarr()
    try:
        return zarr.open_group(path, mode="r")
    except Exception as exc:  # zarr raises several kinds for a path that is not a group
        raise ValueError(f"{path}: not a Zarr group ({exc})") from exc


def zarr_streams(path: str) -> list[str]:
    """The streams of a Zarr recording: ``[]`` for a one-stream group, the names for a session."""
    meta = dict(_open_group(path).attrs).get("slabcast")
    if isinstance(meta, dict) and meta.get("format") == SESSION_FORMAT:
        return list(meta.get("streams") or [])
    return []


def open_zarr(path: str, stream: str | None = None) -> Recording:
    """Read a Zarr recording (one stream, or ``stream`` of a session) as a :class:`~slabcast.client.record.Recording`.

    Raises
    ------
    ValueError
        Not a slabcast Zarr recording; a session and no (or an unknown) ``stream``.
    """
    group = _open_group(path)
    meta = dict(group.attrs).get("slabcast")
    where = path
    if isinstance(meta, dict) and meta.get("format") == SESSION_FORMAT:
        names = list(meta.get("streams") or [])
        if stream is None and len(names) == 1:
            stream = names[0]
        if stream not in names:
            raise ValueError(f"{path} holds the streams {', '.join(map(repr, names)) or 'none'}; "
                             + ("name one (stream=...)" if stream is None else f"not {stream!r}"))  # fmt: skip
        assert stream is not None
        group = group[stream]
        meta = dict(group.attrs).get("slabcast")
        where = os.path.join(path, stream)
    elif stream is not None and isinstance(meta, dict) and meta.get("name") != stream:
        raise ValueError(f"{path} holds the stream {meta.get('name')!r}, not {stream!r}")
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: a Zarr group without slabcast's stream info (attribute 'slabcast')")
    info = _info_from(meta, where)
    arrays: dict[str, Any] = {k: group[f"frames/{k}"] for k in ("index", "n", "t0")}
    index, n, t0 = (np.asarray(arrays[k][:]) for k in ("index", "n", "t0"))
    count = min(len(index), len(n), len(t0))
    frames = np.zeros(count, dtype=FRAME_RECORD)
    frames["index"], frames["n"], frames["t0"] = index[:count], n[:count], t0[:count]
    samples: Any = group["samples"]
    total = int(frames["n"].sum())
    if samples.shape[0] < total:
        raise ValueError(f"{where}: 'samples' is shorter than its frames say ({samples.shape[0]} < {total})")
    times_array: Any = group.get("times", None)
    times = np.asarray(times_array[:total]) if times_array is not None else None
    reader = _MarkerSamples(samples, total, info.dtype) if info.dtype.kind == "S" else _ZarrSamples(samples, total)
    return Recording(info, reader, frames, times)  # type: ignore[arg-type]


class _MarkerSamples(_ZarrSamples):
    """A marker stream's samples, kept as Zarr strings, read back as the stream's ``S<N>`` (UTF-8) bytes."""

    def __init__(self, array: Any, n: int, dtype: np.dtype[Any]) -> None:
        super().__init__(array, n)
        self.dtype = dtype

    def _read(self, start: int, stop: int) -> np.ndarray[Any, Any]:
        text = np.asarray(self.array[start:stop])
        raw = [str(value).encode("utf-8") for value in text.reshape(-1).tolist()]
        return np.array(raw, dtype=self.dtype).reshape(text.shape) if raw else np.zeros(text.shape, self.dtype)
