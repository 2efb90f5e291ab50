"""BufferEmit in this process: ocycle's README examples, the chunk rules, numpy frames, errors, thread mode.

Whatever starts a worker process (process mode, and the tests run in every mode) is in
tests/integration/test_emit_processes.py; that file imports the callbacks and helpers defined here.
"""

from __future__ import annotations

import io
import os
import threading
import time

import numpy as np
import ocycle
import pytest

from slabcast.emit.emit import BufferEmit

# -- callbacks a worker process can import -----------------------------------------------------


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


@pytest.mark.parametrize("t0", [float("nan"), float("inf"), "1.0"])
def test_a_frame_time_that_is_no_finite_number_is_refused_and_nothing_written(t0):
    # An ocycle user: NaN was taken (chunks with t0=nan, and a sampler's skip switched off), inf made a sampler skip
    # nothing; the Publisher refuses both.
    chunks: list = []
    with BufferEmit(lambda value, t: chunks.append((value, t)), 4, clip=True) as emit:
        emit.write(b"ab", t0=1.0)
        with pytest.raises(ValueError, match=rf"t0 must be a finite number of seconds, got {t0!r}; nothing was "
                                             rf"written"):  # fmt: skip
            emit.write(b"cd", t0=t0)
        emit.write(b"ef", t0=2.0)
    assert chunks == [(b"abef", 1.0)]


def test_bad_callbacks_are_refused_at_construction():
    with pytest.raises(TypeError, match="callback must be a callable taking \\(value, t0\\), got 5"):
        BufferEmit(5, 10)
    with pytest.raises(TypeError, match="mode='process' needs a picklable callback"):
        BufferEmit(lambda v, t0: None, 10, mode="process")


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


# -- thread mode --------------------------------------------------------------------------------


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
