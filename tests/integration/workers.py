"""Worker functions run in spawned processes by the integration tests (importable by spawn)."""

from __future__ import annotations

import os
import threading
import zlib

import numpy as np

import slabcast
from slabcast.core import ring as _ring


def frames_for(spec, dtype="float32", channels=2, rate=1000.0, t_start=100.0):
    """Deterministic frames: ``spec`` is a list of frame lengths; returns [(array, t0)]."""
    out, index = [], 0
    for n in spec:
        values = np.arange(index * channels, (index + n) * channels, dtype=np.int64)
        arr = (values % 32749).astype(dtype)
        if channels > 1:
            arr = arr.reshape(n, channels)
        out.append((arr, t_start + index / rate if rate else t_start + len(out)))
        index += n
    return out


def publish(address, name, spec, kwargs, ready_q, go_event, result_q):
    """Open a stream, wait for the go signal, write the frames of ``spec``, close."""
    try:
        pub = slabcast.Publisher(name, address=address, **kwargs)
        ready_q.put(("pub-ready", os.getpid()))
        go_event.wait(30)
        dtype = kwargs.get("dtype", "float32")
        channels = kwargs.get("channels", 1)
        for arr, t0 in frames_for(spec, dtype, channels, kwargs.get("rate")):
            pub.write(arr, t0=t0)
        pub.close()
        result_q.put(("pub-done", pub.frames))
    except BaseException as exc:
        result_q.put(("pub-error", repr(exc)))
        raise


def subscribe(address, name, kwargs, tag, ready_q, result_q):
    """Subscribe, signal ready, and report every chunk as (seq, index, n, t0, crc) until the end."""
    try:
        sub = slabcast.Subscriber(name, address=address, **kwargs)
        ready_q.put(("sub-ready", tag))
        got = []
        end = "end"
        try:
            for chunk in sub:
                with chunk:
                    d = chunk.data
                    got.append((chunk.seq, chunk.index, len(d), chunk.t0, zlib.crc32(d.tobytes())))
        except slabcast.SlabcastError as exc:
            end = type(exc).__name__
        stats = sub.statistics()
        sub.close()
        result_q.put((tag, got, end, stats.dropped))
    except BaseException as exc:
        result_q.put((tag, repr(exc), "crash", -1))
        raise


def hold_and_wait(address, name, size, ready_q):
    """Subscribe, receive one chunk and keep it forever (to be killed with SIGKILL)."""
    sub = slabcast.Subscriber(name, size=size, clip=True, address=address, max_inflight=2)
    ready_q.put(("sub-ready", os.getpid()))
    chunks = [sub.recv(timeout=30) for _ in range(2)]
    ready_q.put(("holding", [c.seq for c in chunks]))
    threading.Event().wait()  # until killed


def publish_and_hang(address, name, spec, ready_q, go_event, result_q):
    """Write the frames of ``spec`` (int32 mono) and then wait, never closing, to be killed."""
    pub = slabcast.Publisher(name, dtype="int32", address=address)
    ready_q.put(("pub-ready", os.getpid()))
    go_event.wait(30)
    for arr, t0 in frames_for(spec, "int32", 1, None):
        pub.write(arr, t0=t0)
    pub.flush()  # notices still queued in a killed process's socket are lost; flush bounds that
    result_q.put(("pub-wrote", len(spec)))
    threading.Event().wait()


_seen = [0]


def crash_after(chunk, n: int = 3) -> None:
    """A task callable (for `slabcast up` tests) that fails on its n-th chunk in each worker process."""
    _seen[0] += 1
    if _seen[0] >= n:
        raise RuntimeError(f"crash_after: chunk {_seen[0]} (index {chunk.index})")


def tally(chunk, out: str) -> None:
    """An `up` task: note where each chunk starts, its length and whether it is the partial tail."""
    with open(out, "a") as f:
        f.write(f"{chunk.index} {len(chunk)} {int(chunk.partial)}\n")
    print(f"[tally] {chunk.index} {len(chunk)}", flush=True)


def slow_tally(chunk, out: str, delay: float) -> None:
    """An `up` task behind its stream: :func:`tally`, then ``delay`` seconds of work per chunk."""
    tally(chunk, out)
    import time

    time.sleep(delay)


def fail_on_tail(chunk, out: str) -> None:
    """An `up` task that fails on the stream's last, partial chunk (after :func:`tally`)."""
    tally(chunk, out)
    if chunk.partial:
        raise RuntimeError("failing on the partial tail, as the test asks")


def read_paused(address, name, kwargs, ready_q, go_event, result_q, drained_event=None):
    """Subscribe, say ready, read nothing until ``go_event``; then report every chunk's (index, n) and every
    SamplesLostError's (start, stop) in order, and how the stream ended.  With ``drained_event``: set it
    once nothing more came for 0.5 s (and keep reading)."""
    try:
        sub = slabcast.Subscriber(name, address=address, **kwargs)
        ready_q.put(("sub-ready", os.getpid()))
        go_event.wait(60)
        events, end = [], "?"
        while True:
            try:
                chunk = sub.recv(timeout=0.5 if drained_event is not None and not drained_event.is_set() else 60)
            except TimeoutError:
                drained_event.set()
                continue
            except slabcast.SamplesLostError as exc:
                events.append(("lost", exc.start, exc.stop, str(exc)))
                continue
            except slabcast.SlabcastError as exc:
                end = type(exc).__name__
                break
            with chunk:
                values = chunk.data
                ok = bool(np.array_equal(values, (np.arange(chunk.index, chunk.index + len(values)) & 0xFF)))
                events.append(("chunk", chunk.index, len(values), ok, chunk.discontinuity))
        stats = sub.statistics()
        sub.close()
        result_q.put((events, end, stats.dropped))
    except BaseException as exc:
        result_q.put(("sub-error", repr(exc)))
        raise


def stress_expected(index, n, channels):
    """The samples ``index .. index + n`` of the stress stream: each value names its sample and channel."""
    base = np.arange(index, index + n, dtype=np.int64)[:, None] * 8 + np.arange(channels, dtype=np.int64)
    return base if channels > 1 else base[:, 0]


def stress_write(address, name, channels, rate, seconds, seed, ready_q, go_event, result_q, timestamps=True,
                 stream_min=None):
    """Write frames of random sizes (1 .. 3000 samples, some single samples in bursts) at full speed for
    ``seconds``, each sample's value naming it (stress_expected) and a time per sample (``timestamps``; else
    each frame's t0, which takes the compiled path where it is built); then close.  ``stream_min``: the
    compiled writer copies frames of this many bytes and more by streaming stores (0: every frame)."""
    try:
        rng = np.random.default_rng(seed)
        pub = slabcast.Publisher(name, dtype="int64", channels=channels, rate=rate, address=address,
                                 timestamps=timestamps, slab_bytes=2 << 20, max_chunk_bytes=1 << 20)
        if stream_min is not None and pub._writer is not None:
            pub._writer.stream_min = stream_min
        ready_q.put(("pub-ready", os.getpid()))
        go_event.wait(60)
        index = 0
        import time

        until = time.monotonic() + seconds
        grants = pub._state.grants
        held = 0  # the most slabs it held granted ahead
        while time.monotonic() < until:
            n = int(rng.integers(1, 3000)) if rng.random() < 0.7 else 1
            frame = stress_expected(index, n, channels)
            if timestamps:
                pub.write(frame, times=1000.0 + np.arange(index, index + n, dtype=np.float64) / rate)
            else:
                pub.write(frame, t0=1000.0 + index / rate)
            index += n
            held = max(held, len(grants))
        compiled = pub._writer.puts if pub._writer is not None else 0  # (frames the compiled path wrote)
        pub.close()
        result_q.put(("pub-done", index, pub.frames, compiled, held))
    except BaseException as exc:
        result_q.put(("pub-error", repr(exc)))
        raise


def stress_read(address, name, kwargs, ready_q, result_q):
    """Subscribe and check every byte of every chunk against the sample it claims to start at: its values,
    its per-sample times, its t0; and that chunks follow each other (a drop subscriber may skip forward).
    Report (chunks, samples, gaps, problems)."""
    try:
        options = {k: v for k, v in kwargs.items() if k != "python_look"}
        sub = slabcast.Subscriber(name, address=address, wait=30, **options)
        if kwargs.get("python_look"):
            sub._rx._reader = None  # the Python steps of LocalReceiver._take_one, not the compiled Reader.take_one
        elif getattr(sub._rx, "_reader", 0) is None and _ring.HOT is not None:
            raise AssertionError("the compiled module is built but this subscriber does not read the ring with it")
        ready_q.put(("sub-ready", os.getpid()))
        channels = sub.info.channels
        rate = sub.info.rate
        chunks = samples = gaps = 0
        problems = []
        at = sub.start_index
        while True:
            try:
                chunk = sub.recv(timeout=60)
            except slabcast.EndOfStream:
                break
            with chunk:
                n = len(chunk.data)
                if chunk.index != at:
                    # A drop subscriber skips the chunks it could not take (counted in `dropped`): forward only.
                    if chunk.index < at or kwargs.get("policy") != "drop":
                        problems.append(f"chunk at {chunk.index}, expected {at} (discontinuity={chunk.discontinuity})")
                    gaps += 1
                if not np.array_equal(chunk.data, stress_expected(chunk.index, n, channels)):
                    bad = np.flatnonzero((np.asarray(chunk.data).reshape(n, -1)
                                          != stress_expected(chunk.index, n, channels).reshape(n, -1)).any(axis=1))
                    problems.append(f"chunk at {chunk.index}: samples {bad[:5].tolist()} hold other values")
                want_t = 1000.0 + np.arange(chunk.index, chunk.index + n, dtype=np.float64) / rate
                if abs(chunk.t0 - want_t[0]) > 1e-6 or (sub.info.timestamps and not np.array_equal(chunk.times, want_t)):
                    problems.append(f"chunk at {chunk.index}: times differ")
                at = chunk.index + n
                chunks += 1
                samples += n
            if len(problems) > 20:
                break
        stats = sub.statistics()
        sub.close()
        result_q.put(("sub-done", kwargs, chunks, samples, gaps, stats.dropped, at, problems))
    except BaseException as exc:
        result_q.put(("sub-error", kwargs, repr(exc)))
        raise


def subscribe_ready(address, name, kwargs, tag, ready_q, result_q):
    """Subscribe to a stream not opened yet, saying ready from ``Subscriber(ready=)`` (the broker holds the
    subscription then), and report every chunk as ``subscribe`` does."""
    try:
        sub = slabcast.Subscriber(name, address=address, ready=lambda: ready_q.put(("sub-ready", tag)), **kwargs)
        got = [(c.seq, c.index, len(c.data), c.t0, zlib.crc32(c.data.tobytes())) for c in sub]
        sub.close()
        result_q.put((tag, got, "end", 0))
    except BaseException as exc:
        result_q.put((tag, repr(exc), "crash", -1))
        raise


def aio_subscribe_then_ready(address, name, size, ready_q, result_q):
    """An asyncio subscriber made before its stream, saying ready once its constructor returned; reports the
    (index, n) of every chunk."""
    import asyncio

    async def main():
        sub = slabcast.aio.Subscriber(name, size, clip=True, address=address, wait=30)
        ready_q.put("sub-ready")
        async with sub:
            return [(c.index, len(c.data)) async for c in sub]

    try:
        result_q.put(asyncio.run(main()))
    except BaseException as exc:
        result_q.put(repr(exc))
        raise


def task_in_a_slow_client(address: str, stream: str, out: str) -> None:
    """`up`'s worker body (task_main) for a tally task, in a client whose ``recv`` spends 0.3 s inside itself after
    each chunk (as a multipart read or an import would, briefly): writes ``interrupted`` to ``out + '.close'`` if the
    subscription is closed while a recv is still inside, ``clean`` otherwise."""
    import time

    from slabcast.cli.up import task_main
    from slabcast.cli.up_config import Task
    from slabcast.client.subscriber import Subscriber

    inside = [False]
    recv, close = Subscriber.recv, Subscriber.close

    def slow_recv(self, timeout=None):
        inside[0] = True
        chunk = recv(self, timeout)
        time.sleep(0.3)  # (still inside the client)
        inside[0] = False
        return chunk

    def watched_close(self):
        with open(out + ".close", "a") as f:
            f.write("interrupted\n" if inside[0] else "clean\n")
        close(self)

    Subscriber.recv = slow_recv
    Subscriber.close = watched_close
    task = Task(name="slow", call="tests.integration.workers:tally", stream=stream, size=80, clip=True,
                options={"out": out})
    task_main(task, address, 0)


def task_main_as_up_starts_it(address: str, stream: str, call: str, directory: str) -> None:
    """`up`'s worker body (task_main) for ``call`` (imported from ``directory``), started as `up` starts a worker: with
    SIGINT, SIGTERM and its stop signal blocked until task_main's handlers."""
    import signal

    from slabcast.cli.up import _WORKER_SIGNALS, task_main
    from slabcast.cli.up_config import Task

    signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
    task_main(Task(name="imp", call=call, stream=stream, size=80), address, 0, directory=directory)
