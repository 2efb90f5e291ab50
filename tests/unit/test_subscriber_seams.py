"""The subscriber's seams: its transports behind one interface, aio and Chunk on public names only."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest

import slabcast
from slabcast._info import StreamInfo
from slabcast.client import _local, _remote, _transport
from slabcast.client.chunk import Chunk

SRC = Path(slabcast.__file__).parent
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}


def _foreign_privates(path: Path) -> list[str]:
    """Attributes named ``_x`` read from anything but ``self`` (or a NamedTuple's own ``_replace`` & co.)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        if node.attr in NAMEDTUPLE_API:
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    return found


@pytest.mark.parametrize("module", ["aio.py", "client/chunk.py", "client/subscriber.py"])
def test_the_subscriber_its_chunks_and_the_asyncio_subscriber_use_no_one_elses_private_names(module):
    assert _foreign_privates(SRC / module) == []


def test_the_check_sees_a_private_attribute_of_another_object(tmp_path):
    code = tmp_path / "x.py"
    code.write_text("def f(self, sub):\n    return sub._conn, self._request._replace(a=1)\n")
    assert _foreign_privates(code) == ["x.py:2 sub._conn"]


@pytest.mark.parametrize("receiver", [_local.LocalReceiver, _remote.RemoteReceiver])
def test_both_transports_offer_what_the_subscriber_calls(receiver):
    for name, member in inspect.getmembers(_transport.Receiver, inspect.isfunction):
        if name.startswith("_"):
            continue
        own = getattr(receiver, name, None)
        assert own is not None, f"{receiver.__name__} lacks {name}"
        assert list(inspect.signature(own).parameters) == list(inspect.signature(member).parameters), name


def test_the_event_loop_seams_are_public_and_documented():
    for name in ("pollables", "keepalive", "resubscribe", "recv_nowait", "reconnect", "timeout_error"):
        assert getattr(slabcast.Subscriber, name).__doc__, name
    assert "auto_resubscribe" in slabcast.Subscriber.__doc__


def _info(**kw: object) -> StreamInfo:
    base: dict[str, object] = dict(name="s", dtype=np.dtype("float32"), channels=1, rate=100.0, channel_names=("a",))
    return StreamInfo(**{**base, **kw})  # type: ignore[arg-type]


def test_a_chunk_tells_its_transport_once_when_released_and_keeps_its_stream_info():
    released = []
    info = _info()
    chunk = Chunk(np.arange(4, dtype=np.float32), 7, 100, 2.0, 0, info, lambda: released.append(1))
    assert chunk.info is info
    assert chunk.times.tolist() == [2.0, 2.01, 2.02, 2.03]
    with chunk:
        pass
    chunk.release()
    assert released == [1]
    with pytest.raises(slabcast.ClosedError, match="seq=7 was released"):
        chunk.data  # noqa: B018


def test_a_chunk_reads_its_per_sample_times_where_its_transport_says_and_copies_them():
    stamps = np.array([9.0, 5.0, 7.0, 1.0], dtype="<f8")
    mapping = bytearray(8) + bytearray(stamps.tobytes())
    chunk = Chunk(np.zeros(3, np.float32), 0, 0, 9.0, 0, _info(timestamps=True), lambda: None, (mapping, 8))
    times = chunk.times
    assert times.tolist() == [9.0, 5.0, 7.0]
    mapping[8:16] = bytes(8)  # the slab is reused: the times taken stay
    assert times.tolist() == [9.0, 5.0, 7.0]
    assert not times.flags.writeable
