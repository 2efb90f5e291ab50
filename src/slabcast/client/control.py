"""Control requests to a running broker (status)."""

from __future__ import annotations

from typing import Any

from .._exceptions import BrokerGoneError
from .._info import StreamStatistics
from ..client.connection import Connection, error_for, unexpected
from ..wire import messages as M

__all__ = ["broker_status", "slab_holders", "stream_statistics"]


def _request(address: str | None, msg: M.Stats | M.Status, expect: type[M.StatsReply | M.StatusReply],
             timeout: float, curve: tuple[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    conn = Connection(address, "ctl", "control", curve=curve, timeout=timeout)  # (its HELLO too)
    try:
        conn.send(msg)
        reply = conn.recv(timeout)
    finally:
        conn.close()
    if reply is None:
        raise BrokerGoneError(f"no answer from the broker at {conn.address} within {timeout} s")
    if isinstance(reply, M.Error):
        raise error_for(reply, type(msg).__name__.lower())
    if not isinstance(reply, expect):
        raise unexpected(reply, expect.__name__, "control")
    return reply[0]


def stream_statistics(name: str, address: str | None = None, timeout: float = 5.0,
                      curve: tuple[str, str] | None = None) -> StreamStatistics:  # fmt: skip
    """Return a stream's totals and rolling per-channel statistics (mean, std, min, max, peak-to-peak).

    ``curve``: for a ``tcp://`` address, this client's secret key file and the
    broker's public key file (``slabcast keygen``).

    Raises
    ------
    StreamNotFoundError
        If the broker has no such stream.
    BrokerGoneError
        If no broker answers at ``address``.
    """
    raw = _request(address, M.Stats(name), M.StatsReply, timeout, curve)
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in raw.items()}
    return StreamStatistics(**{k: v for k, v in fields.items() if k in StreamStatistics.__dataclass_fields__})


def broker_status(address: str | None = None, timeout: float = 5.0,
                  curve: tuple[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Return the broker's streams, subscribers and pool use as plain data.

    ``curve``: for a ``tcp://`` address, this client's secret key file and the
    broker's public key file (``slabcast keygen``).

    Raises
    ------
    BrokerGoneError
        If no broker answers at ``address``.
    """
    return _request(address, M.Status(), M.StatusReply, timeout, curve)


def slab_holders(address: str | None, stream: str, timeout: float = 0.5) -> str:
    """What the broker's status says of who holds a stream's slabs, for a publisher's ``WriteTimeout``:
    ``"; the broker says furthest behind: ...; holding chunks: ..."`` (the ``block`` subscriber furthest behind, those
    holding chunks), or "" when no answer comes within ``timeout`` or it names nobody."""
    try:
        rows = broker_status(address, timeout=timeout)["streams"]
    except Exception:  # (best effort: the error says what it knows without it)
        return ""
    subs: list[dict[str, Any]] = next((s.get("subscribers", []) for s in rows if s.get("name") == stream), [])
    said = []
    behind = max((u for u in subs if u.get("policy") == "block"), key=lambda u: u.get("lag_samples", 0),
                 default=None)  # fmt: skip
    if behind is not None and behind.get("lag_samples", 0) > 0:
        lag = behind.get("lag_seconds")
        said.append(f"furthest behind: {behind.get('label')!r} (pid {behind.get('pid')}, policy block, "
                    + (f"{lag:.3g} s" if lag is not None else f"{behind['lag_samples']} samples") + " behind)")
    holders = [f"{u.get('label')!r} (pid {u.get('pid')}, {u['leases']})" for u in subs if u.get("leases")]
    if holders:
        said.append("holding chunks: " + ", ".join(holders[:4]) + (" ..." if len(holders) > 4 else ""))
    return "; the broker says " + "; ".join(said) if said else ""
