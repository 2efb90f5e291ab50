"""Every wire message is a type defined once (wire/messages.py): round trips, checks that name the field,
schema evolution, and the C client's generated header kept equal to the table."""

from __future__ import annotations

from pathlib import Path

import msgpack
import pytest

from slabcast import ProtocolError
from slabcast.wire import messages as M
from slabcast.wire import protocol as P

ROOT = Path(__file__).resolve().parents[2]

SAMPLES = [
    M.Hello(2, 123, "sub", "worker"),
    M.Open("mic", "<f4", 2, 48000.0, 4 << 20, 8, 2 << 20, ("l", "r"), 10.0, {"timestamps": False}),
    M.Published(17),
    M.Close(),
    M.Subscribe("mic", None, 0.5, True, "block", 8, None, "local", True, b"12345678"),
    M.Release((1, 2, 3), (0.5,)),
    M.Bye(),
    M.Status(),
    M.Unsubscribe(),
    M.Sync(7),
    M.Stats("mic"),
    M.Ack(100, 3, 0, 1),
    M.Carried(65536),
    M.Attach(None),
    M.Welcome(2, 99, 12345),
    M.Opened("slabcast.1.2.0", 1 << 20, 4096, 1 << 16, 8, 4096, 8, "ipc:///x", 0, 0, (b"\x01abc",)),
    M.Grant(3),
    M.Subscribed("seg", 1 << 20, "<f4", 2, None, 100, 0, ("a", "b"), 1, 4096, 1 << 16, 8, 8, "ipc:///n", None),
    M.Chunk(0, 0, 100, 1.0, 4096, 0),
    M.End(P.END_CLOSED, "closed", 4, 400),
    M.Error(P.ERR_BAD_REQUEST, "no"),
    M.StatusReply({"broker_pid": 99}),
    M.Synced(7),
    M.StatsReply({"name": "mic"}),
    M.Carry(4096),
    M.Attached(10),
    M.Notice(1, 0, 0, 0, 1, 4096, (3, 6), (1.5, 2.0), 0, 0),
    M.NoticeEnd(1, 5, P.END_CLOSED, "closed", 9),
    M.Joined(),
    M.History(5, 1, 2, 4096, (3, 4), (0.5, 0.503), 0, 2),
]


def test_every_kind_has_one_type_and_a_sample_here():
    assert sorted(M.MESSAGES) == sorted(P.NAMES)
    assert sorted(type(m).KIND for m in SAMPLES) == sorted(P.NAMES)  # type: ignore[attr-defined]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_is_the_positional_array_of_the_protocol(msg):
    raw = M.encode(msg)
    assert msgpack.unpackb(raw, use_list=False) == (type(msg).KIND, *msg)  # type: ignore[attr-defined]
    assert M.decode(raw) == msg


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ([P.HELLO, 2, "pid", "sub", "x"], "HELLO field 2 (pid) must be int, got 'pid'"),
        ([P.HELLO, True, 1, "sub", "x"], "HELLO field 1 (version) must be int, got True"),
        ([P.SUBSCRIBE, "mic"], "SUBSCRIBE takes 7 to 12 fields, got 1"),
        ([P.SYNC, 1, 2], "SYNC takes 1 fields, got 2"),
        ([P.RELEASE, (1, "x"), ()], "RELEASE field 1 (seqs) must be array, got (1, 'x')"),
        ([P.OPEN, "m", "<f4", 1, "fast", 4096, 2, 2048, None, 1.0], "OPEN field 4 (rate) must be int or float or nil"),
        ([250], "unknown message kind 250"),
    ],
)
def test_a_malformed_message_is_refused_naming_the_field(fields, error):
    with pytest.raises(ProtocolError) as info:
        M.decode(msgpack.packb(fields))
    assert error in str(info.value)


def test_fields_appended_by_a_later_version_are_ignored_when_lenient_refused_when_strict():
    raw = msgpack.packb([P.WELCOME, 2, 1, 3, "a field of version 3"])
    assert M.decode(raw, strict=False) == M.Welcome(2, 1, 3)
    with pytest.raises(ProtocolError, match="WELCOME takes 3 fields, got 4"):
        M.decode(raw)


def test_a_message_of_an_earlier_version_gets_the_defaults_of_the_fields_it_lacks():
    v1 = msgpack.packb([P.SUBSCRIBE, "mic", 100, None, False, "drop", 4, None])
    assert M.decode(v1) == M.Subscribe("mic", 100, None, False, "drop", 4, None, "broker", False, None)
    end = M.encode(M.End(P.END_CLOSED, "bye", 3, 9), fields=3)  # what a version-1 peer is sent
    assert msgpack.unpackb(end) == [P.END, P.END_CLOSED, "bye", 3]


def test_the_c_clients_wire_header_is_the_generated_one():
    committed = (ROOT / "clients" / "c" / "slabcast_wire.h").read_text()
    assert committed == M.c_header(), (
        "clients/c/slabcast_wire.h differs from the table: regenerate it with "
        "`python -c 'from slabcast.wire.messages import c_header; print(c_header(), end=\"\")' > clients/c/slabcast_wire.h`"
    )
    for kind, cls in M.MESSAGES.items():
        assert f"#define SCW_{P.NAMES[kind]} {kind}\n" in committed
        assert f"#define SCW_{P.NAMES[kind]}_FIELDS {len(cls._fields)}\n" in committed
