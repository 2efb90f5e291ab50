"""Control requests to a running broker (status)."""

from __future__ import annotations

from typing import Any

from . import _protocol as P
from ._client import Connection, error_for
from ._exceptions import BrokerGoneError, ProtocolError

__all__ = ["broker_status"]


def broker_status(address: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """Return the broker's streams, subscribers and pool use as plain data.

    Raises
    ------
    BrokerGoneError
        If no broker answers at ``address``.
    """
    conn = Connection(address, "ctl", "status")
    try:
        conn.send([P.STATUS])
        reply = conn.recv(timeout)
    finally:
        conn.close()
    if reply is None:
        raise BrokerGoneError(f"no STATUS answer from the broker at {conn.address} within {timeout} s")
    if reply[0] == P.ERROR:
        raise error_for(reply, "status")
    if reply[0] != P.STATUS_REPLY:
        raise ProtocolError(f"expected STATUS_REPLY, got {P.NAMES.get(reply[0], reply[0])}")
    return reply[1]  # type: ignore[no-any-return]
