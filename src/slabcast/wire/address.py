"""Broker addresses, for clients and broker alike: the per-user default, the endpoint forms, ipc path checks.

The lock that keeps one broker per address is the broker's own (:mod:`slabcast.broker.lock`)."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile

from .._exceptions import AccessDeniedError

__all__ = ["check_private_dir", "default_address", "dir_mode", "ipc_path", "load_key", "normalize", "socket_mode"]

ENV = "SLABCAST_ADDRESS"
_IPC_MAX = 107  # sun_path is 108 bytes including the NUL
_NOTICE_SUFFIX = 17  # ".<epoch>.<stream id>": each stream's notice socket sits beside the broker's (docs/protocol.md)


def default_address() -> str:
    """Return ``$SLABCAST_ADDRESS``, else ``ipc://<runtime dir>/slabcast/broker.sock``.

    The runtime dir is ``$XDG_RUNTIME_DIR`` when set, else ``<tmp>/slabcast-<uid>``,
    made ``0700`` here if it does not exist yet.

    Raises
    ------
    AccessDeniedError
        If ``<tmp>/slabcast-<uid>`` (or its ``slabcast`` directory) is not a
        directory owned by this user without group or other write permission:
        another user made it and could hold the address (as ssh-agent and tmux check).
    """
    env = os.environ.get(ENV)
    if env:
        return normalize(env)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        runtime = os.path.join(tempfile.gettempdir(), f"slabcast-{os.getuid()}")
        # Made now, by us, if nobody made it first; then whoever made it must be us.
        with contextlib.suppress(OSError):  # exists already, or the temp dir is not writable (the bind says so)
            os.mkdir(runtime, 0o700)
        for path in (runtime, os.path.join(runtime, "slabcast")):
            if os.path.lexists(path):
                check_private_dir(path)
    path = os.path.join(runtime, "slabcast", "broker.sock")
    try:
        return normalize(path)
    except ValueError as exc:
        where = f"XDG_RUNTIME_DIR={runtime!r}" if os.environ.get("XDG_RUNTIME_DIR") else f"the temp dir ({runtime!r})"
        raise ValueError(f"the default broker address comes from {where} and {exc}; "
                         f"set {ENV} to a shorter socket path") from None  # fmt: skip


def socket_mode(shm_mode: int) -> int:
    """The mode of the broker's socket files for segments of ``shm_mode``: whoever may read the segments may
    connect (which needs write permission on the socket file)."""
    mode = 0o600
    if shm_mode & 0o060:
        mode |= 0o060
    if shm_mode & 0o006:
        mode |= 0o006
    return mode


def dir_mode(shm_mode: int) -> int:
    """The mode of the socket's directory the broker makes: entered by whoever may connect, written by the
    broker's user only."""
    mode = 0o700
    if shm_mode & 0o060:
        mode |= 0o050
    if shm_mode & 0o006:
        mode |= 0o005
    return mode


def check_private_dir(path: str) -> None:
    """Refuse a directory that is not ours alone: a symlink, or not owned by this user, or writable by others.

    Raises
    ------
    AccessDeniedError
        Naming the path, its owner and its mode.
    """
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    problem = None
    if not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory"
    elif st.st_uid != os.getuid():
        problem = f"belongs to another user, not to this one (uid {os.getuid()})"
    elif mode & 0o022:
        problem = "can be written by other users"
    if problem is not None:
        raise AccessDeniedError(
            f"refusing the broker directory {path} (owner uid {st.st_uid}, mode {mode:04o}, "
            f"{stat.filemode(st.st_mode)}): it {problem}, so another user could hold the broker's address there; "
            f"remove it, or set XDG_RUNTIME_DIR or {ENV}"
        )


def normalize(address: str | os.PathLike[str] | None) -> str:
    """Return a ZeroMQ endpoint: ``None`` -> the default, a bare path -> ``ipc://<absolute path>``.

    Raises
    ------
    ValueError
        If the address is neither ``ipc://``, ``tcp://`` nor a path, or if an ipc
        path is longer than the 107 bytes a Unix socket address can hold.
    """
    if address is None:
        return default_address()
    text = os.fspath(address)
    if not text:
        raise ValueError("address must be an ipc:// endpoint, a tcp:// endpoint or a socket path, got ''")
    if text.startswith("tcp://"):
        return text
    if "://" in text and not text.startswith("ipc://"):
        raise ValueError(f"address must be an ipc:// endpoint, a tcp:// endpoint or a socket path, got {text!r}")
    raw = text.removeprefix("ipc://")
    if raw.startswith("@"):
        raise ValueError(
            f"abstract sockets ({text!r}) are not supported: a broker keeps its lock file and its streams' notice "
            f"sockets beside its socket file; give a path"
        )
    path = os.path.abspath(raw)
    limit = _IPC_MAX - _NOTICE_SUFFIX
    if len(path.encode()) > limit:
        raise ValueError(
            f"ipc socket path must be at most {limit} bytes (a Unix socket address holds {_IPC_MAX}, and each "
            f"stream's notice socket adds up to {_NOTICE_SUFFIX}), got {len(path.encode())}: {path!r}"
        )
    return f"ipc://{path}"


def ipc_path(address: str) -> str | None:
    """Return the socket file path of an ``ipc://`` address, ``None`` for other transports."""
    return address[len("ipc://") :] if address.startswith("ipc://") else None


def load_key(path: str, what: str) -> tuple[bytes, bytes | None]:
    """The CURVE key pair in ``path`` (a file ``slabcast keygen`` wrote: ``NAME.key`` holds the public key,
    ``NAME.key_secret`` both), as ``(public, secret or None)``.

    Raises
    ------
    FileNotFoundError
        No such file, saying which key (``what``) was looked for.
    ValueError
        The file holds no key (ZeroMQ's certificate format).
    """
    from zmq.auth import load_certificate

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such key file: {path} ({what}; `slabcast keygen NAME` writes NAME.key and "
                                f"NAME.key_secret)")  # fmt: skip
    try:
        return load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} holds no CURVE key ({what}): {exc}") from None
