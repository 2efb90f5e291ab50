"""Window: the most recent seconds of a stream, channels-first, and a min/max envelope for display."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .._exceptions import ClosedError, EndOfStream, SlabcastError
from .._info import StreamInfo
from ..client.subscriber import Subscriber

__all__ = ["Window"]


class Window:
    """The latest ``seconds`` of a stream, always ready, never queued.

    A background thread keeps its own subscription (``policy="drop"``, so it
    never slows the publisher or other readers) and copies each frame into a
    ring of ``seconds * rate`` samples.  Every ``Window`` has its own cursor: two
    windows, or a window and a subscriber, never take data from each other.

    Parameters
    ----------
    stream : str
    seconds : float
        Length of the window; the stream must have a rate.
    address : str, optional
    wait : float, optional
        Seconds to wait for the stream to appear (default: the subscriber's timeout, 10 s; 0: not at all).
    curve : (str, str), optional
        For a ``tcp://`` address: this client's secret key file and the broker's
        public key file (``slabcast keygen``).

    Raises
    ------
    ValueError
        If the stream has no rate.
    """

    def __init__(self, stream: str, seconds: float, *, address: str | None = None, wait: float | None = None,
                 curve: tuple[str, str] | None = None) -> None:  # fmt: skip
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < float("inf"):
            raise ValueError(f"seconds must be a positive finite number, got {seconds!r}")
        self._sub = Subscriber(stream, 1, policy="drop", max_inflight=256, address=address, wait=wait,
                               curve=curve, label=f"window:{stream}")  # fmt: skip
        info = self._sub.info
        if info.rate is None:
            self._sub.close()
            raise ValueError(f"a Window needs a stream with a rate; {stream!r} has none")
        self.info: StreamInfo = info
        self.seconds = float(seconds)
        self.capacity = max(1, round(seconds * info.rate))
        self._data = np.zeros((self.capacity, info.channels), dtype=info.dtype)
        self._times = np.zeros(self.capacity, dtype=np.float64)
        self._count = 0  # samples written into the ring in all
        self._lock = threading.Condition()
        self._closed = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"window-{stream}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rate = self.info.rate
        assert rate is not None
        try:
            while not self._closed.is_set():
                try:
                    chunk = self._sub.recv(timeout=0.1)
                except TimeoutError:
                    continue
                with chunk:
                    data = chunk.data if chunk.data.ndim == 2 else chunk.data[:, None]
                    # A stream with per-sample times (an LSL source) gives each sample its own stamp.
                    times = chunk.times if self.info.timestamps else chunk.t0 + np.arange(len(data)) / rate
                    self._append(data, times)
        except EndOfStream:
            pass
        except (SlabcastError, ClosedError) as exc:
            if not self._closed.is_set():
                self.error = exc

    def _append(self, data: np.ndarray[Any, Any], times: np.ndarray[Any, Any]) -> None:
        cap = self.capacity
        if len(data) > cap:
            data, times = data[-cap:], times[-cap:]
        n = len(data)
        with self._lock:
            start = self._count % cap
            first = min(n, cap - start)
            self._data[start : start + first] = data[:first]
            self._times[start : start + first] = times[:first]
            if first < n:  # wrap around
                self._data[: n - first] = data[first:]
                self._times[: n - first] = times[first:]
            self._count += n
            self._lock.notify_all()

    @property
    def samples(self) -> int:
        """Samples received since the window opened."""
        return self._count

    def wait(self, samples: int, timeout: float | None = None) -> bool:
        """Block until at least ``samples`` samples have been received in all; return whether they were."""
        with self._lock:
            return self._lock.wait_for(lambda: self._count >= samples, timeout)

    def get(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """Return ``(data, timestamps)``: the newest samples, ``(channels, n)`` and ``(n,)``, oldest first.

        ``n`` is ``seconds * rate`` once that much has arrived, what there is before.
        The arrays are copies: they stay valid however the stream moves on.
        """
        with self._lock:
            n = min(self._count, self.capacity)
            end = self._count % self.capacity if n == self.capacity else 0  # the oldest sample's slot
            # One copy, straight into channels-first order (the view calls this every frame).
            data = np.empty((self._data.shape[1], n), dtype=self._data.dtype)
            head = n - end
            data[:, :head] = self._data[end:n].T
            data[:, head:] = self._data[:end].T
            times = np.concatenate([self._times[end:n], self._times[:end]])
        return data, times

    def get_display(
        self, n_pixels: int, method: str = "numpy"
    ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """Return ``(mins, maxs, times)``: a per-channel min/max envelope of :meth:`get` in ``n_pixels`` columns.

        Every sample falls in exactly one column, so every peak survives; each column
        reports the smallest and largest value in it (``(channels, columns)`` each) and
        the time of its first sample.  With fewer samples than pixels, each sample is
        its own column.  ``method``: ``"numpy"`` (the default: the faster, measured by
        ``benchmarks/display.py``) or ``"tsdownsample"`` (its MinMax downsampler; the
        ``display`` extra).
        """
        if not isinstance(n_pixels, int) or n_pixels < 1:
            raise ValueError(f"n_pixels must be a positive integer, got {n_pixels!r}")
        if method not in ("numpy", "tsdownsample"):
            raise ValueError(f"method must be 'numpy' or 'tsdownsample', got {method!r}")
        data, times = self.get()
        if method == "tsdownsample":
            return envelope_tsdownsample(data, times, n_pixels)
        return envelope(data, times, n_pixels)

    def close(self) -> None:
        """Stop the background reader and unsubscribe (idempotent)."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join(5)
        self._sub.close()

    def __enter__(self) -> Window:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def envelope(
    data: np.ndarray[Any, Any], times: np.ndarray[Any, Any], n_pixels: int
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """Min/max of ``data`` (``(channels, n)``) over ``n_pixels`` contiguous column ranges, vectorised."""
    n = data.shape[1]
    if n == 0:
        empty = np.zeros((data.shape[0], 0), dtype=data.dtype)
        return empty, empty.copy(), np.zeros(0)
    columns = min(n_pixels, n)
    edges = (np.arange(columns) * n) // columns  # start of each column; all distinct since columns <= n
    return np.minimum.reduceat(data, edges, axis=1), np.maximum.reduceat(data, edges, axis=1), times[edges]


def envelope_tsdownsample(
    data: np.ndarray[Any, Any], times: np.ndarray[Any, Any], n_pixels: int
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The same envelope through ``tsdownsample``'s MinMax downsampler (Rust, SIMD): its own column edges.

    Raises
    ------
    ImportError
        Without the ``display`` extra (``pip install 'slabcast[display]'``).
    """
    try:
        from tsdownsample import MinMaxDownsampler
    except ImportError as exc:
        raise ImportError("method='tsdownsample' needs tsdownsample: pip install 'slabcast[display]'") from exc
    channels, n = data.shape
    if n <= 2 * n_pixels:
        return envelope(data, times, n_pixels)
    sampler = MinMaxDownsampler()  # type: ignore[no-untyped-call]
    # Two indices per column (its min and its max, in time order); one column per pixel.
    idx = np.stack([np.asarray(sampler.downsample(np.ascontiguousarray(row), n_out=2 * n_pixels)) for row in data])
    columns = idx.shape[1] // 2
    values = np.take_along_axis(data, idx, axis=1).reshape(channels, columns, 2)
    first = idx.reshape(channels, columns, 2).min(axis=2).min(axis=0)
    return values.min(axis=2), values.max(axis=2), times[first]
