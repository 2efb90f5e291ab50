"""Control requests to a running broker (status)."""

from __future__ import annotations

from typing import Any

from .._exceptions import BrokerGoneError, ProtocolError
from .._info import StreamStatistics
from ..client.connection import Connection, error_for
from ..wire import protocol as P

__all__ = ["broker_status", "stream_statistics"]


def _request(address: str | None, msg: list[Any], expect: int, timeout: float,
             curve: tuple[str, str] | None = None) -> Any:  # fmt: skip
    conn = Connection(address, "ctl", "control", curve=curve)
    try:
        conn.send(msg)
        reply = conn.recv(timeout)
    finally:
        conn.close()
    if reply is None:
        raise BrokerGoneError(f"no answer from the broker at {conn.address} within {timeout} s")
    if reply[0] == P.ERROR:
        raise error_for(reply, P.NAMES[msg[0]].lower())
    if reply[0] != expect:
        raise ProtocolError(f"expected {P.NAMES[expect]}, got {P.NAMES.get(reply[0], reply[0])}")
    return reply[1]


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
    raw = _request(address, [P.STATS, name], P.STATS_REPLY, timeout, curve)
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
    return _request(address, [P.STATUS], P.STATUS_REPLY, timeout, curve)  # type: ignore[no-any-return]
