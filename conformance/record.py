"""Record the conformance cases from live runs: a real broker, a real publisher, the Python subscriber.

    python -m conformance.record              # every case in CASES, into conformance/cases/
    python -m conformance.record plain bytes  # only these

For each case: a broker starts on a socket in a temporary directory; a publisher (a spawned process, so
that it can die) opens the stream and writes the case's frames, known bytes and times; the Python
subscriber (in this process) subscribes with the case's options, its messages with the broker and the
notices it reads are tapped (``messages.jsonl``), and the segment is copied once the stream ended, before
it says BYE (``segment.xz``: every frame it read still in place, since each case's pool holds them).  The
publisher's position stores are not messages: for a ``block`` case the recorder adds them to the script
(``"from": "publisher"`` lines, :func:`_steps`), so that a client sees the ring grow after ATTACHED and
must wait and be woken.  Then the case is played (:mod:`conformance.play`) against the Python subscriber,
whose lines become ``expected.txt`` once they equal what it cut live and, for every ``block`` case without
flagged frames, what the brute-force oracle ``tests/reference.py`` cuts from the frames that were written
(index, n, t0 and the CRC of the bytes).  Run from the repository root (it imports ``tests.reference``).
"""

from __future__ import annotations

import argparse
import base64
import json
import lzma
import multiprocessing as mp
import os
import signal
import struct
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

import slabcast
from slabcast.broker.process import BrokerProcess
from slabcast.client import _local, connection
from slabcast.core import ring as _ring
from slabcast.core.geometry import Geometry
from slabcast.wire import messages as M
from slabcast.wire import protocol as P

from . import play

# A case: the stream (dtype, channels, rate, pool), the frames (sizes drawn from a seed; `before` frames
# written before the subscriber joins), the subscriber's options, and how the publisher ends.
CASES: dict[str, dict[str, Any]] = {
    "plain": dict(
        about="int16 mono at 1 kHz, clip: frames of 1..300 samples cut into chunks of exactly 256, across slab "
              "changes (carried tails)",
        dtype="<i2", channels=1, rate=1000.0, slab_bytes=8192, nslabs=16, frames=60, max_frame=300, seed=1,
        sub=dict(size=256, clip=True)),
    "no-clip": dict(
        about="the same frames, clip false: each chunk is whole frames, at least 256 samples",
        dtype="<i2", channels=1, rate=1000.0, slab_bytes=8192, nslabs=16, frames=60, max_frame=300, seed=1,
        sub=dict(size=256, clip=False)),
    "seconds": dict(
        about="float32 stereo at 250 Hz, chunks of 0.5 s (125 samples, from SUBSCRIBED), clip",
        dtype="<f4", channels=2, rate=250.0, slab_bytes=16384, nslabs=16, frames=50, max_frame=200, seed=2,
        sub=dict(seconds=0.5, clip=True)),
    "sampler": dict(
        about="a sampler with a rate: after each chunk of 100, skip ceil(0.25 * 1000) = 250 samples",
        dtype="<i2", channels=1, rate=1000.0, slab_bytes=8192, nslabs=16, frames=60, max_frame=300, seed=3,
        sub=dict(size=100, clip=True, sampler=0.25)),
    "sampler-rateless": dict(
        about="a sampler without a rate: after each chunk the frames before its frame's t0 + 0.05 s are skipped",
        dtype="<i4", channels=3, rate=None, slab_bytes=16384, nslabs=16, frames=80, max_frame=60, seed=4,
        sub=dict(size=40, clip=True, sampler=0.05)),
    "rateless": dict(
        about="int32, 3 channels, no rate: each chunk's t0 is its first frame's, as written (jittered)",
        dtype="<i4", channels=3, rate=None, slab_bytes=16384, nslabs=16, frames=80, max_frame=60, seed=5,
        sub=dict(size=50, clip=False)),
    "timestamps": dict(
        about="per-sample times (meta timestamps true): each chunk's times are read from the time tables",
        dtype="<f8", channels=1, rate=100.0, timestamps=True, slab_bytes=8192, nslabs=16, frames=40, max_frame=50,
        seed=6, sub=dict(size=32, clip=True, show_times=True)),
    "discontinuity": dict(
        about="frames 10 and 25 flagged as discontinuities: nothing accumulated crosses them, the next chunk is "
              "flagged",
        dtype="<i2", channels=1, rate=1000.0, slab_bytes=8192, nslabs=16, frames=40, max_frame=120, seed=7,
        jumps=(10, 25), sub=dict(size=100, clip=True)),
    "bytes": dict(
        about="a byte stream (|u1, 8 kHz), small slabs: many slab changes, chunks of 1000 bytes",
        dtype="|u1", channels=1, rate=8000.0, slab_bytes=4096, nslabs=64, frames=80, max_frame=1200, seed=8,
        sub=dict(size=1000, clip=True)),
    "publisher-gone": dict(
        about="the publisher is killed after its last frame: END publisher-gone with the head; the chunks "
              "before it, then exit status 4",
        dtype="<i2", channels=1, rate=1000.0, slab_bytes=8192, nslabs=16, frames=30, max_frame=200, seed=9,
        end="killed", sub=dict(size=128, clip=True)),
    "wrapped-ring": dict(
        about="joins after 65,530 one-sample frames: ATTACHED names descriptor 65530, and the frames it reads "
              "wrap round the ring's 65,536 slots (start mode: at the head)",
        dtype="<i2", channels=1, rate=1000.0, slab_bytes=16384, nslabs=16, before=65530, frames=20, max_frame=90,
        seed=10, sub=dict(size=64, clip=True)),
    "drop-lapped": dict(
        about="a drop subscriber that reads nothing while 70,000 one-sample frames are written is lapped: it goes "
              "on from position - 32768, counts the samples it never saw as ceil(37232 / 1000) = 38 chunks "
              "dropped (the last ACK) and flags its next chunk",
        dtype="<i2", channels=1, rate=1000.0, slab_bytes=16384, nslabs=16, frames=70000, max_frame=1, seed=11,
        sub=dict(size=1000, clip=True, policy="drop", max_inflight=64)),
    "drop-reused-slabs": dict(
        about="a drop subscriber that reads nothing while the publisher goes round its pool of 4 slabs more than "
              "twice: the chunks of slabs granted again since (their generation moved on) are dropped, counted, "
              "and the newest are cut; not lapped in the ring",
        dtype="<i2", channels=1, rate=1000.0, slab_bytes=8192, nslabs=4, frames=200, max_frame=200, seed=12,
        sub=dict(size=100, clip=True, policy="drop", max_inflight=64)),
    "drop-max-inflight": dict(
        about="a drop subscriber with max_inflight 2: a frame that completes more chunks than that keeps the first "
              "two (handed out, then released by the client) and drops the rest",
        dtype="<i2", channels=1, rate=1000.0, slab_bytes=8192, nslabs=16, frames=40, max_frame=120, seed=13,
        sub=dict(size=16, clip=True, policy="drop", max_inflight=2)),
}  # fmt: skip

SUB_DEFAULTS = dict(size=None, seconds=None, clip=False, policy="block", max_inflight=8, sampler=None,
                    show_times=False)  # fmt: skip


def frames_of(case: dict[str, Any]) -> tuple[list[tuple[np.ndarray[Any, Any], float, Any]], np.ndarray[Any, Any]]:
    """The case's frames, (samples, t0, per-sample times or None), and all their samples in order."""
    rng = np.random.default_rng(case["seed"])
    # The `before` frames (written before the subscriber joins) have one sample each.
    sizes = [1] * case.get("before", 0) + [int(x) for x in rng.integers(1, case["max_frame"] + 1, case["frames"])]
    total, channels, rate = sum(sizes), case["channels"], case["rate"]
    dtype = np.dtype(case["dtype"])
    if dtype.kind == "f":
        whole = rng.standard_normal(total * channels).astype(dtype)
    else:
        info = np.iinfo(dtype)
        whole = rng.integers(info.min, info.max, total * channels, dtype=dtype, endpoint=True)
    whole = whole.reshape(total, channels)
    frames, index = [], 0
    for k, n in enumerate(sizes):
        # Explicit t0 values; a rate-less stream's keep a jitter, as written.
        t0 = 1000.0 + index / rate + k * 1e-4 if rate else 50.0 + k * 0.013 + (k % 3) * 1e-6
        times = 2000.0 + np.arange(index, index + n) * 0.01 + rng.uniform(0, 1e-3, n) if case.get("timestamps") \
            else None  # fmt: skip
        frames.append((whole[index : index + n], t0, times))
        index += n
    return frames, whole


def _publish(address: str, name: str, case: dict[str, Any], go: Any, results: Any) -> None:
    """The publisher (a spawned process): open, write the ``before`` frames, wait for the subscriber, write the
    rest, then close, or wait to be killed (``end="killed"``)."""
    frames, _ = frames_of(case)
    pub = slabcast.Publisher(name, dtype=case["dtype"], channels=case["channels"], rate=case["rate"],
                             address=address, slab_bytes=case["slab_bytes"], nslabs=case["nslabs"],
                             max_chunk_bytes=case["slab_bytes"] // 2, timestamps=case.get("timestamps", False),
                             timeout=30.0)  # fmt: skip
    before = case.get("before", 0)
    jumps = set(case.get("jumps", ()))

    def write(k: int) -> None:
        samples, t0, times = frames[k]
        # A byte stream is written as bytes; one channel as a 1-D array.
        data = samples.tobytes() if samples.dtype == np.uint8 else samples[:, 0] if case["channels"] == 1 else samples
        pub.write(data, t0=t0, discontinuity=k in jumps, times=times)

    for k in range(before):
        write(k)
    results.put("waiting")  # (the ring holds them: the broker reads it before it answers ATTACH)
    go.wait(60)
    for k in range(before, len(frames)):
        write(k)
    if case.get("end") == "killed":
        results.put("wrote")
        signal.pause()  # killed here
    pub.close()
    results.put("closed")


class _Tap:
    """What the Python subscriber of this process sends and receives, in order, as wire arrays."""

    def __init__(self, stream: str) -> None:
        self.script: list[dict[str, Any]] = []
        self.segment = ""
        self.snapshot = b""
        self.topic = P.stream_topic(stream)

    def install(self) -> None:
        tap = self
        send, recv, on_notice = connection.Connection.send, connection.Connection.recv, _local.LocalReceiver._on_notice

        def tapped_send(conn: Any, msg: M.Message) -> None:
            wire = list(P.unpack(M.encode(msg)))
            if isinstance(msg, M.Attach):
                tap.script.append({"from": "notice", "topic": "token", "msg": [P.JOINED]})  # (JOINED came first)
            tap.script.append({"from": "client", "msg": wire})
            send(conn, msg)

        def tapped_recv(conn: Any, *args: Any, **kwargs: Any) -> Any:
            msg = recv(conn, *args, **kwargs)
            if msg is not None:
                if isinstance(msg, M.Subscribed):
                    tap.segment = msg.segment
                tap.script.append({"from": "broker", "msg": list(P.unpack(M.encode(msg)))})
            return msg

        def tapped_on_notice(receiver: Any, raw: bytes) -> None:
            if raw.startswith(tap.topic):
                tap.script.append({"from": "notice", "topic": "stream", "msg": list(P.unpack(raw[len(tap.topic) :]))})
            on_notice(receiver, raw)

        connection.Connection.send = tapped_send  # type: ignore[method-assign, assignment]
        connection.Connection.recv = tapped_recv  # type: ignore[method-assign, assignment]
        _local.LocalReceiver._on_notice = tapped_on_notice  # type: ignore[method-assign, assignment]
        self._undo = (send, recv, on_notice)

    def uninstall(self) -> None:
        undo = self._undo
        connection.Connection.send, connection.Connection.recv, _local.LocalReceiver._on_notice = undo  # type: ignore[method-assign]


def record(name: str, case: dict[str, Any], out: Path) -> list[str]:
    """Record case ``name`` into ``out``/``name``; return the lines the Python subscriber printed live."""
    sub = {**SUB_DEFAULTS, **case["sub"]}
    stream = f"conf-{name}"
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="slabcast-rec-") as tmp:
        broker = BrokerProcess(Path(tmp) / "broker.sock")
        broker.start()
        go, results = ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=_publish, args=(broker.address, stream, case, go, results), daemon=True)
        tap = _Tap(stream)
        lines: list[str] = []
        try:
            proc.start()
            assert results.get(timeout=120) == "waiting"  # the stream exists, its `before` frames are written
            tap.install()
            try:
                s = slabcast.Subscriber(stream, sub["size"], seconds=sub["seconds"], clip=sub["clip"],
                                        sampler=sub["sampler"], policy=sub["policy"], max_inflight=sub["max_inflight"],
                                        address=broker.address, wait=0, label="conformance")  # fmt: skip
                with s:
                    go.set()
                    said = results.get(timeout=180)
                    if case.get("end") == "killed":
                        assert said == "wrote", said
                        assert proc.pid is not None
                        os.kill(proc.pid, signal.SIGKILL)
                    else:
                        assert said == "closed", said
                    status = 0
                    while True:
                        try:
                            chunk = s.recv(timeout=30)
                        except slabcast.PublisherGoneError:
                            status = 4
                            break
                        except slabcast.EndOfStream:
                            break
                        lines.append(_line(chunk, sub["show_times"]))
                        chunk.release()
                    # The segment as it ended, before the subscriber leaves (the broker unlinks it then).
                    with open(f"/dev/shm/{tap.segment}", "rb") as f:
                        tap.snapshot = f.read()
                # Leaving: BYE (sent by the connection's close, below the tap), answered by END bye; an END closed
                # read while waiting for that answer was sent before it.
                bye = max(i for i, step in enumerate(tap.script) if step["msg"][:2] == [P.END, P.END_BYE])
                tap.script.insert(bye, {"from": "client", "msg": [P.BYE]})
            finally:
                tap.uninstall()
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            broker.stop()
    _write(name, case, sub, stream, tap, status, out)
    return lines


def _line(chunk: Any, show_times: bool) -> str:
    line = (f"seq={chunk.seq} index={chunk.index} n={len(chunk)} t0={chunk.t0:.9f} "
            f"crc={zlib.crc32(np.ascontiguousarray(chunk.data).tobytes()):08x} flags={chunk.flags}")  # fmt: skip
    if show_times:
        line += f" times={zlib.crc32(chunk.times.astype('<f8').tobytes()):08x}" if chunk.info.timestamps else " times=-"
    return line


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bin": base64.b64encode(value).decode()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _write(name: str, case: dict[str, Any], sub: dict[str, Any], stream: str, tap: _Tap, status: int,
           out: Path) -> None:  # fmt: skip
    """The case's files, with placeholders for what differs from run to run (README.md, "messages.jsonl")."""
    subscribed = next(s["msg"] for s in tap.script if s["msg"][0] == P.SUBSCRIBED)
    segment, notice_endpoint = subscribed[1], subscribed[14]
    token = next(s["msg"][10] for s in tap.script if s["msg"][0] == P.SUBSCRIBE)

    def placeholders(value: Any) -> Any:
        if isinstance(value, list):
            return [placeholders(v) for v in value]
        return {segment: "$segment", notice_endpoint: "$notice_endpoint", token: "$token"}.get(value, value) \
            if isinstance(value, str | bytes) else value  # fmt: skip

    snap = bytearray(tap.snapshot)
    geometry = Geometry(subscribed[12], subscribed[11], subscribed[13], 0, case.get("timestamps", False))
    sleepers = geometry.ring_offset + _ring.RING_SLOTS * _ring.DESCRIPTOR_BYTES
    snap[sleepers : sleepers + _ring.SLEEPERS] = bytes(_ring.SLEEPERS)  # (no subscriber asleep)
    snap[36:40] = bytes(4)  # the broker's pid (informative)
    directory = out / name
    directory.mkdir(parents=True, exist_ok=True)
    spec = {
        "about": case["about"],
        "protocol": P.VERSION,
        "stream": {"name": stream, "dtype": case["dtype"], "channels": case["channels"], "rate": case["rate"],
                   "timestamps": case.get("timestamps", False)},
        "subscriber": sub,
        "exit": status,
        "recorded": {"slab_bytes": case["slab_bytes"], "nslabs": case["nslabs"], "seed": case["seed"],
                     "frames": case.get("before", 0) + case["frames"], "max_frame": case["max_frame"],
                     "segment_bytes": len(snap)},
    }  # fmt: skip
    (directory / "case.json").write_text(json.dumps(spec, indent=2) + "\n")
    filters = [{"id": lzma.FILTER_DELTA, "dist": 64}, {"id": lzma.FILTER_LZMA2, "preset": 9}]
    (directory / "segment.xz").write_bytes(lzma.compress(bytes(snap), format=lzma.FORMAT_XZ, filters=filters))
    with open(directory / "messages.jsonl", "w") as f:
        for step in _steps(tap.script, bytes(snap), sub, subscribed[9]):
            if "msg" in step:
                step = {**step, "msg": placeholders(step["msg"])}
            f.write(json.dumps(_to_json(step)) + "\n")


_DESC = struct.Struct("<QQdQQIIII8x")  # a ring descriptor (docs/protocol.md 7.7)


def _steps(script: list[dict[str, Any]], snap: bytes, sub: dict[str, Any], sid: int,
           count: int = 4) -> list[dict[str, Any]]:  # fmt: skip
    """The script with the publisher's position stores: the segment first shows the ring up to ATTACHED's
    descriptor, then the rest in ``count`` steps after ATTACHED, each taken once the client has cut up to
    ``after`` (its ACK says so) and followed by a NOTICE (a doorbell) naming its last frame, the last step with
    the final ``closed`` word; so the client cuts part of the stream, waits, and is woken.  A ``drop`` case
    keeps the whole ring visible at once (its lap, or drops, must not depend on how fast the client reads)."""
    if sub["policy"] != "block":
        return script
    (position,) = struct.unpack_from("<Q", snap, _ring.POSITION_AT)
    (closed,) = struct.unpack_from("<I", snap, _ring.CLOSED_AT)
    (slots,) = struct.unpack_from("<I", snap, _ring.SLOTS_AT)
    (ring_at,) = struct.unpack_from("<Q", snap, _ring.RING_AT)
    at = next(i for i, step in enumerate(script) if step["msg"][0] == P.ATTACHED)
    first = script[at]["msg"][2]
    steps: list[dict[str, Any]] = [{"from": "publisher", "position": first, "closed": 0}, *script[: at + 1]]
    count = min(count, position - first)
    after = script[at]["msg"][1]  # the client has cut up to here (its start) before the first step
    for k in range(1, count + 1):
        stop = first + (position - first) * k // count
        _, index, t0, offset, floor, n, slab, gen, flags = _DESC.unpack_from(snap, ring_at + 64 * ((stop - 1) % slots))
        steps.append({"from": "publisher", "after": after, "position": stop, "closed": closed if k == count else 0})
        after = index + n
        steps.append({"from": "notice", "topic": "stream",
                      "msg": [P.NOTICE, sid, k - 1, index, slab, gen, offset, n, t0, flags, floor]})  # fmt: skip
    return steps + script[at + 1 :]


def oracle(case: dict[str, Any], sub: dict[str, Any], size: int, start: int) -> list[tuple[int, int, str, str]]:
    """(index, n, t0, crc) of every chunk the rules promise, by tests/reference.py, from the frames written."""
    from tests.reference import expected_chunks

    frames, whole = frames_of(case)
    skipped = 0
    kept: list[tuple[int, float]] = []
    for samples, t0, _ in frames:
        if skipped < start:  # (written before the subscriber joined)
            skipped += len(samples)
            continue
        kept.append((len(samples), t0))
    raw = whole.tobytes()
    sb = whole.dtype.itemsize * case["channels"]
    out = []
    for index, n, t0 in expected_chunks(kept, size, sub["clip"], case["rate"], sub["sampler"]):  # type: ignore[no-untyped-call]
        index += start
        out.append((index, n, f"{t0:.9f}", f"{zlib.crc32(raw[index * sb : (index + n) * sb]):08x}"))
    return out


def finish(name: str, case: dict[str, Any], live: list[str], out: Path) -> None:
    """Play the recorded case against the Python subscriber; write expected.txt once it agrees with the live run
    and the oracle."""
    directory = out / name
    got = play.play(directory, [sys.executable, str(play.CASES.parent / "python_client.py")], expected=[])
    if got.problems or got.status != got.want_status:
        raise SystemExit(f"{name}: the Python subscriber fails its own recording:\n{got.report()}")
    chunks = got.lines[:-1]
    if chunks != live:
        raise SystemExit(
            f"{name}: played, the Python subscriber cut other chunks than live:\n"
            + "\n".join(f"  {a} | {b}" for a, b in zip(live, chunks, strict=False) if a != b)[:3000]
        )
    sub = {**SUB_DEFAULTS, **case["sub"]}
    if sub["policy"] == "block" and not case.get("jumps"):
        script = [json.loads(line) for line in (directory / "messages.jsonl").read_text().splitlines()]
        subscribed = next(s["msg"] for s in script if s.get("msg", [0])[0] == P.SUBSCRIBED)
        attached = next(s["msg"] for s in script if s.get("msg", [0])[0] == P.ATTACHED)
        want = oracle(case, sub, subscribed[6], attached[1])
        have = []
        for line in chunks:
            f = dict(kv.split("=") for kv in line.split())
            have.append((int(f["index"]), int(f["n"]), f["t0"], f["crc"]))
        if have != want:
            raise SystemExit(f"{name}: the recorded chunks differ from tests/reference.py's "
                             f"({len(have)} vs {len(want)} chunks; first: {have[:2]} vs {want[:2]})")  # fmt: skip
    (directory / "expected.txt").write_text("\n".join(got.lines) + "\n")
    print(
        f"{name}: {len(chunks)} chunks, {got.lines[-1]}, exit {got.status}, "
        f"segment.xz {(directory / 'segment.xz').stat().st_size} bytes"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.record", description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"cases to record (default: all of {', '.join(CASES)})")
    parser.add_argument("--out", type=Path, default=play.CASES)
    ns = parser.parse_args(argv)
    for name in ns.names or CASES:
        live = record(name, CASES[name], ns.out)
        finish(name, CASES[name], live, ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
