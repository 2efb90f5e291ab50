"""The broker's decisions, driven through BrokerState with a fake clock and fake liveness probes, no process.

Segments are real (small, in /dev/shm, destroyed by ``shutdown``); time, pids and lease locks are the
test's.  Every test runs in milliseconds.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest

from slabcast.broker import grants
from slabcast.broker import reading as reading_module
from slabcast.broker.model import BrokerCutSub
from slabcast.broker.state import BrokerState, Out, System
from slabcast.core import ring as R
from slabcast.core import shm
from slabcast.core.ring import CURSOR_TAG_SHIFT
from slabcast.core.shm import CLIENT_BASE, PUBLISHER_BYTE, Segment
from slabcast.wire import messages as M
from slabcast.wire import protocol as P

PUB, SUB, SUB2, CTL = b"\x00pub", b"\x00sub", b"\x00sub2", b"\x00ctl"
SLAB = 16384
LEASE = 5.0


class Harness:
    """A BrokerState, a clock, and liveness the test decides: pids in ``dead``, lock bytes in ``unlocked``."""

    def __init__(self, tmp_path: Any, segment: Any = Segment) -> None:
        self.now = 100.0
        self.dead: set[int] = set()
        self.unlocked: set[int] = set()
        self.fds = 10
        system = System(
            segment=segment,
            lock_held=lambda fd, byte: byte not in self.unlocked,
            pid_alive=lambda pid: pid not in self.dead,
            open_fds=lambda: self.fds,
        )
        self.state = BrokerState(pid=os.getpid(), epoch=int.from_bytes(os.urandom(4), "little"),
                                 address=f"ipc://{tmp_path}/b.sock", now=self.now, lease_timeout=LEASE,
                                 fd_limit=1024, fd_headroom=64, system=system)  # fmt: skip
        self.grants: list[int] = []  # slabs granted to the publisher, oldest first
        self.offset = -1
        self.slab_end = 0
        self.reserve = 0
        self.slab = -1
        self.floor = 0
        self.index = 0  # the publisher's next sample
        self.position = 0  # descriptors published

    def send(self, ident: bytes, msg: Any, peer_pid: int = 0) -> list[Out]:
        out = self.state.handle(ident, msg, self.now, peer_pid)
        self._learn(out)
        return out

    def tick(self, seconds: float) -> list[Out]:
        self.now += seconds
        out = self.state.tick(self.now)
        self._learn(out)
        return out

    def _learn(self, out: list[Out]) -> None:
        self.grants += [m.slab for ident, m, _ in out if ident == PUB and isinstance(m, M.Grant)]

    def hello(self, ident: bytes, role: str, pid: int = 0, version: int = P.VERSION) -> None:
        (reply,) = self.send(ident, M.Hello(version, pid or 1000 + ident[-1], role, ident.decode(errors="replace")),
                             peer_pid=pid)  # fmt: skip
        assert isinstance(reply.message, M.Welcome)

    def open(self, name: str = "s", max_chunk: int = 12288, timestamps: bool = False, nslabs: int = 4,
             rate: float | None = 1000.0) -> M.Opened:  # fmt: skip
        self.hello(PUB, "pub", pid=4242)
        meta = {"timestamps": True} if timestamps else None
        out = self.send(PUB, M.Open(name, "<i4", 1, rate, SLAB, nslabs, max_chunk, None, 0, meta))
        opened = [m for i, m, _ in out if i == PUB and isinstance(m, M.Opened)]
        assert len(opened) == 1, out
        self.reserve = opened[0].reserve
        return opened[0]

    def write(self, n: int, t0: float = 0.0, flags: int = 0, name: str = "s", tell: bool = True) -> list[Out]:
        """The publisher writes a frame of ``n`` int32 samples (moving to its next granted slab when full, carrying
        nothing): its descriptor into the ring, then PUBLISHED (unless not ``tell``: a later one covers it)."""
        if self.offset < 0 or self.offset + 4 * n > self.slab_end:
            self.slab = self.grants.pop(0)
            self.offset = 4096 + self.slab * SLAB + self.reserve  # header_bytes(4) is one page
            self.slab_end = 4096 + (self.slab + 1) * SLAB
            self.floor = self.index
        ring = self.state.streams[name].ring
        gen = int(self.state.streams[name].gens[self.slab])
        ring.write(self.position, self.index, t0, self.offset, self.floor, n, self.slab, gen, flags)
        self.position += 1
        ring.publish(self.position)
        out = self.send(PUB, M.Published(self.position)) if tell else []
        self.offset += 4 * n
        self.index += n
        return out


def to(ident: bytes, out: list[Out], kind: type[Any] | None = None) -> list[Any]:
    return [m for i, m, _ in out if i == ident and (kind is None or isinstance(m, kind))]


def decoded(message: Any) -> Any:
    return M.decode(message, strict=False) if isinstance(message, bytes) else message


@pytest.fixture
def h(tmp_path: Any) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.state.shutdown()  # destroys every segment (the autouse fixture checks /dev/shm)


def subscribe(size: int, cut: str = "local", wait: bool = False, token: bytes | None = b"tok") -> M.Subscribe:
    return M.Subscribe("s", size, None, True, "block", 8, None, cut, wait, token if cut == "local" else None)


def join(h: Harness, ident: bytes, size: int, slot: int = 0) -> None:
    """A local subscriber subscribes (the publisher confirming the carry it is asked for) and attaches."""
    out = h.send(ident, subscribe(size))
    for carry in to(PUB, out, M.Carry):
        out = h.send(PUB, M.Carried(carry.nbytes))
    assert to(ident, out, M.Subscribed) or to(ident, out)[0].__class__ is bytes
    assert to(ident, h.send(ident, M.Attach(slot)), M.Attached)


# -------------------------------------------------------------- eviction


def test_a_broker_cut_subscriber_holding_a_chunk_past_lease_timeout_is_evicted(h: Harness) -> None:
    h.open()
    h.hello(SUB, "sub")
    assert to(SUB, h.send(SUB, subscribe(100, cut="broker")), M.Subscribed)
    (chunk,) = to(SUB, h.write(100), M.Chunk)
    assert (chunk.seq, chunk.index, chunk.n) == (0, 0, 100)
    assert not to(SUB, h.tick(LEASE - 0.5))  # within lease_timeout: nothing
    (end,) = to(SUB, h.tick(1.0), M.End)
    assert end.code == P.END_EVICTED and "lease_timeout (5 s)" in end.message
    assert h.state.streams["s"].subs == []


def test_a_lossless_local_subscriber_that_keeps_the_publisher_waiting_is_evicted(h: Harness) -> None:
    h.open()
    h.hello(SUB, "sub")
    join(h, SUB, 100)
    # It never ACKs: once every slab is written the publisher has none left.
    while h.grants or h.offset + 400 <= h.slab_end:
        h.write(100)
    assert not h.state.streams["s"].pool.granted
    assert not to(SUB, h.tick(0.5))  # the stall starts being timed
    assert not to(SUB, h.tick(LEASE))
    out = h.tick(1.0)
    (end,) = to(SUB, out, M.End)
    assert end.code == P.END_EVICTED and "while the publisher waited" in end.message
    # Its claim on unread frames is gone: the publisher gets slabs again at once.
    assert to(PUB, out, M.Grant)


def test_a_publisher_still_writing_its_current_slab_is_not_held_back_and_its_holder_not_evicted(h: Harness) -> None:
    # An audio newcomer: with no slab granted ahead, status said "held back 2.4 s (no free slab)" of a source still
    # writing its current slab at 48,000 samples a second; a subscriber could be evicted for a wait that was not.
    h.open()
    h.hello(SUB, "sub")
    join(h, SUB, 100)
    while h.grants:  # every slab written or being written; no ACK: none is freed
        h.write(100)
    stream = h.state.streams["s"]
    assert not stream.pool.granted and h.offset + 400 <= h.slab_end  # room left in the current slab
    for _ in range(2 * int(LEASE)):  # a frame between two sweeps, past lease_timeout in all
        h.write(1)
        assert not to(SUB, h.tick(1.0)), "evicted while the publisher was still writing"
        assert stream.held_since is None
        assert h.state.status(h.now)["streams"][0]["publisher"]["held_back_s"] is None
    h.write(1)  # (then it stops: its slab full, say)
    h.tick(0.5)
    moved = h.now  # the last sweep that saw the head move
    assert stream.held_since is None
    h.tick(0.5)
    assert stream.held_since == moved  # timed from the last move seen, not from the last grant
    assert h.state.status(h.now + 1.0)["streams"][0]["publisher"]["held_back_s"] == 1.5
    assert not to(SUB, h.tick(LEASE - 0.5))
    (end,) = to(SUB, h.tick(1.0), M.End)
    assert end.code == P.END_EVICTED


# ------------------------------------------------------ subscriber first


def test_a_subscriber_before_its_stream_is_held_then_started_at_index_0_when_it_opens(h: Harness) -> None:
    h.hello(SUB, "sub")
    assert h.send(SUB, subscribe(50, wait=True)) == []  # held, no answer yet
    h.hello(SUB2, "sub")
    (error,) = to(SUB2, h.send(SUB2, subscribe(50, wait=False)), M.Error)
    assert error.code == P.ERR_UNKNOWN_STREAM
    opened = h.open()
    # OPENED names its token: the publisher waits until the subscriber joined before writing.
    assert opened.tokens == (P.token_topic(b"tok"),)
    assert h.state.streams["s"].subs[0].client.ident == SUB
    h.write(10)
    assert to(SUB, h.send(SUB, M.Attach(0)), M.Attached) == [M.Attached(0, 0)]  # from the first sample


def test_the_subscription_held_for_a_stream_is_answered_in_order_before_opened(h: Harness) -> None:
    h.hello(SUB, "sub")
    h.send(SUB, subscribe(50, wait=True))
    h.hello(PUB, "pub", pid=4242)
    out = h.send(PUB, M.Open("s", "<i4", 1, 1000.0, SLAB, 4, 12288, None, 0, None))
    kinds = [(i, type(m).__name__) for i, m, _ in out]
    assert kinds[:2] == [(SUB, "Subscribed"), (PUB, "Opened")], kinds
    assert decoded(to(SUB, out)[0]).start == 0


def test_a_subscriber_that_leaves_before_the_stream_opens_is_forgotten(h: Harness) -> None:
    h.hello(SUB, "sub")
    h.send(SUB, subscribe(50, wait=True))
    assert to(SUB, h.send(SUB, M.Bye()), M.End)[0].code == P.END_BYE
    assert h.open().tokens == ()


# ---------------------------------------------------------- CARRY/CARRIED


def test_a_longer_chunk_waits_for_carried_and_carry_goes_out_before_it(h: Harness) -> None:
    opened = h.open()
    assert opened.carry == 0  # nobody subscribed yet
    h.write(10)
    h.hello(SUB, "sub")
    out = h.send(SUB, subscribe(200))
    # Its chunks need 800 bytes carried: the publisher is asked first; the subscriber is not offered yet.
    assert to(PUB, out, M.Carry) == [M.Carry(800)]
    assert to(SUB, out) == []
    (error,) = to(SUB, h.send(SUB, M.Attach(0)), M.Error)
    assert error.code == P.ERR_BAD_REQUEST and "before SUBSCRIBED" in error.message
    assert to(SUB, h.send(PUB, M.Carried(400))) == []  # not enough yet
    (subscribed,) = to(SUB, h.send(PUB, M.Carried(800)))
    assert decoded(subscribed).size == 200
    assert to(SUB, h.send(SUB, M.Attach(0)), M.Attached) == [M.Attached(10, 1)]  # starts at the head: the frame after the first


def test_carried_from_a_connection_with_no_stream_is_refused(h: Harness) -> None:
    h.hello(SUB, "sub")
    (error,) = h.send(SUB, M.Carried(8))
    assert error.message.code == P.ERR_BAD_REQUEST


# ------------------------------------------------------------ pool memory


def test_the_pool_grows_for_a_long_chunk_and_gives_the_memory_back_after(h: Harness) -> None:
    h.open(max_chunk=12288)
    stream = h.state.streams["s"]
    first = stream.committed
    allocated = stream.segment.allocated
    assert first == SLAB - 12288  # the frame area's worth
    h.hello(SUB, "sub")
    h.send(SUB, subscribe(2048, cut="broker"))  # 8192 bytes: more than is committed
    assert stream.committed == 8192 and stream.segment.allocated == allocated + 4 * 4096
    assert h.state.status(h.now)["streams"][0]["carried_bytes"] == 8192
    h.send(SUB, M.Unsubscribe())
    # Memory goes back slab by slab, as each is granted again (nobody reads it then).
    for _ in range(12):
        h.write(1024)
    assert stream.committed == first and stream.peak == first
    assert stream.segment.allocated == allocated


def test_a_chunk_longer_than_max_chunk_bytes_is_refused_by_name(h: Harness) -> None:
    h.open(max_chunk=4096)
    h.hello(SUB, "sub")
    (error,) = to(SUB, h.send(SUB, subscribe(2000)), M.Error)
    assert error.code == P.ERR_BAD_REQUEST and "max_chunk_bytes=4096" in error.message


# ----------------------------------------------------------------- liveness


def test_a_dead_publisher_ends_its_stream_with_publisher_gone(h: Harness) -> None:
    h.open()
    h.hello(SUB, "sub")
    h.send(SUB, subscribe(10, cut="broker"))
    h.write(10)
    assert not to(SUB, h.tick(1.0), M.End)  # alive: its lock is held
    h.unlocked.add(PUBLISHER_BYTE)  # the kernel dropped its lock: the process died
    (end,) = to(SUB, h.tick(1.0), M.End)
    assert end.code == P.END_PUBLISHER_GONE and end.seq == 1
    assert "s" not in h.state.streams and PUB not in h.state.clients


def test_a_publisher_before_its_first_frame_is_judged_by_its_pid(h: Harness) -> None:
    h.open()
    h.unlocked.add(PUBLISHER_BYTE)  # no frame yet: its lock does not count
    assert PUB in h.state.clients and not h.tick(1.0)
    h.dead.add(4242)
    h.tick(1.0)
    assert PUB not in h.state.clients and "s" not in h.state.streams


def test_a_dead_local_subscriber_is_dropped_by_its_lock_and_is_in_the_status_for_a_minute(h: Harness) -> None:
    h.open()
    h.hello(SUB, "sub", pid=77)
    join(h, SUB, 10, slot=3)
    h.unlocked.add(CLIENT_BASE + 3)
    h.tick(1.0)
    assert SUB not in h.state.clients and h.state.streams["s"].subs == []
    # A newcomer's kill -9 of a subscriber: it vanished from `slabcast status`; only the broker's log said it died.
    (row,) = h.state.status(h.now)["departed"]
    assert {k: row[k] for k in ("pid", "role", "stream", "how")} == {"pid": 77, "role": "sub", "stream": "s",
                                                                     "how": "died"}  # fmt: skip
    assert row["label"] == SUB.decode() and row["ago"] == 0.0
    from slabcast.cli.top import render

    assert (f"{SUB.decode()} pid 77 (sub of 's') died: its leases reclaimed, 0.0 s ago", True) in render(
        h.state.status(h.now), None, 0.0)  # fmt: skip
    h.dead.add(4242)  # the publisher too
    h.tick(1.0)
    assert [(d["role"], d["stream"], d["how"]) for d in h.state.status(h.now)["departed"]] == [
        ("sub", "s", "died"), ("pub", "s", "died")]  # fmt: skip
    h.tick(59.5)
    assert [d["role"] for d in h.state.status(h.now)["departed"]] == ["pub"]  # (each said for 60 s)


def test_a_tcp_client_silent_too_long_is_dropped(h: Harness) -> None:
    tcp = b"T\x00remote"
    h.send(tcp, M.Hello(P.VERSION, 5, "sub", "far"))
    h.tick(9.0)
    assert tcp in h.state.clients
    h.tick(2.0)
    assert tcp not in h.state.clients
    # Its next message (a consumer that did not call recv for 11 s) is told why, not "expected HELLO" (a remote
    # newcomer's ProtocolError pointed nowhere).
    (out,) = h.send(tcp, M.Release((1,), ()))
    assert isinstance(out.message, M.End) and out.message.code == P.END_EVICTED, out
    assert "sent nothing for 10 s" in out.message.message and "keepalive()" in out.message.message
    (out,) = h.send(b"T\x00never-seen", M.Release((1,), ()))  # one it never knew: as before
    assert isinstance(out.message, M.Error) and "expected HELLO" in out.message.message


# ------------------------------------------------------- errors, by table


@pytest.mark.parametrize(
    ("who", "role", "message", "code", "says"),
    [
        (SUB, None, M.Status(), P.ERR_MALFORMED, "expected HELLO"),
        (SUB, None, b"\xc1", P.ERR_MALFORMED, ""),
        (SUB, None, (P.HELLO, 99, 1, "sub", "x"), P.ERR_VERSION, "version mismatch"),
        (SUB, None, M.Hello(P.VERSION, 1, "boss", "x"), P.ERR_MALFORMED, "'pub', 'sub' or 'ctl'"),
        (PUB, None, M.Hello(1, 1, "pub", "x"), P.ERR_VERSION, "publishers must speak"),
        (SUB, "sub", M.Open("t", "<i4", 1, None, SLAB, 4, 4096, None, 0, None), P.ERR_BAD_REQUEST, "OPEN is for"),
        (SUB, "sub", M.Ack(0, 0, 0, 0), P.ERR_BAD_REQUEST, "ACK from"),
        (SUB, "sub", M.Release((1,), ()), P.ERR_BAD_REQUEST, "RELEASE from"),
        (SUB, "sub", M.Published(1), P.ERR_BAD_REQUEST, "PUBLISHED from"),
        (SUB, "sub", (P.SUBSCRIBE, "s", 1), P.ERR_MALFORMED, "SUBSCRIBE takes"),
        (SUB, "sub", (250,), P.ERR_MALFORMED, "unknown message kind 250"),
        (SUB, "sub", M.Subscribe("s", 0, None, True, "block", 8, None, "broker"), P.ERR_BAD_REQUEST, "size must"),
        (SUB, "sub", M.Subscribe("s", 5, None, True, "sometimes", 8, None, "broker"), P.ERR_BAD_REQUEST, "policy"),
        (SUB, "sub", M.Subscribe("s", 5, None, True, "block", 8, None, "local"), P.ERR_BAD_REQUEST, "token"),
        (PUB, "pub", M.Subscribe("s", 5, None, True, "block", 8, None, "broker"), P.ERR_BAD_REQUEST, "SUBSCRIBE is"),
        (PUB, "pub", M.Open("t", "<i4", 0, None, SLAB, 4, 4096, None, 0, None), P.ERR_BAD_REQUEST, "channels"),
        (PUB, "pub", M.Open("t", "<i4", 1, None, 5000, 4, 4096, None, 0, None), P.ERR_BAD_REQUEST, "slab_bytes"),
        (CTL, "ctl", M.Stats("nope"), P.ERR_UNKNOWN_STREAM, "'nope'"),
    ],
)
def test_malformed_and_out_of_role_messages_are_answered_with_an_error(
    h: Harness, who: bytes, role: str | None, message: Any, code: str, says: str
) -> None:
    if role is not None:
        h.hello(who, role)
    (out,) = h.send(who, message)
    assert out.client == who and isinstance(out.message, M.Error), out
    assert out.message.code == code and says in out.message.message, out.message
    # The connection keeps its state and the broker its own.
    (after,) = to(who, h.send(who, M.Sync(7)))
    assert after == M.Synced(7) if role else after.code == P.ERR_MALFORMED


def test_a_wrong_descriptor_is_named_to_its_publisher_and_ends_the_stream(h: Harness) -> None:
    h.open()
    (error,) = to(PUB, h.send(PUB, (P.PUBLISHED, "ten")), M.Error)
    assert error.code == P.ERR_MALFORMED and "field 1 (position)" in error.message
    h.write(10)
    ring = h.state.streams["s"].ring
    ring.write(1, 10, 0.0, 12, 10, 10, 0, 0, 0)  # at byte 12: in the header, not the next offset
    ring.publish(2)
    out = h.send(PUB, M.Published(2))
    (error,) = to(PUB, out, M.Error)
    assert error.code == P.ERR_FRAME and "neither the next offset" in error.message
    assert "s" not in h.state.streams  # ended: its subscribers are told the publisher is gone


LOOKS = [pytest.param("compiled", marks=pytest.mark.skipif(reading_module._RUNS is None, reason="core/_hot.c not built")),
         "python"]  # fmt: skip


@pytest.mark.parametrize("look", LOOKS)
@pytest.mark.parametrize("batch", [5, 40], ids=["short batch (as tuples in Python)", "long batch (by column)"])
@pytest.mark.parametrize("wrong", ["seq", "index", "n"])
def test_a_descriptor_out_of_sequence_is_refused_in_a_batch_of_any_length(
    h: Harness, batch: int, wrong: str, look: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reading_module, "_ROWS", 8)  # (in Python, a batch of more goes by column)
    if look == "python":
        monkeypatch.setattr(reading_module, "_RUNS", None)
    h.open()
    for _ in range(batch - 1):
        h.write(10, tell=False)
    ring = h.state.streams["s"].ring
    k = batch - 1  # the last descriptor of the batch is the wrong one
    seq, index, n = k + (wrong == "seq"), h.index + 3 * (wrong == "index"), 0 if wrong == "n" else 10
    # (Ring.write puts a descriptor in the slot of its seq: into slot k by hand, for a wrong seq)
    R._DESC.pack_into(ring._bytes, (k & ring.mask) * R.DESCRIPTOR_BYTES, seq, index, 0.0, h.offset, h.floor, n,
                      h.slab, int(h.state.streams["s"].gens[h.slab]), 0)  # fmt: skip
    ring.publish(batch)
    (error,) = to(PUB, h.send(PUB, M.Published(batch)), M.Error)
    assert error.code == P.ERR_FRAME
    assert error.message == (f"descriptor {k} says seq {seq}, index {index}, n {n}; expected seq {k}, "
                             f"index {10 * k}, n >= 1")  # fmt: skip
    assert "s" not in h.state.streams


def test_a_batch_is_taken_alike_as_tuples_and_by_column(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same frames (runs in two slabs, a jump), told in batches of 4 (tuples) and in one batch of 40 (by
    column), and both through the compiled look (core/_hot.c): the broker cuts the same chunks and keeps the same
    frames for history, and the same head."""
    monkeypatch.setattr(reading_module, "_ROWS", 8)  # (in Python, a batch of more goes by column)
    compiled = reading_module._RUNS
    cuts = []
    for every, runs in [(4, None), (40, None)] + ([] if compiled is None else [(4, compiled), (40, compiled)]):
        monkeypatch.setattr(reading_module, "_RUNS", runs)
        h = Harness(tmp_path)
        try:
            h.open(max_chunk=1024)
            h.hello(SUB, "sub")
            h.send(SUB, subscribe(64, cut="broker"))
            chunks = []
            for k in range(40):  # 40 frames of 500 bytes: two slabs, the change inside a batch of 4 (frame 30)
                out = h.write(125, t0=k * 0.125, flags=P.FLAG_DISCONTINUITY * (k == 23), tell=(k + 1) % every == 0)
                while cut := to(SUB, out, M.Chunk):  # (it holds at most 8: released, the next come)
                    chunks += [(m.index, m.n, m.t0, m.offset, m.flags) for m in cut]
                    out = h.send(SUB, M.Release(tuple(m.seq for m in cut), ()))
            stream = h.state.streams["s"]
            kept = []  # the history, frame by frame (its runs are grouped as they came)
            for slab, (floors, runs) in sorted(stream.kept.items()):
                for index, offset, ns, t0s, flags in runs:
                    for n, t0 in zip(ns, t0s, strict=True):
                        kept.append((slab, index, offset, n, t0, flags if index == runs[0][0] else flags & ~1))
                        index, offset = index + n, offset + 4 * n
                kept.append(tuple(floors))
            cuts.append((chunks, stream.head, stream.frames, kept))
        finally:
            h.state.shutdown()
    assert len({offset // SLAB for _, _, _, offset, _ in cuts[0][0]}) >= 2  # chunks in more than one slab
    assert all(cut == cuts[0] for cut in cuts[1:])


def test_release_of_a_chunk_not_held_is_malformed(h: Harness) -> None:
    h.open()
    h.hello(SUB, "sub")
    h.send(SUB, subscribe(10, cut="broker"))
    h.write(10)
    (error,) = to(SUB, h.send(SUB, M.Release((0, 5), ())), M.Error)
    assert error.code == P.ERR_MALFORMED and "[5]" in error.message
    sub = h.state.streams["s"].subs[0]
    assert isinstance(sub, BrokerCutSub) and sub.inflight == 0  # seq 0 was released all the same


# --------------------------------------------------------------- a bug of ours


def test_a_broker_bug_is_answered_internal_and_logged_with_its_traceback(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_segment(*args: Any, **kwargs: Any) -> Segment:
        raise ZeroDivisionError("a bug in the broker")

    h = Harness(tmp_path, segment=broken_segment)
    try:
        h.hello(PUB, "pub")
        with caplog.at_level(logging.ERROR, logger="slabcast.broker"):
            (out,) = h.send(PUB, M.Open("s", "<i4", 1, None, SLAB, 4, 4096, None, 0, None))
        assert out.message.code == P.ERR_INTERNAL, out
        assert "ZeroDivisionError: a bug in the broker" in out.message.message
        assert "bug of the broker" in out.message.message
        (record,) = [r for r in caplog.records if r.exc_info]
        assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError  # the traceback, logged
        # The broker goes on: the same client is still served.
        assert to(PUB, h.send(PUB, M.Sync(1))) == [M.Synced(1)]
    finally:
        h.state.shutdown()


def test_status_counts_clients_and_uptime_from_the_clock_it_is_given(h: Harness) -> None:
    h.open()
    h.now += 12.5
    status = h.state.status(h.now)
    assert status["uptime"] == 12.5 and status["clients"] == 1
    assert [s["name"] for s in status["streams"]] == ["s"]


def test_a_stream_that_ended_is_listed_as_it_was_at_its_end_for_a_minute(h: Harness) -> None:
    # With no subscriber left it is gone the moment it ends: `slabcast status` (and the view) showed its counts
    # from the last look before, or nothing.
    h.open()
    for _ in range(3):
        h.write(100)
    h.send(PUB, M.Close())
    status = h.state.status(h.now)
    assert [s["name"] for s in status["streams"]] == []
    (row,) = status["ended_streams"]
    assert (row["name"], row["samples"], row["frames"], row["ended"], row["end"]) == ("s", 300, 3, True, "closed")
    from slabcast.cli.top import render

    assert "s                ended (closed) 0 s ago after 300 samples in 3 frames" in [
        line for line, _ in render(status, None, 0.0)]  # fmt: skip
    h.now += 61.0
    assert h.state.status(h.now)["ended_streams"] == []


def test_a_client_gets_error_internal_as_a_slabcast_error_not_as_its_own_refused_request() -> None:
    from slabcast import RequestError, SlabcastError
    from slabcast.client.connection import error_for

    exc = error_for(M.Error(P.ERR_INTERNAL, "the broker failed on this request: KeyError: 3"), "broker at x")
    assert type(exc) is SlabcastError and not isinstance(exc, RequestError)
    assert "KeyError: 3" in str(exc) and "broker at x" in str(exc)


def test_a_broker_cut_sampler_restarted_by_a_clock_step_back_flags_its_next_chunk(h: Harness) -> None:
    # Without a rate the sampler's pause is frame time; a step back restarts it, and the chunk after says so
    # (the local subscriber and the C client did; the broker-cut ones, TCP and version 1, did not).
    h.hello(PUB, "pub", pid=4242)
    out = h.send(PUB, M.Open("s", "<i4", 1, None, SLAB, 4, 12288, None, 0, None))
    h.reserve = to(PUB, out, M.Opened)[0].reserve
    h.hello(SUB, "sub")
    assert to(SUB, h.send(SUB, M.Subscribe("s", 10, None, True, "drop", 64, 0.5, "broker")), M.Subscribed)
    chunks = []
    for k in range(10):  # a frame every 0.1 s; the clock steps back an hour at frame 5
        out = h.write(10, t0=1000.0 + k * 0.1 - (3600.0 if k >= 5 else 0.0))
        chunks += [(decoded(m).index, decoded(m).flags) for m in to(SUB, out) if isinstance(decoded(m), M.Chunk)]
    assert [i for i, _ in chunks] == [0, 50]  # every 0.5 s of frame time, restarted at the step
    assert chunks[1][1] & P.FLAG_DISCONTINUITY


# -------------------------------------------------------------- history (issue 23, item 4)


def _history(h: Harness, size: int, history: float, policy: str = "block") -> tuple[list[M.History], int]:
    """A local subscriber asking for ``history`` joins: the HISTORY messages it gets, and ATTACHED's start."""
    h.hello(SUB, "sub")
    out = h.send(SUB, M.Subscribe("s", size, None, True, policy, 8, None, "local", False, b"tok", history))
    for carry in to(PUB, out, M.Carry):
        h.send(PUB, M.Carried(carry.nbytes))
    out = h.send(SUB, M.Attach(0))
    messages = [decoded(m) for m in to(SUB, out)]
    assert isinstance(messages[-1], M.Attached), messages
    return messages[:-1], messages[-1].start


def test_history_describes_the_frames_the_pool_holds_from_exactly_that_far_back_and_holds_their_slabs(
    h: Harness,
) -> None:
    h.open()  # 1000 Hz, 1024 samples of frames per slab
    for _ in range(15):
        h.write(100)  # 10 frames in the first slab, 5 in the second
    stream = h.state.streams["s"]
    first, second = next(iter(stream.kept)), stream.pool.current
    history, start = _history(h, 64, 1.25)  # 1250 samples back from the head (1500): sample 250, mid-frame
    assert start == 250
    assert all(isinstance(m, M.History) for m in history)
    a, b = history
    base = 4096 + first * SLAB + h.reserve
    assert (a.index, a.slab, a.offset, a.ns, a.flags) == (250, first, base + 250 * 4, (50, *[100] * 7), 0)
    assert a.t0s[0] == pytest.approx(0.05) and a.t0s[1:] == (0.0,) * 7  # the cut frame's first time moves on
    assert (b.index, b.slab, b.ns, b.flags) == (1000, second, (100,) * 5, 0)
    assert b.floor == 1000 - 64  # the broker carried one chunk into the second slab (the publisher carried none)
    assert b.gen == stream.gens[second]
    # The first slab is held for the subscriber (its cursor is 250) until it read past it.
    for _ in range(20):  # into the third and fourth slabs: the publisher is granted no other
        h.write(100)
    assert stream.pool.state[first] == "retired"
    assert first not in h.grants
    h.send(SUB, M.Ack(1000, 0, 0, 0))
    assert stream.pool.state[first] == "granted"
    assert first in h.grants


def test_history_longer_than_the_pool_holds_starts_at_its_oldest_frame_flagged(h: Harness) -> None:
    h.open()
    for _ in range(60):  # 6000 samples: the 4 slabs went round, the oldest were granted again
        h.write(100)
    history, start = _history(h, 10, 100.0, policy="drop")
    assert history[0].flags & P.FLAG_DISCONTINUITY
    assert not any(m.flags for m in history[1:])
    assert start == history[0].index > 0
    assert [m.index for m in history[1:]] == [m.index + sum(m.ns) for m in history[:-1]]  # no gap
    assert history[-1].index + sum(history[-1].ns) == 6000
    # Held even for a drop subscriber until it read its history: the publisher gets no slab of it back.
    held = {m.slab for m in history[:-1]}
    granted = set()
    for _ in range(30):  # until the publisher has no slab left to write
        if not h.grants and h.offset + 400 > h.slab_end:
            break
        granted |= set(h.grants)
        h.write(100)
    assert held and not held & (granted | set(h.grants))
    assert stream_pool_states(h, held) == {"retired"}


@pytest.mark.parametrize("tell", ["every-change", "every-other-change"])
@pytest.mark.parametrize(("nslabs", "rate", "every", "ahead"), [
    (8, None, 0.01, 3), (8, 1e6, 0.01, 3), (8, None, 0.08, 3), (8, None, 0.15, 2), (8, None, 0.3, 2),
    (4, None, 0.01, 2), (8, 1000.0, 0.01, 2)])  # fmt: skip
def test_a_fast_publisher_with_a_large_pool_is_granted_three_slabs_ahead(h: Harness, nslabs: int,
                                                                         rate: float | None, every: float,
                                                                         ahead: int, tell: str) -> None:  # fmt: skip
    # Three ahead while slabs change faster than every 0.1 s (by the broker's clock, over its last four changes)
    # where a slab holds less than 0.1 s of stream (at 1000 Hz here 1.02 s; or no rate) in a pool of 8 or more;
    # else two, as the pool's history (history_nslabs) counts.  The publisher tells every change, or (as the
    # Python one, granted three) keeps a change for the next while two granted slabs are left; the broker sweeps
    # every 0.5 s as it does (a change its sweep reads is no faster for that).
    h.open(nslabs=nslabs, rate=rate)
    per_slab = (SLAB - h.reserve) // 4 // 100
    held = []
    sweep = h.now + 0.5
    for _ in range(12 * per_slab):
        h.now += every / per_slab
        if h.now >= sweep:
            h.tick(0.0)
            sweep += 0.5
        change = h.offset + 400 > h.slab_end and h.offset >= 0
        if tell == "every-change" or (change and len(h.grants) < 2):
            h.write(100)
        else:
            h.write(100, tell=False)
        held.append(len(h.grants))
    assert max(held[4 * per_slab:]) == ahead


def stream_pool_states(h: Harness, slabs: set[int]) -> set[str]:
    return {h.state.streams["s"].pool.state[slab] for slab in slabs}


def test_history_with_nothing_written_starts_at_the_head_unflagged(h: Harness) -> None:
    h.open()
    assert _history(h, 10, 5.0) == ([], 0)


def test_history_for_a_broker_cut_subscriber_or_not_positive_is_refused(h: Harness) -> None:
    h.open()
    h.hello(SUB, "sub")
    (error,) = to(SUB, h.send(SUB, M.Subscribe("s", 10, None, True, "block", 8, None, "broker", False, None, 2.0)))
    assert error.code == P.ERR_BAD_REQUEST and "history is for a local subscriber" in error.message
    (error,) = to(SUB, h.send(SUB, M.Subscribe("s", 10, None, True, "block", 8, None, "local", False, b"t", -1)))
    assert error.code == P.ERR_BAD_REQUEST and "history must be a finite number > 0" in error.message


# -------------------------------------------------------------- cursor table


def join_v3(h: Harness, slot: int, page: bool) -> M.Attached:
    """A version-3 futex subscriber of 100-sample chunks joins; ``page``: it maps the sleeper page writable."""
    out = h.send(SUB, M.Subscribe("s", 100, None, True, "block", 8, None, "local", False, b"tok", None, "futex"))
    for carry in to(PUB, out, M.Carry):
        out = h.send(PUB, M.Carried(carry.nbytes))
    (attached,) = to(SUB, h.send(SUB, M.Attach(slot, page)), M.Attached)
    return attached


def test_a_subscriber_posting_its_cursor_in_the_ring_keeps_the_publisher_supplied_without_acks(h: Harness) -> None:
    # Protocol 7.9: the cursor in the ring's cursor table instead of an ACK per slab.  The broker reads it when it
    # grants; acks_wanted goes up only when the publisher is short of slabs.
    h.open()
    h.hello(SUB, "sub")
    attached = join_v3(h, 7, page=True)
    entry, start = attached.sleeper, attached.start
    assert entry is not None and attached.cursor_tag is not None
    tag = attached.cursor_tag << CURSOR_TAG_SHIFT
    ring = h.state.streams["s"].ring
    for _ in range(5 * 4 * SLAB // 400):  # five pools' worth of 100-sample frames, read as they come
        h.write(100)
        ring.cursors[entry] = tag | (h.index - start)
        assert not ring.acks_wanted
    # It stops reading: the publisher runs short, and the broker asks for ACKs.
    while h.grants or h.offset + 400 <= h.slab_end:
        h.write(100)
    assert ring.acks_wanted
    # A value under another tag (a previous owner of the entry, late) is not its cursor.
    ring.cursors[entry] = ((attached.cursor_tag % 0xFFFF + 1) << CURSOR_TAG_SHIFT) | (h.index - start)
    assert not to(PUB, h.tick(0.5), M.Grant)
    # Its own value is, read at the next decision (here the sweep); the flag goes down with the publisher supplied.
    ring.cursors[entry] = tag | (h.index - start)
    assert len(to(PUB, h.tick(0.5), M.Grant)) == 2
    h.write(100)
    assert not ring.acks_wanted


def join_v3_as(h: Harness, ident: bytes, slot: int, size: int = 100) -> tuple[int, int, int]:
    """Another version-3 subscriber joins (``size``-sample chunks); return its entry, its start and its tag bits."""
    h.hello(ident, "sub")
    out = h.send(ident, M.Subscribe("s", size, None, True, "block", 8, None, "local", False, b"tok", None, "futex"))
    for carry in to(PUB, out, M.Carry):
        h.send(PUB, M.Carried(carry.nbytes))
    (attached,) = to(ident, h.send(ident, M.Attach(slot, True)), M.Attached)
    assert attached.sleeper is not None and attached.cursor_tag is not None
    return attached.sleeper, attached.start, attached.cursor_tag << CURSOR_TAG_SHIFT


def fill_pool(h: Harness) -> None:
    """The publisher writes until it holds no granted slab and its slab is full."""
    while h.grants or h.offset + 400 <= h.slab_end:
        h.write(100)


@pytest.mark.parametrize(("every", "ahead"), [(0.01, 3), (0.3, 2)])
def test_the_subscriber_holding_a_fast_publisher_back_is_asked_to_ack_once_for_a_batch_of_slabs(
        h: Harness, every: float, ahead: int) -> None:  # fmt: skip
    # Protocol 7.9, ack_at: while the publisher's slabs change fast (granted three ahead), the one asked sends ACK
    # once its cursor is past the retired slab whose freeing gives the publisher three granted slabs again, not at
    # every slab it leaves (a broker wake-up each); a slower publisher's, past the oldest (as before).
    h.open(nslabs=8, rate=None)
    (a, a_start, a_tag), (b, b_start, b_tag) = join_v3_as(h, SUB, 7), join_v3_as(h, SUB2, 8)
    stream = h.state.streams["s"]
    ring, pool = stream.ring, stream.pool
    per_slab = (SLAB - h.reserve) // 4 // 100
    for _ in range(12 * per_slab):  # both read along
        h.now += every / per_slab
        h.write(100)
        ring.cursors[a], ring.cursors[b] = a_tag | (h.index - a_start), b_tag | (h.index - b_start)
    while h.grants or h.offset + 400 <= h.slab_end:  # both stop: the publisher runs short
        h.now += every / per_slab
        h.write(100)
    assert stream.fast(h.now) is (ahead == 3)
    assert ring.acks_wanted and ring.ack_target in (a, b)
    ends = list(pool.retired.values())
    lacking = ahead - len(pool.granted) if ahead == 3 else 1
    assert len(ends) > lacking and ring.ack_at == ends[lacking - 1]
    asked = a if ring.ack_target == a else b
    assert not ring.acks_wanted_from(asked, ring.ack_at - 1) and ring.acks_wanted_from(asked, ring.ack_at)
    # Past that slab (both), the next decision (here a sweep, at once) grants the batch: the flag goes down with
    # the publisher holding three; one slab at a time, it asks from the next slab's end.
    ring.cursors[a], ring.cursors[b] = a_tag | (ring.ack_at - a_start), b_tag | (ring.ack_at - b_start)
    assert len(to(PUB, h.tick(0.0), M.Grant)) == lacking
    if ahead == 3:
        assert len(pool.granted) == 3 and not ring.acks_wanted and ring.ack_at == 0
    else:
        assert ring.acks_wanted and ring.ack_at == ends[1]


@pytest.mark.parametrize(("granted", "pins", "policy", "gate", "ahead", "expect"), [
    (0, (), "block", 0, 3, 300),  # three lacking: the third retired slab's end
    (1, (), "block", 0, 3, 200),  # two lacking
    (1, (0,), "block", 0, 3, 300),  # the oldest pinned (a broker-cut chunk): not the cursors' to free
    (0, (0, 1, 2, 3), "block", 0, 3, 0),  # every one pinned: any cursor
    (0, (), "block", 0, 2, 100),  # not fast: the oldest
    (0, (), "drop", 150, 3, 150),  # a drop subscriber reading its history holds nothing back past its end
    (0, (), "drop", 900, 3, 300),
    (0, (), None, 0, 3, 0),  # every subscriber asked (a lease lock may hold a slab)
])  # fmt: skip
def test_ack_at_is_the_end_of_the_retired_slab_whose_freeing_supplies_the_publisher(
        granted: int, pins: tuple[int, ...], policy: str | None, gate: int, ahead: int, expect: int) -> None:  # fmt: skip
    from types import SimpleNamespace

    from slabcast.core.pool import SlabPool

    pool = SlabPool(8, [0] * 8, lambda slab: True, lambda slab: None)
    pool.retired = {0: 100, 1: 200, 2: 300, 3: 400}
    pool.granted.extend(range(4, 4 + granted))
    for slab in pins:
        pool.pin(slab)
    holder = None if policy is None else SimpleNamespace(policy=policy, gate=gate)
    assert grants.ack_at(SimpleNamespace(pool=pool), holder, ahead) == expect  # type: ignore[arg-type]


def test_only_the_subscriber_holding_the_oldest_slab_is_asked_for_acks(h: Harness) -> None:
    # Protocol 7.9, ack_target: the one whose cursor holds the publisher back is asked, not every subscriber.
    h.open()
    (a, a_start, a_tag), (b, b_start, b_tag) = join_v3_as(h, SUB, 7), join_v3_as(h, SUB2, 8)
    ring = h.state.streams["s"].ring
    for _ in range(30):  # both read a while
        h.write(100)
        ring.cursors[a], ring.cursors[b] = a_tag | (h.index - a_start), b_tag | (h.index - b_start)
    for _ in range(5):  # b reads a little further (in the same slab), then stops too
        h.write(100)
        ring.cursors[b] = b_tag | (h.index - b_start)
    fill_pool(h)
    assert ring.acks_wanted and ring.ack_target == a
    assert ring.acks_wanted_from(a) and not ring.acks_wanted_from(b)
    # a reads everything: now b holds the oldest slab back, and it is asked instead.
    ring.cursors[a] = a_tag | (h.index - a_start)
    assert not to(PUB, h.tick(0.5), M.Grant)
    assert ring.acks_wanted and ring.ack_target == b
    ring.cursors[b] = b_tag | (h.index - b_start)
    assert len(to(PUB, h.tick(0.5), M.Grant)) == 2
    h.write(100)
    assert not ring.acks_wanted


def test_asking_one_subscriber_reads_the_table_again_and_asks_the_next_holder_at_once(h: Harness) -> None:
    # Dekker's handshake for each subscriber asked: between the target's store and the wait, the table is read
    # again; a first holder already past (it posted before it could see itself asked) hands over to the next.
    h.open()
    (a, a_start, a_tag), (b, _, b_tag) = join_v3_as(h, SUB, 7), join_v3_as(h, SUB2, 8)
    stream = h.state.streams["s"]
    ring = stream.ring
    for _ in range(10):
        h.write(100)
    seen: list[int | None] = []
    want = ring.want_acks

    def watch(wanted: bool, entry: int | None = None, at: int = 0) -> None:
        want(wanted, entry, at)
        seen.append(entry if wanted else -1)
        if entry == a:  # a posts its cursor right after the store: the read after the barrier sees it
            ring.cursors[a] = a_tag | (h.index - a_start)

    ring.want_acks = watch  # type: ignore[method-assign]
    ring.cursors[a] = a_tag | 0
    ring.cursors[b] = b_tag | 500
    fill_pool(h)
    assert ring.acks_wanted and ring.ack_target == b
    assert seen[-2:] == [a, b]


def test_three_subscribers_at_most_are_asked_in_one_decision_then_every_one_and_the_flag_goes_down_supplied(
    h: Harness,
) -> None:
    # Each one asked posts its cursor at once (past everything), so the next one holds the slab back: three are
    # asked in turn, then every subscriber; that last read supplies the publisher, and the flag goes down in the
    # same decision (a review found it left up until the next one).
    h.open()
    subs = [join_v3_as(h, ident, slot) for ident, slot in ((SUB, 7), (SUB2, 8), (b"\x00sub3", 9), (b"\x00sub4", 10))]
    stream = h.state.streams["s"]
    ring = stream.ring
    for _ in range(10):
        h.write(100)
    for k, (entry, _, tag) in enumerate(subs):
        ring.cursors[entry] = tag | (100 * k)
    by_entry = {entry: (entry, start, tag) for entry, start, tag in subs}
    seen: list[int | None] = []
    want = ring.want_acks

    def watch(wanted: bool, entry: int | None = None, at: int = 0) -> None:
        want(wanted, entry, at)
        seen.append(entry if wanted else -1)
        if wanted:
            for e, start, tag in [by_entry[entry]] if entry is not None else subs:
                ring.cursors[e] = tag | (h.index - start)  # the one asked posts at once

    ring.want_acks = watch  # type: ignore[method-assign]
    while not seen:
        h.write(100)
    assert seen == [subs[0][0], subs[1][0], subs[2][0], None, -1]
    assert len(stream.pool.granted) == 2 and not ring.acks_wanted


def test_a_free_slab_a_reader_still_locks_asks_every_subscriber(h: Harness) -> None:
    # A lease lock (a chunk held) is not a cursor: whoever holds it must say when it lets go.
    h.open()
    (a, a_start, a_tag), (b, b_start, b_tag) = join_v3_as(h, SUB, 7), join_v3_as(h, SUB2, 8)
    stream = h.state.streams["s"]
    ring = stream.ring
    h.write(100)
    first = h.slab
    fd = shm.open_locks(stream.segment.name)
    try:
        assert shm.lock_slab(fd, first, fcntl.F_RDLCK)  # a reader holds a chunk of the first slab
        for _ in range(15):  # both read the first slab and a half
            h.write(100)
            ring.cursors[a], ring.cursors[b] = a_tag | (h.index - a_start), b_tag | (h.index - b_start)
        fill_pool(h)  # then b stops: its cursor holds a slab, and the lock the first one
        assert stream.pool.free and ring.acks_wanted and ring.ack_target is None and ring.ack_at == 0
        assert ring.acks_wanted_from(a) and ring.acks_wanted_from(b)
    finally:
        os.close(fd)  # it lets go: the slab is granted at the next decision
    assert first in [m.slab for m in to(PUB, h.tick(0.5), M.Grant)]


def test_a_subscriber_that_cannot_write_the_sleeper_page_gets_no_cursor_entry_and_acks(h: Harness) -> None:
    h.open()
    h.hello(SUB, "sub")
    attached = join_v3(h, 7, page=False)
    assert attached.sleeper is None and attached.cursor_tag is None
    while h.grants or h.offset + 400 <= h.slab_end:
        h.write(100)
    assert not h.state.streams["s"].pool.granted
    assert to(PUB, h.send(SUB, M.Ack(h.index, 0, 0, 0)), M.Grant)  # its ACK frees the slabs


def test_a_cursor_entry_handed_to_a_new_owner_gets_a_new_tag_and_a_repeated_attach_keeps_its_start(
    h: Harness,
) -> None:
    h.open()
    stream = h.state.streams["s"]
    stream.free_sleepers[:] = [5]  # one entry: every subscriber gets it, in turn
    h.hello(SUB, "sub")
    first = join_v3(h, 7, page=True)
    assert first.sleeper == 5
    for _ in range(30):
        h.write(100)
    again = to(SUB, h.send(SUB, M.Attach(7, True)), M.Attached)[0]
    assert (again.start, again.cursor_tag) == (first.start, first.cursor_tag)  # not moved to the new head
    h.send(SUB, M.Bye())
    h.hello(SUB2, "sub")
    out = h.send(SUB2, M.Subscribe("s", 100, None, True, "block", 8, None, "local", False, b"tok", None, "futex"))
    for carry in to(PUB, out, M.Carry):
        h.send(PUB, M.Carried(carry.nbytes))
    (second,) = to(SUB2, h.send(SUB2, M.Attach(9, True)), M.Attached)
    # The same entry under another tag: the first owner's late store is not the new one's cursor.
    assert second.sleeper == 5 and second.cursor_tag not in (None, first.cursor_tag)


def test_a_status_reads_the_cursors_before_the_ring_so_no_lag_is_negative(h: Harness, monkeypatch: Any) -> None:
    # A newcomer saw `lag -168480 samples (-3.51 s)` for a subscriber keeping up with a fast publisher: the status
    # read the ring, the publisher wrote on and the subscriber posted a cursor past that head, then the status read
    # the cursors.  Here the publisher writes 10 frames and the subscriber posts the new head right after the ring
    # is read: that cursor is the next status's, and lags are never below 0.
    h.open()
    entry, start, tag = join_v3_as(h, SUB, 7)
    state = h.state
    stream = state.streams["s"]
    for _ in range(5):
        h.write(100)
    stream.ring.cursors[entry] = tag | (h.index - start)
    catch_up, once = state._catch_up, [True]

    def then_the_publisher_writes_on(s: Any) -> None:
        catch_up(s)
        if once:
            once.clear()
            for _ in range(10):
                h.write(100, tell=False)
            stream.ring.cursors[entry] = tag | (h.index - start)

    monkeypatch.setattr(state, "_catch_up", then_the_publisher_writes_on)
    h.hello(CTL, "ctl")
    (reply,) = to(CTL, h.send(CTL, M.Status()), M.StatusReply)
    (row,) = [u for s in reply.status["streams"] for u in s["subscribers"]]
    assert row["lag_samples"] == 0  # (its cursor then was the head then)
    (reply,) = to(CTL, h.send(CTL, M.Status()), M.StatusReply)
    (row,) = [u for s in reply.status["streams"] for u in s["subscribers"]]
    assert row["lag_samples"] == 0, "the cursor posted after the last read is read before the ring now"


def test_top_draws_a_subscribers_lag_against_the_pool_and_lists_ended_streams_without_no_streams() -> None:
    # A newcomer: a subscriber keeping up with a fast stream showed a full bar (the lag against two chunks), and
    # `no streams` came under three ended streams.
    from slabcast.cli.top import render

    sub = {"label": "fast-reader", "pid": 1, "size": 2048, "clip": True, "policy": "block", "delivered": 10,
           "dropped": 0, "leases": 1, "lag_samples": 58368, "lag_seconds": None}  # fmt: skip
    stream = {"name": "s", "dtype": "<i8", "channels": 1, "rate": None, "samples": 10**8, "ended": False,
              "slabs": 8, "slab_bytes": (4 << 20) + (64 << 20), "max_chunk_bytes": 64 << 20, "slabs_free": 5,
              "frames": 10**5, "subscribers": [sub]}  # fmt: skip
    head = {"pid": 7, "address": "ipc://x", "uptime": 1.0, "clients": 2}
    status = {**head, "streams": [stream], "sources": []}

    def bar() -> str:
        (line,) = [line for line, _ in render(status, None, 0.0) if "fast-reader" in line]
        return line[line.index("[") : line.index("]") + 1]

    assert bar().count("#") == 0  # 58,368 of the pool's 4,194,304 samples (8 slabs of 4 MiB of int64)
    sub["lag_samples"] = 4_194_304 // 2
    assert bar().count("#") == 8
    sub["lag_samples"] = 4_194_304
    assert bar().count("#") == 16  # the pool's worth: a block subscriber holds the publisher back
    ended = {"name": "e", "end": "closed", "ended_ago": 3.0, "samples": 5, "frames": 1}
    lines = [line for line, _ in render({**head, "streams": [], "ended_streams": [ended], "sources": []}, None, 0.0)]
    assert any(line.startswith("e ") and "ended (closed)" in line for line in lines) and "no streams" not in lines
