"""Window: the most recent seconds of a stream, channels-first, a min/max envelope for display, and MNE-LSL's
``StreamLSL`` reading API (``get_data(winsize, picks)``, ``n_new_samples``, ``ch_names``)."""

from __future__ import annotations

import atexit
import contextlib
import math
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._exceptions import ClosedError, EndOfStream, PublisherGoneError, SlabcastError
from .._info import StreamInfo
from ..client.chunk import Chunk
from ..client.subscriber import Subscriber
from ..core.rechunk import is_integer, is_real

__all__ = ["Window"]

_FILL_FOR = 1.0  # seconds the constructor takes at most reading the pool (history=True); the thread reads on
_ALL = 1e9  # seconds of history: all the pool holds (a window of samples, whose seconds are unknown beforehand)
_MNE_KEYS = {"sfreq": "rate", "ch_names": "channel_names", "nchan": "channels"}
# Windows not closed yet: closed at the interpreter's exit (a script that ends without disconnect() leaves cleanly;
# its reader, a daemon thread that keeps the window alive, would be stopped mid-read and the broker would log the
# subscriber as died, reclaiming its leases).
_OPEN: weakref.WeakSet[Window] = weakref.WeakSet()


_EXIT_WAIT = 2.0  # seconds the exit hook spends closing windows, at most (each close waits for BYE's answer)


@atexit.register
def _close_open_windows() -> None:
    deadline = time.monotonic() + _EXIT_WAIT
    for window in list(_OPEN):
        if time.monotonic() >= deadline:
            break  # (a broker that does not answer BYE: the rest go with the process, as they did before)
        with contextlib.suppress(Exception):
            window.close()


@dataclass(frozen=True)
class _WindowInfo(StreamInfo):
    """The stream's info, also readable as MNE's ``info["sfreq"]``, ``info["ch_names"]``, ``info["nchan"]``
    (what MNE-LSL code reads of ``StreamLSL.info``; ``sfreq`` is 0.0 without a rate, as in LSL)."""

    def __getitem__(self, key: str) -> Any:
        if key not in _MNE_KEYS:
            raise KeyError(f"{key!r}: a Window's info reads {', '.join(map(repr, _MNE_KEYS))} as MNE's Info does "
                           f"(and has the attributes of a StreamInfo)")  # fmt: skip
        value = getattr(self, _MNE_KEYS[key])
        if key == "sfreq":
            return float(value or 0.0)
        return list(value) if key == "ch_names" else value


class Window:
    """The latest ``seconds`` (or ``samples``) of a stream, always ready, never queued.

    A background thread keeps its own subscription (``policy="drop"``, so it
    never slows the publisher or other readers) and copies each frame into a
    ring of ``seconds * rate`` samples.  Every ``Window`` has its own cursor: two
    windows, or a window and a subscriber, never take data from each other.

    Two ways to read it: :meth:`get` (the whole window) and :meth:`get_display` (an
    envelope, for the view), or MNE-LSL's ``StreamLSL`` API: :meth:`get_data`
    (``winsize``, ``picks``), :attr:`n_new_samples`, :attr:`ch_names`,
    :meth:`get_channel_types`, ``info["sfreq"]``, :meth:`connect` and :meth:`disconnect`
    (docs/lsl.md puts them side by side).

    Parameters
    ----------
    stream : str
    seconds : float, optional
        Length of the window in seconds (the ring holds ``ceil(seconds * rate)`` samples, as
        MNE-LSL's ``bufsize``); the stream must have a rate.
    samples : int, optional
        Length of the window in samples, instead of ``seconds``: any stream, with or without a rate.
    dtype : numpy dtype, optional
        The ring's dtype, which :meth:`get` and :meth:`get_data` return: the stream's own by default (as
        MNE-LSL), ``"float64"`` to have every sample converted as it arrives.
    address : str, optional
    wait : float, optional
        Seconds to wait for the stream to appear (default: the subscriber's timeout, 10 s; 0: not at all).
    history : bool
        Fill the window at once from what the stream's pool still holds, up to its ``seconds`` or ``samples``
        (the newest ones; a subscriber's ``history=``): :meth:`get` then has them straight away, when the
        pool holds them (size it with the publisher's ``history=``).  By default (False) the window fills from
        its creation on, as MNE-LSL's ``StreamLSL`` from ``connect``.  Needs a local (``ipc://``) broker.
    curve : (str, str), optional
        For a ``tcp://`` address: this client's secret key file and the broker's
        public key file (``slabcast keygen``).

    Raises
    ------
    ValueError
        If the stream has no rate and ``samples`` is not given; neither or both of ``seconds``
        and ``samples``; a ``dtype`` the stream's samples do not convert to; ``history`` with a ``tcp://``
        address.
    """

    def __init__(self, stream: str, seconds: float | None = None, *, samples: int | None = None, dtype: Any = None,
                 address: str | None = None, wait: float | None = None,
                 curve: tuple[str, str] | None = None, history: bool = False) -> None:  # fmt: skip
        if (seconds is None) == (samples is None):
            raise ValueError(f"give the window's length as seconds or as samples, not both nor neither "
                             f"(got seconds={seconds!r}, samples={samples!r})")  # fmt: skip
        if seconds is not None and (not is_real(seconds) or not 0 < seconds < float("inf")):
            raise ValueError(f"seconds must be a positive finite number, got {seconds!r}")
        if samples is not None and (not is_integer(samples) or samples < 1):
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        want = None if dtype is None else np.dtype(dtype)
        back = (float(seconds) if seconds is not None else _ALL) if history else None
        self._sub = Subscriber(stream, 1, policy="drop", max_inflight=256, address=address, wait=wait,
                               curve=curve, label=f"window:{stream}", history=back)  # fmt: skip
        info = self._sub.info
        if samples is None and info.rate is None:
            self._sub.close()
            raise ValueError(f"a Window of seconds needs a stream with a rate; {stream!r} has none "
                             f"(give samples= to size it in samples)")  # fmt: skip
        if want is not None and not np.can_cast(info.dtype, want, casting="same_kind"):
            self._sub.close()
            raise ValueError(f"dtype {want} cannot hold the samples of {stream!r} ({info.dtype})")
        self.info: StreamInfo = _WindowInfo(info.name, info.dtype, info.channels, info.rate, info.channel_names,
                                            info.channel_types, info.channel_units, info.source_id,
                                            info.timestamps)  # fmt: skip
        if samples is not None:
            self.capacity = int(samples)
            self.seconds = samples / info.rate if info.rate else math.nan
        else:
            assert seconds is not None
            assert info.rate is not None
            self.seconds = float(seconds)
            self.capacity = max(1, math.ceil(seconds * info.rate - 1e-9))  # MNE-LSL's ceil, not fooled by 0.1 * 10
        self.dtype = want if want is not None else info.dtype
        self._data = np.zeros((self.capacity, info.channels), dtype=self.dtype)
        self._times = np.zeros(self.capacity, dtype=np.float64)
        self._count = 0  # samples written into the ring in all
        self._read = 0  # self._count at the last get_data
        self._lock = threading.Condition()
        self._closed = threading.Event()
        self.error: BaseException | None = None
        self._closed_by_publisher = False  # the stream's clean end, once the thread has read it
        self._done = False  # the thread has stopped reading (an end, an error, close())
        if history:
            try:
                self._fill(every=samples is not None)
            except BaseException:  # (the broker gone, evicted, Ctrl-C: nothing is left open)
                self._sub.close()
                raise
        self._thread = threading.Thread(target=self._run, name=f"window-{stream}", daemon=True)
        self._thread.start()
        _OPEN.add(self)

    def _fill(self, every: bool) -> None:
        """Take what the pool holds of the window's seconds before the constructor returns (``history=True``:
        :meth:`get` has them at once), up to a full window; the thread takes the rest as it comes.  ``every``
        (a window of samples, its history in no seconds): all the pool holds, of which the ring keeps the
        newest."""
        until = time.monotonic() + _FILL_FOR  # (a publisher writing faster than this reads: never caught up)
        try:
            while (every or self._count < self.capacity) and time.monotonic() < until:
                try:
                    chunk = self._sub.recv(timeout=0)  # (the pool's frames are described already: none waits)
                except (TimeoutError, EndOfStream):
                    return  # (all the pool held; an end is the thread's to see again)
                with chunk:
                    self._take(chunk)
        finally:
            self._read = max(0, self._count - self.capacity)  # n_new_samples: at most a window of what was there

    def _run(self) -> None:
        try:
            self._read_stream()
        finally:
            with self._lock:
                self._done = True
                self._lock.notify_all()  # (wait() returns: nothing more comes)

    def _read_stream(self) -> None:
        try:
            while not self._closed.is_set():
                try:
                    chunk = self._sub.recv(timeout=0.1)
                except TimeoutError:
                    continue
                with chunk:
                    self._take(chunk)
        except PublisherGoneError as exc:  # (an end, but not a clean one: the publisher died)
            self.error = exc
        except EndOfStream:
            self._closed_by_publisher = True
        except (SlabcastError, ClosedError) as exc:
            if not self._closed.is_set():
                self.error = exc
        except Exception as exc:  # (a bug, or a sample the window's dtype cannot take): never a silent stop
            self.error = exc
            raise

    def _take(self, chunk: Chunk) -> None:
        # Each sample's own stamp for a stream with per-sample times (an LSL source), else t0 + k / rate (t0 for
        # each sample of a stream without a rate).
        self._append(chunk.data if chunk.data.ndim == 2 else chunk.data[:, None], chunk.times)

    def _append(self, data: np.ndarray[Any, Any], times: np.ndarray[Any, Any]) -> None:
        cap = self.capacity
        skipped = max(0, len(data) - cap)  # a chunk longer than the ring: only its newest samples stay,
        data, times = data[skipped:], times[skipped:]  # but every one counts (samples, n_new_samples)
        n = len(data)
        with self._lock:
            self._count += skipped
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
    def ended(self) -> bool:
        """Whether the window has stopped taking samples: its stream ended (closed by its publisher), or
        reading it failed (:attr:`error`: the publisher died, the broker went away, this window was evicted).
        It holds its last samples; :meth:`get` still returns them, :meth:`get_data` once more."""
        return self._closed_by_publisher or self.error is not None

    def _stopped(self) -> None:
        """Raise why the window takes no more samples (called under the lock, with none left unread)."""
        if self.error is not None:
            raise self.error.with_traceback(None)
        if self._closed_by_publisher:
            raise EndOfStream(f"stream {self.info.name!r} ended after {self._count} samples; the window holds "
                              f"the newest {min(self._count, self.capacity)} (get() returns them)")  # fmt: skip

    @property
    def samples(self) -> int:
        """Samples received since the window opened."""
        return self._count

    def wait(self, samples: int | None = None, timeout: float | None = None, *, new: int | None = None) -> bool:
        """Block until enough samples came, the window stopped reading (:attr:`ended`, or closed), or
        ``timeout`` seconds passed; return whether enough came.

        ``samples``: at least that many received in all, since the window opened (:attr:`samples`).
        ``new``: at least that many since the last :meth:`get_data` (:attr:`n_new_samples`), the
        online loop's wait: ``while win.wait(new=250): data, ts = win.get_data(winsize=1)`` runs once
        per 250 samples and ends with the stream (the samples after the last full 250 are not waited for).

        Raises
        ------
        ValueError
            Neither or both of ``samples`` and ``new``, or one that is not a finite number >= 0.
        """
        if (samples is None) == (new is None):
            raise ValueError(f"give wait() samples (received in all) or new= (since the last get_data), one of "
                             f"them (got samples={samples!r}, new={new!r})")  # fmt: skip
        wanted = samples if new is None else new
        if not is_real(wanted) or not 0 <= wanted < math.inf:  # (2 * rate is a float: that many samples)
            which = "samples" if new is None else "new"
            raise ValueError(f"{which} must be a finite number of samples >= 0, got {wanted!r}")
        with self._lock:
            target = math.ceil(wanted) + (0 if new is None else self._read)
            self._lock.wait_for(lambda: self._count >= target or self._done, timeout)
            return self._count >= target

    def get(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """Return ``(data, timestamps)``: the newest samples, ``(channels, n)`` and ``(n,)``, oldest first.

        ``n`` is ``seconds * rate`` once that much has arrived, what there is before.
        The arrays are copies: they stay valid however the stream moves on.  Once the stream has ended
        (:attr:`ended`) they are its last samples, at every call (a display keeps showing them).
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

    @property
    def n_new_samples(self) -> int:
        """Samples received since the last :meth:`get_data` (since the window opened, before the first), as
        MNE-LSL's: reset by every :meth:`get_data`, whatever its ``winsize`` and ``picks``; it may exceed
        the window's capacity when it is read less often than it fills."""
        with self._lock:
            return self._count - self._read

    @property
    def n_buffer(self) -> int:
        """Samples the window holds at most (MNE-LSL's ``n_buffer``)."""
        return self.capacity

    @property
    def ch_names(self) -> list[str]:
        """The channel names (MNE-LSL's ``ch_names``)."""
        return list(self.info.channel_names)

    def get_channel_types(self, picks: Any = None, unique: bool = False) -> list[str]:
        """The channel types (``info.channel_types``, ``""`` where none was given), of ``picks`` (as
        :meth:`get_data` takes them); ``unique``: each once, in order."""
        types = [self.info.channel_types[i] if self.info.channel_types else "" for i in self._picks(picks)]
        return list(dict.fromkeys(types)) if unique else types

    def _picks(self, picks: Any) -> list[int]:
        """Channel indices for MNE's ``picks``: None, ``"all"``, ``"data"``, an index, a slice, a name, a channel
        type (any case: ``"eeg"`` picks the channels of type ``"EEG"``), or a list of indices, names or types."""
        info = self.info
        n = info.channels
        if picks is None or (isinstance(picks, str) and picks in ("all", "data")):
            return list(range(n))
        if isinstance(picks, slice):
            return list(range(n))[picks]
        items = list(picks) if isinstance(picks, list | tuple | np.ndarray | range) else [picks]
        types = [t.lower() for t in info.channel_types] if info.channel_types else [""] * n
        out: list[int] = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, str | int | np.integer):
                raise ValueError(f"picks must be channel indices, names or types, got {item!r}")
            if isinstance(item, int | np.integer):
                if not -n <= item < n:
                    raise ValueError(f"channel index {item} out of range: {info.name!r} has {n} channels")
                out.append(int(item) % n)
            elif item in info.channel_names:
                out.append(info.channel_names.index(item))
            elif item.lower() in types:
                out += [i for i, t in enumerate(types) if t == item.lower()]
            else:
                kinds = sorted(set(info.channel_types)) or "none given"
                names = ", ".join(info.channel_names[:8]) + (", ..." if n > 8 else "")
                raise ValueError(
                    f"no channel named or typed {item!r} in {info.name!r} (channels {names}; types {kinds})"
                )
        if not out:
            raise ValueError(f"picks {picks!r} select no channel of {info.name!r}")
        return out

    def get_data(self, winsize: float | None = None, picks: Any = None) -> tuple[np.ndarray[Any, Any],
                                                                                 np.ndarray[Any, Any]]:  # fmt: skip
        """Return ``(data, timestamps)``: the newest ``winsize`` of the window, as MNE-LSL's ``StreamLSL.get_data``.

        Parameters
        ----------
        winsize : float, optional
            Seconds (``ceil(winsize * rate)`` samples) for a stream with a rate; samples for a stream
            without one (as MNE-LSL). ``None``: the whole window.
        picks : optional
            Channels: ``None`` or ``"all"`` (every one), an index, a slice, a name, a type (any
            case), or a list of indices, names or types.

        Returns
        -------
        data : numpy.ndarray
            ``(n_channels, n_times)``, oldest first, in the window's ``dtype``. ``n_times`` is at
            most what has arrived (MNE-LSL's ring starts zero-filled; this returns no zeros).
        timestamps : numpy.ndarray
            ``(n_times,)`` float64 seconds, each sample's own (``time.time()`` clock).

        Resets :attr:`n_new_samples`.

        Raises
        ------
        EndOfStream
            The stream ended and every sample of it was returned by an earlier call (the call after the
            last samples came returns them): an analysis loop ends instead of reading the same data again.
        PublisherGoneError, BrokerGoneError, EvictedError
            Reading the stream failed (:attr:`error`), likewise once every sample before it was returned.
        """
        rate = self.info.rate
        if winsize is None:
            n = self.capacity
        elif not is_real(winsize) or not 0 <= winsize < math.inf:
            raise ValueError(f"winsize must be a finite number >= 0 or None, got {winsize!r}")
        elif rate:
            n = math.ceil(winsize * rate - 1e-9)
        elif winsize != int(winsize):
            raise ValueError(f"winsize is in samples for {self.info.name!r} (no rate): an integer, got {winsize!r}")
        else:
            n = int(winsize)
        if n > self.capacity:
            raise ValueError(f"winsize {winsize!r} is {n} samples, more than the window holds ({self.capacity})")
        index = self._picks(picks)
        with self._lock:
            if self._count == self._read and self.ended:
                self._stopped()
            have = min(self._count, self.capacity, n)
            slots = (self._count - have + np.arange(have)) % self.capacity
            data = self._data[slots][:, index].T.copy()
            times = self._times[slots]
            self._read = self._count
        return data, times

    def connect(self, *args: Any, **kwargs: Any) -> Window:
        """Return the window: it connected when made (MNE-LSL's ``StreamLSL(...).connect()`` ports unchanged;
        its arguments, such as ``acquisition_delay``, have no meaning here and are ignored)."""
        return self

    @property
    def connected(self) -> bool:
        """Whether the window still reads its stream (MNE-LSL's ``connected``)."""
        return not self._closed.is_set() and self.error is None and self._thread.is_alive()

    def disconnect(self) -> Window:
        """Close the window (MNE-LSL's ``disconnect``); return it."""
        self.close()
        return self

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
        if self.dtype.kind == "S":
            raise TypeError(f"{self.info.name!r} is a marker stream ({self.dtype}): strings have no min/max "
                            f"envelope; get() returns its newest markers and their times")  # fmt: skip
        data, times = self.get()
        if method == "tsdownsample":
            return envelope_tsdownsample(data, times, n_pixels)
        return envelope(data, times, n_pixels)

    def close(self) -> None:
        """Stop the background reader and unsubscribe (idempotent; windows still open are closed so at the
        interpreter's exit)."""
        if self._closed.is_set():
            return
        self._closed.set()
        _OPEN.discard(self)
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
