"""The broker's TCP listener for remote subscribers: CURVE required, an allow-list of client keys read at each
handshake, refused handshakes said at WARNING.

:class:`TcpListener` owns the TCP ROUTER socket, pyzmq's ZAP authenticator thread and the socket's monitor;
:class:`~slabcast.broker.server.Broker` polls them in its loop and tags what comes on the socket as a TCP
client's (docs/protocol.md, section 11).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from typing import Any

import zmq

from ..wire import protocol as P
from ..wire.address import load_key

__all__ = ["TcpListener", "client_keys"]

log = logging.getLogger("slabcast.broker")

_HANDSHAKE_FAILED = int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
# Seconds a TCP peer has to complete its CURVE handshake before libzmq closes the connection (libzmq's default: 30):
# a peer without a key holds a descriptor of the broker that long at most.  (Pausing the listener when descriptors
# run short is no remedy: libzmq's unbind closes every connection it accepted, keyed clients' too.)
HANDSHAKE_IVL = 5.0
_HANDSHAKE_ERRORS = {
    int(zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC): "its hello could not be decrypted: the client holds another public "
    "key for this broker (its server key file is not this broker's *.key)",
    int(zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH): "the client does not speak CURVE (no keys given?)",
}


def client_keys(directory: str) -> dict[bytes, bool]:
    """The public keys of the ``*.key`` files in ``directory`` (ZeroMQ's certificate format), as pyzmq's
    authenticator holds them; a file or a directory that cannot be read adds none (logged)."""
    from zmq.auth import load_certificate

    keys: dict[bytes, bool] = {}
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".key"))
    except OSError as exc:
        log.warning("cannot read the client keys in %s (%s): every TCP client is refused", directory, exc)
        return keys
    for name in names:
        try:
            public, _ = load_certificate(os.path.join(directory, name))
        except (OSError, ValueError) as exc:
            log.warning("client key file %s refused (%s): it is not accepted", os.path.join(directory, name), exc)
            continue
        if public:
            keys[public] = True
    return keys


def _authenticator(base: Any, ctx: zmq.Context[Any], clients: str) -> Any:
    """pyzmq's ZAP authenticator for the ``clients`` key directory, logging each refused key at WARNING with
    the peer's address (pyzmq logs refusals at DEBUG, so an operator never saw them)."""

    class Authenticator(base):  # type: ignore[misc]
        peer = "?"
        key = "?"

        async def handle_zap_message(self, msg: list[bytes]) -> None:
            self.peer = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
            await super().handle_zap_message(msg)

        async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
            from zmq.utils import z85

            self.key = z85.encode(client_key).decode()
            # The directory as it is now, at each handshake (rare): a key added or removed counts without a restart.
            # Read here, not by configure_curve, which keeps every key it had when one file cannot be read (a key
            # half copied) or the directory is gone: a key that cannot be read is not accepted, said at WARNING.
            self.certs["*"] = client_keys(clients)
            return await super()._authenticate_curve(domain, client_key)  # type: ignore[no-any-return]

        def _send_zap_reply(self, request_id: bytes, status_code: bytes, status_text: bytes,
                            user_id: str = "anonymous") -> None:  # fmt: skip
            if status_code != b"200":
                log.warning(
                    "refused a CURVE client at %s: %s (public key %s is not in %s)",
                    self.peer, status_text.decode(errors="replace"), self.key, clients,
                )  # fmt: skip
            super()._send_zap_reply(request_id, status_code, status_text, user_id)

    return Authenticator(ctx, log=logging.getLogger("slabcast.broker.auth"))


class TcpListener:
    """A ROUTER socket listening on TCP with CURVE, for remote subscribers.

    Parameters
    ----------
    ctx : zmq.Context
        The broker's context (the authenticator is bound to it).
    tcp : str
        ``host:port`` or ``tcp://host:port`` (port 0: any free one; :attr:`address` says which).
    curve_secret : str
        The broker's secret key file (``slabcast keygen``'s ``*.key_secret``).
    curve_clients : str
        The directory of the client public keys (``*.key``) accepted, read at each handshake.

    Raises
    ------
    ValueError
        No key file or directory given, or the key file holds no secret key.
    FileNotFoundError
        The key file or the directory is missing.
    OSError
        The address cannot be listened on (a port in use: the message says so).
    """

    def __init__(self, ctx: zmq.Context[Any], tcp: str, curve_secret: str | None, curve_clients: str | None) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        if not curve_secret or not curve_clients:
            raise ValueError("TCP needs CURVE: give the broker's secret key file and a directory of client public keys")
        public, secret = load_key(curve_secret, "the broker's secret key file, --curve-secret")
        if secret is None:
            raise ValueError(f"{curve_secret} holds no secret key (use the *.key_secret file from `slabcast keygen`)")
        if not os.path.isdir(curve_clients):
            raise FileNotFoundError(f"no such directory: {curve_clients} (--curve-clients: the client public "
                                    f"key files, *.key, that this broker accepts)")  # fmt: skip
        if not client_keys(curve_clients):
            log.warning("no client key (*.key) in %s yet: every TCP client is refused until one is put there "
                        "(read at each handshake: no restart needed)", curve_clients)  # fmt: skip
        auth = _authenticator(ThreadAuthenticator, ctx, curve_clients)
        auth.start()
        sock: zmq.Socket[Any] | None = None
        try:  # (whatever fails from here closes what it made: the broker's context could not end with them open)
            auth.configure_curve(domain="*", location=curve_clients)
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_MESSAGE_BYTES)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.HEARTBEAT_IVL, int(P.HEARTBEAT_IVL * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(P.HEARTBEAT_TIMEOUT * 1000))  # (> REMOTE_SILENCE)
            sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_IVL * 1000))
            sock.curve_server = True
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            endpoint = tcp if tcp.startswith("tcp://") else f"tcp://{tcp}"
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                hint = " (another program, or another broker, listens there)" if exc.errno == errno.EADDRINUSE else ""
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise OSError(f"cannot listen on {endpoint}: {reason}{hint}") from None
            self.address: str = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            # A client that holds the wrong public key for us fails before the authenticator hears of it.
            self.monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)
        except BaseException:
            if sock is not None:
                sock.close(linger=0)
            auth.stop()
            raise
        self.sock = sock
        self._auth = auth

    def log_failed_handshakes(self) -> None:
        """Say at WARNING each handshake the monitor saw fail since the last call, and why (without waiting)."""
        from zmq.utils.monitor import parse_monitor_message

        with contextlib.suppress(zmq.Again):
            while True:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
                code = event["value"]
                reason = _HANDSHAKE_ERRORS.get(code, f"a malformed handshake (ZMTP error {code:#x})")
                log.warning("refused a CURVE handshake on %s: %s", self.address, reason)

    def close(self) -> None:
        """Close the monitor and the socket (lingering 1 s for what it still sends), stop the authenticator."""
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=1000)
        self._auth.stop()
