"""The body of a BufferEmit worker process: map the owner's slabs read-only, run the callback on each chunk."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

from ..core.shm import attach
from ..wire import protocol as P
from .frames import FrameFormat

# The notice (owner -> worker) and the result (worker -> owner) are defined with every other
# message in wire/protocol.py; processes.py says why each worker has two pipes of its own.
_NOTICE, _RESULT = P.EMIT_NOTICE, P.EMIT_RESULT
_DROP = P.EMIT_DROP
_OK, _ERROR, _READY = P.EMIT_OK, P.EMIT_ERROR, P.EMIT_READY


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _pack_exception(exc: BaseException) -> bytes:
    exc.add_note(
        f"(raised by the callback in worker process {os.getpid()}:)\n{''.join(traceback.format_exception(exc))}"
    )
    try:
        return pickle.dumps(exc, pickle.HIGHEST_PROTOCOL)
    except Exception:
        stand_in = RuntimeError(f"the callback raised an exception that cannot be pickled: {exc!r}")
        stand_in.__notes__ = list(getattr(exc, "__notes__", []))
        return pickle.dumps(stand_in, pickle.HIGHEST_PROTOCOL)


def worker_main(
    notices: Any,
    results: Any,
    callback: Callable[..., Any],
    prefix: str,
    fmt: FrameFormat,
    want_result: bool,
) -> None:
    """Body of a worker process: map slabs read-only, run the callback on each chunk."""
    # The owner decides when to stop (it closes our notice pipe); a terminal's Ctrl-C is its.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rfd, wfd = notices.fileno(), results.fileno()
    with contextlib.suppress(BrokenPipeError):  # the owner died: nobody to answer
        _serve(rfd, wfd, callback, prefix, fmt.dtype, fmt.channels, fmt.oned, fmt.asbuffer, want_result)


def _serve(
    rfd: int,
    wfd: int,
    callback: Callable[..., Any],
    prefix: str,
    dtype: np.dtype[Any] | None,
    channels: int,
    oned: bool,
    asbuffer: bool,
    want_result: bool,
) -> None:
    maps: dict[int, Any] = {}
    itemsize = dtype.itemsize if dtype is not None else 1
    size = _NOTICE.size
    _write_all(wfd, _RESULT.pack(-1, _READY, 0))
    rest = b""
    while True:
        data = os.read(rfd, 1 << 16)
        if not data:
            break  # the owner closed the pipe (close) or died
        if rest:
            data = rest + data
        whole = len(data) - len(data) % size
        rest = data[whole:]
        for seq, slab, slab_bytes, offset, nbytes, t0 in _NOTICE.iter_unpack(memoryview(data)[:whole]):
            if seq == _DROP:
                mm = maps.pop(slab, None)
                if mm is not None:
                    with contextlib.suppress(BufferError):  # the callback kept a view: unmapped at exit
                        mm.close()
                continue
            mm = maps.get(slab)
            if mm is None:
                mm = maps[slab] = attach(f"{prefix}{slab}", slab_bytes)
            value: Any
            if dtype is None:
                value = mm[offset : offset + nbytes]  # bytes: the one copy bytes cannot avoid
                if asbuffer:
                    value = io.BytesIO(value)
            else:
                # A read-only view of the slab: no copy.  Valid while the callback runs.
                value = np.frombuffer(mm, dtype, nbytes // itemsize, offset)
                if not oned:
                    value = value.reshape(-1, channels)
            try:
                result = callback(value, t0)
            except Exception as exc:
                status, payload = _ERROR, _pack_exception(exc)
            else:
                status, payload = _OK, b""
                if want_result:
                    try:
                        payload = pickle.dumps(result, pickle.HIGHEST_PROTOCOL)
                    except Exception as exc:
                        err = TypeError(f"the callback returned a value that cannot be pickled: {exc}")
                        status, payload = _ERROR, _pack_exception(err)
                result = None
            del value
            # What the callback printed shows now, not when the worker exits (or never, if it is killed).
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            _write_all(wfd, _RESULT.pack(seq, status, len(payload)) + payload)
