"""Play one conformance case against a client command: the broker's and the publisher's side, from the files.

    python -m conformance.play conformance/cases/plain -- clients/c/build/slabcast-sub
    python -m conformance.play conformance/cases/plain -- python -m conformance.python_client

It creates the case's segment in ``/dev/shm`` (a unique name, unlinked at the end), binds a ZeroMQ
``ROUTER`` (the broker) and an ``XPUB`` (the publisher's notice socket) in a temporary directory, runs
the client command with the case's subscriber options, follows ``messages.jsonl`` (answering what the
client sends with the recorded replies, sending the recorded notices), and compares what the client
printed, then the last ACK it sent, with ``expected.txt``.  README.md in this directory is the
specification; this file uses nothing of slabcast (msgpack and pyzmq only), so that it reads as a
statement of the kit, not of one client.
"""

from __future__ import annotations

import _posixshmem
import argparse
import base64
import ctypes
import difflib
import json
import lzma
import mmap
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq

__all__ = ["Case", "Outcome", "client_args", "load", "main", "play"]

# Message kinds (docs/protocol.md sections 4 to 6).
HELLO, SUBSCRIBE, BYE, ACK, ATTACH = 1, 5, 7, 13, 15
WELCOME, SUBSCRIBED, END, ATTACHED = 101, 104, 106, 112
NAMES = {HELLO: "HELLO", SUBSCRIBE: "SUBSCRIBE", BYE: "BYE", ACK: "ACK", ATTACH: "ATTACH", WELCOME: "WELCOME",
         SUBSCRIBED: "SUBSCRIBED", END: "END", ATTACHED: "ATTACHED", 120: "NOTICE", 121: "NOTICE_END",
         122: "JOINED"}  # fmt: skip
# Words of the segment header the player stores as the publisher would (docs/protocol.md 7.2): the ring's position
# (u64, whose low 32 bits are the futex word) and closed (u32).
POSITION_AT, CLOSED_AT = 152, 172
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine)
# SUBSCRIBE's fields a client's request must equal the recorded one in: name, size, seconds, clip, policy,
# max_inflight, sampler, cut, wait (not the token, random, nor history and wake, a client's own choices).
SUBSCRIBE_CHECKED = slice(1, 10)
CASES = Path(__file__).resolve().parent / "cases"


@dataclass
class Case:
    """One case as read from its directory."""

    name: str
    path: Path
    spec: dict[str, Any]  # case.json
    segment: bytes  # segment.xz, decompressed
    script: list[dict[str, Any]]  # messages.jsonl, one dict per line
    expected: list[str]  # expected.txt, one string per line


@dataclass
class Outcome:
    """What one run of a client against a case gave."""

    lines: list[str]  # the client's chunk lines, then the ACK line the player adds
    expected: list[str]
    status: int | None  # the client's exit status (None: killed after the timeout)
    want_status: int
    stderr: str
    problems: list[str] = field(default_factory=list)  # what went wrong on the wire, if anything
    unsettled: int = 0  # publisher steps taken before the client's ACK said it had caught up (README.md)

    @property
    def ok(self) -> bool:
        return not self.problems and self.lines == self.expected and self.status == self.want_status

    def report(self) -> str:
        """A human-readable account of every difference (empty when ``ok``)."""
        out = list(self.problems)
        if self.status != self.want_status:
            out.append(f"exit status {self.status}, the case expects {self.want_status}")
        if self.lines != self.expected:
            diff = difflib.unified_diff(self.expected, self.lines, "expected.txt", "client", lineterm="", n=2)
            out.append("\n".join(list(diff)[:60]))
        if out and self.stderr.strip():
            out.append("client stderr:\n" + self.stderr.strip()[-2000:])
        return "\n".join(out)


def load(path: str | Path) -> Case:
    """Read a case directory (README.md, "A case")."""
    path = Path(path)
    spec = json.loads((path / "case.json").read_text())
    script = [json.loads(line, object_hook=_from_json) for line in (path / "messages.jsonl").read_text().splitlines()]
    expected = path / "expected.txt"  # (not yet there while the recorder makes the case)
    return Case(path.name, path, spec, lzma.decompress((path / "segment.xz").read_bytes()), script,
                expected.read_text().splitlines() if expected.exists() else [])  # fmt: skip


def _from_json(obj: dict[str, Any]) -> Any:
    return base64.b64decode(obj["bin"]) if obj.keys() == {"bin"} else obj


def client_args(spec: dict[str, Any]) -> list[str]:
    """The options a client is run with for a case (after ``--address ADDR --stream NAME``)."""
    sub = spec["subscriber"]
    args = ["--size", str(sub["size"])] if sub.get("size") is not None else ["--seconds", repr(sub["seconds"])]
    args += ["--policy", sub["policy"], "--max-inflight", str(sub["max_inflight"]), "--show-flags"]
    if sub["clip"]:
        args.append("--clip")
    if sub.get("sampler") is not None:
        args += ["--sampler", repr(sub["sampler"])]
    if sub.get("show_times"):
        args.append("--show-times")
    return args


class _Fail(Exception):
    pass


class _Segment:
    """The case's segment in /dev/shm, mapped; :meth:`publish` stores its position as a publisher does."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name = name
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, len(data))
            os.pwrite(fd, data, 0)
            self.mm = mmap.mmap(fd, len(data))
        except BaseException:
            os.close(fd)
            _posixshmem.shm_unlink("/" + name)
            raise
        os.close(fd)
        self.q = memoryview(self.mm)[:256].cast("Q")  # one aligned 8-byte store per element
        self.w = memoryview(self.mm)[:256].cast("I")
        self._word = ctypes.c_char.from_buffer(self.mm, POSITION_AT)

    def publish(self, position: int, closed: int) -> None:
        """Store the position, then closed, and wake every futex waiter (what a publisher does after a write;
        x86-64 keeps the stores in order, and the frames are in place already)."""
        self.q[POSITION_AT // 8] = position
        self.w[CLOSED_AT // 4] = closed
        if _SYS_FUTEX is not None:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall(_SYS_FUTEX, ctypes.c_void_p(ctypes.addressof(self._word)), 1, 0x7FFFFFFF, None, None, 0)

    def destroy(self) -> None:
        del self._word
        self.q.release()
        self.w.release()
        self.mm.close()
        _posixshmem.shm_unlink("/" + self.name)


class _Player:
    """The broker's ROUTER and the publisher's XPUB, and where the script is."""

    def __init__(self, case: Case, directory: Path, segment: str) -> None:
        self.case = case
        self.segment = segment
        self.proc: Any = None  # the client, once started
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.address = f"ipc://{directory}/broker.sock"
        self.router.bind(self.address)
        self.xpub = self.ctx.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.LINGER, 0)
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.notice_endpoint = f"ipc://{directory}/notices.sock"
        self.xpub.bind(self.notice_endpoint)
        self.ident = b""
        self.token = b""
        self.sleeper = False  # the client's ATTACH asked for a sleeper byte
        self.topics: set[bytes] = set()
        self.last_ack: list[Any] | None = None
        self.pending: list[list[Any]] = []  # messages that came while the player waited for an ACK
        self.unsettled = 0  # publisher steps taken without the ACK that says the client caught up
        self.deadline = 0.0

    def close(self) -> None:
        self.router.close(linger=0)
        self.xpub.close(linger=0)
        self.ctx.term()

    def _wait(self, sock: Any, what: str) -> None:
        while not sock.poll(50):
            if self.proc.poll() is not None:
                raise _Fail(f"the client exited ({self.proc.returncode}) while the player waited for {what}")
            if time.monotonic() > self.deadline:
                raise _Fail(f"the client sent no {what} within the case's time")

    def _next(self) -> list[Any]:
        self.ident, raw = self.router.recv_multipart()
        try:
            msg = msgpack.unpackb(raw)
        except Exception as exc:
            raise _Fail(f"the client sent something that is not msgpack: {raw[:40]!r}") from exc
        if not isinstance(msg, list) or not msg or not isinstance(msg[0], int):
            raise _Fail(f"the client sent {msg!r}, not a msgpack array whose first element is a kind")
        if msg[0] == ACK:
            if len(msg) < 5 or not all(isinstance(v, int) and v >= 0 for v in msg[1:5]):
                raise _Fail(f"ACK {msg!r}: the case expects cursor, delivered, dropped and held, each a uint")
            self.last_ack = msg
        return msg

    def caught_up(self, cursor: int, bound: float) -> None:
        """Wait (at most ``bound`` seconds) for an ACK saying the client has cut up to ``cursor``: it has read the
        ring to its position and is about to wait, so the next publish must wake it.  (A client ACKs before it
        waits when its counters changed; one whose last frames changed none may not, hence the bound.)"""
        until = time.monotonic() + bound
        while self.last_ack is None or self.last_ack[1] < cursor:
            left = until - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.unsettled += 1
                return
            if self.router.poll(int(left * 1000) + 1):
                msg = self._next()
                if msg[0] != ACK:
                    self.pending.append(msg)

    def recv(self, what: str) -> list[Any]:
        """The client's next message other than ACK (ACKs are noted: the last one is part of the output)."""
        while True:
            if self.pending:
                return self.pending.pop(0)
            self._wait(self.router, what)
            msg = self._next()
            if msg[0] != ACK:
                return msg

    def fill(self, value: Any) -> Any:
        """The recorded value with this run's names in place of the placeholders."""
        if isinstance(value, list):
            return [self.fill(v) for v in value]
        if isinstance(value, dict):
            return {k: self.fill(v) for k, v in value.items()}
        return {"$segment": self.segment, "$notice_endpoint": self.notice_endpoint, "$token": self.token}.get(
            value, value) if isinstance(value, str) else value  # fmt: skip

    def expect(self, want: list[Any]) -> None:
        kind = want[0]
        got = self.recv(NAMES.get(kind, str(kind)))
        if got[0] != kind:
            raise _Fail(f"the client sent {NAMES.get(got[0], got[0])} {got!r}, the case expects {NAMES.get(kind)}")
        if kind == HELLO and (got[1:2] != want[1:2] or got[3:4] != ["sub"]):
            raise _Fail(f"HELLO {got!r}: the case expects version {want[1]} and role 'sub'")
        if kind == SUBSCRIBE:
            if got[SUBSCRIBE_CHECKED] != want[SUBSCRIBE_CHECKED]:
                raise _Fail(f"SUBSCRIBE {got[SUBSCRIBE_CHECKED]!r}: the case expects {want[SUBSCRIBE_CHECKED]!r} "
                            "(name, size, seconds, clip, policy, max_inflight, sampler, cut, wait)")  # fmt: skip
            if len(got) < 11 or not isinstance(got[10], bytes) or not 1 <= len(got[10]) <= 32:
                raise _Fail(f"SUBSCRIBE {got!r} has no token of 1 to 32 bytes")
            self.token = got[10]
        if kind == ATTACH:
            self.sleeper = len(got) > 2 and got[2] is True

    def send(self, msg: list[Any]) -> None:
        msg = self.fill(msg)
        if msg[0] == ATTACHED and len(msg) > 3 and not self.sleeper:
            msg[3] = None  # no sleeper byte for a client that did not ask for one
        self.router.send_multipart([self.ident, msgpack.packb(msg, use_bin_type=True)])

    def notice(self, topic: str, msg: list[Any]) -> None:
        stream = self.case.spec["stream"]["name"].encode() + b"\0"
        if topic == "token":
            # Once the client subscribed to both its topics (the XPUB sees them), as a publisher does.
            want = {b"\x01" + stream, b"\x01\x01" + self.token}
            while not want <= self.topics:
                self._wait(self.xpub, "subscription on the notice socket")
                self.topics.add(self.xpub.recv())
        prefix = b"\x01" + self.token if topic == "token" else stream
        self.xpub.send(prefix + msgpack.packb(self.fill(msg), use_bin_type=True))


def play(case: Case | str | Path, command: list[str], timeout: float = 20.0, *,
         expected: list[str] | None = None, settle: float = 0.3) -> Outcome:  # fmt: skip
    """Run ``command`` (a client, README.md "The client") against ``case``; return what happened.

    ``expected`` replaces the case's expected.txt (to prove that a difference is caught); ``settle`` is how long
    the player waits for the client's ACK before a publisher step.
    """
    if not isinstance(case, Case):
        case = load(case)
    spec = case.spec
    name = f"slabcast-conformance.{os.getpid()}.{secrets.token_hex(4)}"
    directory = Path(tempfile.mkdtemp(prefix="slabcast-conf-"))
    segment = _Segment(name, case.segment)
    player = None
    proc = None
    problems: list[str] = []
    script = case.script
    try:
        if script and script[0]["from"] == "publisher":  # the segment as the client first sees it
            segment.publish(script[0]["position"], script[0]["closed"])
            script = script[1:]
        player = _Player(case, directory, name)  # (bound before the client starts: it connects at once)
        with open(directory / "stdout", "wb") as out, open(directory / "stderr", "wb") as err:
            proc = subprocess.Popen([*command, "--address", player.address, "--stream", spec["stream"]["name"],
                                     *client_args(spec)], stdout=out, stderr=err)  # fmt: skip
        player.proc = proc
        player.deadline = time.monotonic() + timeout
        try:
            for step in script:
                if step["from"] == "client":
                    if step["msg"][0] != ACK:  # (the recorded client's ACKs: when a client sends them is its own)
                        player.expect(step["msg"])
                elif step["from"] == "broker":
                    player.send(step["msg"])
                elif step["from"] == "publisher":
                    player.caught_up(step["after"], settle)
                    segment.publish(step["position"], step["closed"])
                else:
                    player.notice(step["topic"], step["msg"])
        except _Fail as exc:
            problems.append(str(exc))
        try:
            # After a failure the client may wait for an answer that will not come: it is killed soon after.
            proc.wait(1.0 if problems else max(1.0, player.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if not problems:
                problems.append(f"the client did not exit within {timeout} s")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if player is not None:
            player.close()
        segment.destroy()
        stdout = (directory / "stdout").read_text(errors="replace") if (directory / "stdout").exists() else ""
        stderr = (directory / "stderr").read_text(errors="replace") if (directory / "stderr").exists() else ""
        shutil.rmtree(directory, ignore_errors=True)
    lines = [line for line in stdout.splitlines() if line != "ready"]
    ack = player.last_ack if player is not None else None
    lines.append("ACK " + (" ".join(f"{k}={v}" for k, v in zip(("cursor", "delivered", "dropped", "held"), ack[1:5],
                                                                 strict=False)) if ack else "none"))  # fmt: skip
    return Outcome(lines, case.expected if expected is None else expected, proc.returncode if proc else None,
                   spec["exit"], stderr, problems, player.unsettled if player is not None else 0)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m conformance.play", description="Run a client against slabcast conformance cases.",
        epilog="example: python -m conformance.play conformance/cases -- clients/c/build/slabcast-sub")  # fmt: skip
    parser.add_argument("cases", nargs="+", help="case directories, or a directory of them")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per case (default 20)")
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        parser.error("give the client command after --")
    at = argv.index("--")
    ns = parser.parse_args(argv[:at])
    command = argv[at + 1 :]
    dirs: list[Path] = []
    for p in map(Path, ns.cases):
        dirs += [p] if (p / "case.json").exists() else sorted(d for d in p.iterdir() if (d / "case.json").exists())
    failed = 0
    for d in dirs:
        outcome = play(d, command, ns.timeout)
        print(f"{'ok  ' if outcome.ok else 'FAIL'} {d.name}" + (f" ({outcome.unsettled} steps unsettled)"
                                                                  if outcome.unsettled else ""))  # fmt: skip
        if not outcome.ok:
            failed += 1
            print("    " + outcome.report().replace("\n", "\n    "))
    print(f"{len(dirs) - failed} of {len(dirs)} cases passed ({shlex.join(command)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
