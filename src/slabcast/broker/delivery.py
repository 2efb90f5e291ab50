"""Chunks the broker cuts itself (protocol version 1 and TCP subscribers): rechunking, leases, credit, backlog.

Functions over a :class:`~slabcast.broker.model.BrokerCutSub` that append what to
send to ``out`` (a list of :class:`~slabcast.broker.state.Out`); the time is passed in.
"""

from __future__ import annotations

import logging
from typing import Any

from ..wire import messages as M
from ..wire import protocol as P
from .checks import PAUSE_PREFETCH_MAX
from .model import BrokerCutSub, Out, Stream

__all__ = ["cut", "overdue", "release"]

log = logging.getLogger("slabcast.broker")


def cut(stream: Stream, n: int, t0: float, jump: int, ns: tuple[int, ...] | None, t0s: tuple[float, ...] | None,
        now: float, out: list[Out]) -> None:  # fmt: skip
    """Frames of ``n`` samples in all (``ns``/``t0s`` for a batch) landed: cut and send each subscriber's chunks."""
    broker_cut = stream.broker_cut
    if jump:
        # The source was swapped or reconnected: no chunk may span the jump.
        for sub in broker_cut:
            sub.chunker.start = None
            sub.jumped = True
    for k, t in zip(ns or (n,), t0s or (t0,), strict=True):
        index = stream.head
        stream.head = index + k
        for sub in broker_cut:
            chunks = sub.chunker.feed(index, k, t)
            if sub.chunker.jumped:  # the clock stepped back (no rate): the sampler's schedule restarted
                sub.chunker.jumped = False
                sub.jumped = True
            for start, length, ct0 in chunks:
                _emit(stream, sub, start, length, ct0, now, out)


def _emit(stream: Stream, sub: BrokerCutSub, start: int, length: int, t0: float, now: float,
          out: list[Out]) -> None:  # fmt: skip
    seq = sub.seq
    sub.seq = seq + 1
    if sub.policy == "drop" and (sub.inflight >= sub.max_inflight or sub.backlog):
        sub.dropped += 1
        return
    offset = stream.base_offset + (start - stream.base_index) * stream.sample_bytes
    remote = sub.client.remote
    flags = P.FLAG_INLINE if remote else 0
    if sub.jumped:
        sub.jumped = False
        flags |= P.FLAG_DISCONTINUITY
    chunk = M.Chunk(seq, start, length, t0, 0 if remote else offset, flags)
    slab = stream.pool.current
    assert slab is not None
    stream.pool.pin(slab)
    sub.leases[seq] = slab
    sub.starts[seq] = start
    if sub.inflight < sub.max_inflight and not sub.backlog:
        _deliver(sub, seq, chunk, offset, length * stream.sample_bytes, now, out)
    else:
        sub.backlog.append((seq, chunk, offset, length * stream.sample_bytes))
        sub.overflows += 1


def _deliver(sub: BrokerCutSub, seq: int, chunk: Any, offset: int, nbytes: int, now: float,
             out: list[Out]) -> None:  # fmt: skip
    sub.inflight += 1
    sub.delivered += 1
    sub.delivered_at.append((seq, now))
    if sub.client.remote:
        # A TCP client shares no memory with us: the samples travel in a second message part, copied now.
        stream = sub.stream
        out.append(Out(sub.client.ident, chunk, stream.u8[offset : offset + nbytes].tobytes()))
        stream.pool.unpin(sub.leases.pop(seq))  # the bytes were copied
        sub.remote_held.add(seq)
    else:
        out.append(Out(sub.client.ident, chunk))


def release(sub: BrokerCutSub, msg: M.Release, now: float, out: list[Out]) -> list[int]:
    """RELEASE: unpin the chunks, take the pauses, deliver what the credit now allows; return the seqs it
    released without holding them."""
    stream = sub.stream
    unknown = []
    for seq in msg.seqs:
        sub.starts.pop(seq, None)
        slab = sub.leases.pop(seq, None)
        if slab is not None:
            stream.pool.unpin(slab)
        elif seq in sub.remote_held:
            sub.remote_held.discard(seq)
        else:
            unknown.append(seq)
            continue
        sub.inflight -= 1
    for value in msg.pauses[: PAUSE_PREFETCH_MAX - len(sub.pauses)]:
        if 0 <= value <= P.MAX_SAMPLER_SECONDS:
            sub.pauses.append(float(value))
    while sub.backlog and sub.inflight < sub.max_inflight and sub in stream.subs:
        _deliver(sub, *sub.backlog.popleft(), now, out)
    if sub.end is not None and not sub.backlog:
        code, message = sub.end
        sub.end = None
        out.append(Out(sub.client.ident, M.End(code, message, sub.seq)))
    return unknown


def overdue(sub: BrokerCutSub, now: float, lease_timeout: float) -> bool:
    """Whether ``sub`` has held a chunk longer than ``lease_timeout`` (then logged: the caller evicts it)."""
    held = sub.delivered_at
    while held and held[0][0] not in sub.leases and held[0][0] not in sub.remote_held:
        held.popleft()
    if not held or now - held[0][1] <= lease_timeout:
        return False
    # Evicting stops the chunks and frees its queue; memory it may still see stays leased
    # until it releases it or dies, because overwriting a visible chunk is never an option.
    log.warning(
        "evicting %s (pid %d) from %r: chunk seq=%d held for %.1f s > lease_timeout %.1f s",
        sub.client.label, sub.client.pid, sub.stream.name, held[0][0], now - held[0][1], lease_timeout,
    )  # fmt: skip
    held.clear()
    return True
