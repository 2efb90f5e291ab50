"""BufferEmit: ocycle's README examples, the chunk rules, numpy frames, errors, and the three modes."""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
import zlib

import numpy as np
import ocycle
import pytest

import slabcast
from slabcast.core import shm as _shm
from slabcast.emit import emit as _emit
from slabcast.emit.emit import BufferEmit, WorkerDiedError
from tests.reference import expected_chunks

MODES = ["serial", "thread", "process"]


# -- callbacks a worker process can import -----------------------------------------------------


def on_process_emit(buff, t0):
    """ocycle README: the callback of the process-mode receiver."""
    x = buff.getvalue()
    print("Im in a process!", x, t0)
    return x[::-1]


def crc_of(value, t0):
    """Checksum of a chunk, where it ran, and what the callback was given."""
    if isinstance(value, np.ndarray):
        return t0, zlib.crc32(value.tobytes()), len(value), value.dtype.str, value.shape, value.flags.writeable
    return t0, zlib.crc32(value), len(value), type(value).__name__, os.getpid()


def die_on_marker(value, t0):
    """Kill the worker (kill -9) on a chunk starting with K, exit with code 3 on X."""
    if value[:1] == b"K":
        os.kill(os.getpid(), signal.SIGKILL)
    if value[:1] == b"X":
        os._exit(3)
    return t0, os.getpid()


def fail_on_bad(value, t0):
    """Raise ValueError on a chunk starting with B."""
    if value[:1] == b"B":
        raise ValueError(f"bad chunk at {t0}")
    return t0


def pid_of(value, t0):
    return os.getpid()


# -- helpers ------------------------------------------------------------------------------------


def own_segments():
    prefix = f"slabcast.{os.getpid()}."
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


@pytest.fixture(autouse=True)
def no_own_segment_left():
    """Process mode names its segments after this process: none may outlive its test."""
    before = own_segments()
    yield
    assert own_segments() <= before


def collect(**kw):
    """A BufferEmit whose callback records (value, t0); returns (emit, list)."""
    got = []
    emit = BufferEmit(lambda value, t0: got.append((value, t0)), **kw)
    return emit, got


def ocycle_values(frames, size, **kw):
    got = []
    emit = ocycle.BufferEmit(lambda value, t0: got.append(value), size, **kw)
    for i, frame in enumerate(frames):
        emit.write(frame, 1.0 + i)
    emit.close()
    return got


def emitter_processes():
    return [p for p in mp.active_children() if p.name.startswith("slabcast-emit")]


def pid_gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- ocycle's README, ported --------------------------------------------------------------------


def test_readme_example(capsys):
    some_data = b"asdfghjkl;"  # the README writes a str, which ocycle's BytesIO refuses as well
    consume_size = 29

    def create_consumer(size):
        def callback(value, t0):
            assert len(value) >= consume_size
            print("Emitting:", t0, value)

        return BufferEmit(callback, size)

    buff = create_consumer(consume_size)
    for _ in range(9):  # the README loops forever
        print("Writing to buffer:", some_data)
        buff.write(some_data)
    buff.close()
    out = capsys.readouterr().out.splitlines()
    emitted = [line for line in out if line.startswith("Emitting:")]
    assert len(emitted) == 3
    assert all(line.endswith(repr(some_data * 3)) for line in emitted)
    assert ocycle_values([some_data] * 9, consume_size) == [some_data * 3] * 3
    with pytest.raises(TypeError):
        ocycle.BufferEmit(lambda v, t: None, consume_size).write("asdfghjkl;")
    with pytest.raises(TypeError, match="bytes-like or a numpy array, got str"):
        BufferEmit(lambda v, t: None, consume_size).write("asdfghjkl;")


def say(*args):
    """print(*args), in one write: lines printed by several threads at once stay whole."""
    print(" ".join(map(str, args)) + "\n", end="")


README_EXAMPLE = textwrap.dedent(
    """
    from slabcast import BufferEmit


    def say(*args):  # print(*args) in one write: lines from several threads and processes stay whole
        print(" ".join(map(str, args)) + "\\n", end="", flush=True)


    def on_process_emit(buff, t0):  # ocycle README: the callback of the process-mode receiver
        x = buff.getvalue()
        say("Im in a process!", x, t0)  # (print(a, b, c) is several writes: another process's line can cut in)
        return x[::-1]


    def generate_data(length=4, n=1):
        for _ in range(n):
            for i in range(10):
                yield str(i).encode("utf-8") * length


    if __name__ == "__main__":
        size = 15
        buffers = []

        def on_emit(label):  # callback
            return lambda buff, t0: say(label, buff.getvalue(), t0)

        # default operation (the README's callback reads buff.getvalue(), so it asks for the buffer)
        buffers.append(BufferEmit(on_emit("default"), size=size, asbuffer=True))
        # execute the callback in a thread
        buffers.append(BufferEmit(on_emit("im in a thread!"), size=size, mode="thread", asbuffer=True))
        # the rows of its printed output that its code does not show
        buffers.append(BufferEmit(lambda x, t0: say("gets value, not buffer object", x, t0), size=size))
        buffers.append(BufferEmit(lambda x, t0: say("value clipped to size", x, t0), size=size, clip=True))
        # execute the callback in a separate process, `on_done` in the main process
        buffers.append(BufferEmit(on_process_emit, on_done=lambda res: say("The process returned:", res),
                                  size=size, mode="process", asbuffer=True, npool=2))
        t0 = 1585253921.0
        for i, x in enumerate(list(generate_data(4, n=2))[:14]):  # the printed output stops after 14 writes
            say("writing", x)
            for b in buffers:
                b.write(x, t0=t0 + i)
        for b in buffers:
            b.close()
    """
)


def test_readme_configuration_example(tmp_path):
    # Run as a user runs it: a script whose output (its own and its worker processes') goes to one pipe.
    script = tmp_path / "example.py"
    script.write_text(README_EXAMPLE)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    t0 = 1585253921.0
    for label in ("default", "im in a thread!", "gets value, not buffer object", "Im in a process!"):
        for value, first in ((b"0000111122223333", 0), (b"4444555566667777", 4), (b"8888999900001111", 8)):
            assert f"{label} {value!r} {t0 + first}" in out, done.stdout
    for value, first in ((b"000011112222333", 0), (b"344445555666677", 3), (b"778888999900001", 7)):
        assert f"value clipped to size {value!r} {t0 + first}" in out
    for value in (b"3333222211110000", b"7777666655554444", b"1111000099998888"):
        assert f"The process returned: {value!r}" in out
    # ocycle cuts the same values
    frames = [str(i).encode() * 4 for i in range(10)] + [str(i).encode() * 4 for i in range(4)]
    assert ocycle_values(frames, 15) == [b"0000111122223333", b"4444555566667777", b"8888999900001111"]
    assert ocycle_values(frames, 15, clip=True) == [b"000011112222333", b"344445555666677", b"778888999900001"]


def test_readme_sampler_examples():
    # "sampler=1.0 ... will pause for 1 second before it begins writing to the buffer again"
    frames = [b"%d" % i * 4 for i in range(10)]
    emit, got = collect(size=4, sampler=1.0)
    for i, frame in enumerate(frames):
        emit.write(frame, t0=100.0 + 0.5 * i)  # a frame every half second
    emit.close()
    assert [v for v, _ in got] == [b"0000", b"2222", b"4444", b"6666", b"8888"]
    assert [t for _, t in got] == [100.0, 101.0, 102.0, 103.0, 104.0]
    # "if you wanted 50% coverage, you could pass sampler=size / fs"; the pause starts at the
    # frame that completes a chunk, so with two frames a chunk the coverage is 2 frames in 3.
    fs, size = 1024.0, 128
    emit, got = collect(size=size, sampler=size / fs)
    frames = [bytes([i]) * 64 for i in range(60)]
    for i, frame in enumerate(frames):
        emit.write(frame, t0=1.0 + i * 64 / fs)
    emit.close()
    assert [v for v, _ in got] == [frames[i] + frames[i + 1] for i in range(0, 60, 3)]
    # a stochastic sampler: any zero-argument callable
    rng = np.random.default_rng(1)
    emit, got = collect(size=100, sampler=lambda: rng.standard_normal() * 1.3 + 4)
    for i in range(200):
        emit.write(bytes(100), t0=1.0 + i * 0.1)  # 20 seconds
    emit.close()
    assert 2 <= len(got) <= 8


# -- the chunk rules ----------------------------------------------------------------------------


def test_t0_is_the_time_of_the_chunks_first_frame_unlike_ocycle():
    frames = [b"ab", b"cd", b"ef", b"gh", b"ij"]
    emit, got = collect(size=4)
    ours_t0 = []
    theirs = []
    oc = ocycle.BufferEmit(lambda v, t0: theirs.append((v, t0)), 4)
    for i, frame in enumerate(frames):
        emit.write(frame, t0=10.0 + i)
        oc.write(frame, 10.0 + i)
    emit.close()
    ours_t0 = [t for _, t in got]
    assert [v for v, _ in got] == [v for v, _ in theirs] == [b"abcd", b"efgh"]
    assert ours_t0 == [10.0, 12.0]
    assert [t for _, t in theirs] == [10.0, 11.0]  # ocycle 0.1.0: the previous chunk's last frame


def test_clip_carries_the_remainder_and_cuts_several_chunks_from_one_frame():
    emit, got = collect(size=3, clip=True)
    emit.write(b"abcdefgh", t0=1.0)
    emit.write(b"ij", t0=2.0)
    emit.write(b"klmnop", t0=3.0)
    emit.close()
    assert got == [(b"abc", 1.0), (b"def", 1.0), (b"ghi", 1.0), (b"jkl", 2.0), (b"mno", 3.0)]


def test_sampler_drops_the_remainder_and_skips_whole_frames():
    emit, got = collect(size=3, clip=True, sampler=1.5)
    for i, frame in enumerate([b"abcd", b"efgh", b"ijkl", b"mnop"]):
        emit.write(frame, t0=1.0 + i)
    emit.close()
    assert got == [(b"abc", 1.0), (b"ijk", 3.0)]


def test_sampler_zero_is_no_sampler_but_a_callable_returning_zero_is_one():
    frames = [b"abcd", b"efgh"]
    emit, got = collect(size=3, clip=True, sampler=0)
    emit2, got2 = collect(size=3, clip=True, sampler=lambda: 0)
    for i, frame in enumerate(frames):
        emit.write(frame, t0=1.0 + i)
        emit2.write(frame, t0=1.0 + i)
    emit.close()
    emit2.close()
    assert [v for v, _ in got] == [b"abc", b"def"] == ocycle_values(frames, 3, clip=True, sampler=0)
    assert [v for v, _ in got2] == [b"abc", b"efg"] == ocycle_values(frames, 3, clip=True, sampler=lambda: 0)


def test_t0_defaults_to_now_and_zero_is_a_time():
    emit, got = collect(size=2)
    before = time.time()
    emit.write(b"ab")
    after = time.time()
    emit.write(b"cd", t0=0.0)
    emit.close()
    assert before <= got[0][1] <= after
    assert got[1] == (b"cd", 0.0)


def test_asbuffer_hands_a_bytesio_at_position_zero():
    emit, got = collect(size=2, asbuffer=True)
    emit.write(b"abc", t0=1.0)
    emit.close()
    ((buff, _),) = got
    assert isinstance(buff, io.BytesIO)
    assert buff.tell() == 0
    assert buff.read() == b"abc"


def test_bytes_like_frames_and_empty_frames():
    emit, got = collect(size=4, clip=True)
    emit.write(bytearray(b"ab"), t0=1.0)
    emit.write(b"", t0=1.5)
    emit.write(memoryview(b"c-d-e-f-")[::2], t0=2.0)  # not contiguous
    emit.write(memoryview(np.arange(2, dtype=np.uint16)), t0=3.0)  # a view of another format: its bytes
    emit.close()
    assert got == [(b"abcd", 1.0), (b"ef\x00\x00", 2.0)]


def test_serial_values_are_copies_the_callback_may_keep():
    emit, got = collect(size=4, clip=True)
    kept = []
    emit2 = BufferEmit(lambda v, t0: kept.append(v), 4, clip=True)
    for i in range(2000):
        frame = bytes([i % 256]) * 3
        emit.write(frame, t0=float(i))
        emit2.write(np.frombuffer(frame, np.uint8), t0=float(i))
    emit.close()
    emit2.close()
    stream = b"".join(bytes([i % 256]) * 3 for i in range(2000))
    assert [v for v, _ in got] == [stream[i : i + 4] for i in range(0, 6000, 4)]
    assert [a.tobytes() for a in kept] == [v for v, _ in got]
    assert all(a.flags.writeable for a in kept)


# -- numpy frames -------------------------------------------------------------------------------


def stereo_frames(seed, count, max_n):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(n), 2)).astype(np.float32) for n in rng.integers(0, max_n, count)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", [False, True])
def test_float32_stereo_frames_in_every_mode(mode, clip):
    frames = stereo_frames(7, 120, 300)
    results = []
    with BufferEmit(crc_of, 1000, clip=clip, mode=mode, npool=2, on_done=results.append) as emit:
        for i, frame in enumerate(frames):
            emit.write(frame, t0=1.0 + i)
    whole = np.concatenate(frames)
    want = expected_chunks([(len(f), 1.0 + i) for i, f in enumerate(frames)], 1000, clip)
    assert len(want) > 10
    expect = [(t0, zlib.crc32(whole[i : i + n].tobytes()), n, "<f4", (n, 2)) for i, n, t0 in want]
    assert sorted(r[:5] for r in results) == sorted(expect)
    # serial and thread mode hand out copies; process mode a read-only view of shared memory
    assert {r[5] for r in results} == {mode != "process"}


@pytest.mark.parametrize("mode", MODES)
def test_mono_numpy_frames_keep_their_rank(mode):
    results = []
    with BufferEmit(crc_of, 5, mode=mode, npool=1, on_done=results.append) as emit:
        emit.write(np.arange(3, dtype=np.int16), t0=1.0)
        emit.write(np.arange(3, 6, dtype=np.int16)[::-1], t0=2.0)  # not contiguous
    assert results == [
        (1.0, zlib.crc32(np.array([0, 1, 2, 5, 4, 3], np.int16).tobytes()), 6, "<i2", (6,), mode != "process")
    ]


def test_a_frame_of_another_dtype_or_channel_count_is_refused_and_not_written():
    emit, got = collect(size=4, clip=True)
    emit.write(np.zeros((3, 2), np.float32), t0=1.0)
    with pytest.raises(TypeError, match=r"dtype must be float32 .*got float64"):
        emit.write(np.ones((3, 2), np.float64), t0=2.0)
    with pytest.raises(ValueError, match=r"must have 2 channel\(s\).*got shape \(3, 3\)"):
        emit.write(np.ones((3, 3), np.float32), t0=2.0)
    with pytest.raises(ValueError, match=r"shape \(n,\) or \(n, channels\), got shape \(1, 1, 2\)"):
        emit.write(np.ones((1, 1, 2), np.float32), t0=2.0)
    with pytest.raises(TypeError, match=r"carries numpy frames of dtype float32 x 2 channel.*got bytes"):
        emit.write(b"abcdefgh", t0=2.0)
    emit.write(np.full((3, 2), 7, np.float32), t0=3.0)
    emit.close()
    assert len(got) == 1
    np.testing.assert_array_equal(got[0][0], np.array([[0, 0]] * 3 + [[7, 7]], np.float32))
    emit, _ = collect(size=4)
    emit.write(b"ab")
    with pytest.raises(TypeError, match=r"carries bytes .* got a numpy array of dtype uint8"):
        emit.write(np.zeros(4, np.uint8))
    emit.close()


def test_asbuffer_is_for_bytes():
    emit, _ = collect(size=4, asbuffer=True)
    with pytest.raises(TypeError, match=r"asbuffer=True .* byte streams, got a numpy frame of dtype float32"):
        emit.write(np.zeros((3, 2), np.float32))
    emit.write(b"ok")  # the refused frame fixed no format
    emit.close()


# -- arguments and life cycle -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"size": 0}, ValueError, "size must be a positive integer number of samples, got 0"),
        ({"size": -3}, ValueError, "got -3"),
        ({"size": 1.5}, TypeError, "got 1.5"),
        ({"size": "10"}, TypeError, "got '10'"),
        ({"mode": "fork"}, ValueError, "mode must be one of 'serial', 'thread', 'process', got 'fork'"),
        ({"npool": 0}, ValueError, "npool must be a positive integer number of workers, got 0"),
        ({"npool": 2.0}, TypeError, "npool must be .* got 2.0"),
        ({"npool": True}, TypeError, "got True"),
        ({"sampler": "1s"}, TypeError, "sampler must be seconds .* got '1s'"),
        ({"sampler": -1}, ValueError, "sampler must be a finite number of seconds >= 0, got -1"),
        ({"sampler": float("nan")}, ValueError, "got nan"),
        ({"on_done": 3}, TypeError, "on_done must be a callable or None, got 3"),
        ({"on_error": "log"}, TypeError, "on_error must be a callable or None, got 'log'"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, error, message):
    args = {"size": 10, **kwargs}
    with pytest.raises(error, match=message):
        BufferEmit(pid_of, **args)


def test_bad_callbacks_are_refused_at_construction():
    with pytest.raises(TypeError, match="callback must be a callable taking \\(value, t0\\), got 5"):
        BufferEmit(5, 10)
    with pytest.raises(TypeError, match="mode='process' needs a picklable callback"):
        BufferEmit(lambda v, t0: None, 10, mode="process")


@pytest.mark.parametrize("mode", MODES)
def test_close_is_idempotent_and_a_closed_emitter_refuses_frames(mode):
    with BufferEmit(pid_of, 4, mode=mode, npool=1) as emit:
        assert isinstance(emit, BufferEmit)
        emit.write(b"abcdef", t0=1.0)
    emit.close()
    with pytest.raises(slabcast.ClosedError, match="closed"):
        emit.write(b"abcd", t0=2.0)
    assert "closed" in repr(emit)


def test_an_unclosed_emitter_is_cleaned_up_when_collected():
    results = []
    emit = BufferEmit(pid_of, 4, mode="process", npool=1, on_done=results.append)
    emit.write(b"abcd", t0=1.0)
    pool = emit._pool
    del emit
    assert pool.closed  # the finalizer ran: workers stopped, segments unlinked (the leak check)
    assert not emitter_processes()


# -- errors -------------------------------------------------------------------------------------


def test_serial_callback_error_is_raised_from_that_write_after_the_other_chunks():
    results = []
    emit = BufferEmit(fail_on_bad, 2, clip=True, on_done=results.append)
    emit.write(b"ok", t0=1.0)
    with pytest.raises(ValueError, match=r"bad chunk at 2.0"):
        emit.write(b"BBok", t0=2.0)
    assert results == [1.0, 2.0]  # the chunk after the failed one was still handed out
    emit.write(b"ok", t0=3.0)
    emit.close()
    assert results == [1.0, 2.0, 3.0]


def test_errors_go_to_on_error_when_given():
    errors, results = [], []
    emit = BufferEmit(fail_on_bad, 2, clip=True, on_error=errors.append, on_done=results.append)
    emit.write(b"okBBok", t0=1.0)
    emit.close()
    assert results == [1.0, 1.0]
    assert [str(e) for e in errors] == ["bad chunk at 1.0"]


def test_an_on_done_error_is_reported_like_a_callback_error():
    def on_done(result):
        raise KeyError(result)

    emit = BufferEmit(pid_of, 2, on_done=on_done)
    with pytest.raises(KeyError):
        emit.write(b"ab")
    emit.close()


def test_an_on_error_failure_is_raised_with_the_original_as_context():
    def on_error(exc):
        raise RuntimeError("on_error broke")

    emit = BufferEmit(fail_on_bad, 2, on_error=on_error)
    with pytest.raises(RuntimeError, match="on_error broke") as info:
        emit.write(b"BB", t0=1.0)
    assert isinstance(info.value.__context__, ValueError)
    emit.close()


def flatten(exc):
    return list(exc.exceptions) if isinstance(exc, ExceptionGroup) else [exc]


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_async_callback_errors_are_raised_from_the_next_write_or_close(mode):
    emit = BufferEmit(fail_on_bad, 2, clip=True, mode=mode, npool=2)
    raised = []
    # A worker may be quick enough for an error to come back before write() returns.
    for step in (lambda: emit.write(b"okBBokBB", t0=1.0), emit.close):
        try:
            step()
        except Exception as exc:
            raised += flatten(exc)
    assert [str(e) for e in raised] == ["bad chunk at 1.0", "bad chunk at 1.0"]
    assert all(type(e) is ValueError for e in raised)
    if mode == "process":
        assert "worker process" in "".join(raised[-1].__notes__)
    emit.close()  # idempotent: nothing more to raise


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_async_callback_error_reaches_on_error(mode):
    errors, results = [], []
    with BufferEmit(
        fail_on_bad, 2, clip=True, mode=mode, npool=1, on_error=errors.append, on_done=results.append
    ) as emit:
        emit.write(b"okBBok", t0=1.0)
        emit.write(b"ok", t0=2.0)
    assert sorted(results) == [1.0, 1.0, 2.0]
    assert [type(e) for e in errors] == [ValueError]


# -- thread and process mode --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_async_chunks_arrive_intact_through_recycled_buffers(mode, monkeypatch):
    # Small buffers: the writer fills, switches and waits for buffers many times over.
    monkeypatch.setattr(_emit, "_SLAB_MIN", 4096)
    monkeypatch.setattr(_emit, "_SERIAL_MIN", 4096)
    rng = np.random.default_rng(3)
    frames = [rng.bytes(int(n)) for n in rng.integers(1, 3000, 400)]
    results = []
    emit = BufferEmit(crc_of, 2500, clip=True, mode=mode, npool=2, on_done=results.append)
    for i, frame in enumerate(frames):
        emit.write(frame, t0=1.0 + i)
    pool = emit._pool
    emit.close()
    stream = b"".join(frames)
    want = expected_chunks([(len(f), 1.0 + i) for i, f in enumerate(frames)], 2500, True)
    expect = [(t0, zlib.crc32(stream[i : i + n]), n, "bytes") for i, n, t0 in want]
    assert sorted(r[:4] for r in results) == sorted(expect)
    assert pool.next_id <= pool.max_slabs  # buffers were recycled, never more than the pool holds
    assert len(stream) > 10 * pool.slab_bytes


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_frames_that_outgrow_the_buffers_get_bigger_ones(mode, monkeypatch):
    monkeypatch.setattr(_emit, "_SLAB_MIN", 4096)
    monkeypatch.setattr(_emit, "_SERIAL_MIN", 4096)
    rng = np.random.default_rng(5)
    frames = [rng.bytes(n) for n in [10, 300, 20, 5000, 70_000, 30, 300_000, 100, 10]]
    results = []
    emit = BufferEmit(crc_of, 700, clip=True, mode=mode, npool=2, on_done=results.append)
    for i, frame in enumerate(frames):
        emit.write(frame, t0=1.0 + i)
    pool = emit._pool
    emit.close()
    stream = b"".join(frames)
    want = expected_chunks([(len(f), 1.0 + i) for i, f in enumerate(frames)], 700, True)
    assert sorted(r[:3] for r in results) == sorted((t0, zlib.crc32(stream[i : i + n]), n) for i, n, t0 in want)
    assert pool.slab_bytes >= 4 * 300_000  # grown; the small buffers were unlinked on the way


def test_process_workers_run_elsewhere_and_are_reaped_at_close():
    pids = []
    with BufferEmit(pid_of, 4, clip=True, mode="process", npool=2, on_done=pids.append) as emit:
        for i in range(50):
            emit.write(b"abcdefgh", t0=float(i))
        assert emitter_processes()
    assert len(pids) == 100
    assert os.getpid() not in pids
    assert not emitter_processes()
    assert all(pid_gone(pid) for pid in set(pids))


def test_a_killed_worker_is_reported_and_replaced():
    errors, results = [], []
    with BufferEmit(
        die_on_marker, 8, clip=True, mode="process", npool=1, on_error=errors.append, on_done=results.append
    ) as emit:
        for i, frame in enumerate([b"a" * 8, b"K" * 8, b"c" * 8, b"X" * 8, b"e" * 8, b"f" * 8]):
            emit.write(frame, t0=1.0 + i)
    assert sorted(t for t, _ in results) == [1.0, 3.0, 5.0, 6.0]
    pids = dict(results)
    assert pids[1.0] != pids[3.0] != pids[5.0]  # a new worker after each death
    assert [type(e) for e in errors] == [WorkerDiedError, WorkerDiedError]
    assert isinstance(errors[0], slabcast.SlabcastError)
    assert "was killed by signal 9" in str(errors[0]) and "t0=2.0" in str(errors[0])
    assert "exited with code 3" in str(errors[1]) and "t0=4.0" in str(errors[1])
    assert not emitter_processes()


def test_a_dead_worker_is_raised_from_close_without_on_error():
    emit = BufferEmit(die_on_marker, 8, clip=True, mode="process", npool=1)
    emit.write(b"X" * 8, t0=1.0)
    with pytest.raises(WorkerDiedError, match=r"worker process \d+ exited with code 3 .* t0=1.0"):
        emit.close()


def test_a_callback_the_workers_cannot_import_breaks_the_pool_with_a_clear_error():
    phantom = types.ModuleType("slabcast_phantom_module")  # exists here only, not in a spawned process

    def callback(value, t0):
        return t0

    callback.__module__ = phantom.__name__
    callback.__qualname__ = "callback"
    phantom.callback = callback
    sys.modules[phantom.__name__] = phantom
    errors = []
    try:
        emit = BufferEmit(callback, 4, mode="process", npool=1, on_error=errors.append)
        emit.write(b"abcd", t0=1.0)
        emit.close()
    finally:
        del sys.modules[phantom.__name__]
    assert len(errors) == 1
    assert isinstance(errors[0], WorkerDiedError)
    assert "before loading the callback" in str(errors[0])
    assert not emitter_processes()


def test_on_done_runs_in_the_callers_process():
    seen = []
    with BufferEmit(pid_of, 2, mode="process", npool=1, on_done=lambda pid: seen.append((pid, os.getpid()))) as e:
        e.write(b"ab", t0=1.0)
    ((worker, here),) = seen
    assert worker != here == os.getpid()


def test_thread_mode_runs_callbacks_in_threads_and_waits_for_them_at_close():
    names = []
    release = threading.Event()

    def slow(value, t0):
        release.wait(10)
        names.append(threading.current_thread().name)
        return t0

    emit = BufferEmit(slow, 2, clip=True, mode="thread", npool=3)
    emit.write(b"abcdef", t0=1.0)
    release.set()
    emit.close()
    assert len(names) == 3
    assert threading.current_thread().name not in names


def test_close_from_a_thread_of_the_pool_is_refused():
    box = {}

    def callback(value, t0):
        box["emit"].close()

    emit = box["emit"] = BufferEmit(callback, 2, mode="thread", npool=1)
    raised = []
    for step in (lambda: emit.write(b"ab", t0=1.0), emit.close):
        try:
            step()
        except Exception as exc:
            raised += flatten(exc)
    assert [type(e) for e in raised] == [RuntimeError]
    assert "would wait for itself" in str(raised[0])


# -- a crash of the owner -----------------------------------------------------------------------


CRASHER = textwrap.dedent(
    """
    import os, sys
    from slabcast.emit.emit import BufferEmit
    from tests.unit.test_emit import pid_of

    if __name__ == "__main__":
        emit = BufferEmit(pid_of, 4096, mode="process", npool=1, on_done=lambda pid: print(pid, flush=True))
        emit.write(bytes(5000), t0=1.0)
        sys.stdin.read()  # until killed
    """
)


def test_a_killed_owner_leaves_segments_the_reaper_removes(tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(CRASHER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        worker = int(proc.stdout.readline())  # a chunk went through a worker: a segment exists
        prefix = f"slabcast.{proc.pid}."
        assert any(n.startswith(prefix) for n in os.listdir("/dev/shm"))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: owner, worker, resource tracker
        proc.wait(10)
        proc.stdout.close()
        proc.stdin.close()
    assert worker != proc.pid
    _shm.reap_stale()
    assert not any(n.startswith(prefix) for n in os.listdir("/dev/shm"))
