"""Fan-out beyond one machine through Zenoh (issue 15): `slabcast bridge --zenoh` and the `zenoh` source kind.

Real processes: broker A with publishers in this process, the bridge as `python -m slabcast bridge --zenoh`,
broker B hosting `zenoh` sources, its subscribers here; a Zenoh session on loopback (or across a veth into
another network namespace), multicast scouting off, explicit endpoints on a free port per test.
"""

from __future__ import annotations

import glob
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

import slabcast

pytest.importorskip("zenoh", reason="the zenoh extra: pip install 'slabcast[zenoh]'")

from slabcast.wire.bridge import FrameHeader, encode_info
from tests.integration.test_remote import netns as _veth  # noqa: F401  (test_remote's fixture, as `_veth`)


@pytest.fixture(autouse=True)
def no_zenoh_files_in_dev_shm():
    """Zenoh's shared-memory transport is off in our sessions: no <id>.zenoh file is left in /dev/shm."""
    before = set(glob.glob("/dev/shm/*.zenoh"))
    yield
    assert set(glob.glob("/dev/shm/*.zenoh")) <= before


@pytest.fixture
def namespace(request):
    """A network namespace joined to this one by a veth pair: (namespace, host address)."""
    return request.getfixturevalue("_veth")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Lines:
    """A subprocess's standard output, line by line, waited on with a bound."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, start: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if line.startswith(start):
                return line
        raise AssertionError(f"no line starting {start!r} within {timeout} s; got {self.seen}")

    def expect_all(self, starts: list[str], timeout: float = 20.0) -> None:
        """Wait for a line starting with each of ``starts``, in any order (two threads print them)."""
        deadline = time.monotonic() + timeout
        left = list(starts)
        while left:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line starting {left!r} within {timeout} s; got {self.seen}") from None
            self.seen.append(line)
            left = [s for s in left if not line.startswith(s)]


def start_bridge(address: str, streams: list[str], prefix: str, listen: str,
                 *extra: str) -> tuple[subprocess.Popen[str], Lines]:  # fmt: skip
    cmd = [sys.executable, "-m", "slabcast", "bridge", "--zenoh", *streams, "--address", address,
           "--key-prefix", prefix, "--listen", listen, "--no-multicast", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = Lines(proc)
    lines.expect("bridge: ready")
    return proc, lines


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> str:
    """Stop a process (SIGKILL after 10 s), reap it, return its standard error."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read()
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            f.close()
    return err


def source_spec(stream: str, prefix: str, endpoint: str, *extra: str) -> str:
    return ",".join([f"zenoh:key={prefix}/{stream}", f"connect={endpoint}", "multicast=false", "timeout=0.5",
                     "slab_bytes=262144", "nslabs=8", *extra])  # fmt: skip


def collect(sub: slabcast.Subscriber, count: int) -> list[tuple[int, float, bool, int, bytes]]:
    out = []
    for _ in range(count):
        with sub.recv(timeout=15) as c:
            out.append((c.index, c.t0, c.discontinuity, zlib.crc32(c.data.tobytes()), c.times.tobytes()))
    return out


# ------------------------------------------ options (the wire format is tested in tests/unit/test_bridge_format.py)


def test_bad_options_and_a_missing_extra_are_said_plainly(monkeypatch):
    from slabcast.sources import parse_source

    with pytest.raises(ValueError, match="one bridged stream's key"):
        parse_source("zenoh:key=slabcast/*/mic")
    with pytest.raises(ValueError, match="policy must be 'block' or 'drop'"):
        parse_source("zenoh:key=slabcast/h/mic,policy=maybe")
    with pytest.raises(ValueError, match="KEY:JSON5"):
        parse_source("zenoh:key=slabcast/h/mic,cfg=nocolon")
    assert parse_source("zenoh:key=slabcast/h/mic-1").name == "mic-1"
    monkeypatch.setitem(sys.modules, "zenoh", None)
    with pytest.raises(ImportError, match=r"pip install 'slabcast\[zenoh\]'"):
        parse_source("zenoh:key=slabcast/h/mic")
    out = subprocess.run([sys.executable, "-m", "slabcast", "bridge", "mic"], capture_output=True, text=True,
                         timeout=30)  # fmt: skip
    assert out.returncode == 2 and "--zenoh" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------ two brokers through Zenoh


def test_two_streams_cross_exactly_samples_indices_times_and_info(tmp_path, broker, stream_name):
    plain, stamped = f"{stream_name}-p", f"{stream_name}-s"
    prefix, endpoint = f"slabcast/t-{stream_name}", f"tcp/127.0.0.1:{free_port()}"
    bridge, lines = start_bridge(broker.address, [plain, stamped], prefix, endpoint)
    specs = ("--source", source_spec(plain, prefix, endpoint), "--source", source_spec(stamped, prefix, endpoint))
    far = slabcast.BrokerProcess(tmp_path / "far.sock", args=specs)
    try:
        far.start()
        pub_p = slabcast.Publisher(plain, dtype="int16", channels=3, rate=1000.0, address=broker.address,
                                   channel_names=["x", "y", "z"], channel_units=["mV", "mV", "mV"],
                                   source_id="dev-p", slab_bytes=65536)  # fmt: skip
        pub_s = slabcast.Publisher(stamped, dtype="float64", channels=1, rate=None, address=broker.address,
                                   timestamps=True, channel_types=["EEG"], slab_bytes=65536)  # fmt: skip
        lines.expect_all([f"bridge: {plain} -> {prefix}/{plain} from index 0",
                          f"bridge: {stamped} -> {prefix}/{stamped} from index 0"])  # fmt: skip
        # The far broker's streams appear once its sources got the info; its subscribers come before any frame.
        far_p = slabcast.Subscriber(plain, size=250, clip=True, address=far.address, wait=20)
        far_p2 = slabcast.Subscriber(plain, size=700, address=far.address, wait=20)  # whole frames, >= 700
        far_s = slabcast.Subscriber(stamped, size=64, clip=True, address=far.address, wait=20)
        near_p = slabcast.Subscriber(plain, size=250, clip=True, address=broker.address)
        near_p2 = slabcast.Subscriber(plain, size=700, address=broker.address)
        near_s = slabcast.Subscriber(stamped, size=64, clip=True, address=broker.address)
        assert far_p.info == near_p.info and far_s.info == near_s.info
        assert far_p.info.channel_units == ("mV",) * 3 and far_p.info.source_id == "dev-p"
        assert far_s.info.timestamps and far_s.info.channel_types == ("EEG",)
        rng = np.random.default_rng(5)
        t = 1_700_000_000.0
        total_p = total_s = 0
        for k in range(60):
            n = int(rng.integers(1, 300))
            pub_p.write(rng.integers(-(2**15), 2**15, (n, 3), dtype=np.int16), t0=t, discontinuity=(k == 31))
            t += n / 1000.0 + (0.5 if k == 31 else 0.0)
            total_p += n
            m = int(rng.integers(1, 80))
            pub_s.write(rng.standard_normal(m), times=np.sort(rng.uniform(t, t + 1.0, m)))
            total_s += m
        assert total_p > 5000 and total_s > 1000
        wanted = {}
        for far_sub, near_sub, count in ((far_p, near_p, total_p // 250 - 2), (far_s, near_s, total_s // 64),
                                         (far_p2, near_p2, 6)):  # fmt: skip
            got, want = collect(far_sub, count), collect(near_sub, count)
            assert got == want, "the far broker's chunks differ from the near one's"
            wanted[far_sub.name, far_sub.size] = want
        assert sum(c[2] for c in wanted[plain, 250]) == 1  # the discontinuity crossed too
        deadline = time.monotonic() + 10  # the statistics are the far broker's own
        while (stats := slabcast.stream_statistics(plain, address=far.address)).samples < total_p:
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
        assert (stats.samples, stats.frames) == (total_p, 60)
        pub_p.close()
        pub_s.close()
        lines.expect(f"bridge: {plain} ended")
        for sub in (far_p, far_p2, far_s, near_p, near_p2, near_s):
            sub.close()
    finally:
        err = stop(bridge)
        far.stop()
    assert bridge.returncode == 0, err
    assert "frames" in err and "Traceback" not in err


class Writer(threading.Thread):
    """Frames of ``n`` int64 samples whose values are their own index, t0 = T + index / rate, until stopped."""

    T = 1_000_000.0

    def __init__(self, pub: slabcast.Publisher, n: int = 100, pause: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.pub = pub
        self.n = n
        self.pause = pause
        self.stopping = threading.Event()
        self.index = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        n = self.n
        try:
            while not self.stopping.is_set():
                self.pub.write(np.arange(self.index, self.index + n, dtype=np.int64), t0=self.T + self.index / 1000.0)
                self.index += n
                self.stopping.wait(self.pause)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)


def check_exact(chunks: list[tuple[int, float, bool, np.ndarray]], n: int = 100) -> int:
    """Every chunk holds the origin's samples and t0; local indices trail the origin's by the samples lost.

    Returns the number of discontinuities.
    """
    lost = 0
    jumps = 0
    for k, (index, t0, disc, data) in enumerate(chunks):
        origin = int(data[0])
        assert np.array_equal(data, np.arange(origin, origin + n)), f"chunk {k}: samples differ"
        assert t0 == Writer.T + origin / 1000.0, f"chunk {k}: t0 {t0!r} is not the origin's"
        if k:
            expected = int(chunks[k - 1][3][0]) + n
            assert disc == (origin != expected), f"chunk {k}: origin index {origin}, expected {expected}, {disc=}"
            lost += origin - expected
            jumps += disc
        assert index == origin - lost, f"chunk {k}: local index {index}, origin {origin}, {lost} lost"
    return jumps


def receive(sub: slabcast.Subscriber, out: list[tuple[int, float, bool, np.ndarray]], count: int) -> None:
    for _ in range(count):
        with sub.recv(timeout=20) as c:
            out.append((c.index, c.t0, c.discontinuity, c.data.copy()))


@pytest.mark.slow
def test_a_bridge_killed_and_restarted_is_followed_with_a_discontinuity(tmp_path, broker, stream_name):
    prefix, endpoint = f"slabcast/t-{stream_name}", f"tcp/127.0.0.1:{free_port()}"
    bridge, lines = start_bridge(broker.address, [stream_name], prefix, endpoint)
    far = slabcast.BrokerProcess(tmp_path / "far.sock",
                                 args=("--source", source_spec(stream_name, prefix, endpoint, "lost_after=0.3")))  # fmt: skip
    writer = None
    try:
        far.start()
        pub = slabcast.Publisher(stream_name, dtype="int64", rate=1000.0, address=broker.address, slab_bytes=65536)
        lines.expect(f"bridge: {stream_name} -> {prefix}/{stream_name} from index 0")
        sub = slabcast.Subscriber(stream_name, size=100, clip=True, address=far.address, wait=20)
        writer = Writer(pub)
        writer.start()
        chunks: list[tuple[int, float, bool, np.ndarray]] = []
        receive(sub, chunks, 10)
        stop(bridge, signal.SIGKILL)
        while True:  # what was on its way arrives; then the key is silent (and the far broker says so)
            try:
                with sub.recv(timeout=1.0) as c:
                    chunks.append((c.index, c.t0, c.discontinuity, c.data.copy()))
            except TimeoutError:
                break
        before = writer.index
        bridge, lines = start_bridge(broker.address, [stream_name], prefix, endpoint)
        line = lines.expect(f"bridge: {stream_name} -> {prefix}/{stream_name} from index ")
        assert int(line.split("from index ")[1].split()[0]) >= before  # it joined at the head, not at 0
        deadline = time.monotonic() + 20
        while not any(c[2] for c in chunks):
            assert time.monotonic() < deadline, "no discontinuity after the bridge came back"
            receive(sub, chunks, 1)
        receive(sub, chunks, 10)
        writer.stop()
        assert check_exact(chunks) == 1
        assert chunks[-1][0] < int(chunks[-1][3][0])  # the gap: the local index trails the origin's
        sub.close()
        pub.close()
    finally:
        if writer is not None:
            writer.stop()
        err = stop(bridge)
        far.stop()
    assert "a gap at origin index" in far.stderr()
    assert f"no frame on '{prefix}/{stream_name}' for" in far.stderr() and "again after" in far.stderr()
    assert "Traceback" not in err


def test_a_broker_in_another_network_namespace_reserves_the_stream(tmp_path, broker, stream_name, namespace):
    ns, host_ip = namespace
    prefix, endpoint = f"slabcast/t-{stream_name}", f"tcp/{host_ip}:{free_port()}"
    bridge, lines = start_bridge(broker.address, [stream_name], prefix, endpoint)
    far_address = f"ipc://{tmp_path}/far.sock"
    far = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "slabcast", "broker", "--address", far_address,
         "--source", source_spec(stream_name, prefix, endpoint)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    writer = None
    try:
        Lines(far).expect("slabcast broker ")
        pub = slabcast.Publisher(stream_name, dtype="int64", rate=1000.0, address=broker.address, slab_bytes=65536)
        lines.expect(f"bridge: {stream_name} -> {prefix}/{stream_name} from index 0")
        sub = slabcast.Subscriber(stream_name, size=100, clip=True, address=far_address, wait=20)
        writer = Writer(pub)
        writer.start()
        chunks: list[tuple[int, float, bool, np.ndarray]] = []
        receive(sub, chunks, 30)
        writer.stop()
        assert check_exact(chunks) == 0
        assert [c[0] for c in chunks] == list(range(0, 3000, 100))  # nothing lost: the same indices
        sub.close()
        pub.close()
    finally:
        if writer is not None:
            writer.stop()
        err = stop(bridge)
        far_err = stop(far)
    assert far.returncode == 0, far_err
    assert "Traceback" not in err + far_err


def test_every_stream_is_bridged_as_it_appears_and_a_restarted_stream_is_followed(tmp_path, broker, stream_name):
    prefix, endpoint = f"slabcast/t-{stream_name}", f"tcp/127.0.0.1:{free_port()}"
    bridge, lines = start_bridge(broker.address, [], prefix, endpoint, "--policy", "block")  # no STREAM: all
    far = slabcast.BrokerProcess(tmp_path / "far.sock", args=("--source", source_spec(stream_name, prefix, endpoint)))
    try:
        far.start()
        sub = None
        got: list[tuple[int, float, bool, np.ndarray]] = []
        for lap in range(2):  # the origin's stream, then the same stream opened again by a new publisher
            pub = slabcast.Publisher(stream_name, dtype="int64", rate=1000.0, address=broker.address,
                                     slab_bytes=65536)  # fmt: skip
            lines.expect(f"bridge: {stream_name} -> {prefix}/{stream_name} from index 0")
            if sub is None:
                sub = slabcast.Subscriber(stream_name, size=100, clip=True, address=far.address, wait=20)
            for i in range(0, 1000, 100):
                pub.write(np.arange(i, i + 100, dtype=np.int64), t0=lap * 10.0 + i / 1000.0)
            receive(sub, got, 10)
            pub.close()
            lines.expect(f"bridge: {stream_name} ended")
        assert sub is not None
        sub.close()
    finally:
        err = stop(bridge, signal.SIGINT)
        far.stop()
    assert bridge.returncode == 0 and "Traceback" not in err, err
    assert [c[0] for c in got] == list(range(0, 2000, 100))  # the local stream goes on
    assert [int(c[3][0]) for c in got] == list(range(0, 1000, 100)) * 2
    assert [c[2] for c in got] == [False] * 10 + [True] + [False] * 9
    assert [c[1] for c in got] == [lap * 10.0 + i / 1000.0 for lap in range(2) for i in range(0, 1000, 100)]
    assert "a new stream at origin index 0 (expected 1000; local index 1000)" in far.stderr()


def test_a_stream_found_by_a_later_look_of_every_stream_mode_is_bridged_from_its_start(tmp_path, broker,
                                                                                       stream_name):  # fmt: skip
    # A newcomer: every-stream mode found a new stream at its next look (every second) and bridged it from the
    # head: "from index 320", its first 320 samples never crossed.  Found late, it is taken from its start.
    prefix, endpoint = f"slabcast/t-{stream_name}", f"tcp/127.0.0.1:{free_port()}"
    early = slabcast.Publisher(stream_name + "e", dtype="int64", address=broker.address)
    bridge, lines = start_bridge(broker.address, [], prefix, endpoint)  # no STREAM: all
    far = slabcast.BrokerProcess(tmp_path / "far.sock", args=("--source", source_spec(stream_name, prefix, endpoint)))
    try:
        lines.expect(f"bridge: {stream_name}e -> {prefix}/{stream_name}e from index 0")  # (its first look is done)
        far.start()
        pubs = []

        def publish() -> None:  # (once the far broker holds our subscription: the stream comes after)
            pubs.append(slabcast.Publisher(stream_name, dtype="int64", rate=1000.0, address=broker.address))
            pubs[0].write(np.arange(1000, dtype=np.int64), t0=5.0)  # (before the bridge can have seen the stream)

        sub = slabcast.Subscriber(stream_name, size=100, clip=True, address=far.address, wait=20, ready=publish)
        lines.expect(f"bridge: {stream_name} -> {prefix}/{stream_name} from index 0")
        got: list[tuple[int, float, bool, np.ndarray]] = []
        receive(sub, got, 10)
        sub.close()
        pubs[0].close()
    finally:
        err = stop(bridge, signal.SIGINT)
        far.stop()
        early.close()
    assert bridge.returncode == 0 and "Traceback" not in err, err
    assert np.concatenate([c[3] for c in got]).tolist() == list(range(1000))
    assert [c[1] for c in got] == [5.0 + i / 1000.0 for i in range(0, 1000, 100)]


def test_the_origin_broker_killed_and_restarted_is_followed(tmp_path, stream_name):
    prefix, endpoint = f"slabcast/t-{stream_name}", f"tcp/127.0.0.1:{free_port()}"
    origin = slabcast.BrokerProcess(tmp_path / "a.sock").start()
    bridge, lines = start_bridge(origin.address, [stream_name], prefix, endpoint)
    far = slabcast.BrokerProcess(tmp_path / "far.sock", args=("--source", source_spec(stream_name, prefix, endpoint)))
    got: list[tuple[int, float, bool, np.ndarray]] = []
    try:
        far.start()
        sub = None
        for lap in range(2):
            pub = slabcast.Publisher(stream_name, dtype="int64", rate=1000.0, address=origin.address,
                                     slab_bytes=65536)  # fmt: skip
            lines.expect(f"bridge: {stream_name} -> {prefix}/{stream_name} from index 0")
            if sub is None:
                sub = slabcast.Subscriber(stream_name, size=100, clip=True, address=far.address, wait=20)
            for i in range(0, 500, 100):
                pub.write(np.arange(i, i + 100, dtype=np.int64), t0=lap * 10.0 + i / 1000.0)
            receive(sub, got, 5)
            if lap == 0:
                origin.kill()  # SIGKILL: the publisher's broker is gone; a new one comes at the same address
                lines.expect(f"bridge: {stream_name} lost its broker")
                pub.close()
                origin = slabcast.BrokerProcess(tmp_path / "a.sock").start()
        assert sub is not None
        sub.close()
        pub.close()
    finally:
        err = stop(bridge)
        far.stop()
        origin.stop()
    assert bridge.returncode == 0 and "Traceback" not in err, err
    assert [c[0] for c in got] == list(range(0, 1000, 100))
    assert [int(c[3][0]) for c in got] == list(range(0, 500, 100)) * 2
    assert [c[2] for c in got] == [False] * 5 + [True] + [False] * 4


def test_a_far_broker_that_joins_late_starts_where_it_joined(tmp_path, broker, stream_name):
    prefix, endpoint = f"slabcast/t-{stream_name}", f"tcp/127.0.0.1:{free_port()}"
    bridge, lines = start_bridge(broker.address, [stream_name], prefix, endpoint)
    pub = slabcast.Publisher(stream_name, dtype="int64", rate=1000.0, address=broker.address, slab_bytes=65536)
    writer = Writer(pub)
    far = slabcast.BrokerProcess(tmp_path / "far.sock", args=("--source", source_spec(stream_name, prefix, endpoint),
                                                              "--log-level", "INFO"))  # fmt: skip
    try:
        lines.expect(f"bridge: {stream_name} -> {prefix}/{stream_name} from index 0")
        writer.start()
        deadline = time.monotonic() + 20
        while writer.index < 2000:  # the stream has been flowing for a while
            assert writer.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        far.start()
        sub = slabcast.Subscriber(stream_name, size=100, clip=True, address=far.address, wait=20)
        chunks: list[tuple[int, float, bool, np.ndarray]] = []
        receive(sub, chunks, 10)
        writer.stop()
        sub.close()
    finally:
        writer.stop()
        err = stop(bridge)
        far.stop()
        pub.close()
    assert "Traceback" not in err
    first = int(far.stderr().split("first frame at origin index ")[1].split()[0])
    assert first >= 2000
    for index, t0, disc, data in chunks:
        origin = int(data[0])
        assert np.array_equal(data, np.arange(origin, origin + 100)) and t0 == Writer.T + origin / 1000.0
        assert index == origin - first and not disc


def stall_the_far_side(tmp_path, broker, stream_name, bridge_args: tuple[str, ...] = (),
                       source_extra: tuple[str, ...] = ()) -> tuple[str, str]:  # fmt: skip
    """A lossless subscriber on the far broker that does not read while the origin writes 40 MB through the
    bridge, far more than every buffer on the way: the origin's publisher must never wait.  Then the far side
    keeps up and must see the gap as a discontinuity, with exact samples.  Returns the bridge's and the far
    broker's standard error."""
    prefix, endpoint = f"slabcast/t-{stream_name}", f"tcp/127.0.0.1:{free_port()}"
    bridge, lines = start_bridge(broker.address, [stream_name], prefix, endpoint, *bridge_args)
    far = slabcast.BrokerProcess(tmp_path / "far.sock",
                                 args=("--source", source_spec(stream_name, prefix, endpoint, *source_extra)))  # fmt: skip
    writer = None
    try:
        far.start()
        pub = slabcast.Publisher(stream_name, dtype="int64", rate=1000.0, address=broker.address, slab_bytes=65536,
                                 timeout=2.0)  # fmt: skip
        lines.expect(f"bridge: {stream_name} -> {prefix}/{stream_name} from index 0")
        sub = slabcast.Subscriber(stream_name, size=1000, clip=True, address=far.address, wait=20)  # not reading
        writer = Writer(pub, n=1000, pause=0.0002)
        writer.start()
        deadline = time.monotonic() + 30
        while writer.index < 40_000_000 // 8:
            assert writer.is_alive() and writer.error is None, writer.error
            assert time.monotonic() < deadline, f"the origin wrote only {writer.index * 8} bytes in 30 s"
            writer.stopping.wait(0.05)
        writer.pause = 0.005  # from now on the far side keeps up: it sees the gap when frames come again
        chunks: list[tuple[int, float, bool, np.ndarray]] = []
        deadline = time.monotonic() + 20
        while not any(c[2] for c in chunks):
            assert time.monotonic() < deadline, "no discontinuity on the far side"
            receive(sub, chunks, 1)
        receive(sub, chunks, 3)
        writer.stop()
        assert writer.error is None, writer.error
        assert check_exact(chunks, n=1000) >= 1
        sub.close()
        pub.close()
    finally:
        if writer is not None:
            writer.stop()
        err = stop(bridge)
        far.stop()
    return err, far.stderr()


def test_a_stalled_far_side_never_holds_the_origin_back_under_policy_drop(tmp_path, broker, stream_name):
    # The bridge in --policy drop (the default): the source's write in Zenoh's callback waits, Zenoh's and TCP's
    # buffers fill up, the bridge drops.
    err, _ = stall_the_far_side(tmp_path, broker, stream_name)
    assert "Traceback" not in err


def test_block_end_to_end_holds_the_origin_back_and_loses_nothing(tmp_path, broker, stream_name):
    # --policy block and the source's policy=block: a far subscriber that stops reading holds the source's write
    # (in Zenoh's callback), then Zenoh, the bridge and the origin's publisher back; every sample arrives.
    prefix, endpoint = f"slabcast/t-{stream_name}", f"tcp/127.0.0.1:{free_port()}"
    bridge, lines = start_bridge(broker.address, [stream_name], prefix, endpoint, "--policy", "block")
    far = slabcast.BrokerProcess(tmp_path / "far.sock", args=("--source", source_spec(stream_name, prefix, endpoint)))
    writer = None
    try:
        far.start()
        pub = slabcast.Publisher(stream_name, dtype="int64", rate=1000.0, address=broker.address, slab_bytes=65536,
                                 timeout=60.0)  # fmt: skip
        lines.expect(f"bridge: {stream_name} -> {prefix}/{stream_name} from index 0")
        sub = slabcast.Subscriber(stream_name, size=1000, clip=True, address=far.address, wait=20)  # not reading
        writer = Writer(pub, n=1000, pause=0.0)
        writer.start()
        deadline = time.monotonic() + 30
        seen = -1
        while writer.index != seen:  # until it stops: held back by the far subscriber, 2 hosts away
            seen = writer.index
            assert writer.is_alive() and writer.error is None, writer.error
            assert time.monotonic() < deadline and seen < 40_000_000 // 8, f"not held back ({seen * 8} bytes)"
            writer.stopping.wait(0.5)
        writer.stopping.set()  # (it leaves after the write it is held in)
        chunks: list[tuple[int, float, bool, np.ndarray]] = []
        while True:
            try:
                with sub.recv(timeout=3.0) as c:
                    chunks.append((c.index, c.t0, c.discontinuity, c.data.copy()))
            except TimeoutError:
                break
        writer.join(10)
        assert writer.error is None, writer.error
        assert seen > 0 and len(chunks) * 1000 == writer.index  # everything written, and nothing else
        assert check_exact(chunks, n=1000) == 0
        assert [c[0] for c in chunks] == [int(c[3][0]) for c in chunks]  # nothing lost: the origin's indices
        sub.close()
        pub.close()
    finally:
        if writer is not None:
            writer.stop()
        err = stop(bridge)
        far.stop()
    assert "Traceback" not in err


def test_the_sources_policy_drop_drops_there_and_never_holds_the_origin_back(tmp_path, broker, stream_name):
    # The bridge in --policy block, the source in policy=drop: a stalled far subscriber makes the source drop
    # (no free slab at once: no wait in Zenoh's callback), so nothing holds Zenoh, the bridge or the origin back.
    err, far_err = stall_the_far_side(tmp_path, broker, stream_name, ("--policy", "block"), ("policy=drop",))
    assert "Traceback" not in err
    assert "dropped (policy='drop')" in far_err and "writing again after" in far_err


def test_malformed_and_oversized_frames_from_a_peer_never_end_the_source(tmp_path, stream_name):
    # Any peer on the Zenoh network may put on the key. Here the "bridge" is this test's own session.
    from slabcast._info import StreamInfo
    from slabcast.bridge.zenoh import open_session, zenoh_config
    from slabcast.wire.bridge import FORMAT, HEADER

    port = free_port()
    key = f"test/{stream_name}/x"
    address = f"ipc://{tmp_path}/b.sock"
    spec = f"zenoh:key={key},name={stream_name},listen=tcp/127.0.0.1:{port},multicast=false,timeout=0.5"
    info = StreamInfo("x", np.dtype("<f4"), 2, 48000.0, ("a", "b"), timestamps=True)
    session = open_session(zenoh_config("peer", connect=f"tcp/127.0.0.1:{port}", multicast=False))
    try:
        session.declare_queryable(f"{key}/@info",
                                  lambda query: query.reply(f"{key}/@info", encode_info(info, 1, "peer")))  # fmt: skip
        put = session.declare_publisher(key).put
        with slabcast.BrokerProcess(address, args=("--source", spec)) as broker:
            sub = slabcast.Subscriber(stream_name, size=480, clip=True, address=broker.address, wait=30)
            t0 = 1.7e9
            index = 0

            def frame(n, times=True):
                nonlocal index
                data = np.repeat(np.arange(index, index + n, dtype="<f4")[:, None], 2, axis=1)
                stamps = t0 + np.arange(index, index + n) / 48000.0
                put(data.tobytes(), attachment=FrameHeader(0, 2, np.dtype("<f4"), 1, index, float(stamps[0]), n)
                    .encode(stamps if times else None))  # fmt: skip
                index += n

            frame(480)
            put(b"\0" * 3840, attachment=HEADER.pack(FORMAT, 0, 2, b"xx", 1, index, t0, 480))  # not a dtype
            put(b"", attachment=FrameHeader(0, 2, np.dtype("<f4"), 1, index, t0, 0).encode())  # no sample
            frame(480, times=False)  # a timestamps stream's frame without times: the rate's
            frame(1 << 19)  # 4 MiB: twice what the local slabs take in one frame
            frame(480)
            total = index
            got = 0
            while got < total // 480:
                with sub.recv(timeout=15) as chunk:
                    want = np.arange(chunk.index, chunk.index + 480)
                    assert np.array_equal(chunk.data[:, 0], want) and np.array_equal(chunk.data[:, 1], want)
                    assert np.allclose(chunk.times, t0 + want / 48000.0, rtol=0, atol=1e-6)
                    assert chunk.index == 480 * got and not chunk.discontinuity
                    got += 1
            (source,) = slabcast.broker_status(broker.address)["sources"]
            assert source["state"] == "running" and source["error"] is None
            sub.close()
    finally:
        session.close()


def test_a_key_that_comes_back_with_another_kind_of_samples_ends_the_source(tmp_path, stream_name):
    # A frame of another kind from a stray peer is refused and the source goes on; once the stream behind the
    # key is int16 x 1 (its info says so), the source stops: the local stream cannot change its kind.
    from slabcast._info import StreamInfo
    from slabcast.bridge.zenoh import open_session, zenoh_config

    port = free_port()
    key = f"test/{stream_name}/x"
    address = f"ipc://{tmp_path}/b.sock"
    spec = f"zenoh:key={key},name={stream_name},listen=tcp/127.0.0.1:{port},multicast=false,timeout=0.5"
    infos = [StreamInfo("x", np.dtype("<f4"), 2, 100.0, ("a", "b"))]
    session = open_session(zenoh_config("peer", connect=f"tcp/127.0.0.1:{port}", multicast=False))
    try:
        session.declare_queryable(f"{key}/@info",
                                  lambda query: query.reply(f"{key}/@info", encode_info(infos[-1], 1, "peer")))  # fmt: skip
        put = session.declare_publisher(key).put
        with slabcast.BrokerProcess(address, args=("--source", spec)) as broker:
            sub = slabcast.Subscriber(stream_name, size=50, clip=True, address=broker.address, wait=30)
            data = np.arange(100, dtype="<f4").reshape(50, 2)
            put(data.tobytes(), attachment=FrameHeader(0, 2, np.dtype("<f4"), 1, 0, 5.0, 50).encode())
            put(np.arange(50, dtype="<i2").tobytes(), attachment=FrameHeader(0, 1, np.dtype("<i2"), 1, 50, 5.5, 50)
                .encode())  # fmt: skip
            put((data + 100).tobytes(), attachment=FrameHeader(0, 2, np.dtype("<f4"), 1, 50, 5.5, 50).encode())
            for k in range(2):
                with sub.recv(timeout=15) as chunk:
                    assert np.array_equal(chunk.data, data + 100 * k) and chunk.t0 == 5.0 + k / 2
                    assert chunk.index == 50 * k and not chunk.discontinuity
            assert slabcast.broker_status(broker.address)["sources"][0]["state"] == "running"
            infos.append(StreamInfo("x", np.dtype("<i2"), 1, 100.0, ("a",)))
            put(np.arange(50, dtype="<i2").tobytes(), attachment=FrameHeader(0, 1, np.dtype("<i2"), 2, 0, 6.0, 50)
                .encode())  # fmt: skip
            deadline = time.monotonic() + 15
            while (source := slabcast.broker_status(broker.address)["sources"][0])["state"] != "failed":
                assert time.monotonic() < deadline, source
                time.sleep(0.05)
            assert "came back as int16 x 1, was float32 x 2" in source["error"]
            sub.close()
        assert "a frame of int16 x 1 on" in broker.stderr() and "the bridge still serves float32 x 2" in broker.stderr()
    finally:
        session.close()


def test_every_stream_mode_stops_bridging_a_stream_gone_from_the_broker(broker, stream_name):
    from slabcast.bridge.zenoh import ZenohBridge, open_session, zenoh_config

    session = open_session(zenoh_config("peer", listen=f"tcp/127.0.0.1:{free_port()}", multicast=False))
    bridge = ZenohBridge(session, address=broker.address, prefix=f"test/{stream_name}", retire_after=1.0)
    runner = threading.Thread(target=bridge.run, daemon=True)
    runner.start()
    try:
        with slabcast.Publisher(stream_name, dtype="int16", address=broker.address) as pub:
            pub.write(np.arange(100, dtype=np.int16))
            deadline = time.monotonic() + 15
            # The bridge looks at the broker once a second, then subscribes (info_reply: it serves the stream).
            while (stream_name not in bridge.forwarders or bridge.forwarders[stream_name].info_reply is None) \
                    and time.monotonic() < deadline:  # fmt: skip
                bridge.stopping.wait(0.05)
            forwarder = bridge.forwarders[stream_name]
            pub.write(np.arange(100, dtype=np.int16))
            while forwarder.frames == 0 and time.monotonic() < deadline:
                bridge.stopping.wait(0.05)
            assert forwarder.frames >= 1
        # Closed, drained by the bridge's own subscription, gone from the broker: retired a second later.
        deadline = time.monotonic() + 15
        while stream_name in bridge.forwarders and time.monotonic() < deadline:
            bridge.stopping.wait(0.05)
        assert stream_name not in bridge.forwarders and forwarder.retire.is_set() and not forwarder.is_alive()
        assert bridge.totals()[0] >= 1  # its frames still counted
    finally:
        bridge.stop()
        runner.join(10)
        session.close()
