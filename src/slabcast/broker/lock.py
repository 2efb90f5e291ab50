"""The lock that keeps one broker per address: an ``flock`` on ``<socket path>.lock`` (ipc addresses only)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat

from .._exceptions import BrokerRunningError
from ..wire.address import dir_mode, ipc_path, socket_mode

__all__ = ["AddressLock"]


class AddressLock:
    """An exclusive ``flock`` on ``<socket path>.lock``, held for the broker's lifetime.

    ZeroMQ lets a second process bind the same ipc path and silently take the
    traffic; the lock makes the second broker fail loudly instead.  The lock file
    holds the pid of its owner.  The socket's directory is created ``0o700``, or
    ``0o750`` for group-readable segments (``shm_mode`` ``0o660``).
    """

    def __init__(self, address: str, shm_mode: int = 0o600) -> None:
        path = ipc_path(address)
        if path is None:
            raise ValueError(f"only ipc:// addresses are locked, got {address!r}")
        self.sock_path = path
        self.path = path + ".lock"
        self.shm_mode = shm_mode
        directory = os.path.dirname(path)
        want = dir_mode(shm_mode)
        os.makedirs(directory, mode=want, exist_ok=True)
        st = os.stat(directory)
        if st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) & want != want:
            # Ours, made by an earlier broker with a narrower mode (or by the umask): let the group in.
            os.chmod(directory, stat.S_IMODE(st.st_mode) | want)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise BrokerRunningError(
                f"a broker (pid {owner}) already serves {address}; stop it first or choose another address"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd
        # The lock is ours, so a socket file here is a dead broker's leftover.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def share(self) -> None:
        """Give the bound socket file the mode that matches the segments' (ZeroMQ creates it under the umask)."""
        os.chmod(self.sock_path, socket_mode(self.shm_mode))

    def release(self) -> None:
        """Remove the socket and lock files and drop the lock (idempotent)."""
        if self._fd is None:
            return
        for p in (self.sock_path, self.path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        os.close(self._fd)
        self._fd = None
