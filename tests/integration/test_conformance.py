"""The conformance kit (conformance/): every recorded case, played by conformance/play.py, against the Python
subscriber and the C client (clients/c/build/slabcast-sub, each of its three ways of waiting).

A case is a segment snapshot, the messages a broker and a publisher sent, and the chunks (and the last ACK) every
client must produce from them: conformance/README.md.  The kit must also catch a client that gets one thing
wrong: a byte of its output, or a field of what it asks for.
"""

from __future__ import annotations

import json
import lzma
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conformance import play

from slabcast.core import shm as _shm
from slabcast.wire import protocol as P
from tests.integration.test_c_client import c_sub  # noqa: F401  (the fixture: builds clients/c, or skips/fails)

CASES = sorted(d.name for d in play.CASES.iterdir() if (d / "case.json").exists())
PYTHON = [sys.executable, str(play.CASES.parent / "python_client.py")]


@pytest.fixture(autouse=True)
def no_segment_left() -> Any:
    """The player unlinks the segment it made, whatever happened."""
    yield
    mine = f"slabcast-conformance.{os.getpid()}."
    left = [n for n in os.listdir(_shm.SHM_DIR) if n.startswith(mine)]
    assert not left, f"segments left in /dev/shm: {left}"


def _check(outcome: play.Outcome, who: str) -> None:
    assert outcome.ok, f"{who}:\n{outcome.report()}"


@pytest.mark.parametrize("case", CASES)
def test_python_subscriber(case: str) -> None:
    outcome = play.play(play.CASES / case, PYTHON, settle=1.0)
    _check(outcome, "python")
    # It ACKs its cursor before it waits (docs/protocol.md 10.3), so every publisher step found it caught up.
    assert outcome.unsettled == 0, f"{outcome.unsettled} publisher steps without the ACK of the client's cursor"


@pytest.mark.parametrize("wake", ["doorbell", "futex", "busy"])
def test_c_client(c_sub: Path, wake: str) -> None:  # noqa: F811
    failed = []
    for case in CASES:
        outcome = play.play(play.CASES / case, [str(c_sub), "--wake", wake])
        if not outcome.ok:
            failed.append(f"--- {case}\n{outcome.report()}")
    assert not failed, "\n".join(failed)


def test_c_client_acks_its_cursor_before_it_waits(c_sub: Path) -> None:  # noqa: F811
    """Between two publisher steps the C client has cut some chunks (delivered changed) and waits: its ACK must
    say so within 0.1 s (the player waits 1 s for it), as the Python subscriber does."""
    unsettled = {case: play.play(play.CASES / case, [str(c_sub)], settle=1.0).unsettled
                 for case in ("discontinuity", "timestamps")}  # fmt: skip
    assert not any(unsettled.values()), unsettled


def test_the_cases_cover_what_the_kit_promises() -> None:
    """Each case is complete (README.md "A case") and the set covers the situations the README lists."""
    assert {"plain", "no-clip", "seconds", "sampler", "sampler-rateless", "rateless", "timestamps", "discontinuity",
            "bytes", "publisher-gone", "wrapped-ring", "drop-lapped", "drop-reused-slabs",
            "drop-max-inflight"} <= set(CASES)  # fmt: skip
    for name in CASES:
        case = play.load(play.CASES / name)
        assert case.spec["protocol"] == P.VERSION, name
        assert case.segment[:8] == _shm.MAGIC and int.from_bytes(case.segment[8:12], "little") == _shm.LAYOUT, name
        assert len(case.segment) == case.spec["recorded"]["segment_bytes"], name
        assert case.expected[-1].startswith("ACK cursor="), name
        assert len(case.expected) > 10, name
        kinds = [step["msg"][0] for step in case.script if step["from"] == "broker"]
        assert kinds[:3] == [P.WELCOME, P.SUBSCRIBED, P.ATTACHED] and kinds[-1] == P.END, (name, kinds)
    flags = {name: [line for line in play.load(play.CASES / name).expected if "flags=1" in line] for name in CASES}
    assert len(flags["discontinuity"]) == 2 and len(flags["drop-lapped"]) == 1, flags
    assert not any(flags[name] for name in ("plain", "no-clip", "bytes", "wrapped-ring")), flags
    assert play.load(play.CASES / "drop-lapped").expected[-1] == "ACK cursor=70000 delivered=32 dropped=38 held=0"
    wrapped = play.load(play.CASES / "wrapped-ring")
    attached = next(s["msg"] for s in wrapped.script if s.get("msg", [0])[0] == P.ATTACHED)
    last = max(s["position"] for s in wrapped.script if s["from"] == "publisher")
    assert attached[2] < 65536 < last, "the ring must wrap inside what the client reads"
    assert play.load(play.CASES / "publisher-gone").spec["exit"] == 4


def test_the_kit_catches_a_wrong_client(tmp_path: Path) -> None:
    """One byte of the output, a flag, a field of SUBSCRIBE: each difference fails the case and is named."""
    case = play.load(play.CASES / "plain")
    # The expected chunks altered by one byte: the right client now fails, and the diff shows the line.
    wrong = list(case.expected)
    wrong[3] = wrong[3][:-1] + ("1" if wrong[3][-1] != "1" else "2")
    outcome = play.play(case, PYTHON, expected=wrong)
    assert not outcome.ok and outcome.status == 0 and not outcome.problems
    assert f"-{wrong[3]}" in outcome.report() and f"+{case.expected[3]}" in outcome.report()
    # A client that flags a chunk it should not (its output altered on the way).
    script = tmp_path / "flagging-client"
    script.write_text(f'#!/bin/sh\n{shlex.join(PYTHON)} "$@" | sed "/^seq=2 /s/flags=0/flags=1/"\n')
    script.chmod(0o755)
    outcome = play.play(case, [str(script)])
    assert not outcome.ok and outcome.lines[2].endswith("flags=1") and "flags=1" in outcome.report()
    # A client that asks for exact chunks when the case says whole frames: refused on the wire, before any chunk.
    no_clip = play.load(play.CASES / "no-clip")
    t = time.monotonic()
    outcome = play.play(no_clip, [*PYTHON, "--clip"], timeout=10)
    assert not outcome.ok and "SUBSCRIBE" in outcome.problems[0] and "clip" in outcome.problems[0], outcome.report()
    assert time.monotonic() - t < 10


def test_segment_snapshots_are_plain_xz(tmp_path: Path) -> None:
    """The snapshots are standard .xz files (a delta filter, then LZMA2): `xz -d` or any language's liblzma reads
    them; the case.json next to them is plain JSON."""
    for name in CASES:
        raw = (play.CASES / name / "segment.xz").read_bytes()
        assert raw[:6] == b"\xfd7zXZ\x00", name
        assert len(lzma.decompress(raw, format=lzma.FORMAT_XZ)) == json.loads(
            (play.CASES / name / "case.json").read_text())["recorded"]["segment_bytes"]  # fmt: skip
